"""A stored series as a volume: its slices read from storage, ordered along the slice normal
and checked to form one regular grid before anything is computed from them.

Slices are ordered by the projection of Image Position (Patient) on the normal of Image
Orientation (Patient) (PS3.3 C.7.6.2.1.1), never by file or instance-number order: those
are not geometry.  A series that does not make a regular grid (mixed orientations or sizes,
missing or duplicated slices, multi-frame objects) raises :class:`BrokenSeries`, a reason
that retrying will not fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from server.catalog.db import session
from server.catalog.search import stored_instances
from server.storage import Storage

_TOLERANCE = 1e-3  # direction cosines and spacings compare within this
_GAP_TOLERANCE = 0.2  # a spacing 20% off the median is a missing (or extra) slice


class BrokenSeries(Exception):
    """The series cannot be analysed as it is; the message says why."""


@dataclass
class Volume:
    pixels: np.ndarray[Any, Any]  # float32 (slices, rows, columns), modality LUT applied
    spacing: tuple[float, float, float]  # mm between slices, rows, columns
    datasets: list[Dataset]  # headers in slice order, pixel data removed
    study_uid: str
    series_uid: str


def _floats(ds: Dataset, keyword: str, count: int) -> list[float]:
    value = ds.get(keyword)
    if value is None:
        raise BrokenSeries(f"instance {ds.SOPInstanceUID} lacks {keyword}")
    numbers = [float(v) for v in (value if isinstance(value, list | tuple) else list(value))]
    if len(numbers) != count:
        raise BrokenSeries(f"instance {ds.SOPInstanceUID} has a malformed {keyword}")
    return numbers


def load_series(
    storage: Storage, study_uid: str, series_uid: str, institution: str | None = None
) -> Volume:
    with session():
        stored = stored_instances(study_uid, series_uid, institution=institution)
    if not stored:
        raise BrokenSeries(f"series {series_uid} has no stored instances")
    datasets: list[Dataset] = [dcmread(storage.local_path(s.file_path)) for s in stored]
    if len(datasets) < 3:
        raise BrokenSeries(f"series has {len(datasets)} slices; a volume needs at least 3")
    first = datasets[0]
    orientation = np.array(_floats(first, "ImageOrientationPatient", 6))
    shape = (int(first.get("Rows") or 0), int(first.get("Columns") or 0))
    pixel_spacing = _floats(first, "PixelSpacing", 2)
    for ds in datasets:
        if "PixelData" not in ds:
            raise BrokenSeries(f"instance {ds.SOPInstanceUID} has no pixel data")
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise BrokenSeries("multi-frame instances are not supported")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise BrokenSeries("the slices differ in size (rows x columns)")
        if np.abs(np.array(_floats(ds, "ImageOrientationPatient", 6)) - orientation).max() > 0.01:
            raise BrokenSeries("the slices have different orientations")
        if np.abs(np.array(_floats(ds, "PixelSpacing", 2)) - pixel_spacing).max() > _TOLERANCE:
            raise BrokenSeries("the slices have different pixel spacings")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(np.dot(normal, _floats(ds, "ImagePositionPatient", 3))) for ds in datasets]
    order = np.argsort(positions, kind="stable")
    datasets = [datasets[i] for i in order]
    gaps = np.diff(np.array(positions)[order])
    if (gaps < _TOLERANCE).any():
        raise BrokenSeries("two slices share one position (duplicated or mixed acquisitions)")
    step = float(np.median(gaps))
    if (np.abs(gaps - step) > _GAP_TOLERANCE * step).any():
        worst = float(gaps.max())
        raise BrokenSeries(
            f"slices are missing or irregularly spaced: gaps from {float(gaps.min()):.2f} to "
            f"{worst:.2f} mm (median {step:.2f} mm)"
        )
    slices = []
    for ds in datasets:
        try:
            array = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
            raise BrokenSeries(f"cannot decode instance {ds.SOPInstanceUID}: {exc}") from exc
        if array.ndim != 2:
            raise BrokenSeries("only single-channel (monochrome) images are supported")
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
        slices.append(array * slope + intercept)
        del ds.PixelData  # highdicom needs the headers only; keep memory to one volume
    return Volume(
        np.stack(slices),
        (step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        datasets,
        study_uid,
        series_uid,
    )
