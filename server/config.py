"""One frozen :class:`Settings`, read from ``ae_config/*.toml`` then the environment, then the CLI.

Precedence (lowest first): built-in defaults, ``server.toml``, ``IMAGING_*`` environment variables,
command-line options.  Every problem is reported as a :class:`~server.errors.ConfigError` naming the
file and line, so a typo stops start-up with a pointer instead of a silent default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConfigError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ae_config"
DUPLICATE_POLICIES = ("ignore", "replace")
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash


@dataclass(frozen=True)
class Peer:
    """A remote AE we know (``peers.toml``): where it listens and what it may do."""

    ae_title: str
    host: str
    port: int
    query: bool = True
    retrieve: bool = True
    move_destination: bool = True
    store: bool = True
    institution: str = ""  # worklist tenant: the MWL/MPPS items this AE sees ("" = none)
    # DICOM TLS (PS3.15 Annex B) for our associations to this AE (send, echo, C-MOVE).
    tls: bool = False
    tls_ca_certificates: Path | None = None  # CAs its certificate must chain to (see tls.py)
    tls_certificate: Path | None = None  # the certificate we present; None: [tls] certificate
    tls_private_key: Path | None = None  # its key; None: [tls] private_key
    tls_check_hostname: bool = True  # its certificate must name ``host`` (RFC 9325 / 6125)


@dataclass(frozen=True)
class AiRule:
    """Which stable series the AI worker analyses (``ai_rules.toml``): every given field must
    match; a series is analysed when any rule matches.  Text fields are regular expressions
    searched case-insensitively in the series' value ("" = any value)."""

    name: str
    modality: str = "MR"  # exact Modality (0008,0060)
    series_description: str = ""
    body_part: str = ""
    scanning_sequence: str = ""
    min_instances: int = 8  # fewer slices than this is not a volume worth segmenting


@dataclass(frozen=True)
class Settings:
    ae_title: str = "IMAGING"
    dimse_port: int = 11112
    bind_address: str = "0.0.0.0"
    http_port: int = 8042
    http_bind_address: str = "127.0.0.1"
    auth_off_for_loopback: bool = True  # requests from this machine need no token
    public_url: str = ""  # how clients reach us, if not the request's Host (proxies)
    cors_origins: str = ""  # comma-separated origins allowed by CORS; "*" for any; "" = off
    viewer_dir: Path = DEFAULT_CONFIG_DIR.parent / "viewer"
    max_pdu: int = 0
    max_associations: int = 32
    max_request_mb: int = 4096  # largest HTTP request body (413 beyond); 0 = no limit
    max_query_results: int = 10000  # C-FIND refuses (0xA700) / QIDO caps (Warning 299) beyond
    dimse_workers: int = 0  # processes accepting associations; 0 = one per core, at most 4
    accept_unknown_calling_aes: bool = True
    # storage-only associations served by server/dimse/storage_scp.py instead of pynetdicom
    direct_storage: bool = True
    unknown_aes_may_query: bool = True
    unknown_aes_may_retrieve: bool = True
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    data_dir: Path = Path("storage")
    database_url: str = ""
    duplicates: str = "ignore"
    storage_backend: str = "local"  # "local" (files under data_dir) or "s3" (server/objectstore.py)
    s3_endpoint: str = ""  # e.g. http://127.0.0.1:8333 (MinIO, SeaweedFS); "" = AWS
    s3_bucket: str = ""
    s3_region: str = ""
    s3_prefix: str = ""  # object names start with this (one bucket, several archives)
    s3_access_key: str = ""
    s3_secret_key: str = ""  # better given as IMAGING_S3_SECRET_KEY than written in a file
    s3_cache_mb: int = 1024  # local copies for readers that seek (frames, rendering, AI)
    sqlite_synchronous: str = "FULL"
    # "power-loss": an acknowledged instance survives a power cut (file, directory and catalog
    # fsynced before the success status); "process": it survives the server being killed, not
    # a power cut or kernel crash (no fsyncs, SQLite synchronous=NORMAL), as Orthanc does.
    durability: str = "power-loss"
    deleted_retention_days: int = 180  # deleted series stay recoverable this long
    case_insensitive_pn: bool = True
    unknown_aes_institution: str = ""  # worklist tenant of calling AEs not in peers.toml
    ai_enabled: bool = True  # serve starts the AI worker(s); the trigger queues jobs
    ai_workers: int = 1  # worker processes started by serve
    ai_device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    ai_threads: int = 1  # CPU threads per worker for inference
    ai_stable_age: float = 10.0  # seconds without a new instance before a series is complete
    ai_model: Path = DEFAULT_CONFIG_DIR.parent / "models" / "prostate-phantom"
    ai_max_attempts: int = 3  # a job failing this often stops with its last reason
    ai_lease: float = 60.0  # seconds a claimed job stays with a worker that stopped reporting
    ai_poll_interval: float = 1.0  # seconds between two looks for stable series and jobs
    metrics_enabled: bool = True  # GET /metrics (Prometheus) and the counters behind it
    metrics_token: str = ""  # a bearer token that may read /metrics ("" = admin users only)
    log_format: str = "text"  # "text" (one readable line) or "json" (one object per line)
    ai_rules: tuple[AiRule, ...] = field(default_factory=tuple)
    peers: tuple[Peer, ...] = field(default_factory=tuple)
    config_dir: Path = DEFAULT_CONFIG_DIR
    # [tls]: DICOM TLS (PS3.15 Annex B) on a port of its own, and HTTPS (server/tls.py).
    tls_certificate: Path | None = None  # PEM certificate (chain) this server presents
    tls_private_key: Path | None = None  # its PEM key; None: the certificate file holds it
    tls_ca_certificates: Path | None = None  # PEM CAs that client certificates must chain to
    tls_require_client_certificate: bool = False  # refuse clients without a valid certificate
    tls_dicom_port: int = 0  # the DICOM TLS port (2762 is registered, PS3.15 B.1); 0 = none
    tls_plain_dicom: bool = True  # False: [ae] port is not opened, only the TLS port
    tls_https: bool = False  # the HTTP port speaks HTTPS
    # Where each setting read from a file or the environment came from ("path:line"), for
    # errors found after loading (an unreadable certificate at start-up).
    locations: tuple[tuple[str, str], ...] = ()

    def location(self, name: str) -> str | None:
        """Where setting ``name`` was given ("path:line", "environment variable ..."), if set."""
        return dict(self.locations).get(name)

    @property
    def dicom_tls(self) -> bool:
        """A DICOM TLS port is configured."""
        return self.tls_dicom_port != 0

    @property
    def sqlite_sync(self) -> str:
        """SQLite's synchronous mode: NORMAL for process-level durability unless set explicitly
        (in WAL mode a committed transaction then survives a killed process, not a power cut)."""
        if self.durability == "process" and self.location("sqlite_synchronous") is None:
            return "NORMAL"
        return self.sqlite_synchronous

    @property
    def catalog_url(self) -> str:
        """The catalog database URL: the configured one, else SQLite inside the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite').resolve()}"

    def peer(self, ae_title: str) -> Peer | None:
        title = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == title), None)

    def institution_of(self, ae_title: str) -> str:
        """The tenant of a calling AE: its peer's ``institution``, else the one for unknown AEs
        ("" = none). It owns the studies the AE stores and scopes its worklist."""
        peer = self.peer(ae_title)
        return peer.institution if peer is not None else self.unknown_aes_institution


# (section, key) in server.toml -> (Settings field, type)
_SERVER_KEYS: dict[tuple[str, str], tuple[str, type]] = {
    ("ae", "title"): ("ae_title", str),
    ("ae", "port"): ("dimse_port", int),
    ("ae", "bind"): ("bind_address", str),
    ("ae", "max_pdu"): ("max_pdu", int),
    ("ae", "max_associations"): ("max_associations", int),
    ("limits", "max_request_mb"): ("max_request_mb", int),
    ("limits", "max_query_results"): ("max_query_results", int),
    ("ae", "workers"): ("dimse_workers", int),
    ("ae", "accept_unknown_calling_aes"): ("accept_unknown_calling_aes", bool),
    ("ae", "direct_storage"): ("direct_storage", bool),
    ("ae", "unknown_aes_may_query"): ("unknown_aes_may_query", bool),
    ("ae", "unknown_aes_may_retrieve"): ("unknown_aes_may_retrieve", bool),
    ("timeouts", "acse"): ("acse_timeout", float),
    ("timeouts", "dimse"): ("dimse_timeout", float),
    ("timeouts", "network"): ("network_timeout", float),
    ("storage", "data_dir"): ("data_dir", Path),
    ("storage", "database_url"): ("database_url", str),
    ("storage", "duplicates"): ("duplicates", str),
    ("storage", "backend"): ("storage_backend", str),
    ("storage", "s3_endpoint"): ("s3_endpoint", str),
    ("storage", "s3_bucket"): ("s3_bucket", str),
    ("storage", "s3_region"): ("s3_region", str),
    ("storage", "s3_prefix"): ("s3_prefix", str),
    ("storage", "s3_access_key"): ("s3_access_key", str),
    ("storage", "s3_secret_key"): ("s3_secret_key", str),
    ("storage", "s3_cache_mb"): ("s3_cache_mb", int),
    ("storage", "sqlite_synchronous"): ("sqlite_synchronous", str),
    ("storage", "durability"): ("durability", str),
    ("storage", "deleted_retention_days"): ("deleted_retention_days", int),
    ("query", "case_insensitive_pn"): ("case_insensitive_pn", bool),
    ("worklist", "unknown_aes_institution"): ("unknown_aes_institution", str),
    ("http", "port"): ("http_port", int),
    ("http", "bind"): ("http_bind_address", str),
    ("http", "cors_origins"): ("cors_origins", str),
    ("http", "public_url"): ("public_url", str),
    ("http", "auth_off_for_loopback"): ("auth_off_for_loopback", bool),
    ("http", "viewer_dir"): ("viewer_dir", Path),
    ("ai", "enabled"): ("ai_enabled", bool),
    ("ai", "workers"): ("ai_workers", int),
    ("ai", "device"): ("ai_device", str),
    ("ai", "threads"): ("ai_threads", int),
    ("ai", "stable_age"): ("ai_stable_age", float),
    ("ai", "model"): ("ai_model", Path),
    ("ai", "max_attempts"): ("ai_max_attempts", int),
    ("ai", "lease"): ("ai_lease", float),
    ("ai", "poll_interval"): ("ai_poll_interval", float),
    ("tls", "certificate"): ("tls_certificate", str),
    ("tls", "private_key"): ("tls_private_key", str),
    ("tls", "ca_certificates"): ("tls_ca_certificates", str),
    ("tls", "require_client_certificate"): ("tls_require_client_certificate", bool),
    ("tls", "dicom_port"): ("tls_dicom_port", int),
    ("tls", "plain_dicom"): ("tls_plain_dicom", bool),
    ("tls", "https"): ("tls_https", bool),
    ("metrics", "enabled"): ("metrics_enabled", bool),
    ("metrics", "token"): ("metrics_token", str),
    ("logging", "format"): ("log_format", str),
}
LOG_FORMATS = ("text", "json")
_TLS_PATHS = ("tls_certificate", "tls_private_key", "tls_ca_certificates")
_RULE_KEYS: dict[str, type] = {
    "name": str,
    "modality": str,
    "series_description": str,
    "body_part": str,
    "scanning_sequence": str,
    "min_instances": int,
}
_PEER_KEYS: dict[str, type] = {
    "ae_title": str,
    "host": str,
    "port": int,
    "query": bool,
    "retrieve": bool,
    "move_destination": bool,
    "store": bool,
    "institution": str,
    "tls": bool,
    "tls_ca_certificates": Path,
    "tls_certificate": Path,
    "tls_private_key": Path,
    "tls_check_hostname": bool,
}
_ENV_PREFIX = "IMAGING_"


def _line_of(text: str, section: str | None, key: str, occurrence: int = 0) -> int | None:
    """Line number of ``key`` inside ``[section]`` (or the n-th ``[[section]]``), if findable."""
    current: str | None = None
    index = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^(\[\[?)\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(2)
            if section is None and current == key:
                return number
            if header.group(1) == "[[" and current == section:
                index += 1
            continue
        if (
            current == section
            and index in (-1, occurrence)
            and re.match(rf"^\"?{re.escape(key)}\"?\s*=", line)
        ):
            return number
    return None


def _coerce(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"expected true or false, got {value!r}", where)
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}", where)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected an integer, got {value!r}", where) from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {value!r}", where) from None
    if kind is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"expected a path, got {value!r}", where)
        return Path(value)
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", where)
    return value


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc}", str(path)) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError carries the position only in its message.
        found = re.search(r"at line (\d+)", str(exc))
        line = found.group(1) if found else None
        raise ConfigError(str(exc), f"{path}:{line}" if line else str(path)) from None


def _server_values(path: Path) -> dict[str, Any]:
    data, text = _read_toml(path)
    values: dict[str, Any] = {}
    for section, body in data.items():
        if not isinstance(body, dict):
            line = _line_of(text, None, section)
            raise ConfigError(f"unknown top-level key {section!r}", f"{path}:{line}")
        for key, value in body.items():
            where = f"{path}:{_line_of(text, section, key)}"
            spec = _SERVER_KEYS.get((section, key))
            if spec is None:
                known = sorted(k for s, k in _SERVER_KEYS if s == section)
                hint = f" (known in [{section}]: {', '.join(known)})" if known else ""
                raise ConfigError(f"unknown setting {section}.{key}{hint}", where)
            name, kind = spec
            values[name] = (_coerce(value, kind, where), where)
    return values


def _tables(path: Path, name: str) -> tuple[str, list[dict[str, Any]]]:
    """The ``[[name]]`` tables of a file that holds nothing else, and the file's text."""
    data, text = _read_toml(path)
    extra = set(data) - {name}
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(
            f"unknown key {key!r}; entries are [[{name}]] tables",
            f"{path}:{_line_of(text, None, key)}",
        )
    items = data.get(name, [])
    if not isinstance(items, list):
        raise ConfigError(f"'{name}' must be written as [[{name}]] tables", str(path))
    return text, items


def _table_values(
    path: Path, text: str, name: str, n: int, item: dict[str, Any], keys: dict[str, type]
) -> dict[str, Any]:
    """The n-th ``[[name]]`` table's values, each checked against ``keys``."""
    kwargs: dict[str, Any] = {}
    for key, value in item.items():
        where = f"{path}:{_line_of(text, name, key, n)}"
        if key not in keys:
            raise ConfigError(f"unknown {name} setting {key!r} (known: {', '.join(keys)})", where)
        kwargs[key] = _coerce(value, keys[key], where)
    return kwargs


def _peers(path: Path) -> tuple[Peer, ...]:
    text, items = _tables(path, "peer")
    peers: list[Peer] = []
    for n, item in enumerate(items):
        kwargs = _table_values(path, text, "peer", n, item, _PEER_KEYS)
        missing = [k for k in ("ae_title", "host", "port") if k not in kwargs]
        if missing:
            raise ConfigError(
                f"peer #{n + 1} lacks {', '.join(missing)}",
                f"{path}:{_line_of(text, 'peer', next(iter(item), ''), n)}",
            )
        where = f"{path}:{_line_of(text, 'peer', 'ae_title', n)}"
        _check_ae_title(kwargs["ae_title"], where)
        _check_port(kwargs["port"], f"{path}:{_line_of(text, 'peer', 'port', n)}", allow_zero=False)
        if any(p.ae_title == kwargs["ae_title"] for p in peers):
            raise ConfigError(f"peer {kwargs['ae_title']!r} is listed twice", where)
        for key in ("tls_ca_certificates", "tls_certificate", "tls_private_key"):
            if key not in kwargs:
                continue
            if not kwargs.get("tls"):
                raise ConfigError(
                    f"{key} has no effect without tls = true",
                    f"{path}:{_line_of(text, 'peer', key, n)}",
                )
            # Relative to the configuration directory, where the certificates usually live.
            kwargs[key] = path.parent.resolve() / kwargs[key].expanduser()
        peers.append(Peer(**kwargs))
    return tuple(peers)


# Used when the configuration directory has no ai_rules.toml (the shipped file says the same).
DEFAULT_AI_RULES = (
    AiRule("T2-weighted by description", series_description="t2"),
    AiRule(
        "prostate spin echo",
        body_part="prostat",
        scanning_sequence="SE",
        series_description="^(?!.*(dwi|adc|diff|dce|perf)).*$",
    ),
)


def _ai_rules(path: Path) -> tuple[AiRule, ...]:
    if not path.exists():
        return DEFAULT_AI_RULES
    text, items = _tables(path, "rule")
    rules: list[AiRule] = []
    for n, item in enumerate(items):
        kwargs = _table_values(path, text, "rule", n, item, _RULE_KEYS)
        for key in ("series_description", "body_part", "scanning_sequence"):
            try:
                re.compile(kwargs.get(key, ""))
            except re.error as exc:
                where = f"{path}:{_line_of(text, 'rule', key, n)}"
                message = f"{key} is not a valid regular expression: {exc}"
                raise ConfigError(message, where) from None
        kwargs.setdefault("name", f"rule {n + 1}")
        rules.append(AiRule(**kwargs))
    return tuple(rules)


def _check_ae_title(title: str, where: str | None) -> None:
    if not _AE_TITLE_RE.match(title) or not title.strip():
        raise ConfigError(
            f"invalid AE title {title!r}: 1-16 printable ASCII characters, no backslash", where
        )


def _check_port(port: int, where: str | None, allow_zero: bool = True) -> None:
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"port {port} out of range", where)


def load_settings(
    config_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective settings.

    ``overrides`` holds CLI values by field name (``None`` values are ignored).
    """
    env = os.environ if environ is None else environ
    directory = Path(config_dir or env.get(f"{_ENV_PREFIX}CONFIG") or DEFAULT_CONFIG_DIR)
    if not directory.is_dir():
        raise ConfigError(f"configuration directory {directory} does not exist")
    values = _server_values(directory / "server.toml")
    types = {name: kind for name, kind in _SERVER_KEYS.values()}
    for name, kind in types.items():
        raw = env.get(f"{_ENV_PREFIX}{name.upper()}")
        if raw is not None:
            where = f"environment variable {_ENV_PREFIX}{name.upper()}"
            values[name] = (_coerce(raw, kind, where), where)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = (
                _coerce(value, types.get(name, type(value)), f"option --{name}"),
                f"option --{name.replace('_', '-')}",
            )
    plain = {name: v for name, (v, _) in values.items()}
    where_of = {name: w for name, (_, w) in values.items()}
    _check_ae_title(plain.get("ae_title", Settings.ae_title), where_of.get("ae_title"))
    for port_field in ("dimse_port", "http_port"):
        if port_field in plain:
            _check_port(plain[port_field], where_of[port_field])
    if plain.get("duplicates", "ignore") not in DUPLICATE_POLICIES:
        raise ConfigError(
            f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}", where_of["duplicates"]
        )
    if plain.get("durability", "power-loss") not in ("power-loss", "process"):
        raise ConfigError(
            'storage.durability must be "power-loss" or "process"', where_of["durability"]
        )
    if plain.get("storage_backend", "local") not in ("local", "s3"):
        raise ConfigError("storage.backend must be local or s3", where_of["storage_backend"])
    if plain.get("storage_backend") == "s3" and not plain.get("s3_bucket"):
        raise ConfigError(
            "storage.backend = s3 needs storage.s3_bucket", where_of["storage_backend"]
        )
    if plain.get("sqlite_synchronous", "FULL").upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(
            "sqlite_synchronous must be FULL, EXTRA or NORMAL", where_of["sqlite_synchronous"]
        )
    if plain.get("log_format", "text") not in LOG_FORMATS:
        raise ConfigError(
            f"logging.format must be one of {', '.join(LOG_FORMATS)}", where_of["log_format"]
        )
    if plain.get("dimse_workers", 0) < 0:
        raise ConfigError("workers must be 0 (one per core) or more", where_of["dimse_workers"])
    for limit in ("max_request_mb", "max_query_results"):
        if plain.get(limit, 0) < 0:
            raise ConfigError(f"limits.{limit} must be 0 (no limit) or more", where_of[limit])
    if plain.get("max_pdu", 0) < 0:
        raise ConfigError("max_pdu must be 0 (unlimited) or a positive size", where_of["max_pdu"])
    if plain.get("ai_device", "auto") not in ("auto", "cpu", "cuda"):
        raise ConfigError("ai.device must be auto, cpu or cuda", where_of["ai_device"])
    for positive in ("ai_threads", "ai_max_attempts"):
        if plain.get(positive, 1) < 1:
            raise ConfigError(f"{positive[3:]} must be at least 1", where_of[positive])
    for seconds in ("ai_stable_age", "ai_lease", "ai_poll_interval"):
        if plain.get(seconds, 1.0) <= 0:
            raise ConfigError(f"{seconds[3:]} must be more than 0 seconds", where_of[seconds])
    if plain.get("ai_workers", 1) < 0:
        raise ConfigError("ai.workers must be 0 or more", where_of["ai_workers"])
    for path_field in ("data_dir", "viewer_dir", "ai_model"):
        path = plain.get(path_field)
        if (
            path is not None
            and not path.is_absolute()
            and where_of[path_field].startswith(str(directory))
        ):
            # A relative path in the file is relative to the project root, next to ae_config/.
            plain[path_field] = directory.resolve().parent / path
    _tls_settings(plain, where_of, directory)
    peers = _peers(directory / "peers.toml")
    rules = _ai_rules(directory / "ai_rules.toml")
    return dataclasses.replace(
        Settings(),
        **plain,
        peers=peers,
        ai_rules=rules,
        config_dir=directory,
        locations=tuple(where_of.items()),
    )


def _tls_settings(plain: dict[str, Any], where_of: dict[str, str], directory: Path) -> None:
    """Check the ``[tls]`` settings together and resolve their paths (in place).

    Only what the configuration says is checked here; whether the files exist, are readable and
    match is checked when ``serve`` starts (:func:`server.tls.check`), so that commands which
    never listen (``import``, ``apikey``) do not need to read the private key."""
    for name in _TLS_PATHS:
        raw = plain.get(name)
        if raw is None:
            continue
        if not raw:
            plain[name] = None  # "" = not set
            continue
        path = Path(raw).expanduser()
        if not path.is_absolute() and where_of[name].startswith(str(directory)):
            path = directory.resolve() / path  # relative to the configuration directory
        plain[name] = path
    port = plain.get("tls_dicom_port", 0)
    if "tls_dicom_port" in plain:
        _check_port(port, where_of["tls_dicom_port"])
    plain_port = plain.get("dimse_port", Settings.dimse_port)
    if port and port == plain_port and plain.get("tls_plain_dicom", True):
        raise ConfigError(
            f"dicom_port {port} is also the plain DICOM port ([ae] port); TLS needs a port "
            "of its own (PS3.15 B.1; 2762 is registered for it)",
            where_of["tls_dicom_port"],
        )
    wanted = [f for f in ("tls_dicom_port", "tls_https") if plain.get(f)]
    if wanted and not plain.get("tls_certificate"):
        raise ConfigError(
            f"{wanted[0][4:]} needs [tls] certificate (and private_key)", where_of[wanted[0]]
        )
    if plain.get("tls_require_client_certificate") and not plain.get("tls_ca_certificates"):
        raise ConfigError(
            "require_client_certificate needs [tls] ca_certificates (the CAs that client "
            "certificates must chain to)",
            where_of["tls_require_client_certificate"],
        )
    if not plain.get("tls_plain_dicom", True) and not port:
        raise ConfigError(
            "plain_dicom = false needs a [tls] dicom_port: no DICOM port would be open",
            where_of["tls_plain_dicom"],
        )
