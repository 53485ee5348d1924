"""Pixel data of stored instances: frames, transcoding and rendering for WADO-RS.

Frames of uncompressed files are read straight from their byte offsets (no decoding, no full
parse); compressed frames are cut out of the encapsulated fragments as stored and only decoded
or re-encoded when the client asked for something else (PS3.18 8.7.4, 8.7.3.5).  Codecs are
pydicom's pixel backends: pylibjpeg (JPEG, JPEG-LS, JPEG 2000, RLE) to decode, and RLE,
pyjpegls and openjpeg to encode.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom import uid as uids
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import pixel_array
from pydicom.tag import Tag

from server.errors import ServerError

NATIVE_SYNTAXES = frozenset(
    {
        uids.ImplicitVRLittleEndian,
        uids.ExplicitVRLittleEndian,
        uids.DeflatedExplicitVRLittleEndian,
        uids.ExplicitVRBigEndian,
    }
)
# Uncompressed syntaxes whose frames sit at plain offsets in the file.
_OFFSET_SYNTAXES = frozenset({uids.ImplicitVRLittleEndian, uids.ExplicitVRLittleEndian})
# What an instance or frame can be transcoded to, in the order we prefer them.
TRANSCODE_TARGETS = (
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.JPEGLSLossless,
    uids.JPEG2000Lossless,
    uids.RLELossless,
)
# PS3.18 Table 8.7.3-5: the media type of a frame in a given transfer syntax.
FRAME_MEDIA_TYPE: dict[str, str] = {
    uids.JPEGBaseline8Bit: "image/jpeg",
    uids.JPEGExtended12Bit: "image/jpeg",
    uids.JPEGLossless: "image/jpeg",
    uids.JPEGLosslessSV1: "image/jpeg",
    uids.JPEGLSLossless: "image/jls",
    uids.JPEGLSNearLossless: "image/jls",
    uids.JPEG2000Lossless: "image/jp2",
    uids.JPEG2000: "image/jp2",
    uids.HTJ2KLossless: "image/jphc",
    uids.HTJ2KLosslessRPCL: "image/jphc",
    uids.HTJ2K: "image/jphc",
    uids.RLELossless: "image/dicom-rle",
}
# The syntax a frame media type means when the request names none (PS3.18 Table 8.7.3-5).
DEFAULT_FRAME_SYNTAX: dict[str, str] = {
    "application/octet-stream": uids.ExplicitVRLittleEndian,
    "image/jls": uids.JPEGLSLossless,
    "image/jp2": uids.JPEG2000Lossless,
    "image/dicom-rle": uids.RLELossless,
    "image/jpeg": uids.JPEGBaseline8Bit,
}
ENCODABLE_FRAME_SYNTAXES = frozenset({uids.JPEGLSLossless, uids.JPEG2000Lossless, uids.RLELossless})
_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "NumberOfFrames",
)
_PIXEL_TAGS = {k: f"{tag_for_keyword(k):08X}" for k in _PIXEL_KEYWORDS}


class PixelError(ServerError):
    """The instance has no pixel data, or the frame/syntax asked for cannot be produced."""

    def __init__(self, message: str, status: int = 404) -> None:
        self.status = status
        super().__init__(message)


def can_decode(syntax: str) -> bool:
    if syntax in NATIVE_SYNTAXES:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def can_transcode(stored: str, target: str) -> bool:
    return stored == target or (target in TRANSCODE_TARGETS and can_decode(stored))


def transcode(path: Path, target: str) -> bytes:
    """The Part 10 file re-encoded in ``target`` (PS3.18 8.7.3.5.2)."""
    ds = dcmread(path)
    stored = str(ds.file_meta.TransferSyntaxUID)
    if stored == target:
        return path.read_bytes()
    if "PixelData" in ds and stored not in NATIVE_SYNTAXES:
        # The same instance in another encoding: lossless, so it keeps its SOP Instance UID.
        ds.decompress(generate_instance_uid=False)  # now Explicit VR Little Endian
    if target in (uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = uids.UID(target)
    elif "PixelData" in ds:
        ds.compress(target, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Frames:
    """The frames of one stored instance."""

    path: Path
    syntax: str
    header: dict[str, Any]  # pixel module attributes by keyword, first value only
    count: int
    _raw: RawDataElement | None

    @property
    def stored_media_type(self) -> str:
        return FRAME_MEDIA_TYPE.get(self.syntax, "application/octet-stream")

    def _check(self, number: int) -> None:
        if not 1 <= number <= self.count:
            raise PixelError(f"frame {number} does not exist (the instance has {self.count})")

    def _frame_size(self) -> int:
        return _frame_size(self.header)

    def stored(self, number: int) -> bytes:
        """The frame as stored: raw little-endian pixels, or the compressed bitstream."""
        self._check(number)
        raw = self._raw
        if raw is None:
            raise PixelError("the instance has no pixel data")
        data: bytes | None = raw.value
        if self.syntax in _OFFSET_SYNTAXES:
            size = self._frame_size()
            if data is not None:
                return bytes(data[(number - 1) * size : number * size])
            with open(self.path, "rb") as fh:
                fh.seek(raw.value_tell + (number - 1) * size)
                return fh.read(size)
        if self.syntax in NATIVE_SYNTAXES:
            # big endian (reordered to little) or deflated (offsets are not file offsets)
            return self.native(number)
        if data is None:
            with open(self.path, "rb") as fh:
                fh.seek(raw.value_tell)
                data = fh.read()
        return get_frame(data, number - 1, number_of_frames=self.count)

    def decoded(self, number: int) -> np.ndarray[Any, Any]:
        self._check(number)
        try:
            return pixel_array(str(self.path), index=number - 1, raw=True)
        except Exception as exc:
            raise PixelError(f"cannot decode {self.syntax}: {exc}", 406) from exc

    def native(self, number: int) -> bytes:
        """Uncompressed little-endian bytes of the frame (application/octet-stream)."""
        if self.syntax in _OFFSET_SYNTAXES:
            return self.stored(number)
        array = self.decoded(number)
        return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()

    def encode(self, number: int, target: str) -> bytes:
        """The frame re-encoded in ``target`` (JPEG-LS, JPEG 2000 or RLE lossless)."""
        if target == self.syntax:
            return self.stored(number)
        if target in NATIVE_SYNTAXES:
            return self.native(number)
        if target not in ENCODABLE_FRAME_SYNTAXES:
            raise PixelError(f"cannot encode frames as {target}", 406)
        array = self.decoded(number)
        h = self.header
        kwargs: dict[str, Any] = {
            "rows": int(h["Rows"]),
            "columns": int(h["Columns"]),
            "samples_per_pixel": int(h.get("SamplesPerPixel", 1)),
            "bits_allocated": int(h["BitsAllocated"]),
            "bits_stored": int(h.get("BitsStored", h["BitsAllocated"])),
            "pixel_representation": int(h.get("PixelRepresentation", 0)),
            "photometric_interpretation": str(h.get("PhotometricInterpretation", "MONOCHROME2")),
            "planar_configuration": 0,
            "number_of_frames": 1,
        }
        if str(kwargs["photometric_interpretation"]).startswith("YBR"):
            kwargs["photometric_interpretation"] = "RGB"  # pixel_array(raw=True) keeps YBR
        try:
            return bytes(get_encoder(target).encode(array, **kwargs))
        except Exception as exc:
            raise PixelError(f"cannot encode this frame as {target}: {exc}", 406) from exc


def _frame_size(header: dict[str, Any]) -> int:
    bits = int(header.get("BitsAllocated") or 0)
    if bits % 8 or not bits:
        raise PixelError("bit-packed pixel data cannot be cut into frames", 406)
    samples = int(header.get("SamplesPerPixel") or 1)
    return int(header["Rows"]) * int(header["Columns"]) * samples * bits // 8


def _first(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def header_from_json(metadata: dict[str, Any]) -> dict[str, Any]:
    """The pixel module attributes from an instance's stored DICOM JSON."""
    header: dict[str, Any] = {}
    for keyword in _PIXEL_KEYWORDS:
        element = metadata.get(_PIXEL_TAGS[keyword])
        values = element.get("Value") if element else None
        if values:
            header[keyword] = values[0]
    return header


def _locate_native(path: Path, syntax: str, header: dict[str, Any], count: int) -> int | None:
    """File offset of the pixel data value of an uncompressed file, found without parsing.

    Pixel Data is nearly always the last element; its expected length follows from the header,
    so the 12 bytes before ``file size - length`` must be its element header.  Anything else
    (trailing elements, odd lengths) returns None and the caller parses the file instead.
    """
    length = _frame_size(header) * count
    length += length & 1
    try:
        size = os.stat(path).st_size
        offset = size - length
        if offset < 144:
            return None
        with open(path, "rb") as fh:
            fh.seek(offset - 12)
            head = fh.read(12)
    except OSError:
        return None
    tag = b"\xe0\x7f\x10\x00"
    expected_length = struct.pack("<I", length)
    if syntax == uids.ImplicitVRLittleEndian:
        ok = head[4:8] == tag and head[8:12] == expected_length
    else:
        ok = head[0:4] == tag and head[4:6] in (b"OW", b"OB") and head[8:12] == expected_length
    return offset if ok else None


def open_frames(path: Path, syntax: str = "", metadata: dict[str, Any] | None = None) -> Frames:
    """Locate the pixel data of a stored file without loading it.

    With the catalog's transfer syntax and stored header an uncompressed file is not parsed at
    all (:func:`_locate_native`); otherwise pydicom reads the header with deferred values.
    """
    if metadata is not None and syntax in _OFFSET_SYNTAXES:
        header = header_from_json(metadata)
        if "Rows" in header and "Columns" in header and "BitsAllocated" in header:
            count = int(header.get("NumberOfFrames") or 1)
            try:
                offset = _locate_native(path, syntax, header, count)
            except (PixelError, ValueError, TypeError):
                offset = None
            if offset is not None:
                raw = RawDataElement(Tag(0x7FE00010), "OW", 0, None, offset, False, True)
                return Frames(path, syntax, header, count, raw)
    try:
        ds = dcmread(path, defer_size=4096)
    except Exception as exc:
        raise PixelError(f"cannot read the stored instance: {exc}", 500) from exc
    syntax = str(ds.file_meta.TransferSyntaxUID)
    element = None
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):  # pixel data, float, double float
        element = ds.get_item(tag)
        if element is not None:
            break
    header = {k: _first(ds[k].value) for k in _PIXEL_KEYWORDS if k in ds}
    if element is None or "Rows" not in header:
        raise PixelError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    if isinstance(element, RawDataElement):
        raw = element
    else:  # already converted (small values are not deferred)
        value = element.value or b""
        raw = RawDataElement(element.tag, element.VR, len(value), value, 0, False, True)
    return Frames(path, syntax, header, count, raw)
