"""``/api/v1/images``: series as the workstation API's "medical images" (workstation-api.md).

An image is a series.  Lists go through the shared query engine at series level (the filters
become C-FIND-style constraints), confined to the caller's institution; geometry and display
defaults come from the first instance's stored header, never from the files.

Decisions where the document is vague (also in the README):

* ``modality`` is the DICOM Modality (``CT``, ``MR``...); the filter takes the same values.
* ``date_from``/``date_to`` are ISO 8601 dates (or date-times, whose date part counts) and
  bound the series date (the study date when the series has none).
* ``dimensions`` is ``[slices, rows, columns]`` (frames for a multi-frame instance) and
  ``spacing`` ``[between slices, between rows, between columns]`` in mm.
* ``file_path`` is the series' WADO-RS URL: server file paths are not disclosed.
* ``limit`` defaults to 50 and is at most 500; ``page_count`` and ``current_page`` follow from
  ``limit`` and ``offset``.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, replace
from typing import Any

import orjson
from peewee import fn
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server import deletion
from server.archive import Archive
from server.audit import subjects
from server.auth.roles import DELETE_IMAGES, READ_IMAGES
from server.catalog.db import session, write_transaction
from server.catalog.schema import Instance, Series, Study
from server.catalog.search import Match, count, search
from server.dicom.attributes import BY_KEYWORD, Level
from server.dicom.query import Constraint, Query, constraint
from server.web.api.auth import API_PREFIX, authorize, tenant_of
from server.web.api.envelope import ApiError, ok

MAX_LIMIT = 500
_T = BY_KEYWORD
_RETURN = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "Modality",
    "SeriesDate",
    "SeriesTime",
    "StudyDate",
    "StudyTime",
    "SeriesDescription",
    "StudyDescription",
    "NumberOfSeriesRelatedInstances",
)
_SELECTED_METADATA = (
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RepetitionTime",
    "EchoTime",
    "MagneticFieldStrength",
    "KVP",
    "ProtocolName",
)


def _iso_date(name: str, text: str) -> str:
    try:
        return dt.date.fromisoformat(text[:10]).strftime("%Y%m%d")
    except ValueError:
        raise ApiError(
            422, "VALIDATION_ERROR", f"{name} must be an ISO 8601 date", {"field": name}
        ) from None


def _int(params: Any, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(
            422,
            "VALIDATION_ERROR",
            f"{name} must be a whole number from {low} to {high}",
            {"field": name},
        )
    return value


def _first(metadata: dict[str, Any] | None, keyword: str) -> Any:
    if not metadata:
        return None
    element = metadata.get(_tag(keyword))
    values = (element or {}).get("Value")
    return values[0] if values else None


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{tag:08X}" if tag is not None else ""


def _values(metadata: dict[str, Any] | None, keyword: str) -> list[Any]:
    element = (metadata or {}).get(_tag(keyword)) or {}
    return list(element.get("Value") or [])


def _acquisition(values: dict[int, Any]) -> str | None:
    date = values.get(_T["SeriesDate"].tag) or values.get(_T["StudyDate"].tag)
    time = values.get(_T["SeriesTime"].tag) if values.get(_T["SeriesDate"].tag) else None
    time = time or values.get(_T["StudyTime"].tag) or ""
    if not date or len(date) < 8:
        return None
    digits = (time.split(".")[0] + "000000")[:6]
    try:
        moment = dt.datetime.strptime(date[:8] + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Facts:
    size: int = 0
    metadata: str | None = None
    created_at: Any = None
    institution: str | None = None


def _derived_objects(series_uid: str, tenant: str | None) -> list[dict[str, Any]]:
    """The series made from this one (SEG, SR: ``series.source_series``), the tenant's only."""
    query = (
        Series.select(
            Series.series_instance_uid,
            Series.modality,
            Series.series_description,
            Series.number_of_series_related_instances,
        )
        .join(Study, on=(Series.study == Study.id))
        .where(Series.source_series == series_uid)
    )
    if tenant is not None:
        query = query.where(Study.institution == tenant)
    return [
        {"series_uid": r[0], "modality": r[1], "series_description": r[2], "instances": r[3]}
        for r in query.order_by(Series.id).tuples()
    ]


class ImagesApi:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def _root(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    def _facts(self, series_ids: list[int]) -> dict[int, Facts]:
        """Per series, in three queries for a whole page: total file size, first instance's
        header, created_at and the owning institution."""
        if not series_ids:
            return {}
        rows = (
            Instance.select(
                Instance.series,
                fn.SUM(Instance.file_size).alias("size"),
                fn.MIN(Instance.id).alias("first"),
            )
            .where(Instance.series.in_(series_ids))
            .group_by(Instance.series)
            .dicts()
        )
        sizes = {r["series"]: (int(r["size"] or 0), int(r["first"])) for r in rows}
        firsts = {
            r["id"]: r["metadata"]
            for r in Instance.select(Instance.id, Instance.metadata)
            .where(Instance.id.in_([first for _, first in sizes.values()]))
            .dicts()
        }
        series = {
            r["id"]: (r["created_at"], r["institution"])
            for r in Series.select(Series.id, Series.created_at, Study.institution)
            .join(Study, on=(Series.study == Study.id))
            .where(Series.id.in_(series_ids))
            .dicts()
        }
        return {
            sid: Facts(size, firsts.get(first), *series.get(sid, (None, None)))
            for sid, (size, first) in sizes.items()
        }

    def _image(self, match: Match, facts: Facts, root: str, detail: bool) -> dict[str, Any]:
        values = match.values
        size, metadata_text, created_at = facts.size, facts.metadata, facts.created_at
        metadata = orjson.loads(metadata_text) if metadata_text else {}
        rows, columns = _first(metadata, "Rows"), _first(metadata, "Columns")
        frames = int(_number(_first(metadata, "NumberOfFrames")) or 1)
        count_instances = int(values.get(_T["NumberOfSeriesRelatedInstances"].tag) or 0)
        slices = frames if frames > 1 else count_instances
        pixel = [_number(v) for v in _values(metadata, "PixelSpacing")] or [None, None]
        between = _number(_first(metadata, "SpacingBetweenSlices")) or _number(
            _first(metadata, "SliceThickness")
        )
        study_uid = values[_T["StudyInstanceUID"].tag]
        series_uid = values[_T["SeriesInstanceUID"].tag]
        name = values.get(_T["PatientName"].tag)
        image: dict[str, Any] = {
            "series_uid": series_uid,
            "study_uid": study_uid,
            "patient_id": values.get(_T["PatientID"].tag),
            "patient_name": name,
            "modality": values.get(_T["Modality"].tag),
            "acquisition_date": _acquisition(values),
            "institution": facts.institution,
            "dimensions": [slices, rows, columns] if rows and columns else None,
            "spacing": [between, *pixel[:2]] if pixel[0] is not None else None,
            "file_size_mb": round(size / 1e6, 2),
            "created_at": created_at.strftime("%Y-%m-%dT%H:%M:%SZ") if created_at else None,
        }
        if detail:
            center = _number(_first(metadata, "WindowCenter"))
            width = _number(_first(metadata, "WindowWidth"))
            orientation = [_number(v) for v in _values(metadata, "ImageOrientationPatient")]
            image.update(
                {
                    "orientation": orientation or None,
                    "window_level": {"default_window": width, "default_level": center},
                    "dicom_metadata": {
                        k: str(v)
                        for k in _SELECTED_METADATA
                        if (v := _first(metadata, k)) is not None
                    },
                    "file_path": f"{root}/dicom-web/studies/{study_uid}/series/{series_uid}",
                    "number_of_instances": count_instances,
                }
            )
        return image

    def _query(self, filters: list[Constraint], tenant: str | None, **paging: Any) -> Query:
        requested = [Constraint(_T[k].tag, _T[k].vr) for k in _RETURN]
        given = {c.tag for c in filters}
        return Query(
            Level.SERIES,
            constraints=(*filters, *(c for c in requested if c.tag not in given)),
            case_insensitive_pn=self.archive.settings.case_insensitive_pn,
            institution=tenant,
            **paging,
        )

    def index(self, request: Request) -> Response:
        claims = authorize(request, self.archive, READ_IMAGES)
        params = request.query_params
        limit = _int(params, "limit", 50, 1, MAX_LIMIT)
        offset = _int(params, "offset", 0, 0, 10**9)
        filters: list[Constraint] = []
        for param, keyword in (
            ("patient_id", "PatientID"),
            ("study_uid", "StudyInstanceUID"),
            ("modality", "Modality"),
        ):
            if params.get(param):
                filters.append(constraint(_T[keyword].tag, _T[keyword].vr, [params[param]]))
        date_from, date_to = params.get("date_from"), params.get("date_to")
        if date_from or date_to:
            low = _iso_date("date_from", date_from) if date_from else ""
            high = _iso_date("date_to", date_to) if date_to else ""
            filters.append(constraint(_T["SeriesDate"].tag, "DA", [f"{low}-{high}"]))
        unknown = set(params) - {
            "patient_id",
            "study_uid",
            "modality",
            "date_from",
            "date_to",
            "limit",
            "offset",
        }
        if unknown:
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                f"unknown filter(s): {', '.join(sorted(unknown))}",
                {"fields": sorted(unknown)},
            )
        query = self._query(filters, tenant_of(claims), limit=limit, offset=offset)
        root = self._root(request)
        with session():
            total = count(replace(query, limit=None, offset=0))
            matches = search(query).matches
            facts = self._facts([m.ids[Level.SERIES] for m in matches])
            images = [
                self._image(m, facts.get(m.ids[Level.SERIES], Facts()), root, False)
                for m in matches
            ]
        self.archive.audit.record(
            "api.images.list",
            f"user_{claims.user_id}",
            address=request.client.host if request.client else "?",
            filters=dict(params),
            results=len(images),
            **subjects(m.values for m in matches),
        )
        return ok(
            {
                "images": images,
                "total_count": total,
                "page_count": max(1, math.ceil(total / limit)),
                "current_page": offset // limit + 1,
            }
        )

    def detail(self, request: Request) -> Response:
        claims = authorize(request, self.archive, READ_IMAGES)
        series_uid = request.path_params["series_uid"]
        uid = _T["SeriesInstanceUID"]
        query = self._query([constraint(uid.tag, uid.vr, [series_uid])], tenant_of(claims))
        with session():
            matches = search(query).matches
            if not matches:
                self.archive.audit.record(
                    "api.images.get", f"user_{claims.user_id}", "not_found", series=series_uid
                )
                raise ApiError(
                    404,
                    "MEDICAL_IMAGE_NOT_FOUND",
                    f"Medical image with UID {series_uid} not found",
                    {"series_uid": series_uid, "search_attempted": True},
                )
            match = matches[0]
            series_id = match.ids[Level.SERIES]
            previous = Series.get_by_id(series_id).last_accessed
            facts = self._facts([series_id]).get(series_id, Facts())
            image = self._image(match, facts, self._root(request), True)
            image["derived_objects"] = _derived_objects(series_uid, tenant_of(claims))
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            with write_transaction():
                Series.update(last_accessed=now).where(Series.id == series_id).execute()
        image["last_accessed"] = previous.strftime("%Y-%m-%dT%H:%M:%SZ") if previous else None
        self.archive.audit.record(
            "api.images.get",
            f"user_{claims.user_id}",
            address=request.client.host if request.client else "?",
            study=image["study_uid"],
            series=series_uid,
            patient_id=image["patient_id"],
        )
        return ok(image)

    def delete(self, request: Request) -> Response:
        """Recoverable deletion (server/deletion.py); needs ``delete_images``."""
        claims = authorize(request, self.archive, DELETE_IMAGES)
        series_uid = request.path_params["series_uid"]
        try:
            deleted = deletion.delete_series(
                self.archive.storage,
                series_uid,
                tenant_of(claims),
                f"user_{claims.user_id}",
                self.archive.settings.deleted_retention_days,
            )
        except deletion.NotFound:
            raise ApiError(
                404,
                "MEDICAL_IMAGE_NOT_FOUND",
                f"Medical image with UID {series_uid} not found",
                {"series_uid": series_uid, "search_attempted": True},
            ) from None
        self.archive.audit.record(
            "api.images.delete",
            f"user_{claims.user_id}",
            address=request.client.host if request.client else "?",
            study=deleted.study_uid,
            series=series_uid,
            instances=deleted.instances,
            backup_location=deleted.backup_location,
        )
        return ok(deleted.as_json(), "Image moved to the deleted area")

    def routes(self) -> list[BaseRoute]:
        async def index(request: Request) -> Response:
            return await run_in_threadpool(self.index, request)

        async def detail(request: Request) -> Response:
            if request.method == "DELETE":
                return await run_in_threadpool(self.delete, request)
            return await run_in_threadpool(self.detail, request)

        return [
            Route(f"{API_PREFIX}/images", index, methods=["GET"]),
            Route(f"{API_PREFIX}/images/{{series_uid}}", detail, methods=["GET", "DELETE"]),
        ]


def image_routes(archive: Archive) -> list[BaseRoute]:
    return ImagesApi(archive).routes()
