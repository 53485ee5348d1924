"""Fuzz the server's network inputs: DIMSE (raw PDUs, P-DATA on an association, C-STORE data
sets, C-FIND identifiers), STOW-RS request bodies and QIDO-RS parameters.

    .venv/bin/python -m tools.fuzz --cases 2000 --seed 1 --out /tmp/fuzz
    .venv/bin/python -m tools.fuzz --cases 2000 --seed 1 --out /tmp/fuzz --corpus tests/fuzz_corpus
    .venv/bin/python -m tools.fuzz --replay tests/fuzz_corpus --out /tmp/fuzz-replay
    .venv/bin/python -m tools.fuzz --cases 500 --database-url postgresql://postgres@127.0.0.1:5432/postgres

It starts a real server (``python -m server serve`` on free loopback ports, SQLite unless
``--database-url``), stores a small study for the queries to find, then sends cases generated
deterministically from ``--seed`` (tools/fuzz_cases.py; case ``n`` depends on the seed and
``n`` only).  Every case's outcome is classified (association rejected or aborted, DIMSE
status, HTTP status, ...; tools/fuzz_wire.py).  After every ``--batch`` cases the server must
still answer C-ECHO and ``GET /health``, its process and its worker processes must be the same
ones (the supervisor restarts a worker that dies, so a new worker pid is a death), and no case
may have been answered with an HTTP 5xx.  A failed check counts as a crash; the server is then
restarted and fuzzing goes on.  The peak memory of the server's process tree is sampled too.

``--out`` gets ``summary.json``, ``summary.md`` (cases per target, outcomes by kind, crashes)
and ``cases.jsonl`` (one line per case).  ``--corpus DIR`` keeps the smallest input of each
distinct outcome class per target (plus the regression and anchor cases) in DIR with an
``index.json``; ``--replay DIR`` sends such a corpus again and checks that each entry's outcome
class is the recorded one (tests/integration/test_fuzz.py does this).

The JSON API (/api/v1) is fuzzed separately, from its OpenAPI description, by schemathesis in
tests/integration/test_openapi_fuzz.py.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools import fuzz_wire as w
from tools.fuzz_cases import (
    TARGETS,
    Case,
    anchor_cases,
    base_instances,
    execute,
    generate,
    regression_cases,
)
from tools.procs import OurServer, echo, log, write_config
from tools.proctree import RssSampler, children

MEMORY_LIMIT_MB = 1500  # the server tree's peak RSS above this is a finding (baseline ~300)


# --- the server and its checks -------------------------------------------------------------


def health(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def store_base(port: int) -> None:
    """The study the queries find (tools/fuzz_cases.BASE_STUDY), stored by C-STORE."""
    from pynetdicom import AE

    ae = AE(ae_title="FUZZBASE")
    datasets = base_instances()
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    if not assoc.is_established:
        raise RuntimeError("the fuzzer's base study could not be stored: association refused")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0:
                raise RuntimeError(f"base study not stored: {status}")
    finally:
        assoc.release()


class Target:
    """Our server under fuzzing, with the checks that tell a crash."""

    def __init__(self, work: Path, database_url: str = "") -> None:
        self.work = work
        self.database_url = database_url
        self.server: OurServer | None = None
        self.workers: set[int] = set()
        self.starts = 0
        self._log_offset = 0

    def start(self) -> None:
        self.starts += 1
        config = write_config(self.work / "config")
        self.server = OurServer(self.work / f"data-{self.starts}", config, self.database_url)
        self.server.start()
        store_base(self.server.port)
        self.workers = self._worker_pids()

    def _worker_pids(self) -> set[int]:
        assert self.server is not None and self.server.proc is not None
        return set(children(self.server.proc.pid))

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.proc is not None
        return self.server.proc.pid

    @property
    def dimse_port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def http_port(self) -> int:
        assert self.server is not None
        return self.server.http_port

    def check(self) -> list[str]:
        """What is wrong with the server now (empty: it is fine)."""
        assert self.server is not None and self.server.proc is not None
        problems: list[str] = []
        if self.server.proc.poll() is not None:
            return [f"server exited with status {self.server.proc.returncode}"]
        now = self._worker_pids()
        if now != self.workers:
            problems.append(f"worker processes changed: {sorted(self.workers)} -> {sorted(now)}")
            self.workers = now
        if not echo(self.dimse_port):
            problems.append("no answer to C-ECHO")
        if not health(self.server.base_url):
            problems.append("GET /health did not answer 200")
        return problems

    def new_log(self) -> str:
        """The server log written since the last call."""
        if self.server is None or self.server.log_path is None:
            return ""
        with open(self.server.log_path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        return data.decode(errors="replace")

    def restart(self) -> None:
        self.stop()
        self._log_offset = 0
        self.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# --- running cases -------------------------------------------------------------------------


@dataclass
class Result:
    index: int
    target: str
    name: str
    size: int
    kind: str
    seconds: float
    crash: str = ""


@dataclass
class Report:
    seed: int
    database: str
    started: str
    results: list[Result] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    peak_rss_mb: float = 0.0
    log_tracebacks: int = 0
    our_errors: int = 0  # ERROR lines from the server's own code (see _OUR_ERROR)
    log_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        targets: dict[str, Any] = {}
        for target in TARGETS:
            mine = [r for r in self.results if r.target == target]
            if not mine:
                continue
            targets[target] = {
                "cases": len(mine),
                "outcomes": dict(Counter(r.kind for r in mine).most_common()),
                "crashes": sum(1 for c in self.crashes if target in c["targets"]),
                "http_5xx": sum(1 for r in mine if r.kind.startswith("http-5")),
                "mean_ms": round(1000 * sum(r.seconds for r in mine) / len(mine), 1),
                "max_ms": round(1000 * max(r.seconds for r in mine), 1),
            }
        return {
            "seed": self.seed,
            "database": self.database,
            "started": self.started,
            "cases": len(self.results),
            "seconds": round(self.seconds, 1),
            "batches_checked": self.batches,
            "crashes": len(self.crashes),
            "crash_details": self.crashes,
            "http_5xx": sum(1 for r in self.results if r.kind.startswith("http-5")),
            "no_reply": sum(1 for r in self.results if "no-reply" in r.kind),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "memory_limit_mb": MEMORY_LIMIT_MB,
            "server_log_tracebacks": self.log_tracebacks,
            "server_code_errors": self.our_errors,
            "server_code_error_lines": self.log_errors[:20],
            "targets": targets,
            "json_api": "fuzzed separately from its OpenAPI description by schemathesis "
            "(tests/integration/test_openapi_fuzz.py)",
        }


# ERROR lines from our own code: the server's modules, uvicorn (an exception that reached the
# ASGI server), or pynetdicom reporting that one of our event handlers raised. pynetdicom's own
# complaints about malformed PDUs are expected under fuzzing and only counted.
_OUR_ERROR = re.compile(
    r"^.*(?: (?:ERROR|CRITICAL) (?:server\.|uvicorn)|Exception in handler bound to).*$", re.M
)


def _scan_log(text: str, report: Report) -> None:
    report.log_tracebacks += text.count("Traceback (most recent call last)")
    for match in _OUR_ERROR.finditer(text):
        report.our_errors += 1
        line = match.group(0)[:300]
        if len(report.log_errors) < 50 and line not in report.log_errors:
            report.log_errors.append(line)


def run_cases(
    target: Target,
    cases: Iterable[tuple[int, Case]],
    report: Report,
    batch: int = 25,
    on_result: Any = None,
) -> None:
    """Send ``cases``, checking the server after every ``batch`` of them."""
    pending: list[Result] = []

    def check_batch() -> None:
        report.batches += 1
        _scan_log(target.new_log(), report)
        five_xx = [r for r in pending if r.kind.startswith("http-5")]
        if five_xx:
            crash(five_xx, [f"HTTP {r.kind[5:]} from case {r.index} ({r.name})" for r in five_xx])
        problems = target.check()
        if problems:
            crash(pending, problems)
            if any("exited" in p or "C-ECHO" in p or "/health" in p for p in problems):
                target.restart()
        pending.clear()

    def crash(results: list[Result], problems: list[str]) -> None:
        cases = [r.index for r in results]
        log(f"CRASH in cases {cases[0]}..{cases[-1]}: {problems}")
        report.crashes.append(
            {"cases": cases, "targets": sorted({r.target for r in results}), "problems": problems}
        )
        for r in results:
            r.crash = "; ".join(problems)

    for index, case in cases:
        started = time.perf_counter()
        try:
            kind = execute(case, target.dimse_port, target.http_port)
        except (OSError, RuntimeError) as exc:
            kind = f"client-error:{type(exc).__name__}"
        result = Result(
            index, case.target, case.name, len(case.data), kind, time.perf_counter() - started
        )
        report.results.append(result)
        pending.append(result)
        if on_result is not None:
            on_result(case, result)
        if len(pending) >= batch:
            check_batch()
    if pending:
        check_batch()


def run_on_server(
    cases: Iterable[tuple[int, Case]],
    work: Path,
    seed: int = -1,
    database_url: str = "",
    batch: int = 25,
    on_result: Any = None,
) -> Report:
    """Send ``cases`` to a fresh server, sampling its memory; the report."""
    report = Report(seed, "postgresql" if database_url else "sqlite", time.strftime("%F %T"))
    target = Target(work, database_url)
    target.start()
    started = time.perf_counter()
    try:
        with RssSampler(target.pid) as sampler:
            run_cases(target, cases, report, batch, on_result)
            report.peak_rss_mb = sampler.peak_mb
    finally:
        target.stop()
    report.seconds = time.perf_counter() - started
    check_memory(report)
    return report


def check_memory(report: Report) -> None:
    """A peak above :data:`MEMORY_LIMIT_MB` counts as a crash (the reader that allocated what
    a PDU header claimed took the tree to 4.4 GB on the regression corpus)."""
    if report.peak_rss_mb > MEMORY_LIMIT_MB:
        problem = f"server tree peak RSS {report.peak_rss_mb:.0f} MB > {MEMORY_LIMIT_MB} MB"
        report.crashes.append({"cases": [], "targets": [], "problems": [problem]})


def fuzz(
    seed: int,
    count: int,
    work: Path,
    database_url: str = "",
    batch: int = 25,
    targets: Sequence[str] = TARGETS,
    corpus: Corpus | None = None,
    progress: bool = True,
) -> Report:
    """``count`` cases of ``seed``, then the regression cases, against a fresh server."""
    last = [time.perf_counter()]
    done = [0]

    def on_result(case: Case, result: Result) -> None:
        done[0] += 1
        if corpus is not None:
            corpus.offer(case, result)
        if progress and time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            log(f"  {done[0]}/{count} cases")

    seeded = ((n, generate(seed, n, tuple(targets))) for n in range(count))
    # then the inputs of the bugs found so far and the anchors (tools/fuzz_cases.py)
    regressions = [c for c in regression_cases() + anchor_cases() if c.target in targets]
    cases = itertools.chain(seeded, enumerate(regressions, start=count))
    return run_on_server(cases, work, seed, database_url, batch, on_result)


# --- the corpus ----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "empty"


class Corpus:
    """The smallest input per (target, outcome kind), plus every regression case."""

    def __init__(self) -> None:
        self.best: dict[tuple[str, str], tuple[Case, Result]] = {}
        self.regressions: dict[str, tuple[Case, Result]] = {}

    def offer(self, case: Case, result: Result) -> None:
        if result.crash or result.kind.startswith("client-error") or "no-reply" in result.kind:
            return  # a kind that depends on timing (a reply slower than the wait) is no corpus
        key = (case.target, w.outcome_class(result.kind))
        held = self.best.get(key)
        if held is None or len(case.data) < len(held[0].data):
            self.best[key] = (case, result)
        if case.name.startswith(("regress/", "anchor/")):
            self.regressions[case.name] = (case, result)

    def write(self, directory: Path, seed: int, count: int) -> int:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            if old.suffix in (".bin", ".json"):
                old.unlink()
        chosen: dict[int, tuple[Case, Result]] = {}
        for case, result in [*self.best.values(), *self.regressions.values()]:
            chosen[result.index] = (case, result)
        entries = []
        for index in sorted(chosen, key=lambda n: (chosen[n][0].target, n)):
            case, result = chosen[index]
            suffix = ".json" if case.target == "qido" else ".bin"
            fixed = case.name.startswith(("regress/", "anchor/"))
            what = case.name if fixed else w.outcome_class(result.kind)
            name = f"{case.target}-{_slug(what)}{suffix}"
            data = case.data
            if case.target == "qido":
                data = (json.dumps(json.loads(data), indent=1, sort_keys=True) + "\n").encode()
            (directory / name).write_bytes(data)
            entries.append(
                {
                    "file": name,
                    "target": case.target,
                    "generator": case.name,
                    "meta": case.meta,
                    "kind": result.kind,
                    "class": w.outcome_class(result.kind),
                    "case": index,
                }
            )
        index_doc = {"seed": seed, "cases": count, "produced_by": _command(), "entries": entries}
        (directory / "index.json").write_text(json.dumps(index_doc, indent=1) + "\n")
        return len(entries)


def _command() -> str:
    return "python -m tools.fuzz " + " ".join(sys.argv[1:])


def load_corpus(directory: Path) -> list[tuple[dict[str, Any], Case]]:
    index = json.loads((directory / "index.json").read_text())
    out = []
    for entry in index["entries"]:
        data = (directory / entry["file"]).read_bytes()
        if entry["target"] == "qido":
            data = json.dumps(json.loads(data), sort_keys=True).encode()
        out.append((entry, Case(entry["target"], entry["generator"], data, entry["meta"])))
    return out


@dataclass
class Mismatch:
    file: str
    expected: str
    got: str


def mismatches(
    entries: Sequence[tuple[dict[str, Any], Case]], results: Sequence[Result]
) -> list[Mismatch]:
    """Corpus entries whose outcome class is not the recorded one."""
    return [
        Mismatch(entry["file"], entry["class"], w.outcome_class(result.kind))
        for (entry, _case), result in zip(entries, results, strict=True)
        if w.outcome_class(result.kind) != entry["class"]
    ]


def replay(
    directory: Path, work: Path, database_url: str = "", batch: int = 25
) -> tuple[Report, list[Mismatch]]:
    """Send a corpus to a fresh server; the report and the entries whose class changed."""
    entries = load_corpus(directory)
    cases = ((entry["case"], case) for entry, case in entries)
    report = run_on_server(cases, work, -1, database_url, batch)
    return report, mismatches(entries, report.results)


# --- output --------------------------------------------------------------------------------


def markdown(summary: dict[str, Any], title: str = "Fuzzing") -> str:
    lines = [
        f"# {title}",
        "",
        f"Seed {summary['seed']}, {summary['cases']} cases in {summary['seconds']} s against "
        f"one server ({summary['database']} catalog); the server was checked after every batch "
        f"({summary['batches_checked']} checks: C-ECHO, GET /health, same worker processes, no "
        "HTTP 5xx).",
        "",
        "| target | cases | outcomes by kind | crashes | 5xx | mean ms | max ms |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, t in summary["targets"].items():
        outcomes = ", ".join(f"`{k}` {v}" for k, v in t["outcomes"].items())
        lines.append(
            f"| {name} | {t['cases']} | {outcomes} | {t['crashes']} | {t['http_5xx']} | "
            f"{t['mean_ms']} | {t['max_ms']} |"
        )
    lines += [
        "",
        f"* crashes: **{summary['crashes']}** (server stopped answering, a process died, or an "
        "HTTP 5xx)",
        f"* cases without any reply in time: {summary['no_reply']}",
        f"* peak RSS of the server's process tree: {summary['peak_rss_mb']} MB "
        f"(limit {summary['memory_limit_mb']} MB)",
        f"* tracebacks in the server log: {summary['server_log_tracebacks']} (pynetdicom logging "
        f"the malformed PDUs it aborts on); ERROR lines from the server's own code (a handler "
        f"that raised, an unhandled HTTP error): {summary['server_code_errors']}",
        f"* JSON API: {summary['json_api']}",
    ]
    for crash in summary["crash_details"]:
        lines.append(f"* crash: cases {crash['cases'][:5]}...: {'; '.join(crash['problems'])}")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, report: Report, extra: dict[str, Any] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {**report.summary(), **(extra or {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    with open(out / "cases.jsonl", "w") as f:
        for result in report.results:
            f.write(json.dumps(asdict(result)) + "\n")


def dump_case(case: Case) -> dict[str, Any]:
    """A case as JSON (for reproducing one by hand)."""
    return {
        "target": case.target,
        "name": case.name,
        "meta": case.meta,
        "data": base64.b64encode(case.data).decode(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=1000, help="how many cases (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="folder for the summary")
    parser.add_argument("--batch", type=int, default=25, help="cases between server checks")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    parser.add_argument("--database-url", default="", help="PostgreSQL instead of SQLite")
    parser.add_argument("--corpus", type=Path, help="write the minimized corpus here")
    parser.add_argument("--replay", type=Path, help="replay this corpus instead of fuzzing")
    parser.add_argument("--case", type=int, help="print case N of --seed as JSON and exit")
    parser.add_argument("--keep", action="store_true", help="keep the server's data and log")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    if args.case is not None:
        print(json.dumps(dump_case(generate(args.seed, args.case, targets)), indent=1))
        return 0
    work_dir = tempfile.mkdtemp(prefix="fuzz-", dir=os.environ.get("TMPDIR"))
    work = Path(work_dir)

    def run() -> int:
        scratch = _scratch_database(args.database_url)
        with scratch as url:
            if args.replay:
                report, mismatches = replay(args.replay, work, url, args.batch)
                write_outputs(args.out, report, {"mismatches": [asdict(m) for m in mismatches]})
                for m in mismatches:
                    log(f"MISMATCH {m.file}: expected {m.expected}, got {m.got}")
                failed = bool(mismatches)
            else:
                corpus = Corpus() if args.corpus else None
                report = fuzz(args.seed, args.cases, work, url, args.batch, targets, corpus)
                write_outputs(args.out, report)
                if corpus is not None:
                    written = corpus.write(args.corpus, args.seed, args.cases)
                    log(f"corpus: {written} entries in {args.corpus}")
                failed = False
        summary = report.summary()
        print((args.out / "summary.md").read_text())
        log(f"wrote {args.out}/summary.json, summary.md, cases.jsonl")
        return 1 if summary["crashes"] or failed else 0

    try:
        return run()
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _scratch_database(url: str) -> Any:
    """A fresh PostgreSQL database on the server of ``url`` (dropped afterwards), or SQLite."""
    import contextlib

    if not url:
        return contextlib.nullcontext("")
    from tools.procs import scratch_postgres

    return scratch_postgres(url)


if __name__ == "__main__":
    sys.exit(main())
