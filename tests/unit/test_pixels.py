"""Frames of stored files (server.dicom.pixels): offsets, encapsulated fragments, transcoding,
and the renderer, on single- and multi-frame instances in several transfer syntaxes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from server.dicom.json import to_json
from server.dicom.pixels import PixelError, can_transcode, open_frames, transcode
from server.dicom.render import RenderOptions, parse_viewport, parse_window, render
from tools.generate import StudySpec, ct_series


def _multiframe(frames: int = 3, size: int = 32) -> Dataset:
    ds = next(ct_series(StudySpec(), 1, size))
    rng = np.random.default_rng(7)
    stack = rng.integers(0, 4000, size=(frames, size, size), dtype=np.uint16)
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    return ds


def _save(ds: Dataset, path: Path, syntax: str) -> Path:
    ds = ds.copy()
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless]
)
@pytest.mark.parametrize("with_catalog", [True, False])
def test_frames_come_out_exactly(tmp_path: Path, syntax: str, with_catalog: bool) -> None:
    ds = _multiframe()
    expected = ds.pixel_array
    path = _save(ds, tmp_path / "mf.dcm", syntax)
    metadata = to_json(dcmread(path, stop_before_pixels=True)) if with_catalog else None
    frames = open_frames(path, syntax, metadata)
    assert frames.count == 3
    for n in (1, 2, 3):
        native = np.frombuffer(frames.native(n), dtype="<u2").reshape(32, 32)
        assert np.array_equal(native, expected[n - 1])
    with pytest.raises(PixelError):
        frames.stored(4)


def test_catalog_fast_path_is_used_and_checked(tmp_path: Path) -> None:
    ds = _multiframe()
    path = _save(ds, tmp_path / "mf.dcm", ExplicitVRLittleEndian)
    metadata = to_json(dcmread(path, stop_before_pixels=True))
    frames = open_frames(path, ExplicitVRLittleEndian, metadata)
    assert frames._raw is not None and frames._raw.value is None  # located, not read
    # A header that lies about the size must not cut frames at a wrong offset.
    metadata["00280010"]["Value"] = [16]
    checked = open_frames(path, ExplicitVRLittleEndian, metadata)
    assert checked.header["Rows"] == 32  # fell back to parsing the file itself


@pytest.mark.parametrize("target", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_frames_encode_losslessly(tmp_path: Path, target: str) -> None:
    ds = _multiframe()
    path = _save(ds, tmp_path / "mf.dcm", ExplicitVRLittleEndian)
    frames = open_frames(path)
    encoded = frames.encode(2, target)
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder

    one = Dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored"):
        setattr(one, keyword, ds[keyword].value)
    one.PixelRepresentation = 0
    one.PhotometricInterpretation = "MONOCHROME2"
    one.NumberOfFrames = 1
    one.PixelData = encapsulate([encoded])
    from pydicom.dataset import FileMetaDataset

    one.file_meta = FileMetaDataset()
    one.file_meta.TransferSyntaxUID = target
    decoded = get_decoder(target).as_array(one, index=0)[0]
    assert np.array_equal(decoded, ds.pixel_array[1])


def test_transcode_round_trip(tmp_path: Path) -> None:
    ds = _multiframe()
    path = _save(ds, tmp_path / "mf.dcm", JPEGLSLossless)
    assert can_transcode(JPEGLSLossless, ExplicitVRLittleEndian)
    assert not can_transcode(JPEGLSLossless, "1.2.840.10008.1.2.4.50")  # no baseline encoder
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless):
        out = dcmread(io.BytesIO(transcode(path, target)))
        assert out.file_meta.TransferSyntaxUID == target
        assert np.array_equal(out.pixel_array, ds.pixel_array)
        assert out.SOPInstanceUID == ds.SOPInstanceUID


def test_render_windows_and_scales(tmp_path: Path) -> None:
    ds = next(ct_series(StudySpec(), 1, 64))
    path = _save(ds, tmp_path / "ct.dcm", ExplicitVRLittleEndian)
    frames = open_frames(path)
    png = render(frames, 1, RenderOptions(media_type="image/png"))
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.shape == (64, 64) and image.max() > image.min()
    small = render(frames, 1, RenderOptions(viewport=(16, 8), media_type="image/png"))
    assert Image.open(io.BytesIO(small)).size == (8, 8)  # aspect ratio kept
    # A window far above every value renders black.
    dark = render(
        frames, 1, RenderOptions(window=(10000.0, 10.0, "linear"), media_type="image/png")
    )
    assert np.asarray(Image.open(io.BytesIO(dark))).max() == 0
    with pytest.raises(PixelError):
        parse_window("40")
    with pytest.raises(PixelError):
        parse_viewport("0,10")


def test_an_instance_without_pixels_says_so(tmp_path: Path) -> None:
    ds = next(ct_series(StudySpec(), 1, 16))
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PixelError, match="no pixel data"):
        open_frames(path)
