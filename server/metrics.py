"""Prometheus metrics: every definition, and the exposition ``GET /metrics`` serves.

``serve`` runs several processes (DIMSE/HTTP workers, AI workers) and a scrape reaches one of
them, so the metrics use prometheus_client's multiprocess mode: ``serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (:func:`server.telemetry.metrics_directory`)
before any process imports this module; each process then keeps its values in files there and
:func:`exposition` adds them up.  Without that variable (tests that build the app in-process,
``import``) the values live in this process's default registry.

Names: ``imaging_instances_received_total{source,outcome}``, ``imaging_received_bytes_total``,
``imaging_dimse_find_duration_seconds``, ``imaging_qido_duration_seconds``,
``imaging_http_request_duration_seconds{method,route,status}``,
``imaging_dimse_associations_active`` / ``_total{outcome}``, ``imaging_processes{kind}``,
``imaging_ai_jobs{status}`` (read from the catalog at scrape time),
``imaging_ai_jobs_processed_total{outcome}``, ``imaging_ai_job_cpu_seconds``,
``imaging_ai_job_gpu_seconds`` and ``imaging_build_info{version}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server import __version__

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Chosen by prometheus_client when it was first imported; the environment may have changed since.
MULTIPROCESS = values.ValueClass is not values.MutexValue

# -- ingest ---------------------------------------------------------------------------------
# The ``source`` strings callers pass to Ingestor.ingest, by prefix -> the label value.
_SOURCE_PREFIXES = (
    ("dimse:", "dimse"),
    ("STOW", "stow"),
    ("upload:", "upload"),
    ("import:", "import"),
    ("ai:", "ai"),
    ("segmentation:", "segmentation"),
    ("report:", "report"),
    ("restore", "restore"),
    ("deidentify", "deidentify"),
)
INGEST_SOURCES = (*(kind for _, kind in _SOURCE_PREFIXES), "other")
INGEST_OUTCOMES = ("stored", "duplicate", "replaced", "failed")

INSTANCES_RECEIVED = Counter(
    "imaging_instances_received",
    "Instances handed to the ingest path, by entry point and outcome",
    ("source", "outcome"),
)
BYTES_RECEIVED = Counter(
    "imaging_received_bytes",
    "Bytes of DICOM data handed to the ingest path, by entry point",
    ("source",),
)
# Children bound once: the per-instance cost is a dict lookup and two increments.
_RECEIVED = {
    (s, o): INSTANCES_RECEIVED.labels(s, o) for s in INGEST_SOURCES for o in INGEST_OUTCOMES
}
_BYTES = {s: BYTES_RECEIVED.labels(s) for s in INGEST_SOURCES}


def source_kind(source: str) -> str:
    """The ``source`` label of an ingest ``source`` string ("dimse:CT1" -> "dimse")."""
    for prefix, kind in _SOURCE_PREFIXES:
        if source.startswith(prefix):
            return kind
    return "other"


def ingested(source: str, outcome: str, size: int) -> None:
    """Count one instance through the ingest path (outcome "failed" when it was refused)."""
    kind = source_kind(source)
    _RECEIVED[kind, outcome].inc()
    _BYTES[kind].inc(size)


# -- queries and HTTP -----------------------------------------------------------------------
_QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

DIMSE_FIND_SECONDS = Histogram(
    "imaging_dimse_find_duration_seconds",
    "C-FIND requests from the request to the last response sent, by information model",
    ("model",),
    buckets=_QUERY_BUCKETS,
)
QIDO_SECONDS = Histogram(
    "imaging_qido_duration_seconds",
    "QIDO-RS searches (query, catalog search, response body), by level",
    ("level",),
    buckets=_QUERY_BUCKETS,
)
HTTP_SECONDS = Histogram(
    "imaging_http_request_duration_seconds",
    "HTTP requests until the response body was sent, by route template, method and status",
    ("method", "route", "status"),
    buckets=_QUERY_BUCKETS,
)

# -- DIMSE associations ---------------------------------------------------------------------
ASSOCIATIONS_ACTIVE = Gauge(
    "imaging_dimse_associations_active",
    "DIMSE associations established and not yet ended",
    multiprocess_mode="livesum",
)
ASSOCIATIONS = Counter(
    "imaging_dimse_associations",
    "DIMSE associations requested by peers, by how they ended (released, aborted, rejected)",
    ("outcome",),
)

# -- processes ------------------------------------------------------------------------------
PROCESSES = Gauge(
    "imaging_processes",
    "Live server processes by kind (server: DIMSE and HTTP; ai_worker)",
    ("kind",),
    multiprocess_mode="livesum",
)

# -- AI worker ------------------------------------------------------------------------------
_JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
AI_JOBS_PROCESSED = Counter(
    "imaging_ai_jobs_processed",
    "AI jobs a worker finished, by outcome (completed, failed, error: retried while attempts"
    " remain, lost: taken over by another worker)",
    ("outcome",),
)
AI_JOB_CPU_SECONDS = Histogram(
    "imaging_ai_job_cpu_seconds",
    "CPU time of the worker process per AI job (all its threads: inference runs on several)",
    buckets=_JOB_BUCKETS,
)
AI_JOB_GPU_SECONDS = Histogram(
    "imaging_ai_job_gpu_seconds",
    "Inference wall time on a CUDA device per AI job",
    buckets=_JOB_BUCKETS,
)
AI_JOB_STATUSES = ("queued", "processing", "completed", "failed")


def inference_done(seconds: float, device: str) -> None:
    """One job's inference: GPU seconds when it ran on a CUDA device ("cuda", "cuda:1")."""
    if device.startswith("cuda"):
        AI_JOB_GPU_SECONDS.observe(seconds)


def process_started(kind: str) -> None:
    """Count this process among the live ones of ``kind`` (until it dies)."""
    PROCESSES.labels(kind).set(1)


def process_dead(pid: int) -> None:
    """The supervisor reaped ``pid``: drop its live gauges (its counters stay in the sums)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if MULTIPROCESS and directory:
        with contextlib.suppress(OSError):
            _multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# -- scrape-time collectors -----------------------------------------------------------------
class AiQueueCollector(Collector):
    """``imaging_ai_jobs{status}``: the analysis_job rows by status, counted when scraped
    (the catalog is the truth; a worker on another node updates it too)."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[Metric]:
        try:
            counts = self.counts()
        except Exception:  # a scrape must not fail because the catalog is briefly away
            log.warning("cannot count AI jobs for /metrics", exc_info=True)
            return []
        family = GaugeMetricFamily(
            "imaging_ai_jobs", "AI analysis jobs in the catalog by status", labels=("status",)
        )
        for status in (*AI_JOB_STATUSES, *sorted(set(counts) - set(AI_JOB_STATUSES))):
            family.add_metric((status,), counts.get(status, 0))
        return [family]


class BuildInfoCollector(Collector):
    """``imaging_build_info{version,python}`` = 1 (Info metrics do not work multiprocess)."""

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "imaging_build_info", "Server version", labels=("version", "python")
        )
        family.add_metric((__version__, platform.python_version()), 1)
        return [family]


class _DefaultRegistry(Collector):
    """This process's own metrics, when not in multiprocess mode."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def exposition(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition of every process's metrics plus ``extra`` collectors."""
    registry = CollectorRegistry()
    directory = os.environ.get(MULTIPROC_ENV)
    if MULTIPROCESS and directory:
        _multiprocess.MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_DefaultRegistry())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)
