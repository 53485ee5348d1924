"""The prostate segmentation network: architecture, preprocessing and sliding-window inference.

One MONAI 3D U-Net maps a T2-weighted axial volume to four classes (:data:`LABELS`, 0 is
background).  Its configuration and preprocessing live in a :class:`ModelSpec` saved next to
the weights as ``model.json``, so a model folder (``model.json`` + ``model.pt``) is everything
:func:`load_model` needs; ``tools/train_prostate.py`` writes such folders.

The network is anisotropic on purpose: prostate T2 series have thick slices (about 3 mm) and
fine in-plane pixels (about 0.5 mm), so only the in-plane axes are resampled (to the spec's
spacing) and the first levels downsample in-plane only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers.utils import sliding_window_inference
from monai.networks.nets.unet import UNet

LABELS: dict[int, str] = {1: "peripheral zone", 2: "transition zone", 3: "lesion"}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and preprocessing of one trained model (``model.json``)."""

    name: str = "prostate-phantom"
    in_channels: int = 1
    out_channels: int = 4  # background + LABELS
    channels: tuple[int, ...] = (16, 32, 64, 128)
    # (z, y, x) strides per level: in-plane first, z last, because slices are ~6x thicker
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (1, 2, 2), (2, 2, 2))
    num_res_units: int = 2
    # batch norm, not instance norm: in eval mode it is a fixed affine map, so the network
    # can train on small crops and still infer on whole-volume windows (instance norm would
    # see different statistics in a window of a different size)
    norm: str = "batch"
    dropout: float = 0.0
    # in-plane (row, column) spacing the network sees, in mm; slices are kept as acquired
    target_spacing_yx: tuple[float, float] = (1.0, 1.0)
    # sliding-window size in network voxels (z, y, x): a whole 30 x 128 x 128 mm prostate
    # field of view in one window, the cheapest way through on a CPU
    roi_size: tuple[int, int, int] = (32, 128, 128)
    # intensities are clipped to these percentiles and mapped to [0, 1]: T2 has no absolute
    # scale, and percentiles shrug off the bright outliers of bias field and noise
    percentiles: tuple[float, float] = (0.5, 99.5)

    def to_json(self, path: Path) -> None:
        """Write the spec as ``model.json``, with :data:`LABELS` for people reading it."""
        raw = {**asdict(self), "labels": {str(k): v for k, v in LABELS.items()}}
        Path(path).write_text(json.dumps(raw, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> ModelSpec:
        """Read a spec written by :meth:`to_json`; unknown keys are an error, not ignored.

        An unknown key means a model written by newer code: refusing it is safer than running
        it with preprocessing this code does not do.
        """
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        unknown = set(raw) - {f.name for f in fields(cls)} - {"labels"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        labels = {int(k): str(v) for k, v in raw.get("labels", {}).items()}
        if labels and labels != LABELS:
            raise ValueError(f"{path}: labels {labels} differ from {LABELS}")
        return cls(
            name=str(raw.get("name", "prostate-phantom")),
            in_channels=int(raw["in_channels"]),
            out_channels=int(raw["out_channels"]),
            channels=tuple(int(c) for c in raw["channels"]),
            strides=tuple((int(s[0]), int(s[1]), int(s[2])) for s in raw["strides"]),
            num_res_units=int(raw["num_res_units"]),
            norm=str(raw["norm"]),
            dropout=float(raw.get("dropout", 0.0)),
            target_spacing_yx=(
                float(raw["target_spacing_yx"][0]),
                float(raw["target_spacing_yx"][1]),
            ),
            roi_size=(int(raw["roi_size"][0]), int(raw["roi_size"][1]), int(raw["roi_size"][2])),
            percentiles=(float(raw["percentiles"][0]), float(raw["percentiles"][1])),
        )


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """The MONAI U-Net described by ``spec`` (untrained)."""
    net: torch.nn.Module = UNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=spec.channels,
        # monai annotates one int per level, but each stride is passed on to Convolution,
        # which takes a per-axis sequence: that is how the levels stay anisotropic
        strides=spec.strides,  # type: ignore[arg-type]
        num_res_units=spec.num_res_units,
        norm=spec.norm,
        dropout=spec.dropout,
    )
    return net


def _inplane_resize(volume: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (C, Z, Y, X) in-plane only, slices as a batch, so z is never interpolated.

    Antialiasing matters when shrinking 0.5 mm pixels to 1 mm: without it thin structures
    such as the capsule alias into the network input.
    """
    c, z = volume.shape[0], volume.shape[1]
    if tuple(volume.shape[2:]) == size:
        return volume
    flat = volume.permute(1, 0, 2, 3).reshape(z, c, volume.shape[2], volume.shape[3])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(z, c, size[0], size[1]).permute(1, 0, 2, 3)


def _network_grid(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], spec: ModelSpec
) -> tuple[int, int]:
    """In-plane size of the volume on the network's grid (``spec.target_spacing_yx``)."""
    return (
        max(1, round(shape[1] * spacing[1] / spec.target_spacing_yx[0])),
        max(1, round(shape[2] * spacing[2] / spec.target_spacing_yx[1])),
    )


def normalise(volume: np.ndarray[Any, Any], spec: ModelSpec) -> np.ndarray[Any, Any]:
    """Clip to the spec's percentiles and map to [0, 1] (float32)."""
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(vol, spec.percentiles)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(vol)
    out: np.ndarray[Any, Any] = np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out


def preprocess(
    volume: np.ndarray[Any, Any],
    spacing: tuple[float, float, float],
    spec: ModelSpec,
) -> torch.Tensor:
    """Volume (z, y, x) at ``spacing`` mm to the network input, shaped (1, 1, z, y', x')."""
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    tensor = torch.from_numpy(normalise(volume, spec))[None]
    return _inplane_resize(tensor, _network_grid(shape, spacing, spec))[None]


def _window_count(image: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many windows sliding_window_inference will run (mirrors monai's scan)."""
    total = 1
    for size, r in zip(image, roi, strict=True):
        if size <= r:
            continue
        interval = max(1, int(r * (1 - overlap)))
        total *= next(d for d in range(size) if d * interval + r >= size) + 1
    return total


def predict(
    net: torch.nn.Module,
    volume: np.ndarray[Any, Any],
    spacing: tuple[float, float, float],
    spec: ModelSpec,
    *,
    device: torch.device,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    scale: float = 1.0,
    progress: Callable[[float], None] | None = None,
) -> np.ndarray[Any, Any]:
    """Class probabilities, float32 (4, z, y, x), on the grid of ``volume``.

    Windows run on ``device`` and are stitched on the CPU, so device memory is bounded by
    ``sw_batch_size`` windows whatever the volume size.  ``progress`` gets fractions in [0, 1].

    ``scale`` < 1 is the caller's answer to running out of GPU memory.  It shrinks the
    windows in-plane by ``scale`` (memory per window goes with ``scale`` squared) and makes
    them overlap by at least half, but keeps the network's own 1 mm grid: this network was
    trained at 1 mm and coarser pixels cost far more accuracy.  On held-out phantoms, gland
    Dice was 0.99 with half-size windows, against 0.61 with the image at 2 mm; quarter-size
    windows lose context (gland Dice about 0.75).  The result is on the original grid anyway.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    inputs = preprocess(volume, spacing, spec)
    roi = spec.roi_size
    if scale < 1.0:
        # multiples of 16 keep the window divisible by the network's in-plane strides (8)
        roi = (
            roi[0],
            max(16, 16 * round(roi[1] * scale / 16)),
            max(16, 16 * round(roi[2] * scale / 16)),
        )
        overlap = max(overlap, 0.5)
    # pad z up to the window's depth with edge slices rather than zeros: zero padding would
    # look like a black slab of tissue to the network
    pad_z = max(0, roi[0] - inputs.shape[2])
    if pad_z:
        inputs = F.pad(inputs, (0, 0, 0, 0, pad_z // 2, pad_z - pad_z // 2), mode="replicate")
    windows = math.ceil(
        _window_count(tuple(int(s) for s in inputs.shape[2:]), roi, overlap) / sw_batch_size
    )
    done = 0

    def run_window(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out: torch.Tensor = net(batch)
        done += 1
        if progress is not None:
            progress(min(1.0, done / max(windows, 1)) * 0.95)
        return out

    net.eval()
    with torch.inference_mode():
        logits = sliding_window_inference(
            inputs,
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            predictor=run_window,
            overlap=overlap,
            mode="gaussian",
            padding_mode="replicate",
            sw_device=device,
            device=torch.device("cpu"),
        )
        assert isinstance(logits, torch.Tensor)
        logits = logits[0]
        if pad_z:
            logits = logits[:, pad_z // 2 : pad_z // 2 + shape[0]]
        # resample logits, not probabilities: they interpolate more smoothly across borders
        logits = _inplane_resize(logits.float(), (shape[1], shape[2]))
        probs = torch.softmax(logits, dim=0).numpy().astype(np.float32, copy=False)
    if progress is not None:
        progress(1.0)
    return probs


def load_model(folder: Path, device: torch.device) -> tuple[torch.nn.Module, ModelSpec]:
    """Load ``model.json`` and ``model.pt`` from ``folder``, ready for :func:`predict`."""
    folder = Path(folder)
    spec = ModelSpec.from_json(folder / "model.json")
    net = build_network(spec)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    # weights may be stored as float16 to keep the file small; load_state_dict copies them
    # into the float32 parameters
    net.load_state_dict(state)
    net.to(device)
    net.eval()
    return net, spec
