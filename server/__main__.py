"""Command line: ``python -m server {serve|import|send|echo}``."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.config import Settings, load_settings
from server.errors import ConfigError, IngestError, StorageError

log = logging.getLogger("server")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "ae_title": getattr(args, "ae_title", None),
        "dimse_port": getattr(args, "dimse_port", None),
        "http_port": getattr(args, "http_port", None),
        "data_dir": getattr(args, "data_dir", None),
        "database_url": getattr(args, "database_url", None),
    }
    from server.telemetry import use_format

    settings = load_settings(args.config, overrides)
    use_format(settings.log_format)  # worker processes read the same settings: same format
    return settings


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _cannot_listen(settings: Settings, exc: OSError, what: str, port: int) -> int:
    address = settings.bind_address if what.startswith("DICOM") else settings.http_bind_address
    print(f"cannot listen for {what} on {address}:{port}: {exc.strerror or exc}", file=sys.stderr)
    return 2


# The listening sockets, by the dimse-worker option that hands each to the workers.
_PLAIN, _TLS, _HTTP = "--listen-fd", "--tls-listen-fd", "--http-fd"


def _listen_all(settings: Settings) -> dict[str, socket.socket] | int:
    """The listening sockets (DICOM unless ``[tls] plain_dicom = false``, DICOM TLS when
    ``[tls] dicom_port`` is set, HTTP), bound before anything starts (a taken port is a clear
    error)."""
    from server.dimse import workers
    from server.web.serve import listen_http

    wanted: list[tuple[str, str, int, Callable[[], socket.socket]]] = []
    if settings.tls_plain_dicom:
        wanted.append((_PLAIN, "DICOM", settings.dimse_port, lambda: workers.listen(settings)))
    if settings.dicom_tls:
        port = settings.tls_dicom_port
        wanted.append((_TLS, "DICOM TLS", port, lambda: workers.listen(settings, port)))
    wanted.append((_HTTP, "HTTP", settings.http_port, lambda: listen_http(settings)))
    sockets: dict[str, socket.socket] = {}
    for option, what, number, bind in wanted:
        try:
            sockets[option] = bind()
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            return _cannot_listen(settings, exc, what, number)
    return sockets


def _banner(settings: Settings, sockets: dict[str, socket.socket], extra: str) -> None:
    def where(option: str) -> str:
        host, port = sockets[option].getsockname()[:2]
        return f"{host}:{port}"

    dimse = [where(_PLAIN)] if _PLAIN in sockets else []
    dimse += [f"{where(_TLS)} (TLS)"] if _TLS in sockets else []
    scheme = "https" if settings.tls_https else "http"
    print(
        f"DICOM AE {settings.ae_title} listening on {' and '.join(dimse)}{extra}; "
        f"DICOMweb at {scheme}://{where(_HTTP)}/dicom-web; "
        f"data in {settings.data_dir.resolve()}; catalog {settings.catalog_url.split('@')[-1]}",
        flush=True,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from server.telemetry import metrics_directory

    settings = _settings(args)
    # Before anything imports prometheus_client; the worker processes inherit the directory.
    with metrics_directory(settings.metrics_enabled):
        return _serve_all(args, settings)


def _serve_all(args: argparse.Namespace, settings: Settings) -> int:
    from server import tls
    from server.archive import open_archive

    tls.check(settings)  # a missing or unusable certificate stops us before anything starts
    archive = open_archive(settings)  # recovery runs here, before any worker writes
    sockets = _listen_all(settings)
    if isinstance(sockets, int):
        return sockets
    from server.ai.launcher import start_workers

    ai = start_workers(args.config, settings)
    try:
        return _serve(args, settings, archive, sockets)
    finally:
        if ai is not None:
            ai.stop()


def _serve(
    args: argparse.Namespace,
    settings: Settings,
    archive: Any,
    sockets: dict[str, socket.socket],
) -> int:
    from server.archive import close_archive
    from server.dimse import workers

    count = workers.worker_count(settings)
    if count == 1:
        return _serve_in_process(archive, sockets)
    close_archive()  # the parent only supervises; it keeps its writers lock (archive.lock_fd)
    from server.dimse.slots import slots_directory

    with slots_directory(settings.max_associations):  # one limit for all worker processes
        return _supervise(args, settings, sockets, count)


def _supervise(
    args: argparse.Namespace, settings: Settings, sockets: dict[str, socket.socket], count: int
) -> int:
    from server.dimse import workers

    supervisor = workers.Supervisor(
        workers.worker_argv(args.config, settings), sockets, count, settings.database_url
    )
    supervisor.start()
    _banner(settings, sockets, f" ({count} worker processes)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    code = supervisor.run()
    print("shutting down", flush=True)
    supervisor.stop()
    return code


def _serve_in_process(archive: Any, sockets: dict[str, socket.socket]) -> int:
    from server.archive import close_archive
    from server.web.serve import run_http

    settings = archive.settings
    plain, secure = sockets.get(_PLAIN), sockets.get(_TLS)
    servers = _start_dimse(
        archive, plain.fileno() if plain else None, secure.fileno() if secure else None
    )
    _banner(settings, sockets, "")
    run_http(archive, sockets[_HTTP], (signal.SIGINT, signal.SIGTERM))
    print("shutting down", flush=True)
    for server in servers:
        server.shutdown()
    close_archive()
    return 0


def _start_dimse(archive: Any, plain_fd: int | None, tls_fd: int | None) -> list[Any]:
    """The AE's servers on the inherited DICOM and DICOM TLS sockets (one AE: one limit)."""
    from server import tls
    from server.dimse.ae import start_dimse

    servers = []
    if plain_fd is not None:
        servers.append(start_dimse(archive, listen_fd=plain_fd))
    if tls_fd is not None:
        context = tls.server_context(archive.settings)
        ae = servers[0].ae if servers else None
        servers.append(start_dimse(archive, listen_fd=tls_fd, tls_context=context, ae=ae))
    return servers


def cmd_dimse_worker(args: argparse.Namespace) -> int:
    """One worker process of ``serve`` (started by it, not by hand): DIMSE on its threads,
    HTTP on the main thread's event loop."""
    from server.archive import close_archive, open_archive
    from server.dimse import workers
    from server.web.serve import run_http

    workers.die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    archive = open_archive(_settings(args))
    servers = _start_dimse(archive, args.listen_fd, args.tls_listen_fd)
    run_http(archive, socket.socket(fileno=args.http_fd), (signal.SIGTERM,))
    for server in servers:
        server.shutdown()
    close_archive()
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    """Worklist API keys: create (prints the key once), list, revoke."""
    from server import apikeys

    with _opened(args):
        if args.apikey_command == "create":
            try:
                key, info = apikeys.create(args.institution, args.name or "")
            except ValueError as exc:
                print(str(exc), file=sys.stderr)
                return 2
            print(key)
            print(
                f"key {info.id} ({info.prefix}...) for institution {info.institution!r}; "
                "store it now: it cannot be shown again",
                file=sys.stderr,
            )
        elif args.apikey_command == "list":
            for k in apikeys.list_keys(args.institution):
                state = "revoked" if k.revoked_at else "active"
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created_at))
                print(f"{k.id}\t{k.prefix}...\t{k.institution}\t{k.name}\t{created}\t{state}")
        else:
            revoked = apikeys.revoke(args.key)
            if revoked is None:
                print(f"no API key {args.key!r}", file=sys.stderr)
                return 1
            print(f"revoked key {revoked.id} ({revoked.prefix}...) of {revoked.institution!r}")
        return 0


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[Any]:
    """The archive for one CLI command, closed afterwards."""
    from server.archive import close_archive, open_archive

    archive = open_archive(_settings(args))
    try:
        yield archive
    finally:
        close_archive()


def _password(args: argparse.Namespace) -> str | None:
    """From stdin (--password-stdin), IMAGING_PASSWORD, or a prompt; never a command argument
    (it would show in the process list)."""
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("IMAGING_PASSWORD"):
        return os.environ["IMAGING_PASSWORD"]
    if getattr(args, "ask_password", False):
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise SystemExit("the passwords differ")
        return first
    return None


def cmd_user(args: argparse.Namespace) -> int:
    """JSON API users: create, list, set (role, password, enable/disable)."""
    from server.auth import users

    with _opened(args):
        try:
            if args.user_command == "create":
                args.ask_password = True
                password = _password(args) or ""
                info = users.create(args.username, args.institution, args.role, password)
                print(
                    f"created {info.public_id} {info.username!r} ({info.role}) "
                    f"in {info.institution!r}"
                )
            elif args.user_command == "list":
                for u in users.list_users(args.institution):
                    state = "active" if u.active else "disabled"
                    print(f"{u.public_id}\t{u.username}\t{u.institution}\t{u.role}\t{state}")
            else:
                active = True if args.enable else False if args.disable else None
                info = users.update(
                    args.username,
                    args.institution,
                    role=args.role,
                    password=_password(args),
                    active=active,
                )
                print(
                    f"updated {info.public_id} {info.username!r}: {info.role}, "
                    f"{'active' if info.active else 'disabled'}"
                )
            return 0
        except users.UserError as exc:
            print(str(exc), file=sys.stderr)
            return 2


def cmd_deleted(args: argparse.Namespace) -> int:
    """Series deleted through the API: list, restore, purge (server/deletion.py)."""
    from server import deletion

    with _opened(args) as archive:
        if args.deleted_command == "list":
            for d in deletion.list_deleted(args.all):
                until = time.strftime("%Y-%m-%d", time.gmtime(d["retention_until"]))
                print(
                    f"{d['series_uid']}\t{d['institution'] or '-'}\t{d['instances']} instances"
                    f"\tby {d['deleted_by']}\tuntil {until}\t{d['backup_location']}"
                )
        elif args.deleted_command == "restore":
            try:
                count = deletion.restore(archive.storage, archive.ingestor, args.series_uid)
            except deletion.NotFound:
                print(f"no deleted series {args.series_uid}", file=sys.stderr)
                return 1
            print(f"restored {count} instances of {args.series_uid}")
        else:
            print(f"purged {deletion.purge(archive.storage)} series past their retention")
        return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """A patient's access history from the audit trail (JSON lines on stdout)."""
    import orjson

    from server.web.api.audit import patient_history

    with _opened(args) as archive:
        entries = patient_history(archive, args.patient_id, args.institution, args.since or "")
        for entry in entries:
            sys.stdout.write(orjson.dumps(entry).decode() + "\n")
        archive.audit.record(
            "cli.audit.patient_history", getpass.getuser(), patient_id=args.patient_id
        )
        print(f"{len(entries)} entries", file=sys.stderr)
        return 0


def cmd_deidentify(args: argparse.Namespace) -> int:
    """A de-identified copy of a stored study, written into the archive (PS3.15 basic profile)."""
    from server.catalog.db import session
    from server.catalog.search import stored_instances
    from server.deid import copy_study

    with _opened(args) as archive:
        with session():
            items = stored_instances(args.study_uid)
        if not items:
            print(f"no study {args.study_uid}", file=sys.stderr)
            return 1
        new_uid, count = copy_study(
            archive.ingestor,
            [archive.storage.local_path(i.file_path) for i in items],
            args.patient_id,
            args.patient_name,
            args.institution,
        )
        archive.audit.record(
            "cli.deidentify", getpass.getuser(), study=args.study_uid, copy=new_uid
        )
        print(f"{count} instances de-identified into study {new_uid}")
        return 0


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(path)


class Progress:
    """A one-line progress bar on stderr (quiet when stderr is not a terminal, except the end)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if done < self.total and (not self.tty or now - self.last < 0.1):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total) if self.total else width
        rate = done / max(now - self.started, 1e-6)
        bar = "#" * filled + "." * (width - filled)
        line = f"{self.label} [{bar}] {done}/{self.total} {rate:.0f}/s {extra}"
        end = "\n" if done >= self.total else ""
        sys.stderr.write(("\r" if self.tty else "") + line + end)
        sys.stderr.flush()


def cmd_import(args: argparse.Namespace) -> int:
    from server.archive import close_archive, open_archive

    settings = _settings(args)
    archive = open_archive(settings)
    files = list(_walk(args.paths))
    counts = {"stored": 0, "replaced": 0, "duplicate": 0, "rejected": 0}
    rejected: list[str] = []
    bar = Progress(len(files), "import")
    for n, path in enumerate(files, start=1):
        try:
            result = archive.ingestor.ingest(
                path.read_bytes(), source=f"import:{path.name}", institution=args.institution
            )
            counts[result.outcome] += 1
        except (IngestError, OSError) as exc:
            counts["rejected"] += 1
            rejected.append(f"{path}: {exc}")
        bar.update(
            n, f"stored {counts['stored']} dup {counts['duplicate']} rejected {counts['rejected']}"
        )
    for line in rejected[:50]:
        print(f"rejected {line}", file=sys.stderr)
    if len(rejected) > 50:
        print(f"... and {len(rejected) - 50} more rejected", file=sys.stderr)
    print(
        f"{len(files)} files: {counts['stored']} stored, {counts['replaced']} replaced, "
        f"{counts['duplicate']} duplicate, {counts['rejected']} rejected"
    )
    archive.audit.record(
        "import",
        f"local:{getpass.getuser()}",
        "ok" if not counts["rejected"] else "partial",
        paths=[str(p) for p in args.paths],
        files=len(files),
        **counts,
    )
    close_archive()
    return 1 if counts["rejected"] and not (counts["stored"] or counts["duplicate"]) else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Storage against catalog (server/check.py); exit 0 when nothing is left unresolved."""
    import orjson

    from server.archive import make_storage
    from server.audit import AuditLog
    from server.catalog.db import database, make_database, session
    from server.catalog.schema import create_schema
    from server.check import ServerRunning, check

    settings = _settings(args)
    database.initialize(
        make_database(settings.catalog_url, sqlite_synchronous=settings.sqlite_sync)
    )
    with session():
        create_schema()

    def progress(stage: str, done: int) -> None:
        if not args.json:
            print(f"check: {stage} ({done} so far)", file=sys.stderr)

    try:
        report = check(
            make_storage(settings),
            repair=args.repair,
            deep=args.deep,
            grace=args.grace,
            progress=progress,
        )
    except ServerRunning as exc:
        print(f"check: {exc}", file=sys.stderr)
        return 2
    finally:
        database.close()
    if args.json:
        print(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        for finding in report.findings[:200]:
            done = f" -> {finding.repaired}" if finding.repaired else ""
            print(f"{finding.kind}: {finding.subject} {finding.detail}{done}".rstrip())
        if len(report.findings) > 200:
            print(f"... and {len(report.findings) - 200} more")
        problems = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts().items()))
        print(
            f"{report.instances} instances, {report.files} files: "
            f"{problems or 'no problems'}; {len(report.unresolved)} unresolved"
        )
    if args.repair:
        AuditLog(settings.data_dir.resolve() / "audit.log").record(
            "check.repair",
            f"local:{getpass.getuser()}",
            "ok" if not report.unresolved else "partial",
            **report.counts(),
        )
    return 1 if report.unresolved else 0


def _peer_or_exit(settings: Settings, title: str) -> Any:
    peer = settings.peer(title)
    if peer is None:
        known = ", ".join(p.ae_title for p in settings.peers) or "none"
        raise ConfigError(
            f"unknown AE {title!r}; add it to {settings.config_dir / 'peers.toml'} (known: {known})"
        )
    return peer


def cmd_echo(args: argparse.Namespace) -> int:
    from server.dimse.scu import echo

    settings = _settings(args)
    peer = _peer_or_exit(settings, args.ae)
    try:
        status = echo(settings, peer)
    except ConnectionError as exc:
        print(f"echo {peer.ae_title}: {exc}", file=sys.stderr)
        return 1
    print(f"echo {peer.ae_title} at {peer.host}:{peer.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from server.dimse.scu import send_files

    settings = _settings(args)
    peer = _peer_or_exit(settings, args.to)
    target = Path(args.what)
    if target.exists():
        files = list(_walk([target]))
    else:
        files = _files_for_uid(settings, args.what)
        if not files:
            print(f"no stored study, series or instance with UID {args.what}", file=sys.stderr)
            return 1
    bar = Progress(len(files), f"send to {peer.ae_title}")
    try:
        report = send_files(settings, peer, files, progress=lambda n, _: bar.update(n))
    except ConnectionError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    for path, status in report.failed:
        print(f"failed {path}: {status}", file=sys.stderr)
    print(f"{report.sent} sent, {len(report.failed)} failed")
    return 0 if not report.failed else 1


def _files_for_uid(settings: Settings, uid: str) -> list[Path]:
    from server.archive import open_archive
    from server.catalog.db import session
    from server.catalog.search import retrieve_items
    from server.dicom.attributes import Level
    from server.dicom.query import Query, constraint

    archive = open_archive(settings)
    with session():
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            from server.dicom.attributes import BY_KEYWORD

            attr = BY_KEYWORD[keyword]
            items = retrieve_items(
                Query(Level.IMAGE, constraints=(constraint(attr.tag, "UI", [uid]),))
            )
            if items:
                return [archive.storage.local_path(i.file_path) for i in items]
    return []


def cmd_worker(args: argparse.Namespace) -> int:
    """An AI worker: claims analysis jobs from the catalog and runs them (imports torch)."""
    from server.ai.worker import main as worker_main

    if args.parent_pid:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches serve, which stops us
    return worker_main(_settings(args), args.parent_pid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="DICOM archive server")
    parser.add_argument(
        "--config", type=Path, default=None, help="configuration directory (default: ae_config/)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir", type=Path, default=None, help="instance files and SQLite catalog"
        )
        p.add_argument(
            "--database-url", default=None, help="sqlite:///path or postgresql://user@host/db"
        )
        p.add_argument("--ae-title", default=None, help="our AE title")
        p.add_argument(
            "--config", type=Path, default=argparse.SUPPRESS, help="configuration directory"
        )

    serve = sub.add_parser("serve", help="run the server (DICOM AE and DICOMweb)")
    common(serve)
    serve.add_argument("--dimse-port", type=int, default=None)
    serve.add_argument("--http-port", type=int, default=None)
    serve.set_defaults(func=cmd_serve)

    imp = sub.add_parser("import", help="import files/folders through the ingest path")
    common(imp)
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--institution", default=None, help="the tenant that owns new studies")
    imp.set_defaults(func=cmd_import)

    send = sub.add_parser(
        "send", help="C-STORE files, or a stored study/series/instance, to a peer"
    )
    common(send)
    send.add_argument("--to", required=True, help="AE title from peers.toml")
    send.add_argument("what", help="a file or folder, or a Study/Series/SOP Instance UID")
    send.set_defaults(func=cmd_send)

    worker = sub.add_parser("dimse-worker", help=argparse.SUPPRESS)
    common(worker)
    worker.add_argument("--dimse-port", type=int, default=None)
    worker.add_argument("--http-port", type=int, default=None)
    worker.add_argument("--listen-fd", type=int, default=None)  # DICOM
    worker.add_argument("--tls-listen-fd", type=int, default=None)  # DICOM TLS
    worker.add_argument("--http-fd", type=int, required=True)
    worker.add_argument("--parent-pid", type=int, required=True)
    worker.set_defaults(func=cmd_dimse_worker)

    ai_worker = sub.add_parser("worker", help="run an AI worker (serve starts [ai] workers)")
    common(ai_worker)
    ai_worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    ai_worker.set_defaults(func=cmd_worker)

    keys = sub.add_parser("apikey", help="worklist API keys: create, list, revoke")
    common(keys)
    keys_sub = keys.add_subparsers(dest="apikey_command", required=True)
    key_create = keys_sub.add_parser("create", help="create a key (printed once)")
    key_create.add_argument("--institution", required=True, help="the tenant the key belongs to")
    key_create.add_argument("--name", help="a label, e.g. the system that uses it")
    key_list = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    key_list.add_argument("--institution", default=None)
    key_revoke = keys_sub.add_parser("revoke", help="revoke a key by id or prefix")
    key_revoke.add_argument("key", help="the key's id or its first characters")
    keys.set_defaults(func=cmd_apikey)

    usr = sub.add_parser("user", help="JSON API users: create, list, set")
    common(usr)
    usr_sub = usr.add_subparsers(dest="user_command", required=True)
    from server.auth.roles import ROLES

    u_create = usr_sub.add_parser("create", help="create a user (asks for the password)")
    u_create.add_argument("--username", required=True)
    u_create.add_argument("--institution", required=True)
    u_create.add_argument("--role", required=True, choices=sorted(ROLES))
    u_create.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    u_list = usr_sub.add_parser("list", help="list users")
    u_list.add_argument("--institution", default=None)
    u_set = usr_sub.add_parser("set", help="change a user's role, password or state")
    u_set.add_argument("--username", required=True)
    u_set.add_argument("--institution", required=True)
    u_set.add_argument("--role", choices=sorted(ROLES))
    u_set.add_argument("--password-stdin", action="store_true", help="new password from stdin")
    state = u_set.add_mutually_exclusive_group()
    state.add_argument("--enable", action="store_true")
    state.add_argument("--disable", action="store_true")
    usr.set_defaults(func=cmd_user)

    dele = sub.add_parser("deleted", help="series deleted through the API: list, restore, purge")
    common(dele)
    dele_sub = dele.add_subparsers(dest="deleted_command", required=True)
    d_list = dele_sub.add_parser("list", help="deleted series still recoverable")
    d_list.add_argument("--all", action="store_true", help="also restored and purged ones")
    d_restore = dele_sub.add_parser("restore", help="put a deleted series back")
    d_restore.add_argument("series_uid")
    dele_sub.add_parser("purge", help="remove the files of series past their retention")
    dele.set_defaults(func=cmd_deleted)

    aud = sub.add_parser("audit", help="the audit trail: a patient's access history")
    common(aud)
    aud_sub = aud.add_subparsers(dest="audit_command", required=True)
    a_hist = aud_sub.add_parser("history", help="every access to one patient's data")
    a_hist.add_argument("--patient-id", required=True)
    a_hist.add_argument("--institution", default=None, help="only this tenant's studies")
    a_hist.add_argument("--since", default=None, help="ISO 8601 time, e.g. 2026-11-01")
    aud.set_defaults(func=cmd_audit)

    deid = sub.add_parser("deidentify", help="a de-identified copy of a study (PS3.15 basic)")
    common(deid)
    deid.add_argument("study_uid")
    deid.add_argument("--patient-id", required=True, help="the pseudonym's Patient ID")
    deid.add_argument("--patient-name", required=True, help="the pseudonym's Patient Name")
    deid.add_argument("--institution", default=None, help="owner of the copy")
    deid.set_defaults(func=cmd_deidentify)

    chk = sub.add_parser("check", help="verify storage against the catalog; --repair fixes")
    common(chk)
    chk.add_argument("--repair", action="store_true", help="fix what can be (server stopped)")
    chk.add_argument("--deep", action="store_true", help="also parse every file's header")
    chk.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="seconds: newer unreferenced files may be writes in flight (read-only check)",
    )
    chk.add_argument("--json", action="store_true", help="the report as JSON")
    chk.set_defaults(func=cmd_check)

    ech = sub.add_parser("echo", help="C-ECHO a peer from peers.toml")
    common(ech)
    ech.add_argument("ae")
    ech.set_defaults(func=cmd_echo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.telemetry import configure_logging

    configure_logging(args.verbose)  # the format is switched once the settings are read
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
