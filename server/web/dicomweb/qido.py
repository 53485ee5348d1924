"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

Query parameters compile to the same :class:`~server.dicom.query.Query` as a C-FIND identifier
(:func:`~server.dicom.query.parse_qido`) and run through the same ``catalog.search``; PS3.18
8.3.4.1 defines QIDO matching as C-FIND matching.  The response is a DICOM JSON array
(PS3.18 F.2) built from catalog columns, plus the first instance's stored header for keys the
catalog has no column for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from server import metrics
from server.archive import Archive
from server.audit import subjects
from server.catalog.db import session
from server.catalog.search import Match, search
from server.dicom.attributes import BY_KEYWORD, BY_TAG, INTEGER_VRS, UNIQUE_KEY, Level
from server.dicom.query import QidoRequest, Query, parse_qido
from server.errors import QueryError
from server.web.api.auth import request_tenant
from server.web.http import HTTPError, client_address, json_response

_T = BY_KEYWORD

# PS3.18 Tables 10.6.3-3/4/5: attributes every response carries at each level (those the
# catalog holds; RetrieveURL and InstanceAvailability are added below).
DEFAULT_RETURN: dict[Level, tuple[int, ...]] = {
    Level.STUDY: tuple(
        _T[k].tag
        for k in (
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ModalitiesInStudy",
            "ReferringPhysicianName",
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyID",
            "StudyDescription",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
        )
    ),
    Level.SERIES: tuple(
        _T[k].tag
        for k in (
            "Modality",
            "SeriesDescription",
            "SeriesInstanceUID",
            "SeriesNumber",
            "SeriesDate",
            "SeriesTime",
            "BodyPartExamined",
            "NumberOfSeriesRelatedInstances",
        )
    ),
    Level.IMAGE: (
        *(_T[k].tag for k in ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "NumberOfFrames")),
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # BitsAllocated
    ),
}
_LEVEL_LABEL = {Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "instance"}
_RETRIEVE_URL = "00081190"
_AVAILABILITY = "00080056"
_STUDY_UID, _SERIES_UID, _SOP_UID = (
    _T["StudyInstanceUID"].tag,
    _T["SeriesInstanceUID"].tag,
    _T["SOPInstanceUID"].tag,
)
# A key of a lower level at study level would silently match everything (PS3.4 C.2.2.1 leaves
# it out); the one users mean is Modality, which is what ModalitiesInStudy answers.
_STUDY_LEVEL_ALIASES = {_T["Modality"].tag: _T["ModalitiesInStudy"].tag}


def _pn(text: str) -> dict[str, str]:
    groups = text.split("=")
    out = {"Alphabetic": groups[0]}
    if len(groups) > 1 and groups[1]:
        out["Ideographic"] = groups[1]
    if len(groups) > 2 and groups[2]:
        out["Phonetic"] = groups[2]
    return out


def _converter(vr: str) -> Callable[[Any], dict[str, Any]]:
    """How a catalog value of this VR becomes a DICOM JSON element (PS3.18 F.2.2)."""
    empty = {"vr": vr}

    if vr in INTEGER_VRS:

        def integer(value: Any) -> dict[str, Any]:
            return empty if value is None else {"vr": vr, "Value": [int(value)]}

        return integer
    if vr == "PN":

        def person(value: Any) -> dict[str, Any]:
            if not value:
                return empty
            return {"vr": vr, "Value": [_pn(v) for v in str(value).split("\\")]}

        return person

    def text(value: Any) -> dict[str, Any]:
        if not value:
            return empty
        return {"vr": vr, "Value": str(value).split("\\")}

    return text


_CONVERT = {a.tag: (f"{a.tag:08X}", _converter(a.vr)) for a in BY_TAG.values()}


def match_json(
    match: Match, query: Query, tags: Sequence[int], root: str, include_all: bool
) -> dict[str, Any]:
    """One result as a DICOM JSON object, keys in tag order."""
    out: dict[str, Any] = {}
    values = match.values
    metadata = match.metadata
    for tag in tags:
        conv = _CONVERT.get(tag)
        if conv is not None:
            if tag in values:
                out[conv[0]] = conv[1](values[tag])
        elif metadata is not None:
            key = f"{tag:08X}"
            element = metadata.get(key)
            if element is not None:
                out[key] = element
    if include_all and query.level == Level.IMAGE and metadata:
        for key, element in metadata.items():
            if "BulkDataURI" not in element:
                out.setdefault(key, element)
    study = values.get(_STUDY_UID)
    url = f"{root}/studies/{study}"
    if query.level >= Level.SERIES:
        url += f"/series/{values.get(_SERIES_UID)}"
    if query.level >= Level.IMAGE:
        url += f"/instances/{values.get(_SOP_UID)}"
    out[_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
    out[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


def _check_levels(qido: QidoRequest) -> QidoRequest:
    query = qido.query
    constraints = []
    for c in query.constraints:
        attr = BY_TAG.get(c.tag)
        if attr is not None and attr.level > query.level:
            alias = _STUDY_LEVEL_ALIASES.get(c.tag) if query.level == Level.STUDY else None
            if alias is not None:
                c = type(c)(alias, BY_TAG[alias].vr, c.terms)
            elif not c.universal:
                raise QueryError(
                    f"{attr.keyword} is a {attr.level.name.lower()}-level attribute; "
                    f"it cannot be matched in a {query.level.name.lower()}-level query"
                )
            else:
                continue  # an includefield of a lower level: nothing to return
        constraints.append(c)
    return QidoRequest(
        replace(query, constraints=tuple(constraints)),
        qido.include_all,
        qido.fuzzy_requested,
    )


def _all_catalog_tags(level: Level) -> tuple[int, ...]:
    """includefield=all: every catalog attribute of the level and above, except the patient
    counts (each costs a subquery per row)."""
    return tuple(
        a.tag
        for a in BY_TAG.values()
        if a.level <= level and not (a.level == Level.PATIENT and a.computed)
    )


class Qido:
    """The QIDO-RS endpoints of one archive."""

    def __init__(self, archive: Archive, root_of: Callable[[Request], str]) -> None:
        self.archive = archive
        self.root_of = root_of

    def run(self, request: Request, level: Level, scope: Sequence[tuple[int, str]]) -> Response:
        """Runs in a worker thread (the catalog is synchronous)."""
        started = time.perf_counter()
        try:
            return self._run(request, level, scope)
        finally:
            label = _LEVEL_LABEL.get(level, "other")
            metrics.QIDO_SECONDS.labels(label).observe(time.perf_counter() - started)

    def _run(self, request: Request, level: Level, scope: Sequence[tuple[int, str]]) -> Response:
        try:
            qido = parse_qido(
                level,
                list(request.query_params.multi_items()),
                scope,
                default_return=DEFAULT_RETURN[level],
                case_insensitive_pn=self.archive.settings.case_insensitive_pn,
            )
            if qido.include_all:
                qido = parse_qido(
                    level,
                    list(request.query_params.multi_items()),
                    scope,
                    default_return=DEFAULT_RETURN[level] + _all_catalog_tags(level),
                    case_insensitive_pn=self.archive.settings.case_insensitive_pn,
                )
            qido = _check_levels(qido)
            cap = self.archive.settings.max_query_results
            if cap and (qido.query.limit is None or qido.query.limit > cap):
                # PS3.18 8.3.4.4: the origin server may return fewer matches than asked for;
                # the Warning 299 below tells the client that more exist.
                qido = QidoRequest(
                    replace(qido.query, limit=cap), qido.include_all, qido.fuzzy_requested
                )
            tenant = request_tenant(request)
            if tenant is not None:
                qido = QidoRequest(
                    replace(qido.query, institution=tenant), qido.include_all, qido.fuzzy_requested
                )
            with session():
                result = search(qido.query)
        except QueryError as exc:
            raise HTTPError(400, str(exc)) from None
        query = qido.query
        unique = (u.tag for lv, u in UNIQUE_KEY.items() if Level.STUDY <= lv <= level)
        tags = sorted({*query.requested_tags(), *unique})
        root = self.root_of(request)
        body = orjson.dumps(
            [match_json(m, query, tags, root, qido.include_all) for m in result.matches]
        )
        warnings: list[str] = []
        if result.truncated:
            warnings.append(
                '299 imaging-server "The number of results exceeded the limit; '
                'more are available with a larger offset"'
            )
        if qido.fuzzy_requested:
            warnings.append('299 imaging-server "fuzzymatching was not applied"')
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        self.archive.audit.record(
            "qido",
            client_address(request),
            level=level.name,
            query=str(request.url.query)[:500],
            results=len(result.matches),
            **subjects(m.values for m in result.matches),
        )
        return json_response(request, body, headers=headers)
