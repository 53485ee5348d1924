"""Malformed input at volume (tools/fuzz.py): the committed corpus and a seeded batch against a
real server, which must keep answering with the same outcome class per corpus entry, no HTTP
5xx, no dead process, no exception out of our handlers, and bounded memory.

The corpus (tests/fuzz_corpus, see its README) holds the smallest input of each distinct
outcome per target and one input per bug the fuzzer found; a change that makes, for example,
a truncated PDU answered with success, or a bad data set stored, shows up as a mismatch here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.helpers import ROOT, catalog, echo
from tools import fuzz_wire
from tools.fuzz import (
    MEMORY_LIMIT_MB,
    Report,
    Target,
    check_memory,
    load_corpus,
    mismatches,
    run_cases,
)
from tools.fuzz_cases import (
    MUST_FAIL,
    MUST_SUCCEED,
    TARGETS,
    anchor_cases,
    generate,
    regression_cases,
)
from tools.proctree import RssSampler

CORPUS = ROOT / "tests" / "fuzz_corpus"
SEED = 20240601
SEEDED_CASES = 200


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """One server per catalog backend: the outcomes must not depend on it (PostgreSQL refused
    NUL characters and over-long index entries where SQLite took them)."""
    with catalog(request.param) as url:
        server = Target(tmp_path_factory.mktemp("fuzz"), url)
        server.start()
        yield server
        server.stop()


def _assert_no_crash(report: Report) -> None:
    summary = report.summary()
    assert summary["crashes"] == 0, summary["crash_details"]
    assert summary["http_5xx"] == 0
    assert summary["server_code_errors"] == 0, summary["server_code_error_lines"]


def test_corpus_covers_every_target_and_regression() -> None:
    entries = load_corpus(CORPUS)
    assert {entry["target"] for entry, _ in entries} == set(TARGETS)
    kept = {entry["generator"] for entry, _ in entries}
    missing = {case.name for case in regression_cases() + anchor_cases()} - kept
    assert not missing, f"regression/anchor cases not in the corpus (regenerate it): {missing}"


def test_corpus_replays_with_the_recorded_outcomes(target: Target) -> None:
    entries = load_corpus(CORPUS)
    report = Report(-1, "", "")
    with RssSampler(target.pid, 0.05) as sampler:
        run_cases(target, ((entry["case"], case) for entry, case in entries), report)
        report.peak_rss_mb = sampler.peak_mb
    check_memory(report)
    _assert_no_crash(report)
    assert report.peak_rss_mb < MEMORY_LIMIT_MB
    assert mismatches(entries, report.results) == []
    # The classes are recorded, but say it outright for the anchors: a truncated PDU, a
    # truncated data set or multipart body is never answered with success; their well-formed
    # counterparts always are.
    for (entry, _case), result in zip(entries, report.results, strict=True):
        if entry["generator"] in MUST_FAIL:
            assert not fuzz_wire.is_success(result.kind), (entry["file"], result.kind)
        if entry["generator"] in MUST_SUCCEED:
            assert fuzz_wire.is_success(result.kind), (entry["file"], result.kind)
        assert "oversized-pdu" not in result.kind, entry["file"]


def test_seeded_batch(target: Target) -> None:
    report = Report(SEED, "", "")
    started = time.monotonic()
    with RssSampler(target.pid) as sampler:
        run_cases(target, ((n, generate(SEED, n)) for n in range(SEEDED_CASES)), report)
        report.peak_rss_mb = sampler.peak_mb
    check_memory(report)
    _assert_no_crash(report)
    assert len(report.results) == SEEDED_CASES
    assert {r.target for r in report.results} == set(TARGETS)
    assert not [r for r in report.results if r.kind.startswith("client-error")]
    assert not [r for r in report.results if "oversized-pdu" in r.kind]
    assert time.monotonic() - started < 120


def test_bare_connections_do_not_hold_association_slots(target: Target) -> None:
    """Connections closed before their A-ASSOCIATE-RQ (a port scan, a TCP health check) held
    an association slot each for the ACSE timeout: 64 of them refused every association for
    30 s (fixed in server/dimse/polling.py)."""
    for _ in range(100):
        socket.create_connection(("127.0.0.1", target.dimse_port)).close()
    deadline = time.monotonic() + 5
    while not echo(target.dimse_port):
        assert time.monotonic() < deadline, "the AE refuses associations after bare connects"
        time.sleep(0.1)  # poll interval


def test_corpus_readme_documents_regeneration() -> None:
    readme = (CORPUS / "README.md").read_text()
    assert "python -m tools.fuzz" in readme and "--corpus tests/fuzz_corpus" in readme
