"""The query engine: run a :class:`~server.dicom.query.Query` against the catalog.

Constraints on catalog columns compile to SQL (PS3.4 C.2.2.2: single value, UID list, wildcard
through ``LIKE ... ESCAPE`` with ``%``/``_``/``\\`` escaped, DA/TM/DT ranges, case-insensitive PN
on an upper-cased column).  Keys without a column are matched in memory
(:mod:`server.dicom.matching`) against the stored DICOM JSON of the entity's first instance.
C-FIND, QIDO-RS and the REST filters all come through :func:`search`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from peewee import SQL, NodeList, Value, fn

from server.catalog.db import database, is_postgres
from server.catalog.schema import Instance, Patient, Series, Study, ci_column
from server.dicom import json as dicom_json
from server.dicom.attributes import BY_TAG, INTEGER_VRS, Attribute, Level
from server.dicom.matching import matches_json
from server.dicom.query import Constraint, MatchKind, Query, Term
from server.errors import QueryError

MODEL_OF: dict[Level, Any] = {
    Level.PATIENT: Patient,
    Level.STUDY: Study,
    Level.SERIES: Series,
    Level.IMAGE: Instance,
}
_PATIENT_COUNTS = {
    "number_of_patient_related_studies",
    "number_of_patient_related_series",
    "number_of_patient_related_instances",
}


@dataclass(slots=True)
class Match:
    """One result entity: catalog values by tag, plus the first instance's JSON if needed."""

    level: Level
    values: dict[int, Any]
    metadata: dict[str, Any] | None = None
    ids: dict[Level, int] = field(default_factory=dict)


@dataclass
class SearchResult:
    matches: list[Match]
    truncated: bool  # more results existed beyond ``limit``


@dataclass(frozen=True)
class RetrieveItem:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    file_path: str


def escape_like(pattern: str) -> str:
    """DICOM wildcards to a LIKE pattern; SQL's own wildcards and the escape are escaped."""
    out = []
    for ch in pattern:
        if ch in ("\\", "%", "_"):
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _column(attr: Attribute, ci_pn: bool) -> Any:
    model = MODEL_OF[attr.level]
    if attr.vr == "PN" and ci_pn:
        return getattr(model, ci_column(attr))
    return getattr(model, attr.column)


_INT_RANGE = range(-(2**31), 2**31)  # IS (PS3.5 6.2); the catalog's integer columns hold it


def _integer(value: str, what: str) -> int:
    """An integer key value; one that is not a number, or is out of the IS range (which the
    database driver would fail on: an HTTP 500 found by tools/fuzz.py), is a QueryError."""
    try:
        number = int(float(value))
    except (ValueError, OverflowError):
        raise QueryError(f"{value!r} is not a valid {what}") from None
    if number not in _INT_RANGE:
        raise QueryError(f"{value!r} is out of range for {what}")
    return number


def _term_sql(col: Any, vr: str, term: Term, fold: bool) -> Any:
    value = term.value.upper() if fold else term.value
    if term.kind is MatchKind.SINGLE:
        if vr in INTEGER_VRS:
            return col == _integer(value, f"{vr} value")
        return col == value
    if term.kind is MatchKind.WILDCARD:
        # Spelled as raw SQL: Peewee rewrites the LIKE operator to GLOB on SQLite.
        return NodeList((col, SQL("LIKE"), Value(escape_like(value)), SQL("ESCAPE '\\'")))
    if term.kind is MatchKind.RANGE:
        expr = col.is_null(False)
        if term.value:
            expr &= col >= term.value
        if term.upper:
            upper = term.upper.upper() if fold else term.upper
            expr &= col <= upper
        return expr
    raise QueryError(f"{term.kind.value} matching is not supported for this key")


def _constraint_sql(c: Constraint, attr: Attribute, ci_pn: bool) -> Any:
    fold = attr.vr == "PN" and ci_pn
    if attr.keyword == "ModalitiesInStudy":
        # A study matches if any of its series has a matching modality (PS3.4 C.6.1.1.3 note).
        alias = Series.alias()
        inner = [_term_sql(alias.modality, "CS", t, False) for t in c.terms]
        cond = inner[0]
        for extra in inner[1:]:
            cond |= extra
        return fn.EXISTS(alias.select(SQL("1")).where((alias.study == Study.id) & cond))
    col = _column(attr, ci_pn)
    singles = [t for t in c.terms if t.kind is MatchKind.SINGLE]
    if len(singles) == len(c.terms) > 1 and attr.vr not in INTEGER_VRS:
        return col.in_([t.value.upper() if fold else t.value for t in singles])
    parts = [_term_sql(col, attr.vr, t, fold) for t in c.terms]
    expr = parts[0]
    for extra in parts[1:]:
        expr |= extra
    return expr


def _patient_count_sql(column: str) -> Any:
    s = Study.alias()
    if column == "number_of_patient_related_studies":
        agg = fn.COUNT(s.id)
    elif column == "number_of_patient_related_series":
        agg = fn.COALESCE(fn.SUM(s.number_of_study_related_series), 0)
    else:
        agg = fn.COALESCE(fn.SUM(s.number_of_study_related_instances), 0)
    return s.select(agg).where(s.patient == Patient.id)


def _first_metadata_sql(level: Level) -> Any:
    i = Instance.alias()
    if level == Level.SERIES:
        q = i.select(i.metadata).where(i.series == Series.id)
    elif level == Level.STUDY:
        s = Series.alias()
        q = i.select(i.metadata).join(s, on=(i.series == s.id)).where(s.study == Study.id)
    else:
        s, st = Series.alias(), Study.alias()
        q = (
            i.select(i.metadata)
            .join(s, on=(i.series == s.id))
            .join(st, on=(s.study == st.id))
            .where(st.patient == Patient.id)
        )
    return q.order_by(i.id).limit(1)


def _selectable(attr: Attribute, level: Level) -> bool:
    """A catalog key can be matched/returned at its own level and any level below it."""
    return attr.level <= level


def _split(query: Query) -> tuple[list[tuple[Constraint, Attribute]], list[Constraint]]:
    in_sql: list[tuple[Constraint, Attribute]] = []
    in_memory: list[Constraint] = []
    for c in query.constraints:
        attr = BY_TAG.get(c.tag)
        if attr is not None:
            if _selectable(attr, query.level):
                in_sql.append((c, attr))
            # A catalog key from a lower level (e.g. Modality at STUDY level) is not an attribute
            # of the entity: it is neither matched nor returned (PS3.4 C.2.2.1).
        else:
            in_memory.append(c)
    return in_sql, in_memory


def _base(level: Level, columns: list[Any]) -> Any:
    if level == Level.PATIENT:
        return Patient.select(*columns)
    if level == Level.STUDY:
        return Study.select(*columns).join(Patient, on=(Study.patient == Patient.id))
    if level == Level.SERIES:
        return (
            Series.select(*columns)
            .join(Study, on=(Series.study == Study.id))
            .join(Patient, on=(Study.patient == Patient.id))
        )
    return (
        Instance.select(*columns)
        .join(Series, on=(Instance.series == Series.id))
        .join(Study, on=(Series.study == Study.id))
        .join(Patient, on=(Study.patient == Patient.id))
    )


def _tenant_sql(query: Query) -> Any:
    if query.level == Level.PATIENT:
        s = Study.alias()
        return fn.EXISTS(
            s.select(SQL("1")).where(
                (s.patient == Patient.id) & (s.institution == query.institution)
            )
        )
    return Study.institution == query.institution


def _where(query: Query, in_sql: list[tuple[Constraint, Attribute]]) -> list[Any]:
    conds = []
    if query.institution is not None:
        conds.append(_tenant_sql(query))
    if query.derived_from is not None and query.level >= Level.SERIES:
        conds.append(Series.source_series == query.derived_from)
    for c, attr in in_sql:
        if c.universal:
            continue
        if attr.column in _PATIENT_COUNTS:
            term = c.terms[0]
            conds.append(_patient_count_sql(attr.column) == _integer(term.value, "count"))
            continue
        conds.append(_constraint_sql(c, attr, query.case_insensitive_pn))
    return conds


def search(query: Query) -> SearchResult:
    """Run a query at its level; returns the matching entities, ordered by arrival."""
    in_sql, in_memory = _split(query)
    wanted: dict[int, Attribute] = {
        a.tag: a for a in BY_TAG.values() if a.unique and a.level <= query.level
    }
    wanted.update({attr.tag: attr for _, attr in in_sql})
    columns: list[Any] = []
    for level in Level:
        if level <= query.level:
            columns.append(MODEL_OF[level].id.alias(f"_id_{level.name}"))
    for attr in wanted.values():
        if attr.column in _PATIENT_COUNTS:
            columns.append(_patient_count_sql(attr.column).alias(attr.column))
        else:
            columns.append(getattr(MODEL_OF[attr.level], attr.column).alias(attr.column))
    if in_memory:
        if query.level == Level.IMAGE:
            columns.append(Instance.metadata.alias("_metadata"))
        else:
            columns.append(_first_metadata_sql(query.level).alias("_metadata"))
    select = _base(query.level, columns)
    conds = _where(query, in_sql)
    if conds:
        select = select.where(*conds)
    select = select.order_by(MODEL_OF[query.level].id)
    memory_filter = any(not c.universal for c in in_memory)
    if query.limit is not None and not memory_filter:
        select = select.limit(query.limit + 1).offset(query.offset)
    # The driver's rows, read by position: the columns were listed above in this order (ids,
    # wanted attributes, metadata). Peewee's row objects cost more than the query itself on
    # wide C-FINDs.
    levels = [lv for lv in Level if lv <= query.level]
    first_value = len(levels)
    tags = list(wanted)
    metadata_at = first_value + len(tags) if in_memory else -1
    matches: list[Match] = []
    for row in database.execute(select):  # every column is text or a number
        raw = row[metadata_at] if metadata_at >= 0 else None
        metadata = dicom_json.loads(raw) if raw else None
        if memory_filter and not all(
            matches_json(c, metadata or {}, query.case_insensitive_pn) for c in in_memory
        ):
            continue
        matches.append(
            Match(
                level=query.level,
                values=dict(zip(tags, row[first_value : first_value + len(tags)], strict=True)),
                metadata=metadata,
                ids=dict(zip(levels, row, strict=False)),
            )
        )
    truncated = False
    if query.limit is not None:
        if memory_filter:
            matches = matches[query.offset :]
        truncated = len(matches) > query.limit
        matches = matches[: query.limit]
    return SearchResult(matches, truncated)


def count(query: Query) -> int:
    """How many entities match (for paged APIs that report a total)."""
    in_sql, in_memory = _split(query)
    if any(not c.universal for c in in_memory):
        return len(search(replace(query, limit=None, offset=0)).matches)
    select = _base(query.level, [fn.COUNT(MODEL_OF[query.level].id)])
    conds = _where(query, in_sql)
    if conds:
        select = select.where(*conds)
    return int(select.scalar())


def retrieve_items(query: Query) -> list[RetrieveItem]:
    """Instances selected by a C-MOVE/C-GET identifier (its keys at any level, PS3.4 C.4.2)."""
    image_query = Query(
        Level.IMAGE,
        query.model,
        query.constraints,
        query.case_insensitive_pn,
        institution=query.institution,
    )
    in_sql, _ = _split(image_query)
    if not any(not c.universal for c, _ in in_sql):
        raise QueryError("a retrieve identifier needs at least one unique key", 0xA900)
    columns = [
        Instance.sop_class_uid,
        Instance.sop_instance_uid,
        Instance.transfer_syntax_uid,
        Instance.file_path,
    ]
    select = _base(Level.IMAGE, columns).where(*_where(image_query, in_sql))
    select = select.order_by(Series.id, Instance.instance_number, Instance.id)
    return [
        RetrieveItem(
            r["sop_class_uid"], r["sop_instance_uid"], r["transfer_syntax_uid"], r["file_path"]
        )
        for r in select.dicts().iterator()
    ]


@dataclass(frozen=True)
class StoredInstance:
    """An instance as WADO-RS needs it: where its file is and what it holds."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    file_path: str
    metadata: str | None = None


_STORED_SQL: dict[tuple[bool, bool, bool, bool, str], str] = {}


def stored_instances(
    study: str,
    series: str | None = None,
    sop: str | None = None,
    *,
    metadata: bool = False,
    institution: str | None = None,
) -> list[StoredInstance]:
    """The instances of a study, series or single instance, in series/instance-number order.

    UIDs are compared as values, never used as paths.  The SQL is written once per shape:
    a viewer asks for every frame separately, and Peewee's query builder would cost more than
    the query itself.
    """
    param = "%s" if is_postgres() else "?"
    key = (series is not None, sop is not None, metadata, institution is not None, param)
    sql = _STORED_SQL.get(key)
    if sql is None:
        sql = (
            'SELECT st."study_instance_uid", se."series_instance_uid", i."sop_class_uid", '
            'i."sop_instance_uid", i."transfer_syntax_uid", i."file_path"'
            + (', i."metadata"' if metadata else "")
            + ' FROM "instance" AS i JOIN "series" AS se ON i."series_id" = se."id" '
            f'JOIN "study" AS st ON se."study_id" = st."id" WHERE st."study_instance_uid" = {param}'
            + (f' AND se."series_instance_uid" = {param}' if series is not None else "")
            + (f' AND i."sop_instance_uid" = {param}' if sop is not None else "")
            + (f' AND st."institution" = {param}' if institution is not None else "")
            + ' ORDER BY se."id", i."instance_number", i."id"'
        )
        _STORED_SQL[key] = sql
    params = [value for value in (study, series, sop, institution) if value is not None]
    return [StoredInstance(*row) for row in database.execute_sql(sql, params).fetchall()]
