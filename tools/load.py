"""Sustained mixed load: modalities storing while viewers query and retrieve.

    .venv/bin/python -m tools.load --minutes 2 --out /tmp/load
    .venv/bin/python -m tools.load --minutes 2 --out /tmp/load-pg \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

It starts a server (``python -m server serve`` on free loopback ports; SQLite unless
``--database-url``, which gets a scratch database on that PostgreSQL server) and, for
``--minutes``, runs at the same time:

* ``--stores`` (4) DCMTK ``storescu`` loops, each on its own association per round, sending a
  generated CT study of ``--slices`` ``--size``x``--size`` images with new Study, Series, SOP
  Instance and Frame of Reference UIDs every round (the template files are patched in place, so
  each round costs a file copy, not a pydicom encode);
* a DICOMweb client (Python asyncio + httpx, ``--http-concurrency`` requests in flight, keep-
  alive connections) drawing, for studies already stored: QIDO-RS ``/studies`` searches
  (PatientID, PatientName wildcard, StudyDate range, with ``limit``), WADO-RS series
  ``metadata``, whole instances (``transfer-syntax=*``) and ``frames/1`` as OHIF asks for them;
* a sampler of the server's whole process tree (parent and workers), summing RSS from /proc
  every 0.5 s.

At the end the catalog is asked (QIDO, NumberOfStudyRelatedInstances) how many instances it
holds; that must equal what storescu reported stored.  The report (``--out``: ``load.json``,
``load.md``) has the instances stored, the C-STORE rate, the errors (store failures, HTTP
errors or non-2xx answers, a catalog count that does not match; all must be 0), HTTP requests
per second, latency p50/p95/p99 per request kind and the peak RSS of the server's tree.  The
exit status is 1 when there were errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tools.generate import ROOT as UID_ROOT
from tools.generate import StudySpec, ct_series
from tools.procs import NODELAY_ENV, OurServer, dcmtk, log, scratch_postgres, write_config
from tools.proctree import RssSampler

MARK = b"900000000"  # nine digits in every UID of the template study, replaced each round
HOST = "127.0.0.1"
KINDS = ("qido", "metadata", "instance", "frames")
WEIGHTS = (35, 25, 15, 25)


# --- the studies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A CT study written once; ``round_files`` copies it with new UIDs."""

    files: list[tuple[str, bytes, int]]  # name, bytes, where Pixel Data starts

    @staticmethod
    def make(directory: Path, slices: int, size: int) -> Template:
        mark = MARK.decode()
        spec = StudySpec(
            patient_id=f"LOAD{mark}",
            patient_name="LOAD^PATIENT",
            study_uid=f"{UID_ROOT}88.{mark}.1",
            accession=f"A{mark}",
            description="LOAD CT",
        )
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for n, ds in enumerate(ct_series(spec, slices, size, series_uid=f"{UID_ROOT}88.{mark}.2")):
            ds.SOPInstanceUID = f"{UID_ROOT}88.{mark}.3.{n + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.FrameOfReferenceUID = f"{UID_ROOT}88.{mark}.4"
            path = directory / f"{n + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            data = path.read_bytes()
            files.append((path.name, data, data.index(b"\xe0\x7f\x10\x00")))
        return Template(files)

    def round_files(self, directory: Path, code: str) -> None:
        """The study with ``code`` (nine digits) in place of the mark, into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        new = code.encode()
        for name, data, pixels in self.files:
            (directory / name).write_bytes(data[:pixels].replace(MARK, new) + data[pixels:])


@dataclass(frozen=True)
class StoredStudy:
    study: str
    series: str
    instances: tuple[str, ...]
    patient_id: str


def study_of(code: str, slices: int) -> StoredStudy:
    base = f"{UID_ROOT}88.{code}"
    return StoredStudy(
        f"{base}.1",
        f"{base}.2",
        tuple(f"{base}.3.{n + 1}" for n in range(slices)),
        f"LOAD{code}",
    )


# --- C-STORE load ----------------------------------------------------------------------------


@dataclass
class StoreStats:
    rounds: int = 0
    instances: int = 0
    bytes: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per round (association + study)


class Stored:
    """Studies stored so far (for the HTTP client to read), shared between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies: list[StoredStudy] = []

    def add(self, study: StoredStudy) -> None:
        with self._lock:
            self._studies.append(study)

    def pick(self, rng: random.Random) -> StoredStudy | None:
        with self._lock:
            return rng.choice(self._studies) if self._studies else None

    def all(self) -> list[StoredStudy]:
        with self._lock:
            return list(self._studies)


def store_loop(
    worker: int,
    template: Template,
    work: Path,
    port: int,
    deadline: float,
    stored: Stored,
    stats: StoreStats,
    lock: threading.Lock,
) -> None:
    """Rounds of one storescu until ``deadline``: one new study per round."""
    storescu = dcmtk("storescu")
    env = {**os.environ, **NODELAY_ENV}
    size = sum(len(data) for _, data, _ in template.files)
    number = 0
    while time.monotonic() < deadline:
        number += 1
        code = f"9{worker:02d}{number:06d}"
        folder = work / f"w{worker}-r{number}"
        template.round_files(folder, code)
        cmd = [storescu, "-aet", f"LOADSCU{worker}", "-aec", "IMAGING", "-pdu", "131072"]
        started = time.perf_counter()
        result = subprocess.run(
            [*cmd, "+sd", HOST, str(port), str(folder)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        elapsed = time.perf_counter() - started
        shutil.rmtree(folder, ignore_errors=True)
        output = result.stdout + result.stderr
        failed = result.returncode != 0 or any(
            line.startswith(("E: ", "F: ")) for line in output.splitlines()
        )
        with lock:
            stats.rounds += 1
            stats.seconds.append(elapsed)
            if failed:
                stats.failures.append(
                    f"storescu {worker} round {number} exited {result.returncode}: "
                    f"{output.strip()[-300:]}"
                )
            else:
                stats.instances += len(template.files)
                stats.bytes += size
        if not failed:
            stored.add(study_of(code, len(template.files)))


# --- DICOMweb load ---------------------------------------------------------------------------


@dataclass
class HttpStats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    errors: list[str] = field(default_factory=list)


def _request(rng: random.Random, study: StoredStudy) -> tuple[str, str, dict[str, str]]:
    """One request: its kind, path and headers."""
    kind = rng.choices(KINDS, WEIGHTS)[0]
    series = f"/dicom-web/studies/{study.study}/series/{study.series}"
    instance = f"{series}/instances/{rng.choice(study.instances)}"
    if kind == "qido":
        query = rng.choice(
            (
                f"PatientID={study.patient_id}",
                "PatientName=LOAD*&limit=50",
                "StudyDate=20240101-20241231&limit=25&includefield=00081030",
                f"StudyInstanceUID={study.study}&includefield=all",
            )
        )
        return kind, f"/dicom-web/studies?{query}", {"Accept": "application/dicom+json"}
    if kind == "metadata":
        return kind, f"{series}/metadata", {"Accept": "application/dicom+json"}
    if kind == "instance":
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        return kind, instance, {"Accept": accept}
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    return kind, f"{instance}/frames/1", {"Accept": accept}


async def http_load(
    base_url: str, concurrency: int, deadline: float, stored: Stored, stats: HttpStats, seed: int
) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def one_client(n: int) -> None:
            rng = random.Random(f"{seed}:{n}")
            while time.monotonic() < deadline:
                study = stored.pick(rng)
                if study is None:
                    await asyncio.sleep(0.05)  # poll until the first study is stored
                    continue
                kind, path, headers = _request(rng, study)
                started = time.perf_counter()
                try:
                    response = await client.get(path, headers=headers)
                    body = await response.aread()
                except httpx.HTTPError as exc:
                    stats.errors.append(f"{kind} {path}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    stats.errors.append(
                        f"{kind} {path}: HTTP {response.status_code} {body[:200]!r}"
                    )
                    continue
                stats.latencies[kind].append(elapsed)
                stats.bytes[kind] += len(body)

        await asyncio.gather(*(one_client(n) for n in range(concurrency)))


# --- the run ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def catalog_count(base_url: str, studies: Sequence[StoredStudy]) -> int:
    """Instances the catalog holds for the load's studies (QIDO, one request)."""
    response = httpx.get(
        f"{base_url}/dicom-web/studies",
        params={"PatientName": "LOAD^PATIENT", "includefield": "00201208"},
        headers={"Accept": "application/dicom+json"},
        timeout=120,
    )
    response.raise_for_status()
    wanted = {s.study for s in studies}
    total = 0
    for item in response.json() if response.content else []:
        if item.get("0020000D", {}).get("Value", [""])[0] in wanted:
            total += int(item.get("00201208", {}).get("Value", [0])[0])
    return total


@dataclass
class Settings:
    minutes: float
    stores: int = 4
    http_concurrency: int = 8
    slices: int = 40
    size: int = 512
    database_url: str = ""
    seed: int = 1


def run(settings: Settings, work: Path) -> dict[str, Any]:
    """Start a server, load it for ``settings.minutes``, stop it; the figures."""
    template = Template.make(work / "template", settings.slices, settings.size)
    config = write_config(work / "config")
    server = OurServer(work / "data", config, settings.database_url).start()
    assert server.proc is not None
    stored = Stored()
    store_stats, http_stats = StoreStats(), HttpStats()
    lock = threading.Lock()
    duration = settings.minutes * 60
    try:
        with RssSampler(server.proc.pid, 0.5) as sampler:
            started = time.monotonic()
            deadline = started + duration
            threads = [
                threading.Thread(
                    target=store_loop,
                    args=(w, template, work / "rounds", server.port, deadline, stored),
                    kwargs={"stats": store_stats, "lock": lock},
                    name=f"storescu-{w}",
                )
                for w in range(settings.stores)
            ]
            for thread in threads:
                thread.start()
            asyncio.run(
                http_load(
                    server.base_url,
                    settings.http_concurrency,
                    deadline,
                    stored,
                    http_stats,
                    settings.seed,
                )
            )
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
        in_catalog = catalog_count(server.base_url, stored.all())
    finally:
        server.stop()
    return report(settings, elapsed, store_stats, http_stats, sampler, in_catalog)


def report(
    settings: Settings,
    elapsed: float,
    stores: StoreStats,
    http: HttpStats,
    sampler: RssSampler,
    in_catalog: int,
) -> dict[str, Any]:
    requests = sum(len(v) for v in http.latencies.values())
    errors = [*stores.failures, *http.errors]
    if in_catalog != stores.instances:
        errors.append(f"catalog holds {in_catalog} of the {stores.instances} stored instances")
    kinds = {}
    for kind in KINDS:
        values = http.latencies[kind]
        kinds[kind] = {
            "requests": len(values),
            "per_second": round(len(values) / elapsed, 1),
            "p50_ms": round(1000 * percentile(values, 50), 1),
            "p95_ms": round(1000 * percentile(values, 95), 1),
            "p99_ms": round(1000 * percentile(values, 99), 1),
            "max_ms": round(1000 * max(values), 1) if values else None,
            "mb": round(http.bytes[kind] / 1e6, 1),
        }
    return {
        "started": time.strftime("%F %T"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "database": "postgresql" if settings.database_url else "sqlite",
        "settings": {
            "minutes": settings.minutes,
            "storescu_associations": settings.stores,
            "slices_per_study": settings.slices,
            "image_size": settings.size,
            "http_concurrency": settings.http_concurrency,
        },
        "seconds": round(elapsed, 1),
        "store": {
            "rounds": stores.rounds,
            "instances": stores.instances,
            "instances_per_second": round(stores.instances / elapsed, 1),
            "mb_per_second": round(stores.bytes / 1e6 / elapsed, 1),
            "round_p50_s": round(percentile(stores.seconds, 50), 2),
            "failed_rounds": len(stores.failures),
            "in_catalog": in_catalog,
        },
        "http": {
            "requests": requests,
            "per_second": round(requests / elapsed, 1),
            "errors": len(http.errors),
            "kinds": kinds,
        },
        "errors": len(errors),
        "error_samples": errors[:20],
        "rss": {
            "peak_mb": round(sampler.peak_mb, 1),
            "mean_mb": round(sampler.mean_mb, 1),
            "first_mb": round(sampler.samples[0][1], 1) if sampler.samples else None,
            "last_mb": round(sampler.samples[-1][1], 1) if sampler.samples else None,
            "samples": len(sampler.samples),
            # every 10 s (seconds since start, MB): whether memory levels off
            "timeline": [(round(t), round(mb, 1)) for t, mb in sampler.samples[:: max(1, 20)]],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    s, h, st = result["settings"], result["http"], result["store"]
    rss = result["rss"]
    lines = [
        "# Load",
        "",
        f"{result['seconds']} s on {result['machine']} ({result['database']} catalog): "
        f"{s['storescu_associations']} storescu associations looping over "
        f"{s['slices_per_study']}-slice {s['image_size']}x{s['image_size']} CT studies (new "
        f"UIDs each round) while {s['http_concurrency']} DICOMweb requests were in flight.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| instances stored (C-STORE) | {st['instances']} ({st['rounds']} studies) |",
        f"| C-STORE rate | {st['instances_per_second']} instances/s, {st['mb_per_second']} MB/s |",
        f"| instances the catalog holds afterwards | {st['in_catalog']} |",
        f"| HTTP requests | {h['requests']} ({h['per_second']}/s) |",
        f"| errors (store failures, HTTP errors, catalog mismatch) | **{result['errors']}** |",
        f"| server process tree RSS, peak (mean; first, last sample) | {rss['peak_mb']} MB "
        f"({rss['mean_mb']}; {rss['first_mb']}, {rss['last_mb']}) |",
        "",
        "| request | count | per s | p50 ms | p95 ms | p99 ms | max ms | MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, k in h["kinds"].items():
        lines.append(
            f"| {kind} | {k['requests']} | {k['per_second']} | {k['p50_ms']} | {k['p95_ms']} | "
            f"{k['p99_ms']} | {k['max_ms']} | {k['mb']} |"
        )
    if result["error_samples"]:
        lines += ["", "Errors:", *(f"* {e}" for e in result["error_samples"])]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _database(url: str) -> Iterator[str]:
    if not url:
        yield ""
        return
    with scratch_postgres(url) as scratch:
        yield scratch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--database-url", default="", help="PostgreSQL instead of SQLite")
    parser.add_argument("--stores", type=int, default=4, help="concurrent storescu loops")
    parser.add_argument("--http-concurrency", type=int, default=8)
    parser.add_argument("--slices", type=int, default=40, help="CT slices per study")
    parser.add_argument("--size", type=int, default=512, help="image rows and columns")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the server's data and log")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="load-", dir=os.environ.get("TMPDIR")))
    try:
        with _database(args.database_url) as url:
            settings = Settings(
                args.minutes,
                args.stores,
                args.http_concurrency,
                args.slices,
                args.size,
                url,
                args.seed,
            )
            log(f"load: {args.minutes} min, {args.stores} storescu, {args.http_concurrency} HTTP")
            result = run(settings, work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "load.md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
