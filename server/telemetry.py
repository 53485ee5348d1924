"""Process set-up for observability: the log format and the metrics directory.

Nothing here imports prometheus_client: :func:`metrics_directory` must run before it is imported
(it picks multiprocess mode from the environment once, at import).

Log records carry ``request_id`` inside an HTTP request (server/web/api/envelope.py) and
``association`` (calling AE and a short id) on a DIMSE association's thread.  ``json`` writes one
object per line: ``ts``, ``level``, ``logger``, ``message``, ``process``, those two when set,
and ``exc`` with the traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import orjson

from server.tempdirs import shared_directory
from server.web.api.envelope import request_id_var

association_var: contextvars.ContextVar[str] = contextvars.ContextVar("association", default="-")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(log_context)s]: %(message)s"
_METRICS_PREFIX = "imaging-metrics-"


class LogContextFilter(logging.Filter):
    """Adds ``request_id``, ``association`` and ``log_context`` (whichever is set) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        association = association_var.get()
        record.request_id = request_id
        record.association = association
        record.log_context = request_id if request_id != "-" else association
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            entry["request_id"] = request_id
        association = getattr(record, "association", "-")
        if association != "-":
            entry["association"] = association
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(verbose: bool = False, fmt: str | None = None) -> None:
    """Root logging on stderr; the format from ``fmt``, else ``IMAGING_LOG_FORMAT``, else text
    (:func:`use_format` switches once the settings are read)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(LogContextFilter())  # "-" outside a request or association
    use_format(fmt or os.environ.get("IMAGING_LOG_FORMAT", "text"))
    if not verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def use_format(fmt: str) -> None:
    """Switch every root handler to ``fmt`` ("text" or "json")."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_formatter(fmt))


@contextlib.contextmanager
def metrics_directory(enabled: bool = True) -> Iterator[Path | None]:
    """A fresh directory for the metrics of ``serve`` and its children, set as
    ``PROMETHEUS_MULTIPROC_DIR`` (which the children inherit) and removed at the end.  It is a
    temporary directory, not in the data directory, which several servers may share."""
    if not enabled:
        yield None
        return
    with shared_directory(_METRICS_PREFIX, "PROMETHEUS_MULTIPROC_DIR") as path:
        yield path
