from __future__ import annotations

from pathlib import Path

import pytest

from server.config import load_settings
from server.errors import ConfigError
from tests.helpers import ROOT

PEER = '[[peer]]\nae_title = "A"\nhost = "h"\nport = {}\n'
TWO_PEERS = PEER.format(1) + PEER.format(2)


def _dir(tmp_path: Path, server: str, peers: str = "") -> Path:
    (tmp_path / "server.toml").write_text(server)
    (tmp_path / "peers.toml").write_text(peers)
    return tmp_path


def test_shipped_config_loads() -> None:
    settings = load_settings(ROOT / "ae_config", environ={})
    assert settings.ae_title == "IMAGING"
    assert settings.dimse_port == 11112
    assert settings.data_dir == ROOT / "storage"
    assert settings.peer("VIEWER") is not None
    assert settings.catalog_url.startswith("sqlite:///")


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    d = _dir(tmp_path, '[ae]\ntitle = "FROMFILE"\nport = 1000\n')
    assert load_settings(d, environ={}).ae_title == "FROMFILE"
    env = {"IMAGING_AE_TITLE": "FROMENV", "IMAGING_DIMSE_PORT": "2000"}
    s = load_settings(d, environ=env)
    assert (s.ae_title, s.dimse_port) == ("FROMENV", 2000)
    s = load_settings(d, {"ae_title": "FROMCLI", "dimse_port": None}, environ=env)
    assert (s.ae_title, s.dimse_port) == ("FROMCLI", 2000)


@pytest.mark.parametrize(
    ("server", "peers", "where", "message"),
    [
        ('[ae]\ntitle = "X"\nport = "abc"\n', "", "server.toml:3", "expected an integer"),
        ('[ae]\n\ntitel = "X"\n', "", "server.toml:3", "unknown setting ae.titel"),
        ("[ae]\nport = 99999\n", "", "server.toml:2", "out of range"),
        ('[ae]\ntitle = "WAY_TOO_LONG_AE_TITLE"\n', "", "server.toml:2", "invalid AE title"),
        ('[storage]\nduplicates = "keep"\n', "", "server.toml:2", "duplicates must be"),
        ('[storage]\ndurability = "never"\n', "", "server.toml:2", "durability must be"),
        ('[storage]\nbackend = "ftp"\n', "", "server.toml:2", "backend must be local or s3"),
        ('[storage]\nbackend = "s3"\n', "", "server.toml:2", "needs storage.s3_bucket"),
        ("[ae\ntitle = 1\n", "", "server.toml:1", ""),
        ("", '[[peer]]\nae_title = "A"\nhost = "h"\n', "peers.toml:", "lacks port"),
        (
            "",
            TWO_PEERS.replace('"A"\nhost = "h"\nport = 2', '"B"\nhost = "h"\nport = 0'),
            "peers.toml:8",
            "out of range",
        ),
        (
            "",
            '[[peer]]\nae_title = "A"\nhost = "h"\nport = 1\nfoo = 2\n',
            "peers.toml:5",
            "unknown peer setting",
        ),
        (
            "",
            TWO_PEERS,
            "peers.toml:6",
            "listed twice",
        ),
    ],
)
def test_errors_name_file_and_line(
    tmp_path: Path, server: str, peers: str, where: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_dir(tmp_path, server, peers), environ={})
    assert where in str(info.value)
    assert message in str(info.value)


def test_durability_sets_sqlite_synchronous(tmp_path: Path) -> None:
    """Process-level durability drops SQLite to NORMAL unless synchronous is set explicitly."""
    default = load_settings(_dir(tmp_path, ""), environ={})
    assert (default.durability, default.sqlite_sync) == ("power-loss", "FULL")
    process = load_settings(tmp_path, environ={"IMAGING_DURABILITY": "process"})
    assert process.sqlite_sync == "NORMAL"
    explicit = _dir(tmp_path, '[storage]\ndurability = "process"\nsqlite_synchronous = "FULL"\n')
    assert load_settings(explicit, environ={}).sqlite_sync == "FULL"


def test_shipped_configuration_lets_durability_choose_sqlite_synchronous() -> None:
    """ae_config/server.toml once set sqlite_synchronous = "FULL" explicitly, so switching
    its durability to "process" silently kept a WAL fsync on every commit (0.31 ms instead of
    0.06 ms per instance, measured)."""
    shipped = load_settings(None, environ={})
    assert (shipped.durability, shipped.sqlite_sync) == ("power-loss", "FULL")
    process = load_settings(None, environ={"IMAGING_DURABILITY": "process"})
    assert process.sqlite_sync == "NORMAL"


def test_bad_environment_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IMAGING_DIMSE_PORT"):
        load_settings(_dir(tmp_path, ""), environ={"IMAGING_DIMSE_PORT": "eleven"})


def test_serve_reports_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    d = _dir(tmp_path, "[ae]\nmax_pdu = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(d)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "server.toml:2" in result.stderr and "max_pdu" in result.stderr
