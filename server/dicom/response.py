"""C-FIND response identifiers from query matches (PS3.4 C.4.1.2.2).

Only the keys the request asked for are returned, plus the Query/Retrieve Level and the unique
keys of the query level and the levels above it in the information model.

:func:`identifier_elements` decides what goes in; :func:`find_identifier` makes a pydicom
Dataset of it and :func:`encode_identifier` the encoded bytes directly (the C-FIND fast path:
pydicom's writer costs more per response than the whole catalog query).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from server.catalog.search import Match
from server.dicom.attributes import BY_TAG, INTEGER_VRS, UNIQUE_KEY
from server.dicom.query import Query

# (tag, VR, value): value is text, an int, None (empty) or a DataElement from stored metadata
Element = tuple[int, str, Any]
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_CHARSET_TAG = 0x00080005
_LEVEL_TAG = 0x00080052  # Query/Retrieve Level


def _no_bulk(tag: str, vr: str, uri: str) -> bytes:
    return b""


def _from_json(tag: int, vr: str, metadata: dict[str, Any] | None) -> Element:
    element = (metadata or {}).get(f"{tag:08X}")
    if element:
        ds = Dataset.from_json({f"{tag:08X}": element}, bulk_data_uri_handler=_no_bulk)
        return tag, ds[tag].VR, ds[tag]
    return tag, vr, None


def identifier_elements(query: Query, match: Match) -> list[Element]:
    """The response's elements in tag order, SpecificCharacterSet included when needed."""
    tags = {UNIQUE_KEY[level].tag for level in query.model.levels() if level <= query.level}
    tags.update(query.requested_tags())
    elements: list[Element] = [(_LEVEL_TAG, "CS", query.level.name)]
    utf8 = False
    for tag in sorted(tags):
        attr = BY_TAG.get(tag)
        if attr is None:
            vr = next((c.vr for c in query.constraints if c.tag == tag), "UN")
            elements.append(_from_json(tag, vr, match.metadata))
            utf8 = True  # metadata text may be anything; UTF-8 is always right
            continue
        value = match.values.get(tag)  # absent: a key from a lower level, returned empty
        if value == "":
            value = None
        if isinstance(value, str) and not value.isascii():
            utf8 = True
        elements.append((tag, attr.vr, value))
    if utf8:
        elements.insert(0, (_CHARSET_TAG, "CS", "ISO_IR 192"))
    elements.sort(key=lambda e: e[0])
    return elements


def find_identifier(query: Query, match: Match) -> Dataset:
    ds = Dataset()
    for tag, vr, value in identifier_elements(query, match):
        if isinstance(value, DataElement):
            ds[tag] = value
        elif value is None:
            ds[tag] = DataElement(tag, vr, None)
        elif vr in INTEGER_VRS:
            ds[tag] = DataElement(tag, vr, int(value))
        else:
            text = str(value)
            ds[tag] = DataElement(tag, vr, text.split("\\") if "\\" in text else text)
    return ds


def _header(tag: int, vr: str, length: int, explicit: bool) -> bytes:
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return group_element + struct.pack("<I", length)
    if vr in _LONG_VRS:
        return group_element + vr.encode() + b"\0\0" + struct.pack("<I", length)
    return group_element + vr.encode() + struct.pack("<H", length)


def encode_identifier(elements: list[Element], explicit: bool) -> bytes:
    """Little-endian encoding of the elements (implicit or explicit VR, PS3.5 7.1)."""
    utf8 = bool(elements) and elements[0][0] == _CHARSET_TAG
    out = BytesIO()
    for tag, vr, value in elements:
        if isinstance(value, DataElement):
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, not explicit
            write_data_element(fp, value, ["ISO_IR 192"] if utf8 else None)
            out.write(fp.getvalue())
            continue
        data = b"" if value is None else str(value).encode("utf-8" if utf8 else "ascii")
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
        out.write(_header(tag, vr, len(data), explicit))
        out.write(data)
    return out.getvalue()


class IdentifierEncoder:
    """:func:`encode_identifier` of :func:`identifier_elements` for every match of one query,
    with what does not change between matches (which keys, their VRs and element headers)
    worked out once: a wide C-FIND sends thousands of responses.

    Matches that need stored metadata (keys outside the catalog columns) take the general
    path; the output is the same byte for byte (tests/unit/test_response_encoding.py).
    """

    def __init__(self, query: Query, explicit: bool) -> None:
        self.query = query
        self.explicit = explicit
        tags = {UNIQUE_KEY[level].tag for level in query.model.levels() if level <= query.level}
        tags.update(query.requested_tags())
        self.general = any(tag not in BY_TAG or tag <= _CHARSET_TAG for tag in tags)
        level = query.level.name.encode("ascii")
        if len(level) % 2:
            level += b" "
        self.level = _header(_LEVEL_TAG, "CS", len(level), explicit) + level
        # per key: tag, element header without its length, the length's width, padding, and
        # the whole element when the value is empty
        self.plan: list[tuple[int, bytes, int, bytes, bytes]] = []
        for tag in sorted(t for t in tags if t in BY_TAG):
            vr = BY_TAG[tag].vr
            width = 4 if not explicit or vr in _LONG_VRS else 2
            pad = b"\0" if vr == "UI" else b" "
            prefix = _header(tag, vr, 0, explicit)[:-width]
            self.plan.append((tag, prefix, width, pad, prefix + bytes(width)))
        # where Query/Retrieve Level goes among the keys (tag order)
        self.level_at = sum(1 for entry in self.plan if entry[0] < _LEVEL_TAG)
        self.charset = _header(_CHARSET_TAG, "CS", 10, explicit) + b"ISO_IR 192"

    def encode(self, match: Match) -> bytes:
        if self.general:
            return encode_identifier(identifier_elements(self.query, match), self.explicit)
        values = match.values
        out: list[bytes] = []
        try:  # one pass for the common case, every value ASCII (no Specific Character Set)
            for tag, prefix, width, pad, empty in self.plan:
                value = values.get(tag)
                if value is None or value == "":
                    out.append(empty)
                    continue
                data = (value if type(value) is str else str(value)).encode("ascii")
                if len(data) & 1:
                    data += pad
                out.append(prefix + len(data).to_bytes(width, "little") + data)
        except UnicodeEncodeError:
            return self._encode_text(values)
        out.insert(self.level_at, self.level)
        return b"".join(out)

    def _encode_text(self, values: dict[int, Any]) -> bytes:
        """Any text: UTF-8 with its Specific Character Set when a value is not ASCII."""
        texts: list[str | None] = []
        utf8 = False
        for tag, *_ in self.plan:
            value = values.get(tag)
            if value is None or value == "":
                texts.append(None)
                continue
            shown = str(value)
            if not shown.isascii():
                utf8 = True
            texts.append(shown)
        encoding = "utf-8" if utf8 else "ascii"
        out = [self.charset] if utf8 else []
        for index, ((_, prefix, width, pad, _), text) in enumerate(
            zip(self.plan, texts, strict=True)
        ):
            if index == self.level_at:
                out.append(self.level)
            data = b"" if text is None else text.encode(encoding)
            if len(data) % 2:
                data += pad
            out.append(prefix + len(data).to_bytes(width, "little") + data)
        if self.level_at == len(self.plan):
            out.append(self.level)
        return b"".join(out)
