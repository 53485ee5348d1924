"""Domain entities: geometry, window/level and the segmentation measurements."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.domain.entities import (
    AnatomicalRegion,
    ImageModalityType,
    ImageSpacing,
    MedicalImage,
    MedicalSegmentation,
)


def _ball(radius_mm: float, spacing: ImageSpacing) -> np.ndarray:
    sz, sy, sx = spacing.as_zyx()
    n = [int(2 * radius_mm / s) + 6 for s in (sz, sy, sx)]
    z, y, x = np.mgrid[0 : n[0], 0 : n[1], 0 : n[2]].astype(float)
    centre = [k / 2 for k in n]
    inside = ((z - centre[0]) * sz) ** 2 + ((y - centre[1]) * sy) ** 2 + ((x - centre[2]) * sx) ** 2
    return (inside < radius_mm**2).astype(np.uint8)


@pytest.mark.parametrize(
    "spacing",
    [ImageSpacing(1.0, 1.0, 1.0), ImageSpacing(0.7, 0.7, 2.0), ImageSpacing(0.5, 0.9, 1.5)],
)
def test_ball_measurements_match_geometry(spacing: ImageSpacing) -> None:
    radius = 12.0
    seg = MedicalSegmentation(
        "s1", "1.2.3", AnatomicalRegion.LESION, _ball(radius, spacing), "manual", spacing=spacing
    )
    volume_ml = 4 / 3 * math.pi * radius**3 / 1000
    area = 4 * math.pi * radius**2
    assert seg.calculate_volume() == pytest.approx(volume_ml, rel=0.05)
    assert seg.calculate_surface_area() == pytest.approx(area, rel=0.05)
    assert seg.calculate_sphericity() == pytest.approx(1.0, abs=0.06)


def test_elongated_shapes_are_less_spherical() -> None:
    mask = np.zeros((20, 20, 80), np.uint8)
    mask[5:15, 5:15, 5:75] = 1
    seg = MedicalSegmentation("s", "i", AnatomicalRegion.OTHER, mask, "manual")
    assert seg.calculate_volume() == pytest.approx(7.0)  # 10*10*70 mm^3
    assert seg.calculate_sphericity() < 0.75
    empty = MedicalSegmentation("e", "i", AnatomicalRegion.OTHER, np.zeros((4, 4, 4)), "manual")
    assert empty.calculate_surface_area() == 0 and empty.calculate_sphericity() == 0
    assert empty.bounding_box() is None


def test_image_geometry_window_and_roi() -> None:
    data = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    image = MedicalImage(
        "1.2.3", "P1", "1.2", ImageModalityType.MRI_T2, None, data, ImageSpacing(0.5, 0.5, 2.0)
    )
    assert image.dimensions == (2, 4, 4)
    assert image.voxel_volume == pytest.approx(0.5)
    assert image.get_slice(1).shape == (4, 4)
    with pytest.raises(IndexError):
        image.get_slice(2)
    windowed = image.apply_window_level(window=10, level=10)
    assert windowed.dtype == np.uint8 and windowed.min() == 0 and windowed.max() == 255
    mask = np.zeros_like(data, dtype=np.uint8)
    mask[1, 1:3, 2] = 1
    seg = MedicalSegmentation("s", "1.2.3", AnatomicalRegion.LESION, mask, "manual")
    assert seg.bounding_box() == {"min": [1, 1, 2], "max": [1, 2, 2]}
    roi = seg.extract_roi(image)
    assert roi.shape == (1, 2, 1) and roi[0, :, 0].tolist() == [22.0, 26.0]
