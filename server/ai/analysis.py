"""From the network's class probabilities to structures with measurements.

The label map is the argmax of the probabilities (0 background, 1 peripheral zone, 2 transition
zone, 3 lesion; server/ai/network.py).  The gland is the largest 26-connected component of
everything that is not background (islands elsewhere are noise); lesions are the 26-connected
components of class 3 inside it, kept when their mean lesion probability reaches the request's
``confidence_threshold`` and they are larger than :data:`MIN_LESION_ML`.

Each lesion gets a sector-style location (PI-RADS v2.1 sector map, simplified to zone, side
and level: ``peripheral_zone_left_base``) and an *AI-suggested* PI-RADS category from its
largest diameter alone: this phantom-trained model sees T2-like intensities only and cannot
weigh diffusion or contrast, so the category is a size-based suggestion that a radiologist
must confirm (PI-RADS v2.1: 1.5 cm is the threshold between categories 4 and 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.domain.entities import AnatomicalRegion, ImageSpacing, MedicalSegmentation

MIN_LESION_ML = 0.02  # smaller components are noise at 3 x 0.5 x 0.5 mm voxels (~27 voxels)
BACKGROUND, PERIPHERAL, TRANSITION, LESION = 0, 1, 2, 3


class NothingFound(Exception):
    """The model found no gland in the series: a result to report, not a fault to retry."""


@dataclass
class Structure:
    """One segment of the output SEG with its measurements."""

    region: str  # prostate, peripheral_zone, transition_zone, lesion
    label: str  # segment label, e.g. "Lesion 1"
    mask: np.ndarray[Any, Any]  # bool (slices, rows, columns)
    confidence: float
    volume_ml: float
    surface_area_mm2: float
    sphericity: float
    bounding_box: dict[str, list[int]] | None
    voxel_count: int
    diameter_mm: float = 0.0
    location: str | None = None
    zone: str | None = None
    pi_rads: int | None = None


@dataclass
class Findings:
    gland: Structure
    zones: list[Structure]
    lesions: list[Structure] = field(default_factory=list)
    psa: float | None = None

    @property
    def structures(self) -> list[Structure]:
        return [self.gland, *self.zones, *self.lesions]

    @property
    def psa_density(self) -> float | None:
        if self.psa is None or self.gland.volume_ml <= 0:
            return None
        return self.psa / self.gland.volume_ml

    @property
    def highest_pi_rads(self) -> int | None:
        scores = [s.pi_rads for s in self.lesions if s.pi_rads]
        return max(scores) if scores else None

    @property
    def overall_assessment(self) -> str:
        highest = self.highest_pi_rads
        if highest is None or highest <= 2:
            return "no_clinically_significant_disease_detected"
        if highest == 3:
            return "equivocal_findings"
        return "clinically_significant_disease_detected"


def components(mask: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], int]:
    """26-connected components (SimpleITK): a label image and the number of components."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labelled = sitk.ConnectedComponent(image, True)  # type: ignore[no-untyped-call]
    array = sitk.GetArrayFromImage(labelled)
    return array, int(array.max())


def _measure(
    region: str,
    label: str,
    mask: np.ndarray[Any, Any],
    confidence: float,
    spacing: tuple[float, float, float],
) -> Structure:
    entity = MedicalSegmentation(
        "",
        "",
        AnatomicalRegion(region),
        mask,
        "ai_automatic",
        confidence_score=confidence,
        spacing=ImageSpacing(spacing[2], spacing[1], spacing[0]),
    )
    return Structure(
        region=region,
        label=label,
        mask=mask,
        confidence=round(confidence, 3),
        volume_ml=entity.calculate_volume(),
        surface_area_mm2=entity.calculate_surface_area(),
        sphericity=entity.calculate_sphericity(),
        bounding_box=entity.bounding_box(),
        voxel_count=entity.voxel_count,
    )


def _diameter_mm(mask: np.ndarray[Any, Any], spacing: tuple[float, float, float]) -> float:
    """The largest in-plane diameter over the lesion's slices, in mm (PI-RADS v2.1 measures
    lesions on axial images): the widest pair of boundary pixels of any slice, edge to edge."""
    best = 0.0
    pixel = np.array(spacing[1:])
    for plane in mask:
        if not plane.any():
            continue
        inner = plane.copy()
        inner[1:, :] &= plane[:-1, :]
        inner[:-1, :] &= plane[1:, :]
        inner[:, 1:] &= plane[:, :-1]
        inner[:, :-1] &= plane[:, 1:]
        edge = np.argwhere(plane & ~inner) * pixel
        if len(edge) > 1500:  # a very large component: a subsample bounds the pairwise cost
            edge = edge[:: len(edge) // 1500 + 1]
        gaps = np.sqrt(((edge[:, None, :] - edge[None, :, :]) ** 2).sum(-1))
        best = max(best, float(gaps.max()) + float(pixel.max()))
    return best


def suggest_pi_rads(diameter_mm: float) -> int:
    """Size-only suggestion (see the module docstring) from the largest in-plane diameter:
    >= 15 mm 5, >= 10 mm 4, >= 5 mm 3, else 2."""
    if diameter_mm >= 15:
        return 5
    if diameter_mm >= 10:
        return 4
    if diameter_mm >= 5:
        return 3
    return 2


def _zone_of(lesion: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> int:
    """The zone that surrounds most of a lesion: the majority label in a two-voxel in-plane
    shell around it (a lesion's own voxels carry no zone)."""
    shell = lesion.copy()
    for _ in range(2):
        grown = shell.copy()
        grown[:, 1:, :] |= shell[:, :-1, :]
        grown[:, :-1, :] |= shell[:, 1:, :]
        grown[:, :, 1:] |= shell[:, :, :-1]
        grown[:, :, :-1] |= shell[:, :, 1:]
        shell = grown
    around = labels[shell & ~lesion]
    peripheral = int(np.count_nonzero(around == PERIPHERAL))
    transition = int(np.count_nonzero(around == TRANSITION))
    return PERIPHERAL if peripheral >= transition else TRANSITION


def _side_and_level(
    lesion: np.ndarray[Any, Any], gland: np.ndarray[Any, Any], axes: np.ndarray[Any, Any]
) -> str:
    """ "left_base" and so on; ``axes`` maps voxel index steps (slice, row, column) to
    patient-space millimetres (3 x 3)."""
    centre = np.argwhere(lesion).mean(0) @ axes
    gland_points = np.argwhere(gland) @ axes
    # Patient coordinates are LPS (PS3.3 C.7.6.2.1.1): +x is the patient's left, +z superior.
    side = "left" if centre[0] > gland_points[:, 0].mean() else "right"
    # Level by thirds of the gland's superior-inferior extent: base is superior, apex inferior.
    top, bottom = float(gland_points[:, 2].max()), float(gland_points[:, 2].min())
    span = top - bottom
    third = (centre[2] - bottom) / span if span > 0 else 0.5
    level = "base" if third >= 2 / 3 else "mid" if third >= 1 / 3 else "apex"
    return f"{side}_{level}"


def findings(
    probabilities: np.ndarray[Any, Any],
    spacing: tuple[float, float, float],
    orientation: list[float],
    *,
    confidence_threshold: float = 0.5,
    psa: float | None = None,
) -> Findings:
    """Structures from probabilities shaped (4, slices, rows, columns)."""
    labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    tissue = labels != BACKGROUND
    if not tissue.any():
        raise NothingFound("the model found no prostate in this series")
    parts, count = components(tissue)
    sizes = np.bincount(parts.ravel(), minlength=count + 1)
    sizes[0] = 0
    gland = parts == int(np.argmax(sizes))
    labels[~gland] = BACKGROUND
    gland_confidence = float(1.0 - probabilities[BACKGROUND][gland].mean())
    result = Findings(
        gland=_measure("prostate", "Prostate", gland, gland_confidence, spacing),
        zones=[],
        psa=psa,
    )
    row_dir = np.array(orientation[:3], dtype=float)
    col_dir = np.array(orientation[3:], dtype=float)
    # A row index steps along the column direction cosines, a column index along the row's.
    axes = np.stack(
        [np.cross(row_dir, col_dir) * spacing[0], col_dir * spacing[1], row_dir * spacing[2]]
    )
    lesion_parts, count = components(labels == LESION)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    # Every lesion component belongs to the zone around it, kept or not, so the zone volumes
    # add up to the gland's.
    zone_masks = {PERIPHERAL: labels == PERIPHERAL, TRANSITION: labels == TRANSITION}
    candidates = []
    for index in range(1, count + 1):
        mask = lesion_parts == index
        zone = _zone_of(mask, labels)
        zone_masks[zone] |= mask
        if mask.sum() * voxel_ml < MIN_LESION_ML:
            continue
        confidence = float(probabilities[LESION][mask].mean())
        if confidence < confidence_threshold:
            continue
        candidates.append((mask, confidence, zone))
    for region, label, value in (
        ("peripheral_zone", "Peripheral zone", PERIPHERAL),
        ("transition_zone", "Transition zone", TRANSITION),
    ):
        zone_mask = zone_masks[value]
        if zone_mask.any():
            confidence = float(1.0 - probabilities[BACKGROUND][zone_mask].mean())
            result.zones.append(_measure(region, label, zone_mask, confidence, spacing))
    # Largest first, so "Lesion 1" is the index lesion.
    candidates.sort(key=lambda item: -int(item[0].sum()))
    for number, (mask, confidence, zone) in enumerate(candidates, start=1):
        structure = _measure("lesion", f"Lesion {number}", mask, confidence, spacing)
        structure.diameter_mm = round(_diameter_mm(mask, spacing), 1)
        structure.zone = "peripheral_zone" if zone == PERIPHERAL else "transition_zone"
        structure.location = f"{structure.zone}_{_side_and_level(mask, gland, axes)}"
        structure.pi_rads = suggest_pi_rads(structure.diameter_mm)
        result.lesions.append(structure)
    return result
