"""Part 10 header to DICOM JSON in one pass over the bytes, for the receive path.

Ingest needs the header as DICOM JSON (PS3.18 F.2) and nothing else: the UIDs, the catalog
columns and the stored metadata all come from it.  Building a pydicom ``Dataset`` first and
converting it afterwards cost more than half of the CPU an instance takes to ingest, so this
module walks the encoded elements (PS3.5 7.1: tag, VR, length, value) and converts each value as
it finds it, with :func:`server.dicom.json.value_json`, the converter ``to_json`` uses.

It reads what modalities send nearly always: Explicit VR Little Endian (which every compressed
transfer syntax uses, PS3.5 A.4) and Implicit VR Little Endian, with sequences and items of
defined or undefined length.  Anything else (big endian, deflate, a private tag in implicit VR,
an ambiguous VR, a value the fast converter leaves to pydicom, a truncated or malformed element)
makes :func:`read_header` return None, and the caller parses with pydicom as before.  So this
module never decides how odd data is read; it only has to agree with pydicom on the data it
accepts, and a property test holds it to that on mutated files.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, private_dictionary_VR

from server.dicom.json import UTF8_CHARSETS, Fallback, value_json

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Big endian and deflate change how every element is read: pydicom handles them.
_NOT_HERE = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # PS3.5 7.1.2
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXELS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # where a header-only read stops
_CHARSET = 0x00080005
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32

_tag_vr = struct.Struct("<HH2s").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_implicit = struct.Struct("<HHI").unpack_from
_dictionary: dict[int, str] = {}


class _Bail(Exception):
    """Leave this data to pydicom."""


_GIVE_UP = (_Bail, Fallback, struct.error, ValueError, KeyError, UnicodeDecodeError, RecursionError)


@dataclass(frozen=True)
class Header:
    """What ingest needs of a Part 10 file."""

    json: dict[str, Any]  # the data set without group 0002, sorted by tag
    transfer_syntax: str
    pixel_at: int  # offset of the Pixel Data element, or the length of the data


def read_header(data: bytes) -> Header | None:
    """The header of Part 10 ``data`` (preamble and ``DICM`` included), or None when it needs
    pydicom (see the module docstring)."""
    try:
        return _read(data)
    except _GIVE_UP:
        return None


def _read(data: bytes) -> Header:
    if data[128:132] != b"DICM":
        raise _Bail
    syntax, pos = _file_meta(data)
    if syntax == _IMPLICIT_LE:
        implicit = True
    elif syntax in _NOT_HERE:
        raise _Bail
    else:
        implicit = False  # PS3.5 A.4: the encapsulated syntaxes are Explicit VR Little Endian
    end = len(data)
    if pos + 6 <= end:
        if data[pos : pos + 2] == b"\0\0":
            raise _Bail  # a command set group (0000) before the data set
        # pydicom checks the first element's VR against the transfer syntax and follows the
        # data when they disagree; such files are rare enough to leave to it
        if _looks_explicit(data, pos) == implicit:
            raise _Bail
    json, pos = _dataset(data, pos, end, implicit, 0, True)
    return Header(json, syntax, pos)


def _file_meta(data: bytes) -> tuple[str, int]:
    """PS3.10 7.1: group 0002 in Explicit VR Little Endian; returns the transfer syntax and
    where the data set starts."""
    pos, end, syntax = 132, len(data), None
    while pos + 8 <= end:
        group, element, vr = _tag_vr(data, pos)
        if group != 2:
            break
        if vr not in _VRS:
            raise _Bail
        if vr in _LONG:
            length = _u32(data, pos + 8)[0]
            start = pos + 12
        else:
            length = _u16(data, pos + 6)[0]
            start = pos + 8
        if length == _UNDEFINED or start + length > end:
            raise _Bail
        if element == 0x0010:
            syntax = data[start : start + length].decode("ascii").rstrip("\0 ")
        pos = start + length
    if not syntax or not syntax.replace(".", "").isdigit():
        raise _Bail  # missing or odd: pydicom says what is wrong with it
    return syntax, pos


def _charset_is_utf8(value: bytes) -> bool:
    """How ``to_json`` reads (0008,0005): one value, UTF-8 or its ASCII subset."""
    parts = value.decode("ascii").rstrip(" \0").split("\\")
    if any(part and part.strip(" ") not in python_encoding for part in parts):
        raise _Bail  # pydicom warns about, guesses or refuses names it does not know
    return len(parts) == 1 and parts[0] in UTF8_CHARSETS


def _vr_of(tag: int, out: dict[str, Any]) -> str:
    """The VR of an implicit VR element as pydicom finds it: the data dictionary, group
    lengths UL, and for private tags (PS3.5 6.2.2) LO for creators, the private dictionary
    under the creator read earlier in ``out``, else UN."""
    vr = _dictionary.get(tag)
    if vr is not None:
        return vr
    group, element = tag >> 16, tag & 0xFFFF
    if group & 1:
        if 0x0010 <= element < 0x0100:
            return "LO"
        creator = out.get(f"{group:04X}00{element >> 8:02X}") if element & 0xFF00 else None
        names = (creator or {}).get("Value") or []
        if not names:
            return "UN"
        if len(names) > 1 or not isinstance(names[0], str):
            raise _Bail
        try:
            vr = private_dictionary_VR(tag, names[0])
        except KeyError:
            return "UN"
    elif element == 0:
        return "UL"  # a group length
    else:
        vr = dictionary_VR(tag)  # KeyError (an unknown tag): pydicom decides
        _dictionary[tag] = vr
    if " or " in vr:
        raise _Bail  # depends on other elements (PS3.5 A.1 c)
    return vr


def _looks_explicit(data: bytes, pos: int) -> bool:
    """pydicom's test of an element's encoding: a VR is two capital letters."""
    return 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B


def _dataset(
    data: bytes, pos: int, end: int, implicit: bool, level: int, utf8: bool, depth: int = 0
) -> tuple[dict[str, Any], int]:
    """Elements from ``pos`` up to ``end``. ``level`` 0 is the top level, which stops at Pixel
    Data; an item of undefined length (``level`` < 0) ends at its delimiter. Returns the JSON
    object and where reading stopped."""
    if depth > _MAX_DEPTH:
        raise _Bail  # real objects nest a few levels; the rest is pydicom's to refuse
    out: dict[str, Any] = {}
    last = -1
    while pos < end:
        if pos + 8 > end:
            raise _Bail
        group, element, code = _tag_vr(data, pos)
        tag = group << 16 | element
        if tag == _ITEM_END and level < 0:
            return out, pos + 8
        if group in (0, 2, 0xFFFE):
            raise _Bail  # command or file meta elements, stray delimiters
        if implicit:
            vr = ""
            length = _u32(data, pos + 4)[0]
            start = pos + 8
        else:
            if code not in _VRS:
                raise _Bail
            vr = code.decode("ascii")
            if code in _LONG:
                if pos + 12 > end:
                    raise _Bail
                length = _u32(data, pos + 8)[0]
                start = pos + 12
            else:
                length = _u16(data, pos + 6)[0]
                start = pos + 8
        if level == 0 and tag in _PIXELS:
            return out, pos  # pydicom stops here too, once it has read the length field
        if tag <= last:
            raise _Bail  # out of order or repeated: pydicom's data set decides which counts
        last = tag
        key = f"{tag:08X}"
        if length == _UNDEFINED:
            if vr == "UN":
                vr = "SQ"  # PS3.5 6.2.2: UN of undefined length is a sequence
            elif not vr:
                vr = _vr_of(tag, out)
            if vr != "SQ":
                raise _Bail  # e.g. encapsulated pixel data inside an item
            items, pos = _sequence(data, start, None, implicit, utf8, depth)
            out[key] = {"vr": "SQ", "Value": items}
            continue
        stop = start + length
        if stop > end:
            raise _Bail  # cut short
        pos = stop
        if not vr:
            vr = _vr_of(tag, out)
        if vr == "SQ":
            items, _ = _sequence(data, start, stop, implicit, utf8, depth)
            out[key] = {"vr": "SQ", "Value": items}
            continue
        value = data[start:stop]
        if tag == _CHARSET:
            if vr != "CS" or any(t & 0xFFFF for t in map(_tag_of, out)):
                raise _Bail  # not where a writer puts it: values before it were read already
            utf8 = _charset_is_utf8(value)
        out[key] = value_json(tag, value, vr, utf8)
    if level < 0:
        raise _Bail  # an item of undefined length without its delimiter
    return out, pos


def _tag_of(key: str) -> int:
    return int(key, 16)


def _sequence(
    data: bytes, pos: int, end: int | None, implicit: bool, utf8: bool, depth: int
) -> tuple[list[dict[str, Any]], int]:
    """Items of a sequence (PS3.5 7.5) from ``pos``; ``end`` None for undefined length. Items
    without a Specific Character Set of their own use their parent's (PS3.5 6.1.2.5.3)."""
    items: list[dict[str, Any]] = []
    limit = len(data) if end is None else end
    while True:
        if end is not None and pos == end:
            return items, pos
        if pos + 8 > limit:
            raise _Bail
        group, element, length = _implicit(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END and end is None:
            return items, pos + 8
        if tag != _ITEM:
            raise _Bail
        start = pos + 8
        if length == _UNDEFINED:
            item_end, level = limit, -1
        elif start + length > limit:
            raise _Bail
        else:
            item_end, level = start + length, 1
        if (
            not implicit
            and item_end >= start + 8
            and _tag_vr(data, start)[:2] != (0xFFFE, 0xE00D)
            and not _looks_explicit(data, start)
        ):
            raise _Bail  # an implicit VR item in an explicit VR data set: pydicom follows it
        item, pos = _dataset(data, start, item_end, implicit, level, utf8, depth + 1)
        if level > 0:
            pos = item_end
        items.append(item)
