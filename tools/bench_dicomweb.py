"""DICOMweb benchmark: our server against Orthanc's DICOMweb plugin, same machine, same data.

    .venv/bin/python -m tools.bench_dicomweb                        # full run (minutes, 2 cores)
    .venv/bin/python -m tools.bench_dicomweb --ct 40 --studies 500  # quick look
    .venv/bin/python -m tools.bench_dicomweb --database-url postgresql://postgres@127.0.0.1:5432/postgres

What it measures, first on Orthanc (with its DICOMweb plugin), then on our server; one server
runs at a time and both get the same generated files:

1. stow: STOW-RS of ``--ct`` 512x512 CT slices, ``--batch`` instances per multipart request,
   requests one after the other on one keep-alive connection (instances/s).
2. qido: ``/studies?...`` on a catalog of ``--studies`` one-instance studies (loaded untimed:
   ours with ``import``, Orthanc with REST ``POST /instances``): by PatientID (one match), by
   PatientName ``LEW*`` (a few percent) and by a StudyDate range (a tenth). Each query runs once
   to warm up (hit counts checked against what was generated), then ``--repeat`` times; the
   median is reported. No includefield: both servers return their default attributes.
3. metadata: WADO-RS ``/studies/{s}/series/{se}/metadata`` of the CT series (median of
   ``--repeat``).
4. retrieve: WADO-RS of the CT series as ``multipart/related; type="application/dicom";
   transfer-syntax=*`` (MB/s of the whole body, best of 3).
5. frames: what OHIF does to show the series: ``/frames/1`` of every instance, Accept
   ``multipart/related; type=application/octet-stream; transfer-syntax=*``, over 6 connections
   as a browser would (frames/s).

The client is Python's http.client with keep-alive connections; bodies are read completely and
not parsed while timed. Ratios read as in tools/bench_dimse.py: above 1 means ours is faster.
Needs Orthanc and its DICOMweb plugin (Debian packages ``orthanc`` and ``orthanc-dicomweb``),
installed with apt-get when missing and this runs as root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from tools.bench_dimse import (
    Figure,
    FindQuery,
    Series,
    add_rounds_option,
    cpu_seconds,
    generate_catalog,
    generate_ct,
    print_table,
    run_rounds,
)
from tools.generate import StudySpec
from tools.orthanc import ORTHANC_BINARY, OrthancProcess
from tools.procs import OurServer, ensure_tools, log, scratch_databases, write_config

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MEASUREMENTS = ("stow", "qido", "metadata", "retrieve", "frames")
BOUNDARY = "bench-dicomweb-boundary-7f3a"


class Target:
    """A DICOMweb server under test: its HTTP port, root path, process and catalog loading."""

    name = ""

    def __init__(self) -> None:
        self.http_port = 0
        self.root = "/dicom-web"
        self.pid = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def load_catalog(self, files: Sequence[Path], directory: Path) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=600)


class OrthancTarget(Target):
    name = "orthanc"

    def __init__(self, work: Path, binary: str) -> None:
        super().__init__()
        self.orthanc = OrthancProcess(
            work,
            binary=binary,
            extra={
                "Plugins": [DICOMWEB_PLUGIN],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            },
        )
        self.http_port = self.orthanc.http_port

    def start(self) -> None:
        self.orthanc.start()
        assert self.orthanc.proc is not None
        self.pid = self.orthanc.proc.pid

    def stop(self) -> None:
        self.orthanc.stop()

    def load_catalog(self, files: Sequence[Path], directory: Path) -> None:
        accepted = self.orthanc.upload(files, connections=4)
        if accepted != len(files):
            log(f"  WARNING: Orthanc accepted {accepted} of {len(files)} catalog files")

    def describe(self) -> str:
        return f"Orthanc {self.orthanc.version()} + DICOMweb plugin (SQLite index)"


class OursTarget(Target):
    name = "ours"

    def __init__(self, work: Path, database_url: str, durability: str = "power-loss") -> None:
        super().__init__()
        config = write_config(work / "config")
        self.server = OurServer(work / "data", config, database_url)
        self.server.env["IMAGING_DURABILITY"] = durability
        self.durability = durability
        self.http_port = self.server.http_port

    def start(self) -> None:
        self.server.start()
        assert self.server.proc is not None
        self.pid = self.server.proc.pid

    def stop(self) -> None:
        self.server.stop()

    def load_catalog(self, files: Sequence[Path], directory: Path) -> None:
        self.server.stop()  # the bulk import opens the catalog itself
        self.server.import_paths([directory])
        self.start()

    def describe(self) -> str:
        db = self.server.database_url.split("@")[-1] if self.server.database_url else "SQLite"
        return f"ours ({sys.executable} -m server, catalog {db}, durability {self.durability})"


def ensure_plugin(orthanc_binary: str) -> None:
    ensure_tools(orthanc_binary)
    if Path(DICOMWEB_PLUGIN).is_file():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing orthanc-dicomweb with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "orthanc-dicomweb"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    if not Path(DICOMWEB_PLUGIN).is_file():
        raise SystemExit(
            f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN}); "
            "apt-get install orthanc-dicomweb"
        )


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def measure_stow(target: Target, ct: Series, batch: int, figure: Figure) -> None:
    conn = target.connection()
    cpu_before = cpu_seconds(target.pid)
    elapsed = 0.0
    stored = 0
    for start in range(0, len(ct.files), batch):
        parts = [
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
            for p in ct.files[start : start + batch]
        ]
        body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
        }
        seconds, (status, payload) = _timed(
            lambda b=body, h=headers: request(conn, "POST", f"{target.root}/studies", h, b)
        )
        elapsed += seconds
        if status != 200:
            figure.problem(target.name, f"STOW answered {status}: {payload[:200]!r}")
            continue
        referenced = orjson.loads(payload).get("00081199", {}).get("Value", [])
        stored += len(referenced)
    conn.close()
    figure.cpu_s[target.name] = cpu_seconds(target.pid) - cpu_before
    if stored != len(ct.files):
        figure.problem(target.name, f"{stored} of {len(ct.files)} instances stored")
    figure.values[target.name] = len(ct.files) / elapsed


def measure_qido(target: Target, query: FindQuery, repeat: int, figures: dict[str, Figure]) -> None:
    params = "&".join(f"{k}={v}" for k, v in query.keys.items())
    path = f"{target.root}/studies?{params}"
    name = query.name.replace("find", "QIDO")
    figure = figures.setdefault(name, Figure(name, "ms", False, expected_hits=query.expected))
    conn = target.connection()
    status, body = request(conn, "GET", path, {"Accept": "application/dicom+json"})
    hits = len(orjson.loads(body)) if status == 200 and body else 0
    figure.hits[target.name] = hits
    if hits != query.expected:
        figure.problem(target.name, f"{hits} results, {query.expected} expected (HTTP {status})")
    cpu_before = cpu_seconds(target.pid)
    times = []
    for _ in range(repeat):
        seconds, _ = _timed(
            lambda: request(conn, "GET", path, {"Accept": "application/dicom+json"})
        )
        times.append(seconds)
    figure.cpu_s[target.name] = (cpu_seconds(target.pid) - cpu_before) / repeat
    figure.values[target.name] = statistics.median(times) * 1000
    conn.close()


def _series_path(target: Target, ct: Series) -> str:
    return f"{target.root}/studies/{ct.study_uid}/series/{ct.series_uid}"


def measure_metadata(target: Target, ct: Series, repeat: int, figure: Figure) -> None:
    conn = target.connection()
    path = f"{_series_path(target, ct)}/metadata"
    headers = {"Accept": "application/dicom+json"}
    status, body = request(conn, "GET", path, headers)
    count = len(orjson.loads(body)) if status == 200 else 0
    figure.hits[target.name] = count
    if count != len(ct.files):
        figure.problem(target.name, f"metadata of {count} instances (HTTP {status})")
    cpu_before = cpu_seconds(target.pid)
    times = [_timed(lambda: request(conn, "GET", path, headers))[0] for _ in range(repeat)]
    figure.cpu_s[target.name] = (cpu_seconds(target.pid) - cpu_before) / repeat
    figure.values[target.name] = statistics.median(times) * 1000
    conn.close()


def measure_retrieve(target: Target, ct: Series, figure: Figure) -> None:
    conn = target.connection()
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    path = _series_path(target, ct)
    best = 0.0
    cpu_before = cpu_seconds(target.pid)
    for _ in range(3):
        seconds, (status, body) = _timed(lambda: request(conn, "GET", path, headers))
        if status != 200:
            figure.problem(target.name, f"retrieve answered {status}: {body[:200]!r}")
            return
        parts = body.count(b"Content-Type: application/dicom") or body.count(
            b"content-type: application/dicom"
        )
        if parts < len(ct.files):
            figure.problem(target.name, f"{parts} parts, {len(ct.files)} expected")
        best = max(best, len(body) / seconds / 1e6)
    figure.cpu_s[target.name] = (cpu_seconds(target.pid) - cpu_before) / 3
    figure.values[target.name] = best
    conn.close()


def measure_frames(target: Target, ct: Series, instance_uids: list[str], figure: Figure) -> None:
    """OHIF's pattern: one /frames/1 request per instance, 6 browser connections."""
    headers = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    base = _series_path(target, ct)
    chunks = [instance_uids[n::6] for n in range(6)]
    failures: list[str] = []

    def fetch(uids: list[str]) -> int:
        conn = target.connection()
        received = 0
        for uid in uids:
            status, body = request(conn, "GET", f"{base}/instances/{uid}/frames/1", headers)
            if status != 200:
                failures.append(f"HTTP {status}")
            received += len(body)
        conn.close()
        return received

    cpu_before = cpu_seconds(target.pid)
    with ThreadPoolExecutor(6) as pool:
        seconds, _ = _timed(lambda: list(pool.map(fetch, chunks)))
    figure.cpu_s[target.name] = cpu_seconds(target.pid) - cpu_before
    if failures:
        figure.problem(target.name, f"{len(failures)} frame requests failed ({failures[0]})")
    figure.values[target.name] = len(instance_uids) / seconds


def _instance_uids(ct: Series) -> list[str]:
    from pydicom import dcmread

    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct.files]


def bench(
    target: Target,
    args: argparse.Namespace,
    only: set[str],
    ct: Series,
    catalog: tuple[list[Path], list[FindQuery], Path] | None,
    figures: dict[str, Figure],
    info: dict[str, Any],
) -> None:
    target.start()
    try:
        info[f"{target.name}_server"] = target.describe()
        log(f"[{target.name}] STOW-RS {len(ct.files)} CT slices, {args.batch} per request")
        stow = figures.setdefault("stow", Figure("STOW-RS CT", "inst/s", True))
        measure_stow(target, ct, args.batch, stow)
        if "metadata" in only:
            log(f"[{target.name}] series metadata")
            figure = figures.setdefault("metadata", Figure("series metadata", "ms", False))
            measure_metadata(target, ct, args.repeat, figure)
        if "retrieve" in only:
            log(f"[{target.name}] series retrieve")
            figure = figures.setdefault("retrieve", Figure("series retrieve", "MB/s", True))
            measure_retrieve(target, ct, figure)
        if "frames" in only:
            log(f"[{target.name}] frames, OHIF pattern")
            figure = figures.setdefault("frames", Figure("frames (6 conns)", "frames/s", True))
            measure_frames(target, ct, _instance_uids(ct), figure)
        if catalog is not None:
            files, queries, directory = catalog
            log(f"[{target.name}] loading the catalog ({len(files)} studies, untimed)")
            target.load_catalog(files, directory)
            for query in queries:
                log(f"[{target.name}] {query.name}")
                measure_qido(target, query, args.repeat, figures)
    finally:
        target.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_dicomweb",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ct", type=int, default=300, help="CT slices in the series (300)")
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW request (50)")
    parser.add_argument("--studies", type=int, default=20000, help="catalog studies (20000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query (5)")
    add_rounds_option(parser)
    parser.add_argument("--only", action="append", choices=MEASUREMENTS)
    parser.add_argument("--database-url", default="", help="run ours on this PostgreSQL server")
    parser.add_argument(
        "--durability",
        choices=("power-loss", "process"),
        default="power-loss",
        help="ours: [storage] durability (process = no fsyncs, Orthanc's guarantee)",
    )
    parser.add_argument("--json", type=Path, help="also save the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--workdir", type=Path, help="parent of the work directory ($TMPDIR)")
    parser.add_argument("--orthanc", default=ORTHANC_BINARY, help="Orthanc binary")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only or MEASUREMENTS)
    ensure_plugin(args.orthanc)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_dicomweb_", dir=args.workdir))
    log(f"work directory {work}")
    info: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }
    figures: dict[str, Figure] = {}
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            database_url = scratch_databases(stack, args.database_url, args.keep)
            log(f"generating {args.ct} CT slices (512x512) ...")
            spec = StudySpec(patient_id="BENCHWEB", patient_name="BENCH^WEB", study_date="19990101")
            ct = generate_ct(work / "ct", spec, args.ct)
            catalog = None
            if "qido" in only:
                log(f"generating a catalog of {args.studies} studies ...")
                files, queries = generate_catalog(work / "catalog", args.studies)
                catalog = (files, queries, work / "catalog")

            def targets(place: Path) -> list[Target]:
                return [
                    OrthancTarget(place / "orthanc", args.orthanc),
                    OursTarget(place / "ours", database_url(), args.durability),
                ]

            def run(target: Target, place: Path, found: dict[str, Figure]) -> None:
                bench(target, args, only, ct, catalog, found, info)

            figures = run_rounds(args.rounds, work, targets, run)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info["total_s"] = round(time.perf_counter() - started, 1)
    print()
    print(f"DICOMweb benchmark, {info['cpus']} CPUs, {info['date']}")
    print(f"  orthanc: {info.get('orthanc_server', '?')}")
    print(f"  ours:    {info.get('ours_server', '?')}")
    print(
        f"  --ct {args.ct} --batch {args.batch} --studies {args.studies} --repeat {args.repeat} "
        f"--rounds {args.rounds}"
    )
    print()
    print_table(list(figures.values()))
    if args.json:
        report = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "info": info,
            "results": [{**asdict(f), "ratio": f.ratio()} for f in figures.values()],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
