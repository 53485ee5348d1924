"""The OpenAPI 3.1 description of the JSON APIs, served at ``/api/v1/openapi.json``.

Written by hand next to the endpoints it describes; ``tests/unit/test_openapi.py`` fails when
a route exists that the document does not list (or the other way round), so the two cannot drift.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from server.web.api.auth import API_PREFIX
from server.worklist import service as worklist

_STR = {"type": "string"}
_INT = {"type": "integer"}


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["success", "data", "timestamp", "request_id"],
        "properties": {
            "success": {"const": True},
            "data": data,
            "message": _STR,
            "timestamp": {"type": "string", "format": "date-time"},
            "request_id": _STR,
        },
    }


_ERROR = {
    "type": "object",
    "required": ["success", "error", "timestamp", "request_id"],
    "properties": {
        "success": {"const": False},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": _STR, "message": _STR, "details": {"type": "object"}},
        },
        "timestamp": _STR,
        "request_id": _STR,
    },
}


def _responses(ok_status: str, data: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        ok_status: {
            "description": "success",
            "content": {"application/json": {"schema": _envelope(data)}},
        }
    }
    for status in errors:
        out[str(status)] = {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return out


_USER_INFO = {
    "type": "object",
    "properties": {
        "id": _STR,
        "username": _STR,
        "role": _STR,
        "institution": _STR,
        "permissions": {"type": "array", "items": _STR},
    },
}
_TOKENS = {
    "type": "object",
    "required": ["access_token", "refresh_token", "expires_in", "user_info"],
    "properties": {
        "access_token": _STR,
        "refresh_token": _STR,
        "token_type": _STR,
        "expires_in": _INT,
        "user_info": _USER_INFO,
    },
}
_IMAGE = {
    "type": "object",
    "properties": {
        "series_uid": _STR,
        "study_uid": _STR,
        "patient_id": {"type": ["string", "null"]},
        "patient_name": {"type": ["string", "null"]},
        "modality": {"type": ["string", "null"]},
        "acquisition_date": {"type": ["string", "null"]},
        "institution": {"type": ["string", "null"]},
        "dimensions": {"type": ["array", "null"], "items": {"type": ["integer", "null"]}},
        "spacing": {"type": ["array", "null"], "items": {"type": ["number", "null"]}},
        "file_size_mb": {"type": "number"},
        "created_at": {"type": ["string", "null"]},
    },
}
# The worklist schemas come from the rules the service enforces (server/worklist/service.py).
_WORKLIST_ITEM = {
    "type": "object",
    "properties": {
        name: (
            {"type": "integer"}
            if name in ("id", "created_at", "updated_at")
            else {"type": ["string", "null"]}
        )
        for name in worklist.FIELDS
    },
}
_WORKLIST_ENUMS: dict[str, tuple[str, ...]] = {
    "sex": worklist.SEXES,
    "modality": worklist.MODALITIES,
    "status": worklist.STATUSES,
}


def _writable(name: str) -> dict[str, Any]:
    if name in _WORKLIST_ENUMS:
        return {"enum": list(_WORKLIST_ENUMS[name])}
    if name == "date_of_birth":
        return {"type": "string", "format": "date"}
    if name == "exam_date_and_time":
        return {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"}
    return {"type": "string", "maxLength": worklist.MAX_LENGTH[name]}


_WORKLIST_WRITE = {
    "type": "object",
    "properties": {name: _writable(name) for name in sorted(worklist.WRITABLE)},
}


def _plain(status: str, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        status: {"description": "success", "content": {"application/json": {"schema": schema}}}
    }
    for code in errors:
        out[str(code)] = {"description": "error"}
    return out


def _on_one(summary: str, path_param: str) -> dict[str, Any]:
    """An operation on one resource named in the path: bearer auth, 200 or 401/403/404."""
    return {
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": [_param(path_param, "path")],
        "responses": _responses("200", {"type": "object"}, 401, 403, 404),
    }


def _param(
    name: str, where: str = "query", schema: dict[str, Any] | None = None, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema or _STR,
    }


def document() -> dict[str, Any]:
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    api_key: list[dict[str, list[str]]] = [{"apiKey": []}]
    body = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    worklist_body = {"required": True, "content": {"application/json": {"schema": _WORKLIST_WRITE}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imaging-server JSON APIs",
            "version": "1",
            "description": "workstation-api.md (/api/v1) and worklist-api.md (/v1/worklists).",
        },
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
            },
        },
        "paths": {
            f"{API_PREFIX}/auth/login": {
                "post": {
                    "summary": "Log in",
                    "security": [],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["username", "password", "institution"],
                                    "properties": {
                                        "username": _STR,
                                        "password": _STR,
                                        "institution": _STR,
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("200", _TOKENS, 401, 422, 429),
                }
            },
            f"{API_PREFIX}/auth/refresh": {
                "post": {
                    "summary": "Exchange a refresh token (single use) for a new pair",
                    "security": [],
                    "requestBody": body,
                    "responses": _responses("200", _TOKENS, 401, 422),
                }
            },
            f"{API_PREFIX}/auth/logout": {
                "post": {
                    "summary": "Revoke the access token and, if given, the refresh token",
                    "security": bearer,
                    "requestBody": body,
                    "responses": _responses("200", {"type": "object"}, 400, 401, 422),
                }
            },
            f"{API_PREFIX}/auth/me": {
                "get": {
                    "summary": "The caller's user_info",
                    "security": bearer,
                    "responses": _responses("200", _USER_INFO, 401),
                }
            },
            f"{API_PREFIX}/images": {
                "get": {
                    "summary": "Series visible to the caller's institution",
                    "security": bearer,
                    "parameters": [
                        _param("patient_id"),
                        _param("study_uid"),
                        _param("modality"),
                        _param("date_from", schema={"type": "string", "format": "date"}),
                        _param("date_to", schema={"type": "string", "format": "date"}),
                        _param("limit", schema={"type": "integer", "minimum": 1, "maximum": 500}),
                        _param("offset", schema={"type": "integer", "minimum": 0}),
                    ],
                    "responses": _responses(
                        "200",
                        {
                            "type": "object",
                            "properties": {
                                "images": {"type": "array", "items": _IMAGE},
                                "total_count": _INT,
                                "page_count": _INT,
                                "current_page": _INT,
                            },
                        },
                        401,
                        403,
                        422,
                    ),
                }
            },
            f"{API_PREFIX}/images/upload": {
                "post": {
                    "summary": "Upload DICOM files or zip archives (processed in the background)",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "file": {
                                            "type": "array",
                                            "items": {"type": "string", "format": "binary"},
                                        },
                                        "metadata": _STR,
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("202", {"type": "object"}, 401, 403, 415, 422),
                }
            },
            f"{API_PREFIX}/images/upload/{{upload_id}}": {
                "get": _on_one("Progress of an upload", "upload_id")
            },
            f"{API_PREFIX}/images/{{series_uid}}": {
                "get": {
                    "summary": "One series with geometry and display defaults",
                    "security": bearer,
                    "parameters": [_param("series_uid", "path")],
                    "responses": _responses("200", _IMAGE, 401, 403, 404),
                },
                "delete": _on_one("Move a series to the recoverable deleted area", "series_uid"),
            },
            f"{API_PREFIX}/audit/patients/{{patient_id}}": {
                "get": {
                    "summary": "A patient's access history (read_audit_log)",
                    "security": bearer,
                    "parameters": [_param("patient_id", "path"), _param("since")],
                    "responses": _responses("200", {"type": "object"}, 401, 403, 404),
                }
            },
            f"{API_PREFIX}/studies/{{study_uid}}/deidentify": {
                "post": {
                    "summary": "Write a de-identified copy of a study (PS3.15 basic profile)",
                    "security": bearer,
                    "parameters": [_param("study_uid", "path")],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["patient_id", "patient_name"],
                                    "properties": {
                                        "patient_id": {"type": "string", "maxLength": 64},
                                        "patient_name": {"type": "string", "maxLength": 64},
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("201", {"type": "object"}, 401, 403, 404, 422),
                }
            },
            f"{API_PREFIX}/segmentations": {
                "get": {
                    "summary": "Segmentations, optionally of one image (series)",
                    "security": bearer,
                    "parameters": [_param("image_uid")],
                    "responses": _responses("200", {"type": "object"}, 401, 403),
                },
                "post": {
                    "summary": "Create a segmentation from a base64 mask (stored as DICOM SEG)",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image_uid", "region_type", "mask_data"],
                                    "properties": {
                                        "image_uid": _STR,
                                        "region_type": {
                                            "enum": [
                                                "prostate",
                                                "peripheral_zone",
                                                "transition_zone",
                                                "lesion",
                                                "other",
                                            ]
                                        },
                                        "creation_method": {
                                            "enum": ["manual", "semi_automatic", "ai_automatic"]
                                        },
                                        "confidence": {"type": "number"},
                                        "mask_data": _STR,
                                        "metadata": {"type": "object"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("201", {"type": "object"}, 401, 403, 404, 422),
                },
            },
            f"{API_PREFIX}/segmentations/{{segmentation_id}}": {
                "get": _on_one("One segmentation", "segmentation_id"),
                "put": {
                    "summary": "Update score, validation, notes",
                    "security": bearer,
                    "parameters": [_param("segmentation_id", "path")],
                    "requestBody": body,
                    "responses": _responses("200", {"type": "object"}, 401, 403, 404, 422),
                },
            },
            f"{API_PREFIX}/ai/analyze": {
                "get": {
                    "summary": "The analyses of a series, oldest first (automatic and requested)",
                    "security": bearer,
                    "parameters": [_param("series_uid", required=True)],
                    "responses": _responses("200", {"type": "object"}, 401, 403, 422),
                },
                "post": {
                    "summary": "Queue an AI analysis of a series (SEG + SR stored in the archive)",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["series_uid"],
                                    "properties": {
                                        "series_uid": _STR,
                                        "analysis_type": {"const": "prostate_comprehensive"},
                                        "config": {
                                            "type": "object",
                                            "properties": {
                                                "confidence_threshold": {
                                                    "type": "number",
                                                    "minimum": 0,
                                                    "maximum": 1,
                                                },
                                                "target_regions": {
                                                    "type": "array",
                                                    "items": {
                                                        "enum": ["prostate", "zones", "lesions"]
                                                    },
                                                },
                                                "include_pi_rads": {"type": "boolean"},
                                                "generate_report": {"type": "boolean"},
                                                "psa_ng_ml": {"type": "number", "minimum": 0},
                                            },
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses(
                        "202",
                        {
                            "type": "object",
                            "required": ["analysis_id", "status", "progress_url"],
                            "properties": {
                                "analysis_id": _STR,
                                "status": _STR,
                                "estimated_completion": _STR,
                                "progress_url": _STR,
                            },
                        },
                        401,
                        403,
                        404,
                        422,
                        503,
                    ),
                },
            },
            f"{API_PREFIX}/ai/analyze/{{analysis_id}}": {
                "get": _on_one(
                    "An analysis: its status and, once completed, results", "analysis_id"
                )
            },
            f"{API_PREFIX}/ai/analyze/{{analysis_id}}/progress": {
                "get": _on_one(
                    "An analysis' stage and progress (as on the WebSocket)", "analysis_id"
                )
            },
            f"{API_PREFIX}/reports/generate": {
                "post": {
                    "summary": "Generate a signed PI-RADS report (PDF, HTML, JSON, DICOM SR)",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["study_uid"],
                                    "properties": {
                                        "study_uid": _STR,
                                        "template": {"const": "pi_rads_structured_report"},
                                        "include_images": {"type": "boolean"},
                                        "include_measurements": {"type": "boolean"},
                                        "radiologist_signature": {"type": "object"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": _responses("201", {"type": "object"}, 401, 403, 404, 422),
                }
            },
            f"{API_PREFIX}/reports/signing-key": {
                "get": {
                    "summary": "The Ed25519 public key (PEM) that verifies report signatures",
                    "security": [],
                    "responses": {"200": {"description": "PEM public key"}},
                }
            },
            f"{API_PREFIX}/reports/{{name}}": {
                "get": {
                    "summary": "A report as report_<id>.pdf, .html, .json or .dcm",
                    "security": bearer,
                    "parameters": [_param("name", "path")],
                    "responses": {
                        "200": {"description": "the report"},
                        "401": {"description": "error"},
                        "403": {"description": "error"},
                        "404": {"description": "error"},
                    },
                }
            },
            f"{API_PREFIX}/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": _plain("200", {"type": "object"}),
                }
            },
            "/v1/worklists": {
                "get": {
                    "summary": "Worklist items of the key's institution, 20 per page",
                    "security": api_key,
                    "parameters": [
                        _param("status"),
                        _param("patient_id"),
                        _param("modality"),
                        _param("exam_date_and_time"),
                        _param("surname"),
                        _param("forename"),
                        _param("page", schema={"type": "integer", "minimum": 1}),
                    ],
                    "responses": _plain(
                        "200",
                        {
                            "type": "object",
                            "properties": {
                                "data": {"type": "array", "items": _WORKLIST_ITEM},
                                "meta": {"type": "object"},
                                "links": {"type": "object"},
                            },
                        },
                        401,
                        422,
                    ),
                },
                "post": {
                    "summary": "Create a worklist item",
                    "security": api_key,
                    "requestBody": worklist_body,
                    "responses": _plain(
                        "201", {"type": "object", "properties": {"data": _WORKLIST_ITEM}}, 401, 422
                    ),
                },
            },
            "/v1/worklists/{item_id}": {
                "get": {
                    "summary": "One worklist item",
                    "security": api_key,
                    "parameters": [_param("item_id", "path", {"type": "integer"})],
                    "responses": _plain(
                        "200", {"type": "object", "properties": {"data": _WORKLIST_ITEM}}, 401, 404
                    ),
                },
                "put": {
                    "summary": "Update a worklist item (partial)",
                    "security": api_key,
                    "parameters": [_param("item_id", "path", {"type": "integer"})],
                    "requestBody": worklist_body,
                    "responses": _plain(
                        "200",
                        {"type": "object", "properties": {"data": _WORKLIST_ITEM}},
                        401,
                        404,
                        422,
                    ),
                },
                "delete": {
                    "summary": "Delete a worklist item",
                    "security": api_key,
                    "parameters": [_param("item_id", "path", {"type": "integer"})],
                    "responses": {
                        "204": {"description": "deleted"},
                        "401": {"description": "error"},
                        "404": {"description": "error"},
                    },
                },
            },
        },
    }


def openapi_routes() -> list[BaseRoute]:
    async def serve(request: Request) -> Response:
        return JSONResponse(document())

    return [Route(f"{API_PREFIX}/openapi.json", serve, methods=["GET"])]
