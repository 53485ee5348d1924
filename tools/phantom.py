"""Deterministic synthetic prostate-MR phantoms (T2-like, optional ADC) with ground truth.

Everything is drawn from ``numpy.random.default_rng`` streams derived from one seed, so the
same seed always gives the same volume, labels and lesion list: training, evaluation and tests
can name phantoms by seed instead of shipping data. No torch here; numpy and pydicom only.

Geometry follows DICOM patient coordinates (LPS): array axes are (z, y, x) with z going from
inferior (apex) to superior (base, bladder), y from anterior (pubic bone) to posterior
(rectum) and x from the patient's right to left.

    python -m tools.phantom --seed 7 --out /tmp/phantom7
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROOT = "1.2.826.0.1.3680043.10.1439."  # the same test-only UID root as tools/generate.py

BACKGROUND, PERIPHERAL, TRANSITION, LESION = 0, 1, 2, 3


@dataclass
class LesionTruth:
    """One ground-truth lesion."""

    center_zyx: tuple[float, float, float]  # centroid of its voxels, in voxel coordinates
    radius_mm: float  # nominal radius it was drawn with (it is deformed and clipped)
    volume_ml: float  # from its voxel count in ``lesion_ids``
    zone: str  # "peripheral" or "transition": the zone most of its voxels replaced
    label_id: int  # its value in ``Phantom.lesion_ids`` (1-based)


@dataclass
class Phantom:
    """A phantom volume and its truth, all arrays (z, y, x) on the same grid."""

    t2: np.ndarray  # float32 T2-like magnitude, arbitrary scale
    labels: np.ndarray  # uint8: 0 background, 1 PZ, 2 TZ, 3 lesion (overrides the zone)
    lesion_ids: np.ndarray  # uint8: 0, or the label_id of the lesion at that voxel
    lesions: list[LesionTruth]
    spacing: tuple[float, float, float] = (3.0, 0.5, 0.5)  # mm (z, y, x)
    adc: np.ndarray | None = None  # float32 ADC in 1e-6 mm^2/s when asked for


# --------------------------------------------------------------------------- helpers


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], ctrl: tuple[int, int, int]
) -> np.ndarray:
    """Unit-variance smooth random field: a coarse Gaussian grid blended by Gaussian kernels.

    Separable kernel matrices keep it to three small matrix products, which is much cheaper
    than filtering full-resolution white noise (and needs no scipy).
    """
    coarse = rng.standard_normal(ctrl).astype(np.float32)
    mats = []
    for n_out, n_c in zip(shape, ctrl, strict=True):
        pos = np.linspace(0.0, n_out - 1.0, n_c)
        step = (n_out - 1.0) / max(n_c - 1, 1)
        grid = np.arange(n_out, dtype=np.float64)[:, None]
        w = np.exp(-0.5 * ((grid - pos[None, :]) / (0.8 * step)) ** 2)
        mats.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    # contract the two small axes first, the full-size one last: one big product, not three
    small = mats[1] @ (coarse @ mats[2].T)  # (c, y, x)
    field = (mats[0] @ small.reshape(ctrl[0], -1)).reshape(shape)
    field -= field.mean(dtype=np.float64)
    std = float(field.std(dtype=np.float64))
    return field / std if std > 0 else field


def _blur_inplane(img: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 blur along y and x: a cheap point-spread function against aliased edges."""
    out = img.copy()
    out[:, 1:-1, :] = 0.25 * img[:, :-2, :] + 0.5 * img[:, 1:-1, :] + 0.25 * img[:, 2:, :]
    tmp = out.copy()
    out[:, :, 1:-1] = 0.25 * tmp[:, :, :-2] + 0.5 * tmp[:, :, 1:-1] + 0.25 * tmp[:, :, 2:]
    return out


def _dilate_inplane(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a mask by ``steps`` voxels along y and x (4-neighbour steps, no wrap-around)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[:, 1:, :] |= out[:, :-1, :]
        grown[:, :-1, :] |= out[:, 1:, :]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        out = grown
    return out


def _touches(mask: np.ndarray, others: np.ndarray) -> bool:
    """Whether ``mask`` is 26-adjacent to (or overlaps) any non-zero voxel of ``others``."""
    nz = np.nonzero(mask)
    box = tuple(
        slice(max(0, int(a.min()) - 1), min(n, int(a.max()) + 2))
        for a, n in zip(nz, mask.shape, strict=True)
    )
    grown = mask[box].copy()
    for axis in range(3):  # separable dilation by one voxel along each axis = 3x3x3 cube
        step = grown.copy()
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(1, None), slice(None, -1)
        step[tuple(lo)] |= grown[tuple(hi)]
        step[tuple(hi)] |= grown[tuple(lo)]
        grown = step
    return bool((grown & (others[box] > 0)).any())


class _Grid:
    """Physical coordinates (mm, centred on the volume) as broadcastable axis vectors."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        self.z = ((np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]).astype(np.float32)
        self.y = ((np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]).astype(np.float32)
        self.x = ((np.arange(shape[2]) - (shape[2] - 1) / 2) * spacing[2]).astype(np.float32)

    def to_voxel(self, zyx_mm: tuple[float, float, float]) -> tuple[float, float, float]:
        return tuple(  # type: ignore[return-value]
            c / s + (n - 1) / 2 for c, s, n in zip(zyx_mm, self.spacing, self.shape, strict=True)
        )

    def ellipse_2d(
        self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
    ) -> np.ndarray:
        """Normalised radius of an in-plane ellipse, shape (1, Y, X)."""
        dy = self.y[:, None] - cy
        dx = self.x[None, :] - cx
        c, s = math.cos(angle), math.sin(angle)
        u = c * dx + s * dy
        v = -s * dx + c * dy
        return np.sqrt((u / rx) ** 2 + (v / ry) ** 2)[None]

    def ellipsoid(
        self,
        center: tuple[float, float, float],
        radii: tuple[float, float, float],
        angle: float = 0.0,
    ) -> np.ndarray:
        """Normalised radius of an ellipsoid rotated in-plane by ``angle``, shape (Z, Y, X)."""
        cz, cy, cx = center
        rz, ry, rx = radii
        zz = ((self.z - cz) / rz)[:, None, None] ** 2
        return np.sqrt(zz + self.ellipse_2d(cy, cx, ry, rx, angle) ** 2)


def _draw_bones_muscles(
    g: _Grid, rng: np.random.Generator, img: np.ndarray, gland_c: tuple[float, float, float]
) -> np.ndarray:
    """Pelvic surroundings in fat: obturator muscles, pubic bone, rectum, vessels.

    Returns a tissue-class map used for the optional ADC (0 fat, 4 muscle, 5 fluid, 6 gas,
    7 bone).
    """
    tissue = np.zeros(g.shape, dtype=np.uint8)
    _, cy, cx = gland_c
    # obturator internus: long dark bands either side of the gland
    for side in (-1.0, 1.0):
        ox = cx + side * rng.uniform(38.0, 50.0)
        r = g.ellipse_2d(cy + rng.uniform(-8, 8), ox, rng.uniform(30, 45), rng.uniform(8, 13))
        m = np.broadcast_to(r < 1.0, g.shape)
        img[m] = rng.uniform(0.25, 0.35)
        tissue[m] = 4
    # pubic symphysis anteriorly: dark cortex around intermediate marrow
    py = cy - rng.uniform(38.0, 48.0)
    for side in (-1.0, 1.0):
        r = g.ellipse_2d(py, cx + side * rng.uniform(7, 11), rng.uniform(7, 10), rng.uniform(5, 8))
        cortex = np.broadcast_to(r < 1.0, g.shape)
        marrow = np.broadcast_to(r < 0.7, g.shape)
        img[cortex] = 0.08
        img[marrow] = rng.uniform(0.45, 0.6)
        tissue[cortex] = 7
    # levator ani: thin dark sling posterolateral to the gland
    r = g.ellipse_2d(cy + 5.0, cx, rng.uniform(30, 36), rng.uniform(34, 42))
    sling = np.broadcast_to((r > 0.93) & (r < 1.0) & (g.y[None, :, None] > cy), g.shape)
    img[sling] = 0.3
    tissue[sling] = 4
    return tissue


def _draw_rectum_bladder(
    g: _Grid,
    rng: np.random.Generator,
    img: np.ndarray,
    tissue: np.ndarray,
    gland_c: tuple[float, float, float],
    gland_r: tuple[float, float, float],
) -> None:
    """Rectum behind the gland (dark wall, gas or fluid lumen) and bladder above it."""
    cz, cy, cx = gland_c
    rz, ry, _ = gland_r
    ry_rect, rx_rect = rng.uniform(9.0, 14.0), rng.uniform(13.0, 20.0)
    rect_y = cy + ry + ry_rect + rng.uniform(2.0, 6.0)
    tilt = rng.uniform(-0.15, 0.15)  # the rectum runs a little obliquely through the slices
    for k, z in enumerate(g.z):
        r = g.ellipse_2d(rect_y + tilt * (z - cz), cx + rng.uniform(-0.5, 0.5), ry_rect, rx_rect)[0]
        wall = r < 1.0
        lumen = r < rng.uniform(0.55, 0.75)
        img[k][wall] = 0.32
        tissue[k][wall] = 4
        img[k][lumen] = 0.04 if rng.random() < 0.5 else rng.uniform(0.4, 0.7)
        tissue[k][lumen] = 6
    # bladder: large bright fluid ellipsoid resting on the base, with a thin dark wall
    b_r = (rng.uniform(18, 30), rng.uniform(22, 32), rng.uniform(28, 40))
    b_c = (cz + rz + b_r[0] * rng.uniform(0.6, 0.9), cy - rng.uniform(0, 10), cx)
    r = g.ellipsoid(b_c, b_r)
    img[r < 1.0] = 0.35
    tissue[r < 1.0] = 4
    inner = r < 1.0 - 2.0 / min(b_r)
    img[inner] = rng.uniform(1.1, 1.4)
    tissue[inner] = 5


# --------------------------------------------------------------------------- phantom


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (30, 256, 256),
    spacing: tuple[float, float, float] = (3.0, 0.5, 0.5),
    n_lesions: int | None = None,
    with_adc: bool = False,
) -> Phantom:
    """Build phantom ``seed``: the same arguments always give the same arrays.

    Anatomy, lesions and noise come from separate random streams, so asking for a fixed
    ``n_lesions`` changes the lesions but not the gland they sit in.
    """
    ss = np.random.SeedSequence(seed)
    rng_anat, rng_les, rng_img = (np.random.default_rng(s) for s in ss.spawn(3))
    g = _Grid(shape, spacing)

    # gland: ellipsoid of 25-60 mL, tapered towards the apex, flattened posteriorly, deformed
    volume_ml = rng_anat.uniform(25.0, 60.0)
    u, w = rng_anat.uniform(0.62, 0.8), rng_anat.uniform(0.8, 1.05)
    rx = (volume_ml * 1000.0 * 3.0 / (4.0 * math.pi * u * w)) ** (1.0 / 3.0)
    gland_r = (rx * w, rx * u, rx)
    gland_c = (
        rng_anat.uniform(-6.0, 6.0),
        rng_anat.uniform(-8.0, 8.0),
        rng_anat.uniform(-5.0, 5.0),
    )
    angle = rng_anat.uniform(-0.2, 0.2)
    taper = rng_anat.uniform(0.08, 0.22)
    flatten = rng_anat.uniform(1.1, 1.35)

    cz, cy, cx = gland_c
    zn = (g.z - cz) / gland_r[0]  # -1 at the apex, +1 at the base
    inplane = (1.0 + taper * np.clip(zn, -1.0, 1.0))[:, None, None]  # narrower at the apex
    dy = g.y[:, None] - cy
    dx = g.x[None, :] - cx
    c, s = math.cos(angle), math.sin(angle)
    uu = (c * dx + s * dy) / gland_r[2]
    vv = (-s * dx + c * dy) / gland_r[1]
    vv = np.where(vv > 0, vv * flatten, vv)  # the rectum flattens the posterior surface
    r2d = np.sqrt(uu**2 + vv**2)[None] / inplane
    r_gland = np.sqrt(zn[:, None, None] ** 2 + r2d**2)
    r_gland = r_gland * (1.0 + 0.06 * _smooth_noise(rng_anat, shape, (5, 6, 6)))
    gland = r_gland < 1.0

    # transition zone: anterior-central and superior, larger in larger (BPH) glands
    t = float(np.clip(0.45 + (volume_ml - 25.0) / 35.0 * 0.2 + rng_anat.normal(0, 0.04), 0.4, 0.7))
    tz_c = (
        cz + gland_r[0] * rng_anat.uniform(0.1, 0.25),
        cy - gland_r[1] * rng_anat.uniform(0.2, 0.35),
        cx,
    )
    tz_r = (gland_r[0] * rng_anat.uniform(0.6, 0.75), gland_r[1] * t, gland_r[2] * t * 1.05)
    r_tz = g.ellipsoid(tz_c, tz_r, angle)
    r_tz = r_tz * (1.0 + 0.06 * _smooth_noise(rng_anat, shape, (5, 6, 6)))
    tz = r_tz < 1.0
    # anterior fibromuscular stroma in front of the TZ is lumped with the TZ (label 2), so the
    # peripheral zone is the posterior/lateral horseshoe the issue asks for
    z_in_tz = (np.abs(g.z - tz_c[0]) < tz_r[0])[:, None, None]
    anterior = z_in_tz & (g.y[None, :, None] < tz_c[1])
    labels = np.zeros(shape, dtype=np.uint8)
    labels[gland] = PERIPHERAL
    labels[gland & (tz | anterior)] = TRANSITION

    # ------------------------------------------------------------------ image intensities
    img = 0.85 + 0.05 * _smooth_noise(rng_anat, shape, (8, 24, 24))  # periprostatic/pelvic fat
    tissue = _draw_bones_muscles(g, rng_anat, img, gland_c)
    _draw_rectum_bladder(g, rng_anat, img, tissue, gland_c, gland_r)

    # capsule: a thin dark rim (about 1 mm in-plane) just outside the gland, then a brighter
    # periprostatic venous plexus; grown in-plane only so the slices beyond apex and base are
    # not painted as a whole disc of capsule
    rim_px = max(1, round(rng_anat.uniform(0.8, 1.4) / spacing[1]))
    plexus_px = max(2, round(rng_anat.uniform(2.0, 3.5) / spacing[1]))
    grown_rim = _dilate_inplane(gland, rim_px)
    grown_plexus = _dilate_inplane(grown_rim, plexus_px)
    plexus = grown_plexus & ~grown_rim
    img[plexus] = np.maximum(img[plexus], 0.8 + 0.15 * rng_anat.random())
    img[grown_rim & ~gland] = rng_anat.uniform(0.15, 0.3)

    # neurovascular bundles at 5 and 7 o'clock: small dark dots that are not lesions
    for side in (-1.0, 1.0):
        ny = cy + gland_r[1] * 0.75
        nx = cx + side * gland_r[2] * 0.8
        r = g.ellipse_2d(ny, nx, 2.0, 2.0)
        dots = np.broadcast_to(r < 1.0, shape) & ~gland & (np.abs(zn) < 0.9)[:, None, None]
        img[dots] = 0.35

    texture = _smooth_noise(rng_anat, shape, (10, 48, 48))
    pz_level = rng_anat.uniform(0.62, 0.85)
    img[labels == PERIPHERAL] = (pz_level + 0.05 * texture)[labels == PERIPHERAL]
    # prostatitis-like bands: mild, diffuse PZ hypointensity that must not be called a lesion
    band = _smooth_noise(rng_anat, shape, (5, 8, 8)) > rng_anat.uniform(1.0, 2.0)
    pz_band = band & (labels == PERIPHERAL)
    img[pz_band] *= rng_anat.uniform(0.7, 0.9)

    tz_level = rng_anat.uniform(0.4, 0.52)
    img[labels == TRANSITION] = (tz_level + 0.05 * texture)[labels == TRANSITION]
    # BPH nodules: round, slightly brighter or darker, encapsulated by a dark rim
    tz_idx = np.flatnonzero(labels == TRANSITION)
    for _ in range(int(rng_anat.integers(2, 9))):
        if tz_idx.size == 0:
            break
        k = np.unravel_index(rng_anat.choice(tz_idx), shape)
        centre = (float(g.z[k[0]]), float(g.y[k[1]]), float(g.x[k[2]]))
        nr = rng_anat.uniform(3.0, 8.0)
        r = g.ellipsoid(centre, (nr * 1.1, nr, nr))
        inside = (r < 1.0) & (labels == TRANSITION)
        img[inside] = tz_level * rng_anat.uniform(0.9, 1.35)
        img[(r >= 1.0) & (r < 1.12) & (labels == TRANSITION)] = tz_level * 0.75

    # ------------------------------------------------------------------ lesions
    if n_lesions is None:
        n_lesions = int(rng_les.choice(4, p=[0.15, 0.4, 0.3, 0.15]))
    lesion_ids = np.zeros(shape, dtype=np.uint8)
    lesions: list[LesionTruth] = []
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    zone_idx = {
        "peripheral": np.flatnonzero(labels == PERIPHERAL),
        "transition": np.flatnonzero(labels == TRANSITION),
    }
    placed: list[tuple[tuple[float, float, float], float]] = []
    attempts = 0
    while len(lesions) < n_lesions:
        attempts += 1
        relax = attempts > 500  # a gland too small for the request must not loop forever
        zone = "peripheral" if rng_les.random() < 0.7 else "transition"
        if zone_idx[zone].size == 0:
            zone = "peripheral" if zone == "transition" else "transition"
        radius = float(rng_les.uniform(3.0, 9.0))
        k = np.unravel_index(rng_les.choice(zone_idx[zone]), shape)
        centre = (float(g.z[k[0]]), float(g.y[k[1]]), float(g.x[k[2]]))
        if not relax and any(math.dist(centre, c2) < radius + r2 + 3.0 for c2, r2 in placed):
            continue
        radii = tuple(radius * rng_les.uniform(0.8, 1.2) for _ in range(3))
        r = g.ellipsoid(centre, radii, rng_les.uniform(0, math.pi))  # type: ignore[arg-type]
        r = r * (1.0 + 0.08 * _smooth_noise(rng_les, shape, (6, 10, 10)))
        blob = r < 1.0
        mask = blob & gland & (lesion_ids == 0)
        voxels = int(mask.sum())
        if voxels == 0:
            continue
        # a lesion mostly cut off by the capsule would be a sliver, and lesions that touch
        # would be one 26-connected component to anyone counting them: draw another one
        if not relax and (voxels < 0.6 * int(blob.sum()) or _touches(mask, lesion_ids)):
            continue
        # the lesion's zone is the one most of its voxels replace, not just its centre's
        under = labels[mask]
        zone = (
            "peripheral"
            if (under == PERIPHERAL).sum() >= (under == TRANSITION).sum()
            else "transition"
        )
        label_id = len(lesions) + 1
        lesion_ids[mask] = label_id
        labels[mask] = LESION
        placed.append((centre, radius))
        # PZ lesions are markedly hypointense; TZ lesions only a little darker than the TZ
        level = (
            rng_les.uniform(0.28, 0.48)
            if zone == "peripheral"
            else tz_level * rng_les.uniform(0.6, 0.78)
        )
        img[mask] = level + 0.02 * texture[mask]
        cz_v, cy_v, cx_v = (float(v) for v in np.argwhere(mask).mean(axis=0))
        lesions.append(
            LesionTruth(
                center_zyx=(cz_v, cy_v, cx_v),
                radius_mm=radius,
                volume_ml=voxels * voxel_ml,
                zone=zone,
                label_id=label_id,
            )
        )

    # ------------------------------------------------------------------ acquisition
    img = _blur_inplane(img.astype(np.float32))
    bias = np.exp(rng_img.uniform(0.1, 0.3) * _smooth_noise(rng_img, shape, (3, 4, 4)))
    # surface coils: signal falls off towards the centre of the pelvis
    fall = rng_img.uniform(0.0, 0.3)
    rad = np.sqrt(g.y[:, None] ** 2 + g.x[None, :] ** 2) / (0.5 * shape[1] * spacing[1])
    bias = bias * (1.0 - fall + fall * np.clip(rad, 0.0, 1.5))[None]
    scale = rng_img.uniform(0.5, 2.0)
    sigma = rng_img.uniform(0.015, 0.06)
    signal = img * bias
    n1 = rng_img.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng_img.standard_normal(shape, dtype=np.float32) * sigma
    t2 = (np.sqrt((signal + n1) ** 2 + n2**2) * scale).astype(np.float32)  # Rician magnitude

    adc = None
    if with_adc:
        # ADC in 1e-6 mm^2/s: lesions restrict diffusion, PZ is high, urine higher still
        adc_table = np.array([1500, 1750, 1250, 850, 1450, 2900, 200, 400], dtype=np.float32)
        cls = tissue.copy()
        cls[tissue == 0] = 0
        cls[labels > 0] = labels[labels > 0]
        adc_img = adc_table[cls]
        adc_img[tissue == 0] = 400 + 150 * texture[tissue == 0]  # fat: low ADC on DWI
        adc_img[labels == PERIPHERAL] = rng_img.uniform(1500, 1900)
        adc_img[labels == TRANSITION] = rng_img.uniform(1100, 1400)
        for les in lesions:
            adc_img[lesion_ids == les.label_id] = rng_img.uniform(650, 1000)
        adc_img = adc_img + rng_img.standard_normal(shape, dtype=np.float32) * 80.0
        adc = np.clip(adc_img, 0, None).astype(np.float32)

    return Phantom(
        t2=t2,
        labels=labels,
        lesion_ids=lesion_ids,
        lesions=lesions,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        adc=adc,
    )


# --------------------------------------------------------------------------- DICOM


def write_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Prostate",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "t2_tse_tra",
    series_number: int = 3,
    shuffle: bool = False,
) -> list[Path]:
    """Write the T2 volume as one MR Image Storage file per slice; returns the paths.

    Slice k sits at z = k * spacing (ImagePositionPatient), so consumers must sort by position;
    ``shuffle`` names the files in random order to check that they do not rely on names.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=ROOT)
    series_uid = series_uid or generate_uid(prefix=ROOT)
    frame_uid = generate_uid(prefix=ROOT)
    sz, sy, sx = phantom.spacing
    nz, ny, nx = phantom.t2.shape
    peak = float(np.percentile(phantom.t2, 99.9)) or 1.0
    pixels = np.clip(phantom.t2 / peak * 1800.0, 0, 4095).round().astype(np.uint16)
    now = dt.datetime(2024, 3, 1, 9, 30, 0)
    order = np.arange(nz)
    if shuffle:
        order = np.random.default_rng(nz * 7919 + ny).permutation(nz)
    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy)
    paths: list[Path] = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop_uid = generate_uid(prefix=ROOT)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"PH{zlib.crc32(study_uid.encode()) % 10**8:08d}"
        ds.Modality = "MR"
        ds.Manufacturer = "SYNTHETIC"
        ds.InstitutionName = "PHANTOM LAB"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MRI PROSTATE (PHANTOM)"
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "tools.phantom"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19550101"
        ds.PatientSex = "M"
        ds.PatientAge = "069Y"
        ds.BodyPartExamined = "PROSTATE"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "tse2d1_25"
        ds.AngioFlag = "N"
        ds.SliceThickness = sz
        ds.RepetitionTime = 4000.0
        ds.EchoTime = 100.0
        ds.NumberOfAverages = 2.0
        ds.ImagingFrequency = 123.2
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = 3.0
        ds.SpacingBetweenSlices = sz
        ds.EchoTrainLength = 25
        ds.PercentSampling = 100.0
        ds.PercentPhaseFieldOfView = 100.0
        ds.PixelBandwidth = 200.0
        ds.FlipAngle = 150.0
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], k * sz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = k * sz
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [sy, sx]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 900
        ds.WindowWidth = 1800
        ds.PixelData = pixels[k].tobytes()
        path = out_dir / f"IM{int(order[k]) + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True, help="folder for the DICOM files")
    parser.add_argument("--lesions", type=int, default=None, help="exact number of lesions")
    parser.add_argument("--shuffle", action="store_true", help="write files in random order")
    parser.add_argument("--patient-id", default="PHANTOM")
    args = parser.parse_args(argv)
    phantom = make_phantom(args.seed, n_lesions=args.lesions)
    paths = write_series(phantom, args.out, patient_id=args.patient_id, shuffle=args.shuffle)
    gland_ml = float((phantom.labels > 0).sum()) * float(np.prod(phantom.spacing)) / 1000.0
    print(f"{len(paths)} files in {args.out}; gland {gland_ml:.1f} mL")
    for les in phantom.lesions:
        z, y, x = les.center_zyx
        print(
            f"  lesion {les.label_id}: {les.zone}, r={les.radius_mm:.1f} mm, "
            f"{les.volume_ml:.2f} mL at voxel (z={z:.1f}, y={y:.1f}, x={x:.1f})"
        )


if __name__ == "__main__":
    main()
