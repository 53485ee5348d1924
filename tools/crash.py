"""Crash harness: SIGKILL the server at random moments during ingest and prove nothing
acknowledged is lost.

    .venv/bin/python -m tools.crash --rounds 20 --seed 7 --out crash-report
    .venv/bin/python -m tools.crash --database-url postgresql://postgres@127.0.0.1:5432/postgres

Each round, on the same data directory (state accumulates from round to round):

1. start ``python -m server serve``;
2. send at once: 4 DCMTK ``storescu -v`` associations (one CT series each, new UIDs every
   round) and a STOW-RS client posting multipart batches;
3. SIGKILL the server (its workers die with it) after a random delay drawn from the seed;
4. restart it (start-up recovery runs), stop it cleanly, then verify:
   * every instance acknowledged before the kill (storescu's "Received Store Response
     (Success)", a STOW response's ReferencedSOPSequence) is catalogued and its file holds
     that instance (``python -m server check --deep`` plus a catalog lookup);
   * ``check`` finds no orphan file, no row without a file, no interrupted write left and no
     wrong counter.

The summary (JSON and markdown) counts kills, acknowledged instances, instances lost (must be
0) and check problems (must be 0). Exit status 1 when anything was lost or left behind.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tools.generate import StudySpec, ct_series, write
from tools.procs import NODELAY_ENV, OurServer, dcmtk, scratch_postgres, stow_body, write_config

ROOT = Path(__file__).resolve().parent.parent
_SENT = re.compile(r"Sending file: (\S+)")
_RECOVERED = re.compile(r"recovered interrupted writes: (\d+) kept, (\d+) orphans removed")


@dataclass
class Round:
    number: int
    kill_at_acks: int  # the kill comes once storescu saw this many acknowledgements ...
    jitter_ms: float  # ... plus this long, so it lands at any point of an instance's write
    kill_after_s: float = 0.0
    acked_dimse: int = 0
    acked_stow: int = 0
    lost: list[str] = field(default_factory=list)
    check_problems: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # C-STORE or STOW failures before the kill (should be 0)
    unacked: int = 0  # sent but not acknowledged when the kill came (the kill was mid-ingest)
    recovered: str = ""  # what start-up recovery reported (writes caught in flight)
    restart_s: float = 0.0


def acknowledged(log: str) -> list[str]:
    """Files storescu saw acknowledged with Success (its -v log, in order)."""
    acked, current = [], None
    for line in log.splitlines():
        sent = _SENT.search(line)
        if sent:
            current = sent.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def _refused(log: str) -> int:
    return sum(
        1
        for line in log.splitlines()
        if "Received Store Response" in line and "Success" not in line
    )


class StowClient(threading.Thread):
    """Posts ``files`` in batches until done or the connection breaks; remembers acks."""

    def __init__(self, port: int, files: list[Path], batch: int = 4) -> None:
        super().__init__(daemon=True)
        self.port, self.files, self.batch = port, files, batch
        self.acked: list[str] = []
        self.failed = 0

    def run(self) -> None:
        for start in range(0, len(self.files), self.batch):
            body, content_type = stow_body(
                p.read_bytes() for p in self.files[start : start + self.batch]
            )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request(
                    "POST",
                    "/dicom-web/studies",
                    body,
                    {"Content-Type": content_type, "Accept": "application/dicom+json"},
                )
                response = conn.getresponse()
                payload = response.read()
                conn.close()
            except (OSError, http.client.HTTPException):
                return  # the server was killed
            if response.status not in (200, 202):
                self.failed += 1
                continue
            for item in orjson.loads(payload).get("00081199", {}).get("Value", []):
                self.acked.append(item["00081155"]["Value"][0])


def _generate(work: Path, number: int, slices: int, size: int) -> tuple[list[Path], list[Path]]:
    """Four storescu folders and one STOW file list, all with new UIDs."""
    base = work / "input" / f"round{number}"
    folders = []
    for n in range(4):
        folder = base / f"dimse{n}"
        spec = StudySpec(patient_id=f"CRASH{number:03d}{n}", accession=f"C{number}{n}")
        for ds in ct_series(spec, slices, size):
            write(ds, folder)
        folders.append(folder)
    stow_dir = base / "stow"
    spec = StudySpec(patient_id=f"CRASHSTOW{number:03d}", accession=f"S{number}")
    for ds in ct_series(spec, slices, size):
        write(ds, stow_dir)
    return folders, sorted(stow_dir.iterdir())


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(
        dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
    )


def _catalogued(server: OurServer, database_url: str) -> set[str]:
    """SOP Instance UIDs in the catalog (read directly, server stopped)."""
    code = (
        "import sys\n"
        "from server.catalog.db import database, make_database\n"
        "from server.catalog.schema import Instance\n"
        "database.initialize(make_database(sys.argv[1]))\n"
        "database.connect()\n"
        "for (uid,) in Instance.select(Instance.sop_instance_uid).tuples():\n"
        "    print(uid)\n"
    )
    url = database_url or f"sqlite:///{(server.data_dir / 'catalog.sqlite').resolve()}"
    out = subprocess.run(
        [sys.executable, "-c", code, url], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def _check(server: OurServer, config: Path, database_url: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "server", "--config", str(config), "check", "--deep", "--json"]
    cmd += ["--data-dir", str(server.data_dir), "--grace", "0"]
    if database_url:
        cmd += ["--database-url", database_url]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        raise RuntimeError(f"check failed: {out.stderr[-500:]}")
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def run_round(
    server: OurServer,
    config: Path,
    work: Path,
    number: int,
    rng: random.Random,
    args: argparse.Namespace,
) -> Round:
    folders, stow_files = _generate(work, number, args.slices, args.size)
    total = 4 * args.slices
    # At most 70% acknowledged plus 0-30 ms: the rest takes longer than that even at the
    # fastest ingest measured (~600 instances/s), so the kill lands mid-ingest (with 90% plus
    # 0-50 ms, a faster server finished some rounds before the kill).
    result = Round(number, rng.randint(total // 20, total * 7 // 10), round(rng.uniform(0, 30), 1))
    server.start()
    logs = [work / f"storescu-{number}-{n}.log" for n in range(4)]
    senders = []
    for folder, log in zip(folders, logs, strict=True):
        with open(log, "w") as fh:
            senders.append(
                subprocess.Popen(
                    [
                        dcmtk("storescu"),
                        "-v",
                        "-aec",
                        server.ae_title,
                        "127.0.0.1",
                        str(server.port),
                        "+sd",
                        str(folder),
                    ],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env={**NODELAY_ENV, "PATH": "/usr/bin:/bin"},
                )
            )
    stow = StowClient(server.http_port, stow_files)
    stow.start()
    began = time.monotonic()
    while time.monotonic() - began < 300:
        if sum(len(acknowledged(log.read_text())) for log in logs) >= result.kill_at_acks:
            break
        if all(proc.poll() is not None for proc in senders):
            break  # everything was sent before the drawn moment
        time.sleep(0.005)  # polling the storescu logs, not waiting for the server
    time.sleep(result.jitter_ms / 1000)
    server.kill()
    result.kill_after_s = round(time.monotonic() - began, 3)
    for proc in senders:
        proc.wait(60)
    stow.join(60)
    acked_files = [Path(p) for log in logs for p in acknowledged(log.read_text())]
    result.acked_dimse = len(acked_files)
    result.acked_stow = len(stow.acked)
    result.refused = sum(_refused(log.read_text()) for log in logs) + stow.failed
    acked = {_sop_uid(p) for p in acked_files} | set(stow.acked)
    result.unacked = 5 * args.slices - len(acked)

    before = len(server.log())
    started = time.monotonic()
    server.start()  # recovery of the interrupted writes runs here
    result.restart_s = round(time.monotonic() - started, 2)
    server.stop()
    found = _RECOVERED.search(server.log()[before:])
    result.recovered = f"{found.group(1)} kept, {found.group(2)} removed" if found else "nothing"

    result.lost = sorted(acked - _catalogued(server, args.database_url))
    report = _check(server, config, args.database_url)
    result.check_problems = report["problems"]
    shutil.rmtree(work / "input" / f"round{number}", ignore_errors=True)
    return result


def summarise(rounds: list[Round]) -> dict[str, Any]:
    problems: dict[str, int] = {}
    for r in rounds:
        for kind, n in r.check_problems.items():
            problems[kind] = problems.get(kind, 0) + n
    return {
        "kills": len(rounds),
        "acknowledged_dimse": sum(r.acked_dimse for r in rounds),
        "acknowledged_stow": sum(r.acked_stow for r in rounds),
        "lost": sum(len(r.lost) for r in rounds),
        "check_problems": problems,
        "refused_before_kill": sum(r.refused for r in rounds),
        "restart_s_max": max((r.restart_s for r in rounds), default=0.0),
    }


def markdown(summary: dict[str, Any], rounds: list[Round], args: argparse.Namespace) -> str:
    lines = [
        "# Crash harness",
        "",
        f"`python -m tools.crash --rounds {args.rounds} --seed {args.seed} "
        f"--slices {args.slices} --size {args.size} --durability {args.durability}`; the kill "
        "comes after a random number of "
        "C-STORE acknowledgements plus 0-30 ms"
        + (" (PostgreSQL)" if args.database_url else " (SQLite)"),
        "",
        "| round | killed after (s) | acked C-STORE | acked STOW | not acked | recovery at restart "
        "| lost | problems |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        problems = ", ".join(f"{k} {v}" for k, v in r.check_problems.items()) or "none"
        lines.append(
            f"| {r.number} | {r.kill_after_s} | {r.acked_dimse} | {r.acked_stow} | "
            f"{r.unacked} | {r.recovered} | {len(r.lost)} | {problems} |"
        )
    lines += [
        "",
        f"Kills: {summary['kills']}; acknowledged: {summary['acknowledged_dimse']} by C-STORE, "
        f"{summary['acknowledged_stow']} by STOW-RS; **lost: {summary['lost']}**; "
        f"check problems after restart: {summary['check_problems'] or 'none'}; "
        f"slowest restart {summary['restart_s_max']} s.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slices", type=int, default=60, help="CT slices per series")
    parser.add_argument("--size", type=int, default=256, help="CT rows/columns")
    parser.add_argument("--database-url", default="", help="PostgreSQL (a scratch database)")
    parser.add_argument(
        "--durability",
        choices=("power-loss", "process"),
        default="power-loss",
        help="[storage] durability; both must survive SIGKILL",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    parser.add_argument("--out", type=Path, default=None, help="write summary.json/.md here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dcmtk("storescu")  # a clear error now rather than in the first round
    import tempfile

    work = args.workdir or Path(tempfile.mkdtemp(prefix="crash-"))
    work.mkdir(parents=True, exist_ok=True)
    scratch = scratch_postgres(args.database_url) if args.database_url else None
    database_url = args.database_url = scratch.__enter__() if scratch is not None else ""
    try:
        config = write_config(
            work / "config",
            server=f'[ae]\ntitle = "IMAGING"\n[storage]\ndurability = "{args.durability}"\n',
        )
        server = OurServer(work / "data", config, database_url=database_url)
        rng = random.Random(args.seed)
        rounds = []
        for number in range(1, args.rounds + 1):
            r = run_round(server, config, work, number, rng, args)
            rounds.append(r)
            print(
                f"round {number}: killed after {r.kill_after_s}s, acked {r.acked_dimse} C-STORE "
                f"+ {r.acked_stow} STOW, lost {len(r.lost)}, problems {r.check_problems or 0}",
                flush=True,
            )
    finally:
        if scratch is not None:
            scratch.__exit__(None, None, None)
    summary = summarise(rounds)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"summary": summary, "rounds": [asdict(r) for r in rounds]}
        (args.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "summary.md").write_text(markdown(summary, rounds, args))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if summary["lost"] or summary["check_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
