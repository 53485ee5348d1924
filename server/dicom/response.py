"""Build C-FIND response identifiers from query matches (PS3.4 C.4.1.2.2).

Only the keys the request asked for are returned, plus the Query/Retrieve Level and the unique
keys of the query level and the levels above it in the information model.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from server.catalog.search import Match
from server.dicom.attributes import BY_TAG, INTEGER_VRS, UNIQUE_KEY
from server.dicom.query import Query


def _no_bulk(tag: str, vr: str, uri: str) -> bytes:
    return b""


def _from_json(tag: int, vr: str, metadata: dict[str, Any] | None) -> DataElement:
    element = (metadata or {}).get(f"{tag:08X}")
    if element:
        ds = Dataset.from_json({f"{tag:08X}": element}, bulk_data_uri_handler=_no_bulk)
        return ds[tag]
    return DataElement(tag, vr, None)


def _catalog_element(tag: int, value: Any) -> DataElement:
    attr = BY_TAG[tag]
    if value is None or value == "":
        return DataElement(tag, attr.vr, None)
    if attr.vr in INTEGER_VRS:
        return DataElement(tag, attr.vr, int(value))
    text = str(value)
    return DataElement(tag, attr.vr, text.split("\\") if "\\" in text else text)


def _needs_utf8(ds: Dataset) -> bool:
    for element in ds:
        value = element.value
        texts = value if isinstance(value, list | tuple) else [value]
        for text in texts:
            if text is not None and not str(text).isascii():
                return True
    return False


def find_identifier(query: Query, match: Match) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level.name
    tags: list[int] = [
        UNIQUE_KEY[level].tag for level in query.model.levels() if level <= query.level
    ]
    tags += [t for t in query.requested_tags() if t not in tags]
    for tag in sorted(tags):
        attr = BY_TAG.get(tag)
        if attr is not None:
            if tag in match.values:
                ds[tag] = _catalog_element(tag, match.values[tag])
            else:
                ds[tag] = DataElement(tag, attr.vr, None)  # a key from a lower level
        else:
            vr = next((c.vr for c in query.constraints if c.tag == tag), "UN")
            ds[tag] = _from_json(tag, vr, match.metadata)
    if _needs_utf8(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
