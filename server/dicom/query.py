"""Query and constraint types, and the parser of C-FIND identifiers (PS3.4 C.2.2.2).

A :class:`Query` is what C-FIND, QIDO-RS and the REST filters all compile to; the catalog runs it
(``server.catalog.search``), and :mod:`server.dicom.matching` evaluates the same constraints in
memory for keys the catalog has no column for.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from server.dicom.attributes import BY_TAG, Level
from server.dicom.uids import is_valid_uid
from server.errors import QueryError

# PS3.4 C.2.2.2.4: wildcards only for these VRs (not DA/TM/DT/UI/numbers/AS).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})  # PS3.4 C.2.2.2.5
_SKIPPED_TAGS = frozenset({0x00080052, 0x00080005})  # QueryRetrieveLevel, SpecificCharacterSet


class Model(enum.Enum):
    """The information model the query was issued in (PS3.4 C.6)."""

    PATIENT_ROOT = "PATIENT"
    STUDY_ROOT = "STUDY"

    def levels(self) -> tuple[Level, ...]:
        if self is Model.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


class MatchKind(enum.Enum):
    SINGLE = "single"  # C.2.2.2.1 single value
    WILDCARD = "wildcard"  # C.2.2.2.4
    RANGE = "range"  # C.2.2.2.5
    SEQUENCE = "sequence"  # C.2.2.2.6


@dataclass(frozen=True)
class Term:
    """One alternative of a constraint; a constraint matches when any of its terms does."""

    kind: MatchKind
    value: str = ""
    upper: str = ""  # RANGE only; "" is an open end
    items: tuple[Constraint, ...] = ()  # SEQUENCE only: all must match within one item


@dataclass(frozen=True)
class Constraint:
    """A key of the identifier. No terms means universal matching (return the value only)."""

    tag: int
    vr: str
    terms: tuple[Term, ...] = ()

    @property
    def universal(self) -> bool:
        return not self.terms

    @property
    def keyword(self) -> str:
        attr = BY_TAG.get(self.tag)
        return attr.keyword if attr else f"{self.tag:08X}"


@dataclass(frozen=True)
class Query:
    level: Level
    model: Model = Model.STUDY_ROOT
    constraints: tuple[Constraint, ...] = ()
    case_insensitive_pn: bool = True
    limit: int | None = None
    offset: int = 0
    institution: str | None = None  # confine results to this tenant's studies (None: all)
    # Only series (and their instances) derived from this series: the SEGs and SRs made from
    # it (the catalog's series.source_series, filled at ingest).
    derived_from: str | None = None

    @property
    def matching(self) -> tuple[Constraint, ...]:
        return tuple(c for c in self.constraints if not c.universal)

    def requested_tags(self) -> tuple[int, ...]:
        return tuple(c.tag for c in self.constraints)


def _terms_for(vr: str, values: Sequence[str]) -> tuple[Term, ...]:
    """The terms of one key's value(s); empty values mean universal matching."""
    # NUL is never part of a stored value (ingest drops it; PostgreSQL text cannot hold it).
    values = [v.replace("\0", "").rstrip(" ") for v in values]
    if not any(values):
        return ()
    terms: list[Term] = []
    for value in values:
        if not value:
            continue
        if vr in RANGE_VRS and "-" in value:
            lower, _, upper = value.partition("-")
            if not lower and not upper:
                raise QueryError(f"range '{value}' has neither bound")
            terms.append(Term(MatchKind.RANGE, lower.strip(), upper.strip()))
        elif vr in WILDCARD_VRS and ("*" in value or "?" in value):
            if value.strip("*") == "":
                return ()  # "*" alone is universal matching (C.2.2.2.4)
            terms.append(Term(MatchKind.WILDCARD, value))
        else:
            terms.append(Term(MatchKind.SINGLE, value))
    return tuple(terms)


def constraint(tag: int, vr: str, values: Sequence[str]) -> Constraint:
    """A constraint from plain text values (as QIDO and the REST filters have them)."""
    return Constraint(tag, vr, _terms_for(vr, values))


def _element_values(ds: Dataset, tag: int, vr: str) -> list[str]:
    try:
        value = ds[tag].value
    except (ValueError, TypeError):
        # An identifier may carry "*" in an IS/DS key; pydicom cannot convert it, so read raw.
        raw = ds.get_item(tag)
        data = raw.value if raw is not None else b""
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)
        return text.split("\\")
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return [value.decode("ascii", "replace")]
    return [str(value)]


def _parse_elements(ds: Dataset) -> tuple[Constraint, ...]:
    result: list[Constraint] = []
    for elem in ds:
        tag = int(elem.tag)
        if tag in _SKIPPED_TAGS or tag >> 16 == 0x0002 or tag & 0xFFFF == 0:
            continue
        vr = elem.VR
        if vr in (None, "UN"):
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr == "SQ":
            items = list(elem.value or [])
            sub = _parse_elements(items[0]) if items else ()
            terms = (
                (Term(MatchKind.SEQUENCE, items=sub),) if any(not c.universal for c in sub) else ()
            )
            result.append(Constraint(tag, vr, terms))
            continue
        result.append(Constraint(tag, vr, _terms_for(vr, _element_values(ds, tag, vr))))
    return tuple(result)


def parse_identifier(
    identifier: Dataset, model: Model, *, case_insensitive_pn: bool = True
) -> Query:
    """Compile a C-FIND identifier into a :class:`Query`.

    PS3.4 C.4.1.1.3: the Query/Retrieve Level must be present and valid for the information model,
    otherwise the request fails with 0xA900 (Identifier does not match SOP Class).
    """
    raw_level = identifier.get("QueryRetrieveLevel", "")
    if not raw_level:
        raise QueryError("identifier lacks (0008,0052) QueryRetrieveLevel")
    try:
        level = Level.parse(str(raw_level))
    except KeyError:
        raise QueryError(f"invalid QueryRetrieveLevel {raw_level!r}") from None
    if level not in model.levels():
        raise QueryError(f"level {level.name} is not part of the {model.value} root model")
    return Query(
        level=level,
        model=model,
        constraints=_parse_elements(identifier),
        case_insensitive_pn=case_insensitive_pn,
    )


def parse_keys(identifier: Dataset) -> tuple[Constraint, ...]:
    """The keys of an identifier that has no Query/Retrieve Level, as in the Basic Worklist
    Management Service (PS3.4 K.2.2: a worklist information model has a single level).

    Matching follows PS3.4 C.2.2.2 as for :func:`parse_identifier`; a sequence key with an item
    becomes one SEQUENCE term whose items are that item's keys (C.2.2.2.6)."""
    return _parse_elements(identifier)


# --- QIDO-RS (PS3.18 8.3.4, 10.6) -------------------------------------------------------------

QIDO_CONTROL = frozenset({"limit", "offset", "fuzzymatching", "includefield"})


def attribute_tag(name: str) -> int:
    """A QIDO attribute ID: a keyword (``PatientID``) or eight hex digits (``00100020``)."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"unknown attribute {name!r}")
    return int(tag)


def vr_of(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    # Ambiguous dictionary VRs ("US or SS") fall back to the first alternative.
    return vr.split(" or ")[0]


@dataclass(frozen=True)
class QidoRequest:
    query: Query
    include_all: bool
    fuzzy_requested: bool


# QIDO-RS sequence matching (PS3.18 8.3.4.1 attribute paths) supported for one path: series
# whose Referenced Series Sequence names a series, i.e. the objects derived from it.
DERIVED_FROM_KEYS = ("ReferencedSeriesSequence.SeriesInstanceUID", "00081115.0020000E")


def parse_qido(
    level: Level,
    params: Sequence[tuple[str, str]],
    scope: Sequence[tuple[int, str]] = (),
    *,
    default_return: Sequence[int] = (),
    case_insensitive_pn: bool = True,
) -> QidoRequest:
    """Compile QIDO-RS query parameters into a :class:`Query` (PS3.18 8.3.4).

    ``params`` are the decoded ``(name, value)`` pairs of the query string; ``scope`` the UIDs of
    the resource path (``/studies/{uid}/series``).  Matching follows C-FIND matching (PS3.18
    8.3.4.1): ``*``/``?`` wildcards, ``-`` ranges, ``\\``-separated value lists (for UIDs also
    ``,``).  ``includefield`` may repeat or carry a comma-separated list; ``all`` returns every
    attribute.  Raises :class:`QueryError` (an HTTP 400) on anything malformed.
    """
    values: dict[int, list[str]] = {}
    include: list[int] = []
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    derived_from: str | None = None
    for name, value in params:
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item == "all":
                    include_all = True
                elif "." in item:
                    include.append(attribute_tag(item.split(".")[0]))  # a sequence path
                else:
                    include.append(attribute_tag(item))
        elif name == "limit":
            limit = _non_negative(name, value)
        elif name == "offset":
            offset = _non_negative(name, value)
        elif name == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            fuzzy = value.lower() == "true"
        elif name.startswith("_") or name in ("accept", "charset"):
            continue  # the accept/charset query parameters (PS3.18 8.3.3.1) are not matching
        elif name in DERIVED_FROM_KEYS:
            if level < Level.SERIES:
                raise QueryError(f"{name} matches series and instances, not {level.name.lower()}")
            if not is_valid_uid(value):
                raise QueryError(f"{name} must be one Series Instance UID")
            derived_from = value
        else:
            if "." in name:
                raise QueryError(
                    f"sequence matching ({name}) is not supported in QIDO-RS except "
                    f"{DERIVED_FROM_KEYS[0]}"
                )
            tag = attribute_tag(name)
            values.setdefault(tag, []).append(value)
    for tag, uid in scope:
        values[tag] = [uid]
    constraints: list[Constraint] = []
    for tag, texts in values.items():
        vr = vr_of(tag)
        items: list[str] = []
        for text in texts:
            parts = text.split("\\")
            if vr == "UI":
                parts = [p for part in parts for p in part.split(",")]
            items.extend(parts)
        if vr == "SQ":
            raise QueryError(f"sequence matching ({tag:08X}) is not supported in QIDO-RS")
        constraints.append(constraint(tag, vr, items))
    present = set(values)
    for tag in (*default_return, *include):
        if tag not in present:
            present.add(tag)
            constraints.append(Constraint(tag, vr_of(tag)))
    query = Query(
        level=level,
        constraints=tuple(constraints),
        case_insensitive_pn=case_insensitive_pn,
        limit=limit,
        offset=offset,
        derived_from=derived_from,
    )
    return QidoRequest(query, include_all, fuzzy)


def _non_negative(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QueryError(f"{name} must be a non-negative integer, got {value!r}") from None
    if number < 0:
        raise QueryError(f"{name} must be a non-negative integer, got {value!r}")
    # Beyond this the database driver fails (an HTTP 500 found by tools/fuzz.py); no catalog
    # holds that many rows, so the clamped value means the same.
    return min(number, 2**31 - 1)
