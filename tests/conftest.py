from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import (
    ServerProcess,
    catalog,
    free_port,
    have,
    write_config,
)
from tools.generate import StudySpec, ct_series, write

if TYPE_CHECKING:
    from server.archive import Archive

CT_SLICES = 110


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from tools import procs

    item.stash[_FIRST_LOG] = len(procs.STARTED_LOGS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with the log tails of the servers it started (module- and
    session-scoped servers started before it are not shown)."""
    from tools import procs

    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for path in procs.STARTED_LOGS[item.stash.get(_FIRST_LOG, 0) :]:
            if path.exists():
                text = path.read_text(errors="replace")[-4000:]
                report.sections.append((f"server log {path.name} (tail)", text))


_FIRST_LOG = pytest.StashKey[int]()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """'' selects the embedded SQLite catalog; otherwise a fresh PostgreSQL database."""
    with catalog(request.param) as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with catalog("postgres") as url:
        yield url


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 110-slice 512x512 CT study written as Part 10 files."""
    out = tmp_path_factory.mktemp("ct")
    spec = StudySpec(patient_id="CT-PAT-1", patient_name="LEWIS^ANNA", accession="CTACC1")
    for ds in ct_series(spec, CT_SLICES, 512):
        write(ds, out)
    return out


@pytest.fixture
def dcmtk() -> None:
    if not (have("storescu") and have("findscu") and have("movescu") and have("getscu")):
        pytest.skip("DCMTK is not installed (tools/test installs it when run as root)")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def make(
        database_url: str = "",
        *,
        peers: tuple[tuple[str, int], ...] = (),
        server_toml: str = "",
        name: str = "node",
    ) -> ServerProcess:
        config = write_config(tmp_path / f"{name}-config", peers=peers, server=server_toml)
        proc = ServerProcess(tmp_path / f"{name}-data", config, database_url)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def move_port() -> int:
    return free_port()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """An archive opened in this process on an empty data directory (SQLite)."""
    from server.archive import close_archive, open_archive
    from server.config import load_settings

    opened = open_archive(load_settings(None, {"data_dir": str(tmp_path / "data")}, environ={}))
    try:
        yield opened
    finally:
        close_archive()
