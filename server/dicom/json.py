"""The DICOM JSON model (PS3.18 F.2) for stored metadata, without bulk data.

Ingest stores each instance's header in this form so WADO-RS metadata and C-FIND keys outside the
catalog columns never reopen instance files.  Binary values above the threshold become
``BulkDataURI`` entries relative to the instance (``bulkdata/<tag>``); the web layer prefixes them
with the instance's URL (PS3.18 8.6.2).

:func:`to_json` is on the C-STORE path, so the common element kinds are converted straight from
the raw bytes; anything unusual (other byte orders, ambiguous VRs, non-ASCII text in a
non-UTF-8 character set, odd values) goes through pydicom's own converter, and a unit test holds
the two to identical output.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

BULK_DATA_THRESHOLD = 1024

_ASCII_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI"})
_CHARSET_TEXT = frozenset({"LO", "SH", "UC"})
_UNSPLIT_TEXT = frozenset({"LT", "ST", "UT", "UR"})
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_BINARY = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
UTF8_CHARSETS = ("", "ISO_IR 6", "ISO_IR 192")  # and no (0008,0005) at all


def _bulk_uri(element: DataElement) -> str:
    return f"bulkdata/{int(element.tag):08X}"


class Fallback(Exception):
    """This element needs pydicom's converter."""


def _text(data: bytes, utf8: bool) -> str:
    if data.isascii():
        return data.decode("ascii")
    if utf8:
        return data.decode("utf-8")
    raise Fallback


def _split(text: str) -> list[str]:
    parts = text.split("\\")
    if any(not p.strip(" ") for p in parts) and len(parts) > 1:
        raise Fallback  # empty components: pydicom's rules for those are subtle
    return parts


def value_json(tag: int, data: bytes, vr: str, utf8: bool) -> dict[str, Any]:
    """One element's DICOM JSON from its encoded little endian value; raises
    :class:`Fallback` for what pydicom must convert."""
    out: dict[str, Any] = {"vr": vr}
    if vr in _BINARY:
        if not data:
            return out
        if len(data) > (BULK_DATA_THRESHOLD // 4) * 3:  # pydicom's rule: base64 grows by 4/3
            out["BulkDataURI"] = f"bulkdata/{tag:08X}"
        else:
            out["InlineBinary"] = base64.b64encode(data).decode("ascii")
        return out
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        size = struct.calcsize(code)
        if not data or len(data) % size:
            raise Fallback
        values = list(struct.unpack(f"<{len(data) // size}{code}", data))
        if vr in ("FL", "FD") and any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise Fallback  # NaN/inf are not JSON numbers
        out["Value"] = values
        return out
    if vr == "AT":
        if not data or len(data) % 4:
            raise Fallback
        pairs = struct.unpack(f"<{len(data) // 2}H", data)
        out["Value"] = [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]
        return out
    if vr in _ASCII_TEXT or vr in _CHARSET_TEXT or vr == "PN" or vr in ("IS", "DS"):
        text = _text(data, utf8 if vr not in _ASCII_TEXT else False)
        text = text.rstrip("\0 ") if vr == "UI" else text.strip(" \0")
        if not text:
            return out
        values = _split(text)
        if vr == "PN":
            out["Value"] = [_person_name(v) for v in values]
        elif vr == "IS":
            out["Value"] = [int(v) for v in values]
        elif vr == "DS":
            out["Value"] = [float(v) for v in values]
        else:
            out["Value"] = [v.strip(" ") for v in values]
        return out
    if vr in _UNSPLIT_TEXT:
        text = _text(data, utf8).rstrip(" \0")
        if text:
            out["Value"] = [text]
        return out
    raise Fallback


def _person_name(value: str) -> dict[str, str]:
    groups = value.strip(" ").split("=")
    if len(groups) > 3:
        raise Fallback
    return dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False))


def to_json(ds: Dataset, inherited_utf8: bool = True) -> dict[str, Any]:
    """The dataset as a DICOM JSON object; large binary values are replaced by BulkDataURIs.

    An item without a Specific Character Set of its own is read in its parent's (PS3.5
    6.1.2.5.3), which ``inherited_utf8`` carries down."""
    charset = ds.get("SpecificCharacterSet")
    utf8 = inherited_utf8 if charset is None else charset in UTF8_CHARSETS
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        raw = ds.get_item(tag)
        key = f"{int(tag):08X}"
        try:
            if not isinstance(raw, RawDataElement) or not raw.is_little_endian:
                raise Fallback
            vr = raw.VR or dictionary_VR(tag)
            if vr == "SQ" or " or " in vr or raw.length == 0xFFFFFFFF:
                raise Fallback
            out[key] = value_json(int(tag), raw.value or b"", vr, utf8)
        except (Fallback, KeyError, ValueError, UnicodeDecodeError):
            try:
                element = ds[tag]
                if element.VR != "SQ":
                    out[key] = element.to_json_dict(_bulk_uri, BULK_DATA_THRESHOLD)
                    continue
            except (RecursionError, MemoryError):
                raise
            except Exception:
                out[key] = _lenient(raw, tag)
                continue
            out[key] = {"vr": "SQ", "Value": [to_json(item, utf8) for item in element.value]}
    return out


_LENIENT_TEXT = _ASCII_TEXT | _CHARSET_TEXT | _UNSPLIT_TEXT | {"PN", "IS", "DS", "DT", "LT"}


def _lenient(raw: Any, tag: Any) -> dict[str, Any]:
    """An element pydicom cannot convert either (found by tools/fuzz.py: a multi-valued PN
    with an empty value, IS/DS text that is not a number, a VR that does not exist, a
    value whose length does not fit its VR). The file keeps the bytes as received; the
    metadata gets what can be read: text as text, unreadable numbers and empty values as null
    (PS3.18 F.2.5), and anything else as UN bytes."""
    vr = str(getattr(raw, "VR", "") or "")
    if vr not in _LENIENT_TEXT:
        try:
            vr = vr if vr in _NUMBERS or vr in _BINARY else dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    value = getattr(raw, "value", None)
    if isinstance(value, bytes | bytearray):
        if vr not in _LENIENT_TEXT:
            data = bytes(value)
            if not data or len(data) > BULK_DATA_THRESHOLD:
                return {"vr": "UN"}
            return {"vr": "UN", "InlineBinary": base64.b64encode(data).decode("ascii")}
        text = bytes(value).decode("utf-8", "replace").strip(" \0")
        texts = [text] if vr in _UNSPLIT_TEXT else text.split("\\")
    elif isinstance(value, list | tuple | MultiValue):
        texts = [str(v) for v in value]
    else:
        texts = [] if value is None else [str(value)]
    values: list[Any] = []
    for text in (t.strip(" \0") for t in texts):
        if not text:
            values.append(None)
        elif vr == "PN":
            values.append({"Alphabetic": text})
        elif vr in ("IS", "DS"):
            values.append(_number(text, vr))
        else:
            values.append(text)
    if vr not in _LENIENT_TEXT or all(v is None for v in values):
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _number(text: str, vr: str) -> int | float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    if vr == "IS":
        return int(number) if number.is_integer() and abs(number) < 2**31 else None
    return number


def text_values(element: dict[str, Any] | None) -> list[str]:
    """One element's values in their DICOM string form: PN groups joined with ``=``, numbers
    as written. The catalog columns and in-memory matching both read values this way."""
    if not element:
        return []
    out: list[str] = []
    for value in element.get("Value", []):
        if isinstance(value, dict):
            groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
            while groups and not groups[-1]:
                groups.pop()
            out.append("=".join(groups))
        elif isinstance(value, float) and value.is_integer():
            out.append(str(int(value)))
        elif value is None:
            out.append("")
        else:
            out.append(str(value))
    return out


def dumps(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


def loads(data: bytes | str) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(data)
    return value
