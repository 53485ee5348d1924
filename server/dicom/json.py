"""The DICOM JSON model (PS3.18 F.2) for stored metadata, without bulk data.

Ingest stores each instance's header in this form so WADO-RS metadata and C-FIND keys outside the
catalog columns never reopen instance files.  Binary values above the threshold become
``BulkDataURI`` entries relative to the instance (``bulkdata/<tag>``); the web layer prefixes them
with the instance's URL (PS3.18 8.6.2).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_DATA_THRESHOLD = 1024
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _bulk_uri(element: DataElement) -> str:
    return f"bulkdata/{int(element.tag):08X}"


def to_json(ds: Dataset) -> dict[str, Any]:
    """The dataset as a DICOM JSON object; large binary values are replaced by BulkDataURIs."""
    data: dict[str, Any] = ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=_bulk_uri,
        suppress_invalid_tags=True,
    )
    return data


def dumps(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


def loads(data: bytes | str) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(data)
    return value
