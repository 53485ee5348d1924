"""Catalog tables: Patient, Study, Series, Instance (PS3.4 C.6 hierarchy).

The DICOM columns of each table are generated from the attribute table
(:mod:`server.dicom.attributes`), so adding a key there adds a column, an index, ingest
extraction and query support in one place.  Empty DICOM values are stored as NULL so range
matching never matches an absent value.  PN columns get an upper-cased twin (``*_ci``) so
case-insensitive name matching can use an index on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    CompositeKey,
    DateTimeField,
    DoubleField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

from server.catalog.db import database, is_postgres
from server.dicom.attributes import INTEGER_VRS, Attribute, Level, at_level

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
# Columns added after version 1: (table, column, SQL type, indexed). create_schema adds them to
# an older catalog in place (both SQLite and PostgreSQL allow ADD COLUMN of a nullable column).
_ADDED_COLUMNS = (
    ("study", "institution", "TEXT", True),
    ("series", "last_accessed", "TIMESTAMP", False),
    ("series", "source_series", "TEXT", True),
    ("segmentation", "segment_number", "INTEGER", False),
    ("segmentation", "analysis_id", "TEXT", True),
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


def _columns(level: Level, indexed: bool, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The level's DICOM columns; indexed all, or only those whose keyword is in ``keys``."""
    fields: dict[str, Any] = {}
    for a in at_level(level):
        indexed_here = indexed or a.keyword in keys
        if a.computed and level == Level.PATIENT:
            continue  # patient counts are derived at query time: patients are rarely queried
        if a.unique and level != Level.PATIENT:
            fields[a.column] = TextField(unique=True)
            continue
        if a.computed and a.vr in INTEGER_VRS:
            fields[a.column] = IntegerField(default=0, index=indexed_here)
        elif a.vr in INTEGER_VRS:
            fields[a.column] = IntegerField(null=True, index=indexed_here)
        else:
            fields[a.column] = TextField(null=True, index=indexed_here)
        if a.vr == "PN":
            fields[ci_column(a)] = TextField(null=True, index=indexed_here)
    return fields


def ci_column(a: Attribute) -> str:
    return f"{a.column}_ci"


Patient: Any = type(
    "Patient",
    (BaseModel,),
    {
        "__module__": __name__,
        "id": AutoField(),
        # PatientID + IssuerOfPatientID identify a patient; PatientID alone is not unique
        # across issuers.
        "patient_key": TextField(unique=True),
        **_columns(Level.PATIENT, indexed=True),
        "created_at": DateTimeField(default=_now),
    },
)

Study: Any = type(
    "Study",
    (BaseModel,),
    {
        "__module__": __name__,
        "id": AutoField(),
        "patient": ForeignKeyField(Patient, backref="studies", on_delete="CASCADE"),
        **_columns(Level.STUDY, indexed=True),
        # The tenant that owns the study: the institution of whoever sent its first instance
        # (the calling AE's, the user's); NULL = not assigned, visible to local operators only.
        "institution": TextField(null=True, index=True),
        "created_at": DateTimeField(default=_now),
        "updated_at": DateTimeField(default=_now, index=True),
    },
)

Series: Any = type(
    "Series",
    (BaseModel,),
    {
        "__module__": __name__,
        "id": AutoField(),
        "study": ForeignKeyField(Study, backref="series", on_delete="CASCADE"),
        **_columns(Level.SERIES, indexed=True),
        "last_accessed": DateTimeField(null=True),  # last read through the JSON API
        # The series this one was derived from (a SEG's or SR's referenced image series,
        # PS3.3 C.7.4.1 / C.17.2), so a source series finds its results in one indexed query.
        "source_series": TextField(null=True, index=True),
        "created_at": DateTimeField(default=_now),
        "updated_at": DateTimeField(default=_now, index=True),
    },
)

Instance: Any = type(
    "Instance",
    (BaseModel,),
    {
        "__module__": __name__,
        "id": AutoField(),
        "series": ForeignKeyField(Series, backref="instances", on_delete="CASCADE"),
        # Instance keys are mostly matched within a series (its index finds them). SOP Class
        # UID and Instance Number are also asked across the archive (every SR, every SEG;
        # QIDO /instances) and are indexed; each index is one more page written per instance.
        **_columns(Level.IMAGE, indexed=False, keys=("SOPClassUID", "InstanceNumber")),
        "storage_key": TextField(index=True),
        "file_path": TextField(),
        "file_size": BigIntegerField(),
        "transfer_syntax_uid": TextField(),
        "metadata": TextField(),
        "source": TextField(default=""),
        "received_at": DateTimeField(default=_now),
    },
)


class SchemaInfo(BaseModel):
    version = IntegerField()


class ApiKey(BaseModel):
    """An API key of the worklist API: it belongs to one institution and is stored hashed."""

    id = AutoField()
    institution = TextField(index=True)
    name = TextField(default="")
    key_hash = TextField(unique=True)  # sha256 of the key; the key itself is shown once
    prefix = TextField()  # the key's first characters, to tell keys apart in listings
    created_at = IntegerField()
    revoked_at = IntegerField(null=True)


class WorklistItem(BaseModel):
    """One scheduled exam (shared/spec/worklist-api.md), served over REST, MWL C-FIND and MPPS.

    Text columns used for case-insensitive matching have an upper-cased ``*_ci`` twin, as the
    PN columns of the archive tables do.
    """

    id = AutoField()
    institution = TextField(index=True)
    accession_number = TextField(index=True)  # alone too: ingest links studies by it
    patient_id = TextField(index=True)
    surname = TextField()
    surname_ci = TextField(index=True)
    forename = TextField()
    forename_ci = TextField(index=True)
    title = TextField(null=True)
    sex = TextField(null=True)
    date_of_birth = TextField(null=True)  # YYYY-MM-DD
    modality = TextField(index=True)
    exam_date_and_time = TextField(index=True)  # YYYY-MM-DD HH:MM:SS
    study_instance_uid = TextField(index=True)
    status = TextField(index=True, default="SCHEDULED")
    exam_description = TextField(null=True)
    referring_physician = TextField(null=True)
    performing_physician = TextField(null=True)
    exam_room = TextField(null=True)
    hospital_name = TextField(null=True)
    scheduled_aet = TextField(index=True)
    procedure_id = TextField(null=True)
    procedure_step_id = TextField(null=True)
    mpps_instance_uid = TextField(null=True, index=True)  # the MPPS that performs this item
    linked_study_uid = TextField(null=True)  # a stored study that belongs to this item
    created_at = IntegerField()
    updated_at = IntegerField()

    class Meta:
        indexes = ((("institution", "accession_number"), True),)


class AccessionCounter(BaseModel):
    """Next accession number per institution and year (see server/worklist/service.py)."""

    institution = TextField()
    year = IntegerField()
    value = IntegerField()

    class Meta:
        primary_key = CompositeKey("institution", "year")


class MppsInstance(BaseModel):
    """A Modality Performed Procedure Step SOP Instance (PS3.4 F.7) created by N-CREATE.

    Every MPPS is kept, also one that matched no worklist item (an unscheduled procedure), so
    N-SET can find it and refuse updates once it is COMPLETED or DISCONTINUED (F.7.2.2.2).
    ``item_ids`` lists the worklist items it performs (space-separated ids, usually one).
    """

    id = AutoField()
    sop_instance_uid = TextField(unique=True)
    institution = TextField(index=True)  # the calling AE's tenant ("" = none)
    calling_ae = TextField()
    status = TextField()  # IN PROGRESS, COMPLETED or DISCONTINUED
    item_ids = TextField(default="")
    accession_number = TextField(null=True, index=True)
    study_instance_uid = TextField(null=True, index=True)
    attributes = TextField()  # DICOM JSON of the attributes as last set
    created_at = IntegerField()
    updated_at = IntegerField()


TABLES: list[Any] = [
    Patient,
    Study,
    Series,
    Instance,
    SchemaInfo,
    ApiKey,
    WorklistItem,
    AccessionCounter,
    MppsInstance,
]


class User(BaseModel):
    """A person using the JSON API (python -m server user ...); passwords are argon2 hashes."""

    id = AutoField()
    username = TextField()
    institution = TextField(index=True)
    password_hash = TextField()
    role = TextField()
    active = IntegerField(default=1)
    created_at = IntegerField()
    last_login = IntegerField(null=True)

    class Meta:
        indexes = ((("username", "institution"), True),)


class RefreshToken(BaseModel):
    """Issued refresh tokens by id (jti): rotated on use, revoked on logout."""

    jti = TextField(primary_key=True)
    user = ForeignKeyField(User, on_delete="CASCADE")
    expires_at = IntegerField(index=True)
    revoked_at = IntegerField(null=True)


class RevokedToken(BaseModel):
    """Access tokens revoked before their expiry (logout), kept until they would expire."""

    jti = TextField(primary_key=True)
    expires_at = IntegerField(index=True)


class LoginFailure(BaseModel):
    """Failed logins, counted per username and address to rate-limit guessing across workers."""

    id = AutoField()
    username = TextField(index=True)
    address = TextField()
    at = IntegerField(index=True)


class Upload(BaseModel):
    """A ``POST /api/v1/images/upload``: its files are ingested in the background; any worker
    answers ``GET /api/v1/images/upload/{id}`` from this row."""

    id = TextField(primary_key=True)  # upload_<hex>
    user_id = IntegerField()
    institution = TextField(null=True)
    status = TextField()  # processing, completed, completed_with_errors, failed, interrupted
    files = IntegerField(default=0)  # DICOM objects found (zip members included)
    stored = IntegerField(default=0)
    duplicates = IntegerField(default=0)
    failed = IntegerField(default=0)
    errors = TextField(default="[]")  # JSON list of {"file", "reason", "status"}
    series_uids = TextField(default="[]")  # JSON list
    total_bytes = BigIntegerField(default=0)
    created_at = IntegerField()
    updated_at = IntegerField()


class DeletedSeries(BaseModel):
    """A series removed through the API: its files wait in ``deleted/`` until ``retention_until``
    (``python -m server deleted restore|purge``)."""

    id = AutoField()
    series_instance_uid = TextField(index=True)
    study_instance_uid = TextField()
    institution = TextField(null=True)
    backup_location = TextField()  # relative to the data directory
    instances = IntegerField()
    deleted_by = TextField()
    deleted_at = IntegerField()
    retention_until = IntegerField(index=True)
    restored_at = IntegerField(null=True)
    purged_at = IntegerField(null=True)


class Segmentation(BaseModel):
    """A segmentation of a series (the workstation API's ``/segmentations``); its mask is a
    DICOM SEG instance in the archive (``seg_sop_instance_uid``)."""

    id = TextField(primary_key=True)  # seg_<hex>
    image_uid = TextField(index=True)  # the segmented series
    study_uid = TextField()
    institution = TextField(null=True, index=True)
    seg_series_uid = TextField()
    seg_sop_instance_uid = TextField()
    region_type = TextField()
    creation_method = TextField()
    confidence = FloatField(null=True)
    created_by = TextField()
    created_at = IntegerField()
    last_modified = IntegerField()
    volume_ml = FloatField()
    surface_area_mm2 = FloatField()
    sphericity = FloatField()
    voxel_count = IntegerField()
    bounding_box = TextField(null=True)  # JSON {"min": [z, y, x], "max": [...]}
    pi_rads_score = IntegerField(null=True)
    anatomical_location = TextField(null=True)
    notes = TextField(null=True)
    validated = IntegerField(default=0)
    validated_by = TextField(null=True)
    validation_date = IntegerField(null=True)
    segment_number = IntegerField(null=True)  # in the SEG instance; NULL = 1 (one per SEG)
    analysis_id = TextField(null=True, index=True)  # the AI job that produced it


AUTH_TABLES: list[Any] = [
    User,
    RefreshToken,
    RevokedToken,
    LoginFailure,
    Upload,
    DeletedSeries,
    Segmentation,
]


# pg_advisory_xact_lock key: one process at a time looks at, and changes, the schema.
_SCHEMA_LOCK = 0x494D4147


def create_schema() -> None:
    """Create missing tables and indexes; refuse a catalog written by a newer schema.

    Every process of every node calls this when it starts, often while others are ingesting.
    On PostgreSQL even ``CREATE INDEX IF NOT EXISTS`` takes a SHARE lock on its table before
    it finds the index there, and a transaction holding SHARE locks on patient, study and
    series deadlocks with an ingest that updates series then study (seen: a worker process
    starting during a C-STORE turned one instance into 0xA700).  So only statements for what
    is missing run, under an advisory lock that also keeps two starting processes from
    creating the same table at once.
    """
    invalid: set[str] = set()
    later: list[str] = []  # PostgreSQL: indexes a table that holds rows lacks (see below)
    with database.atomic():
        if is_postgres():
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
            invalid = _invalid_indexes()
        tables = set(database.get_tables())
        indexes = _index_names() - invalid
        missing = [m for m in [*TABLES, *AUTH_TABLES] if m._meta.table_name not in tables]
        if missing:
            database.create_tables(missing, safe=True)

        def create_index(sql: str, new_table: bool) -> None:
            if is_postgres() and not new_table:
                later.append(sql)
            else:
                database.execute_sql(sql)

        for model in [*TABLES, *AUTH_TABLES]:
            if model in missing:
                continue
            for index in model._meta.fields_to_index():
                if index._name not in indexes:
                    query = model._schema._create_index(index, safe=True)
                    create_index(database.get_sql_context().sql(query).query()[0], False)
        if is_postgres():
            # Prefix LIKE ('LEW%') uses a btree index in PostgreSQL only with pattern ops
            # (unless the database collation is C).
            for model in (Patient, Study, Series):
                for field in model._meta.sorted_fields:
                    if isinstance(field, TextField) and not field.unique:
                        table = model._meta.table_name
                        name = f"{table}_{field.column_name}_pattern"
                        if name not in indexes:
                            create_index(
                                f'CREATE INDEX IF NOT EXISTS "{name}" '
                                f'ON "{table}" ("{field.column_name}" text_pattern_ops)',
                                model in missing,
                            )
        row = SchemaInfo.select().first()
        if row is not None and row.version > SCHEMA_VERSION:
            raise RuntimeError(
                f"catalog schema version {row.version} is newer than this server ({SCHEMA_VERSION})"
            )
        _upgrade(indexes, create_index)
        if row is None:
            SchemaInfo.create(version=SCHEMA_VERSION)
        elif row.version < SCHEMA_VERSION:
            SchemaInfo.update(version=SCHEMA_VERSION).execute()
    if later or invalid:
        _build_concurrently(invalid, later)


# pg_advisory_lock key (held by a session, across the transactions of the builds below).
_INDEX_LOCK = _SCHEMA_LOCK + 1


def _invalid_indexes() -> set[str]:
    """PostgreSQL: indexes left unusable by a CONCURRENTLY build that was interrupted (they
    are still maintained on every write, and never used)."""
    rows = database.execute_sql(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE NOT i.indisvalid AND n.nspname = current_schema()"
    ).fetchall()
    return {str(row[0]) for row in rows}


def _build_concurrently(invalid: set[str], statements: list[str]) -> None:
    """Build the indexes an existing PostgreSQL table lacks (a catalog from before they were
    added) with CREATE INDEX CONCURRENTLY: a plain CREATE INDEX holds a SHARE lock for the
    whole build, minutes on a large table, and every other node's ingest waits behind it.
    Concurrently, writes go on; this process starts once the index is there. One node at a
    time (a session advisory lock); an index a killed build left invalid is built again."""
    database.execute_sql("SELECT pg_advisory_lock(%s)", [_INDEX_LOCK])
    try:
        for name in _invalid_indexes() & invalid:
            log.warning(
                "catalog index %s was left invalid by an interrupted build; rebuilding", name
            )
            database.execute_sql(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
        for sql in statements:
            concurrent = sql.replace("INDEX IF NOT EXISTS", "INDEX CONCURRENTLY IF NOT EXISTS", 1)
            if concurrent == sql:
                raise AssertionError(f"not an index creation: {sql}")
            log.warning("building a catalog index while writes go on: %s", concurrent)
            database.execute_sql(concurrent)
    finally:
        database.execute_sql("SELECT pg_advisory_unlock(%s)", [_INDEX_LOCK])


def _index_names() -> set[str]:
    """Names of the catalog's indexes, read from the system catalog (no table locks)."""
    if is_postgres():
        sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'index'"
    return {str(row[0]) for row in database.execute_sql(sql).fetchall()}


def _upgrade(indexes: set[str], create_index: Callable[[str, bool], None]) -> None:
    for table, column, sql_type, indexed in _ADDED_COLUMNS:
        present = {c.name for c in database.get_columns(table)}
        if column not in present:
            database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type}')
        if indexed and f"{table}_{column}" not in indexes:
            create_index(
                f'CREATE INDEX IF NOT EXISTS "{table}_{column}" ON "{table}" ("{column}")', False
            )


__all__ = [
    "SQL",
    "TABLES",
    "AccessionCounter",
    "ApiKey",
    "Instance",
    "MppsInstance",
    "Patient",
    "Series",
    "Study",
    "WorklistItem",
    "ci_column",
    "create_schema",
]


class EventLog(BaseModel):
    """Events published on the bus (server/events.py), kept an hour so every process can relay
    them to its WebSocket clients, whichever process published them."""

    id = AutoField()
    kind = TextField()  # e.g. "worklist.created", "image_upload", "system_alert"
    institution = TextField(null=True)  # the tenant the event belongs to; NULL = none
    data = TextField()  # JSON object
    origin = TextField()  # the publishing process (host:pid:nonce)
    created_ms = BigIntegerField(index=True)  # epoch milliseconds


TABLES.append(EventLog)


class AnalysisJob(BaseModel):
    """One AI analysis of a series (server/ai/jobs.py): queued by the stability trigger or the
    API, claimed by one worker at a time, retried when its worker dies."""

    # Times are epoch seconds in DOUBLE PRECISION: PostgreSQL's REAL (Peewee's FloatField)
    # keeps 24 bits, a resolution of minutes at today's epoch.
    id = TextField(primary_key=True)  # analysis_<hex>
    series_uid = TextField(index=True)
    study_uid = TextField()
    institution = TextField(null=True, index=True)
    # What was analysed: "<instances>@<last update>" for the trigger, so each version of a
    # series is queued once (also across restarts and nodes); "api:<id>" for requests.
    series_version = TextField()
    analysis_type = TextField(default="prostate_comprehensive")
    trigger = TextField()  # "stable_series" or "api"
    requested_by = TextField(default="")
    config = TextField(default="{}")  # JSON: the request's config
    status = TextField(index=True)  # queued, processing, completed, failed
    stage = TextField(default="")
    progress = DoubleField(default=0.0)  # 0..1
    attempts = IntegerField(default=0)
    max_attempts = IntegerField(default=3)
    worker = TextField(null=True)  # host:pid:nonce of the claiming worker
    lease_until = DoubleField(null=True)  # epoch seconds; after it, another worker may take it
    created_at = DoubleField(index=True)  # epoch seconds
    started_at = DoubleField(null=True)
    finished_at = DoubleField(null=True)
    inference_seconds = DoubleField(null=True)
    device = TextField(null=True)
    error = TextField(null=True)
    result = TextField(null=True)  # JSON: the API's "results"

    class Meta:
        indexes = ((("series_uid", "series_version"), True),)


class AiState(BaseModel):
    """Small shared values of the AI loop, e.g. how far the stability trigger has looked."""

    key = TextField(primary_key=True)
    value = TextField()


TABLES.extend([AnalysisJob, AiState])
