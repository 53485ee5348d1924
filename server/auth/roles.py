"""Roles and the permissions each grants. Every endpoint names the permission it needs."""

from __future__ import annotations

READ_IMAGES = "read_images"
UPLOAD_IMAGES = "upload_images"
DELETE_IMAGES = "delete_images"
CREATE_SEGMENTATIONS = "create_segmentations"
GENERATE_REPORTS = "generate_reports"
RUN_AI = "run_ai_analysis"
READ_AUDIT = "read_audit_log"

ROLES: dict[str, tuple[str, ...]] = {
    "admin": (
        READ_IMAGES,
        UPLOAD_IMAGES,
        DELETE_IMAGES,
        CREATE_SEGMENTATIONS,
        GENERATE_REPORTS,
        RUN_AI,
        READ_AUDIT,
    ),
    "radiologist": (READ_IMAGES, CREATE_SEGMENTATIONS, GENERATE_REPORTS, RUN_AI),
    "technician": (READ_IMAGES, UPLOAD_IMAGES),
    "researcher": (READ_IMAGES, RUN_AI),
    "viewer": (READ_IMAGES,),
}


def permissions_of(role: str) -> tuple[str, ...]:
    return ROLES.get(role, ())
