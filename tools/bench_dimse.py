"""DIMSE benchmark: our server against Orthanc, same machine, same generated data, DCMTK clients.

    .venv/bin/python -m tools.bench_dimse                      # full run (minutes on 2 cores)
    .venv/bin/python -m tools.bench_dimse --ct 20 --small 50 --studies 300   # quick look
    .venv/bin/python -m tools.bench_dimse --only find --studies 5000 --json find.json
    .venv/bin/python -m tools.bench_dimse --database-url postgresql://postgres@127.0.0.1:5432/postgres

What it measures, first on Orthanc, then on our server (one server runs at a time):

1. ingest: C-STORE of ``--ct`` 512x512 CT slices with one storescu association, then of another
   ``--ct`` slices split over ``--parallel`` folders sent by as many storescu processes at once
   (instances/s and MB/s, wall clock of the storescu processes).
2. small: C-STORE of ``--small`` tiny secondary captures (one study each) over one association.
3. find: Study Root C-FIND at STUDY level with findscu on a catalog of ``--studies`` studies (our
   ``import`` command / Orthanc's REST ``POST /instances`` load it, untimed): by PatientID (one
   match), by PatientName ``LEW*`` (a few percent) and by a StudyDate range (a tenth: ~2,000 of
   20,000). Each query runs once to warm up (its responses are counted: the hit counts must be
   the same on both servers and as generated), then ``--repeat`` times with ``findscu -q``; the
   median wall clock of those findscu processes is reported.
4. move: C-MOVE of the ``--ct`` slice series (SERIES level, movescu) to a storescp destination.
5. get: C-GET of the same series by getscu.

Every DCMTK process and Orthanc run with ``TCP_NODELAY=1`` (DCMTK leaves Nagle on otherwise and
each C-STORE waits ~40 ms for a delayed ACK); storescu, storescp and Orthanc use 128 KiB PDUs.
Both servers keep their default storage settings (ours: SQLite with synchronous=FULL, or the
PostgreSQL server given with ``--database-url``, on which a scratch database is created and
dropped; Orthanc: its SQLite index). Ratios are "ours relative to Orthanc" and always read the same
way: above 1 means our server is faster (ours/orthanc for throughput, orthanc/ours for times).
Wall-clock figures are noisy when something else runs on the machine; the server CPU seconds
printed under the table are steadier.

Needs DCMTK and Orthanc (Debian packages ``dcmtk`` and ``orthanc``); when they are missing and
this runs as root, they are installed with apt-get.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from tools import fuzz_wire
from tools.generate import StudySpec, ct_series, many_studies, small_instance, write
from tools.orthanc import ORTHANC_BINARY, OrthancProcess
from tools.procs import (
    NODELAY_ENV,
    OurServer,
    dcmtk,
    ensure_tools,
    free_port,
    log,
    scratch_databases,
    storescp,
    write_config,
)

MEASUREMENTS = ("ingest", "small", "find", "move", "get")
HOST = "127.0.0.1"
PDU = "131072"
MOVE_DESTINATION = "STORESCP"
CATALOG_START = dt.date(2015, 1, 1)  # many_studies' default start
SINGLE_PATIENT = "PSINGLE01"
# What a study browser asks for; the computed keys cost something on both servers.
RETURN_KEYS = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
_FIND_RESPONSE = re.compile(r"Find Response: \d+ \(Pending\)")


# --- generated data ------------------------------------------------------------------------


@dataclass
class Series:
    study_uid: str
    series_uid: str
    folders: list[Path]
    files: list[Path]
    patient_ids: str = ""  # without a series UID: a PatientID pattern matching its studies

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


@dataclass
class FindQuery:
    name: str
    keys: dict[str, str]
    expected: int


@dataclass
class Data:
    ct: Series | None = None  # sent over one association, then moved
    ct_parallel: Series | None = None  # sent over --parallel associations
    small: Series | None = None
    catalog: list[Path] = field(default_factory=list)
    catalog_dir: Path | None = None
    queries: list[FindQuery] = field(default_factory=list)


def generate_ct(root: Path, spec: StudySpec, slices: int, folders: int = 1) -> Series:
    dirs = [root / f"{n}" for n in range(folders)] if folders > 1 else [root]
    files: list[Path] = []
    series_uid = ""
    for n, ds in enumerate(ct_series(spec, slices, 512)):
        series_uid = str(ds.SeriesInstanceUID)
        files.append(write(ds, dirs[n % folders]))
    return Series(spec.study_uid, series_uid, dirs, files)


def generate_small(root: Path, count: int) -> Series:
    files = []
    for n in range(count):
        spec = StudySpec(
            patient_id=f"SMALL{n:06d}",
            patient_name=f"SMALL^N{n}",
            study_date="19990101",
            accession=f"S{n:08d}",
        )
        files.append(write(small_instance(spec), root))
    return Series("", "", [root], files, patient_ids="SMALL*")


def generate_catalog(root: Path, studies: int) -> tuple[list[Path], list[FindQuery]]:
    """``studies`` one-instance studies: many_studies(studies - 1) plus one patient that has a
    single study; returns the files and the three queries with their expected hit counts."""
    specs = list(many_studies(max(studies - 1, 0), start=CATALOG_START))
    specs.insert(
        len(specs) // 2,
        StudySpec(
            patient_id=SINGLE_PATIENT,
            patient_name="SINGLE^PATIENT",
            study_date="20000101",
            accession="SINGLE01",
        ),
    )
    files = []
    for n, spec in enumerate(specs, start=1):
        files.append(write(small_instance(spec), root))
        if n % 5000 == 0:
            log(f"  catalog: {n}/{len(specs)} files written")
    span = min(len(specs) - 1, 3650) or 1  # many_studies cycles dates over 3650 days
    window = max(1, round(span / 10))
    first = CATALOG_START + dt.timedelta(days=(span - window) // 2)
    last = first + dt.timedelta(days=window - 1)
    date_range = f"{first:%Y%m%d}-{last:%Y%m%d}"
    queries = [
        FindQuery(
            "find PatientID (1 study)",
            {"PatientID": SINGLE_PATIENT},
            sum(s.patient_id == SINGLE_PATIENT for s in specs),
        ),
        FindQuery(
            "find PatientName LEW*",
            {"PatientName": "LEW*"},
            sum(s.patient_name.startswith("LEW") for s in specs),
        ),
        FindQuery(
            f"find StudyDate {date_range}",
            {"StudyDate": date_range},
            sum(f"{first:%Y%m%d}" <= s.study_date <= f"{last:%Y%m%d}" for s in specs),
        ),
    ]
    return files, queries


def generate(root: Path, args: argparse.Namespace, only: set[str]) -> Data:
    data = Data()
    started = time.perf_counter()
    if only & {"ingest", "move", "get"}:
        log(f"generating {args.ct} CT slices (512x512) ...")
        spec = StudySpec(patient_id="BENCHCT1", patient_name="BENCH^CT", study_date="19990101")
        data.ct = generate_ct(root / "ct", spec, args.ct)
    if "ingest" in only:
        log(f"generating {args.ct} more CT slices in {args.parallel} folders ...")
        spec = StudySpec(patient_id="BENCHCT2", patient_name="BENCH^CT", study_date="19990101")
        data.ct_parallel = generate_ct(root / "ct-parallel", spec, args.ct, args.parallel)
    if "small" in only:
        log(f"generating {args.small} small instances ...")
        data.small = generate_small(root / "small", args.small)
    if "find" in only:
        log(f"generating a catalog of {args.studies} studies ...")
        data.catalog_dir = root / "catalog"
        data.catalog, data.queries = generate_catalog(data.catalog_dir, args.studies)
    log(f"generated in {time.perf_counter() - started:.1f}s")
    return data


# --- the two servers -----------------------------------------------------------------------


class Target(Protocol):
    name: str
    ae_title: str

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def load_catalog(self, files: Sequence[Path], directory: Path) -> None: ...

    def describe(self) -> str: ...


class OrthancTarget:
    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, work: Path, move_port: int, binary: str) -> None:
        self.orthanc = OrthancProcess(
            work, modalities={MOVE_DESTINATION: (HOST, move_port)}, binary=binary
        )

    @property
    def port(self) -> int:
        return self.orthanc.dicom_port

    @property
    def pid(self) -> int:
        assert self.orthanc.proc is not None
        return self.orthanc.proc.pid

    def start(self) -> None:
        self.orthanc.start()

    def stop(self) -> None:
        self.orthanc.stop()

    def load_catalog(self, files: Sequence[Path], directory: Path) -> None:
        step = max(len(files) // 10, 1)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                log(f"  orthanc REST upload: {done}/{total}")

        accepted = self.orthanc.upload(files, connections=4, progress=progress)
        if accepted != len(files):
            log(f"  WARNING: Orthanc accepted {accepted} of {len(files)} catalog files")

    def describe(self) -> str:
        return f"Orthanc {self.orthanc.version()} (SQLite index, {self.orthanc.binary})"


class OursTarget:
    name = "ours"
    ae_title = "IMAGING"

    def __init__(
        self, work: Path, move_port: int, database_url: str, durability: str = "power-loss"
    ) -> None:
        config = write_config(work / "config", peers=[(MOVE_DESTINATION, move_port)])
        self.server = OurServer(work / "data", config, database_url)
        self.server.env["IMAGING_DURABILITY"] = durability
        self.durability = durability

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def load_catalog(self, files: Sequence[Path], directory: Path) -> None:
        # The bulk import opens the catalog itself: the server is stopped meanwhile.
        self.server.stop()
        self.server.import_paths([directory])
        self.server.start()

    def describe(self) -> str:
        db = self.server.database_url.split("@")[-1] if self.server.database_url else "SQLite"
        return f"ours ({sys.executable} -m server, catalog {db}, durability {self.durability})"


# --- measuring -----------------------------------------------------------------------------


@dataclass
class Figure:
    metric: str
    unit: str
    higher_is_better: bool
    values: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # server CPU seconds
    hits: dict[str, int] = field(default_factory=dict)
    expected_hits: int | None = None
    problems: dict[str, list[str]] = field(default_factory=dict)
    round_ratios: list[float] = field(default_factory=list)  # one per round (--rounds)

    def ratio(self) -> float | None:
        if self.round_ratios:
            return statistics.median(self.round_ratios)
        ours, theirs = self.values.get("ours"), self.values.get("orthanc")
        if not ours or not theirs:
            return None
        return ours / theirs if self.higher_is_better else theirs / ours

    def problem(self, target: str, message: str) -> None:
        """Something went wrong: the figure is flagged in the table and the message listed."""
        log(f"  WARNING: {target}: {message}")
        self.problems.setdefault(target, []).append(message)


T = TypeVar("T")  # a server under test


def merge_rounds(rounds: Sequence[dict[str, Figure]]) -> dict[str, Figure]:
    """One figure per metric from several rounds: the median of each server's values and,
    as the ratio, the median of the rounds' own ratios. Each round measured both servers
    minutes apart, so its ratio is what drift of the machine's speed disturbs least."""
    if len(rounds) == 1:
        return dict(rounds[0])
    merged: dict[str, Figure] = {}
    for key, first in rounds[0].items():
        present = [r[key] for r in rounds if key in r]
        figure = Figure(
            first.metric, first.unit, first.higher_is_better, expected_hits=first.expected_hits
        )
        for name in ("orthanc", "ours"):
            values = [f.values[name] for f in present if name in f.values]
            if values:
                figure.values[name] = statistics.median(values)
            cpu = [f.cpu_s[name] for f in present if name in f.cpu_s]
            if cpu:
                figure.cpu_s[name] = statistics.median(cpu)
            for f in present:
                figure.problems.setdefault(name, []).extend(f.problems.get(name, []))
                if name in f.hits:
                    figure.hits[name] = f.hits[name]
        figure.problems = {k: v for k, v in figure.problems.items() if v}
        figure.round_ratios = [r for r in (f.ratio() for f in present) if r is not None]
        merged[key] = figure
    return merged


def run_rounds(
    rounds: int,
    work: Path,
    make_targets: Callable[[Path], list[T]],
    run: Callable[[T, Path, dict[str, Figure]], None],
) -> dict[str, Figure]:
    """``run`` every target ``rounds`` times, alternating which goes first, each round in a
    directory of its own; the merged figures (:func:`merge_rounds`)."""
    measured: list[dict[str, Figure]] = []
    for number in range(rounds):
        place = work / f"round{number + 1}" if rounds > 1 else work
        targets = make_targets(place)
        if number % 2:
            targets.reverse()  # neither server always runs on a warmer machine
        if rounds > 1:
            log(f"== round {number + 1} of {rounds}")
        measured.append({})
        for target in targets:
            run(target, place, measured[-1])
    # Nothing is deleted between rounds: for minutes after a deletion ext4's inode allocator
    # steps over the freed inodes one by one (recently_deleted()), which made every file and
    # directory the next round created several times dearer, for both servers. The caller
    # removes the work directory once all rounds are done.
    return merge_rounds(measured)


def add_rounds_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times, alternating which server goes first; figures "
        "are medians and the ratio is the median of the rounds' ratios (1)",
    )


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (our DIMSE worker
    processes), from /proc; a worker restarted in between would be missed."""
    fields = _stat(pid)
    if fields is None:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            child = _stat(int(entry.name))
            if child is not None and child[1] == str(pid):
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def server_cpu(target: Target, figure: Figure) -> Iterator[None]:
    # Every measurement starts with nothing left to write back: the kernel flushing the
    # gigabyte a previous ingest left in the page cache took CPU and disk from whichever
    # server ran next (with --rounds 3 that was ours in two rounds of three).
    os.sync()
    before = cpu_seconds(target.pid)
    yield
    figure.cpu_s[target.name] = cpu_seconds(target.pid) - before


def _failed(returncode: int, output: str) -> bool:
    return returncode != 0 or re.search(r"^[EF]: ", output, re.M) is not None


def run_dcmtk(cmd: Sequence[str], timeout: float = 900) -> tuple[float, str, str | None]:
    """Run a DCMTK client with TCP_NODELAY=1: its wall clock, output and failure (or None)."""
    started = time.perf_counter()
    result = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **NODELAY_ENV},
    )
    elapsed = time.perf_counter() - started
    output = result.stdout + result.stderr
    failure = None
    if _failed(result.returncode, output):
        failure = f"{Path(cmd[0]).name} exited {result.returncode}: {output[-500:].strip()}"
    return elapsed, output, failure


def storescu_cmd(target: Target, folder: Path) -> list[str]:
    return [
        dcmtk("storescu"),
        "-aet",
        "STORESCU",
        "-aec",
        target.ae_title,
        "-pdu",
        PDU,
        "+sd",  # the last argument is a folder to scan
        HOST,
        str(target.port),
        str(folder),
    ]


def store(target: Target, series: Series) -> tuple[float, list[str]]:
    """Send every folder of ``series`` with its own storescu, all at once: the wall clock and
    the failures."""
    env = {**os.environ, **NODELAY_ENV}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_cmd(target, folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for folder in series.folders
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    elapsed = time.perf_counter() - started
    failures = [
        f"storescu exited {proc.returncode} (a store refused? --keep keeps the server log) "
        f"{output[-300:].strip()}".strip()
        for proc, output in zip(procs, outputs, strict=True)
        if _failed(proc.returncode, output)
    ]
    return elapsed, failures


def c_find(target: Target, level: str, keys: dict[str, str]) -> list[Dataset]:
    """An untimed C-FIND from Python (for checks)."""
    ae = AE(ae_title="CHECKSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"{target.name}: association for a check query rejected")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    answers = []
    try:
        for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and ds is not None:
                answers.append(ds)
    finally:
        assoc.release()
    return answers


def count_stored(target: Target, series: Series) -> int:
    """How many instances of ``series`` the server holds (C-FIND)."""
    if series.series_uid:
        answers = c_find(
            target,
            "SERIES",
            {
                "StudyInstanceUID": series.study_uid,
                "SeriesInstanceUID": series.series_uid,
                "NumberOfSeriesRelatedInstances": "",
            },
        )
        return int(answers[0].NumberOfSeriesRelatedInstances or 0) if answers else 0
    # one instance per study, patients named by the pattern
    return len(c_find(target, "STUDY", {"PatientID": series.patient_ids, "StudyInstanceUID": ""}))


def measure_store(
    target: Target, series: Series, figures: dict[str, Figure], label: str, with_mb: bool
) -> None:
    rate = figures.setdefault(f"{label} inst/s", Figure(label, "inst/s", True))
    with server_cpu(target, rate):
        elapsed, failures = store(target, series)
    rate.values[target.name] = len(series.files) / elapsed
    mb = None
    if with_mb:
        mb = figures.setdefault(f"{label} MB/s", Figure(label, "MB/s", True))
        mb.values[target.name] = series.bytes / 1e6 / elapsed
    log(f"  {label}: {len(series.files)} instances in {elapsed:.2f}s")
    stored = count_stored(target, series)
    if stored != len(series.files):
        failures.append(f"holds {stored} of the {len(series.files)} instances sent")
    for failure in failures:
        rate.problem(target.name, failure)
        if mb is not None:
            mb.problems.setdefault(target.name, []).append(failure)


def findscu_cmd(target: Target, keys: dict[str, str]) -> list[str]:
    cmd = [dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-aec", target.ae_title]
    cmd += ["-k", "QueryRetrieveLevel=STUDY"]
    for keyword in RETURN_KEYS:
        cmd += ["-k", f"{keyword}={keys[keyword]}" if keyword in keys else keyword]
    for keyword, value in keys.items():
        if keyword not in RETURN_KEYS:
            cmd += ["-k", f"{keyword}={value}"]
    return [*cmd, HOST, str(target.port)]


def measure_find(target: Target, query: FindQuery, repeat: int, figures: dict[str, Figure]) -> None:
    figure = figures.setdefault(
        query.name, Figure(query.name, "ms", False, expected_hits=query.expected)
    )
    cmd = findscu_cmd(target, query.keys)
    # The warm-up run prints every response (to count them); the timed ones are quiet, so that
    # they measure the server rather than findscu's dataset dumps.
    _, output, failure = run_dcmtk(cmd)
    failures = {failure} if failure else set()
    hits = len(_FIND_RESPONSE.findall(output))
    quiet = [cmd[0], "-q", *cmd[1:]]
    times = []
    with server_cpu(target, figure):
        for _ in range(repeat):
            elapsed, _, failure = run_dcmtk(quiet)
            times.append(elapsed)
            if failure:
                failures.add(failure)
    figure.cpu_s[target.name] /= repeat
    for failure in sorted(failures):
        figure.problem(target.name, failure)
    figure.hits[target.name] = hits
    if hits != query.expected:
        figure.problem(target.name, f"{hits} hits, {query.expected} expected")
    figure.values[target.name] = statistics.median(times) * 1000
    log(f"  {query.name}: {hits} hits, median {figure.values[target.name]:.0f} ms")
    measure_find_on_association(target, query, repeat, figures)


def _identifier(keys: dict[str, str]) -> bytes:
    """The C-FIND identifier findscu sends for ``keys`` (implicit VR little endian)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, keys.get(keyword, ""))
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


_STATUS = b"\x00\x00\x00\x09\x02\x00\x00\x00"  # (0000,0900) Status, implicit VR, length 2


def _find_statuses(sock: socket.socket) -> list[int]:
    """Read P-DATA-TF PDUs until a C-FIND's final response; the statuses of all responses.
    Only command sets are looked at, with offsets into one buffer: the client must cost far
    less per response than either server."""
    buffer = bytearray()
    command = bytearray()
    statuses: list[int] = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed during C-FIND")
        buffer += chunk
        at = 0
        while len(buffer) - at >= 6:
            length = int.from_bytes(buffer[at + 2 : at + 6], "big")
            end = at + 6 + length
            if len(buffer) < end:
                break
            if buffer[at] != 0x04:
                raise RuntimeError(f"PDU type 0x{buffer[at]:02X} during C-FIND")
            item = at + 6
            while item + 6 <= end:
                size = int.from_bytes(buffer[item : item + 4], "big")
                header = buffer[item + 5]
                if header & 0x01:
                    command += buffer[item + 6 : item + 4 + size]
                    if header & 0x02:
                        found = command.find(_STATUS)
                        status = int.from_bytes(command[found + 8 : found + 10], "little")
                        statuses.append(status)
                        command.clear()
                item += 4 + size
            at = end
            if statuses and statuses[-1] not in (0xFF00, 0xFF01):
                return statuses
        del buffer[:at]


def measure_find_on_association(
    target: Target, query: FindQuery, repeat: int, figures: dict[str, Figure]
) -> None:
    """The same query as a viewer with an open association sends it: C-FIND-RQ to the final
    response, timed in a client that reads the responses' command sets and skips their data
    sets. findscu's own start-up and printing (26-29 ms even for one hit) are not in it."""
    name = f"{query.name}, open association"
    figure = figures.setdefault(name, Figure(name, "ms", False, expected_hits=query.expected))
    identifier = _identifier(query.keys)
    context = fuzz_wire.CONTEXT_ID[(fuzz_wire.STUDY_FIND, fuzz_wire.IMPLICIT)]
    times: list[float] = []
    hits = -1
    with server_cpu(target, figure), fuzz_wire.association(target.port) as (conn, accepted, most):
        if context not in accepted:
            figure.problem(target.name, "Study Root C-FIND not accepted")
            return
        conn.sock.settimeout(120)
        for number in range(repeat + 1):
            request = fuzz_wire.find_rq(fuzz_wire.STUDY_FIND, number + 1)
            started = time.perf_counter()
            conn.send(fuzz_wire.message(context, request, identifier, most))
            statuses = _find_statuses(conn.sock)
            elapsed = time.perf_counter() - started
            if statuses[-1] != 0:
                figure.problem(target.name, f"final status 0x{statuses[-1]:04X}")
            if number == 0:
                hits = len(statuses) - 1  # the warm-up counts; the others are timed
            else:
                times.append(elapsed)
        conn.send(fuzz_wire.release_rq())
    figure.cpu_s[target.name] /= repeat + 1
    figure.hits[target.name] = hits
    if hits != query.expected:
        figure.problem(target.name, f"{hits} hits, {query.expected} expected")
    figure.values[target.name] = statistics.median(times) * 1000
    log(f"  {name}: {hits} hits, median {figure.values[target.name]:.1f} ms")


def _series_keys(series: Series) -> list[str]:
    """The DCMTK ``-k`` arguments of a SERIES-level retrieve of ``series``."""
    keys = (
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={series.study_uid}",
        f"SeriesInstanceUID={series.series_uid}",
    )
    return [arg for key in keys for arg in ("-k", key)]


def measure_move(target: Target, series: Series, work: Path, move_port: int, fig: Figure) -> None:
    destination = work / f"moved-{target.name}"
    cmd = [
        dcmtk("movescu"),
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        target.ae_title,
        "-aem",
        MOVE_DESTINATION,
        *_series_keys(series),
        HOST,
        str(target.port),
    ]
    with storescp(destination, MOVE_DESTINATION, move_port), server_cpu(target, fig):
        elapsed, _, failure = run_dcmtk(cmd)
    _count_retrieved(target, series, destination, fig, "C-MOVE", elapsed, failure)


def _count_retrieved(
    target: Target,
    series: Series,
    destination: Path,
    fig: Figure,
    what: str,
    elapsed: float,
    failure: str | None,
) -> None:
    """Instances/s of a retrieve from the files that arrived in ``destination`` (kept until the
    work directory goes: see :func:`run_rounds`); a DCMTK failure or a missing file is a
    problem of the figure."""
    received = sum(1 for p in destination.iterdir() if p.is_file())
    if failure:
        fig.problem(target.name, failure)
    if received != len(series.files):
        fig.problem(target.name, f"{what}: received {received} of {len(series.files)}")
    fig.values[target.name] = received / elapsed
    log(f"  {what}: {received} instances in {elapsed:.2f}s")


def measure_get(target: Target, series: Series, work: Path, fig: Figure) -> None:
    """C-GET of the series by getscu (SERIES level, 128 KiB PDUs), instances/s of its wall
    clock; the files getscu wrote are counted."""
    destination = work / f"got-{target.name}"
    destination.mkdir(parents=True, exist_ok=True)
    cmd = [
        dcmtk("getscu"),
        "-S",
        "-aet",
        "GETSCU",
        "-aec",
        target.ae_title,
        "-pdu",
        "131072",
        "-od",
        str(destination),
        *_series_keys(series),
        HOST,
        str(target.port),
    ]
    with server_cpu(target, fig):
        elapsed, _, failure = run_dcmtk(cmd)
    _count_retrieved(target, series, destination, fig, "C-GET", elapsed, failure)


def bench_target(
    target: Target,
    data: Data,
    args: argparse.Namespace,
    only: set[str],
    figures: dict[str, Figure],
    info: dict[str, Any],
    work: Path,
    move_port: int,
) -> None:
    log(f"== {target.name}: starting")
    target.start()
    try:
        info[f"{target.name}_server"] = target.describe()
        stored_ct = False
        if "ingest" in only and data.ct and data.ct_parallel:
            log(f"[{target.name}] C-STORE {args.ct} CT slices, 1 association")
            measure_store(target, data.ct, figures, "C-STORE CT, 1 assoc", True)
            stored_ct = True
            log(f"[{target.name}] C-STORE {args.ct} CT slices, {args.parallel} associations")
            label = f"C-STORE CT, {args.parallel} assoc"
            measure_store(target, data.ct_parallel, figures, label, True)
        if "small" in only and data.small:
            log(f"[{target.name}] C-STORE {args.small} small instances, 1 association")
            measure_store(target, data.small, figures, "C-STORE small, 1 assoc", False)
        if "find" in only and data.catalog_dir:
            log(f"[{target.name}] loading the catalog ({len(data.catalog)} files, untimed)")
            started = time.perf_counter()
            target.load_catalog(data.catalog, data.catalog_dir)
            elapsed = time.perf_counter() - started
            info[f"{target.name}_catalog_load_s"] = round(elapsed, 1)
            log(f"  catalog loaded in {elapsed:.1f}s ({len(data.catalog) / elapsed:.0f}/s)")
            for query in data.queries:
                measure_find(target, query, args.repeat, figures)
        if only & {"move", "get"} and data.ct and not stored_ct:
            log(f"[{target.name}] storing the CT series to retrieve (untimed)")
            _, failures = store(target, data.ct)
            for failure in failures:
                log(f"  WARNING: {failure}")
        if "move" in only and data.ct:
            log(f"[{target.name}] C-MOVE {args.ct} CT slices to storescp")
            figure = figures.setdefault("C-MOVE", Figure("C-MOVE CT series", "inst/s", True))
            measure_move(target, data.ct, work, move_port, figure)
        if "get" in only and data.ct:
            log(f"[{target.name}] C-GET {args.ct} CT slices with getscu")
            figure = figures.setdefault("C-GET", Figure("C-GET CT series", "inst/s", True))
            measure_get(target, data.ct, work, figure)
    finally:
        target.stop()


# --- output --------------------------------------------------------------------------------


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{text} {unit}".rstrip()


def print_table(figures: Sequence[Figure]) -> None:
    rows = [("metric", "unit", "orthanc", "ours", "ratio", "hits", "rounds")]
    for f in figures:
        hits = ""
        if f.hits:
            hits = "/".join(str(f.hits.get(k, "-")) for k in ("orthanc", "ours"))
        flag = {name: " !" if f.problems.get(name) else "" for name in ("orthanc", "ours")}
        ratio = f.ratio()
        rows.append(
            (
                f.metric,
                f.unit,
                _num(f.values.get("orthanc")) + flag["orthanc"],
                _num(f.values.get("ours")) + flag["ours"],
                "-" if ratio is None else f"{ratio:.2f}x" + (" !" if f.problems else ""),
                hits,
                " ".join(f"{r:.2f}" for r in f.round_ratios) if len(f.round_ratios) > 1 else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            " | ".join(
                cell.ljust(w) if i < 2 or i >= 5 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    print(
        "\nratio: ours relative to Orthanc, >1 = ours faster "
        "(throughput: ours/orthanc; times: orthanc/ours). hits: orthanc/ours. rounds: each "
        "round's ratio (--rounds)."
    )
    print("\nserver CPU seconds (for find: per query):")
    for f in figures:
        if f.cpu_s:
            cpu = "  ".join(f"{k} {v:.3f}s" for k, v in f.cpu_s.items())
            print(f"  {f.metric} ({f.unit}): {cpu}")
    flagged = [f for f in figures if f.problems or len(set(f.hits.values())) > 1]
    if flagged:
        print("\n! problems (figures marked ! are not comparable):")
    for f in flagged:
        if len(set(f.hits.values())) > 1:
            print(f"  {f.metric}: hit counts differ: {f.hits}")
        for name, messages in f.problems.items():
            for message in dict.fromkeys(messages):
                print(f"  {f.metric} ({f.unit}), {name}: {message}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_dimse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ct", type=int, default=300, help="CT slices per series (300)")
    parser.add_argument("--small", type=int, default=500, help="small instances (500)")
    parser.add_argument("--studies", type=int, default=20000, help="catalog studies (20000)")
    parser.add_argument("--parallel", type=int, default=4, help="parallel associations (4)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query (5)")
    add_rounds_option(parser)
    parser.add_argument(
        "--only",
        action="append",
        choices=MEASUREMENTS,
        help="run only this measurement (repeatable; default: all)",
    )
    parser.add_argument(
        "--durability",
        choices=("power-loss", "process"),
        default="power-loss",
        help="ours: [storage] durability (process = no fsyncs, Orthanc's guarantee)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="run ours on this PostgreSQL server (a scratch database is created and dropped)",
    )
    parser.add_argument("--json", type=Path, help="also save the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--workdir", type=Path, help="parent of the work directory ($TMPDIR)")
    parser.add_argument("--orthanc", default=ORTHANC_BINARY, help="Orthanc binary")
    args = parser.parse_args(argv)
    for name in ("ct", "small", "studies", "parallel", "repeat", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only or MEASUREMENTS)
    ensure_tools(args.orthanc)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_dimse_", dir=args.workdir))
    log(f"work directory {work}")
    started = time.perf_counter()
    figures: dict[str, Figure] = {}
    info: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with ExitStack() as stack:
            database_url = scratch_databases(stack, args.database_url, args.keep)
            data = generate(work / "data", args, only)
            move_port = free_port()

            def targets(place: Path) -> list[Target]:
                return [
                    OrthancTarget(place / "orthanc", move_port, args.orthanc),
                    OursTarget(place / "ours", move_port, database_url(), args.durability),
                ]

            def run(target: Target, place: Path, found: dict[str, Figure]) -> None:
                bench_target(target, data, args, only, found, info, place, move_port)

            figures = run_rounds(args.rounds, work, targets, run)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info["total_s"] = round(time.perf_counter() - started, 1)
    print()
    print(f"DIMSE benchmark, {info['cpus']} CPUs, {info['date']}")
    print(f"  orthanc: {info.get('orthanc_server', '?')}")
    print(f"  ours:    {info.get('ours_server', '?')}")
    print(
        f"  --ct {args.ct} --small {args.small} --studies {args.studies} "
        f"--parallel {args.parallel} --repeat {args.repeat} --rounds {args.rounds}; "
        f"only {sorted(only)}"
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
        log(f"figures saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
