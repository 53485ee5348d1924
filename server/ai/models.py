"""Model loaders: every model becomes a :class:`Segmenter`, a callable from a volume to per-voxel
probabilities of this server's four classes (background, peripheral zone, transition zone,
lesion; server/ai/network.py ``LABELS``) on the volume's own grid.

``[ai] model`` names one of (nothing is downloaded; everything is read from local files):

* a folder with this server's ``model.json`` + ``model.pt`` (the shipped phantom model);
* a MONAI bundle folder (``configs/inference.json`` or ``.yaml`` defining ``network_def``,
  weights in ``models/model.pt``, or a TorchScript ``models/model.ts``);
* an nnU-Net v2 results folder (``dataset.json``, ``plans.json``, ``fold_*/checkpoint_*.pth``;
  needs the ``dynamic-network-architectures`` package nnU-Net itself uses);
* a TorchScript file (``.ts``, ``.pt``, ``.pth`` saved with ``torch.jit.save``), a
  ``torch.export`` program (``.pt2``) or an ONNX file (``.onnx``, run with onnxruntime).

Foreign models rarely share our label numbering, so each may carry a sidecar JSON (``x.json``
next to a file, ``imaging-server.json`` in a folder; see :class:`ForeignSpec`) giving the
output channel of each class, the patch size, the spacing it was trained at and the intensity
normalisation.  Without one, channels 0-3 are taken as our classes and the intensities are
z-scored.  Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Progress = Callable[[float], None]
CLASSES = ("background", "peripheral_zone", "transition_zone", "lesion")
# Names foreign label maps use for our classes (nnU-Net dataset.json, MONAI metadata).
_SYNONYMS = {
    "peripheral_zone": ("peripheral", "pz"),
    "transition_zone": ("transition", "tz", "central gland", "cg"),
    "lesion": ("lesion", "tumor", "tumour", "cancer", "pca"),
    "background": ("background",),
}


class ModelError(Exception):
    """The configured model cannot be loaded; the message says what is wrong."""


@dataclass
class Segmenter:
    name: str
    version: str
    device: str
    _run: Callable[[np.ndarray[Any, Any], tuple[float, float, float], float, Progress | None], Any]

    def __call__(
        self,
        volume: np.ndarray[Any, Any],
        spacing: tuple[float, float, float],
        *,
        scale: float = 1.0,
        progress: Progress | None = None,
    ) -> np.ndarray[Any, Any]:
        """Probabilities (4, slices, rows, columns), float32."""
        with torch.inference_mode():
            out = np.asarray(self._run(volume, spacing, scale, progress), dtype=np.float32)
        if out.shape != (4, *volume.shape):
            raise ModelError(f"the model returned {out.shape}; expected {(4, *volume.shape)}")
        return out


@dataclass
class ForeignSpec:
    """How to run a model that is not ours (the sidecar JSON's keys)."""

    channels: dict[str, list[int]] = field(
        default_factory=lambda: {name: [i] for i, name in enumerate(CLASSES)}
    )
    roi_size: tuple[int, int, int] = (16, 128, 128)  # slices, rows, columns
    spacing: tuple[float, float, float] | None = None  # mm; None = run at the native grid
    normalisation: str = "zscore"  # "zscore" or "none"
    softmax: bool = True  # outputs are logits (True) or already probabilities (False)

    @classmethod
    def read(cls, path: Path | None, labels: dict[str, int] | None = None) -> ForeignSpec:
        spec = cls()
        if labels:
            spec.channels = _channels_from_names(labels)
        if path is None or not path.is_file():
            return spec
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {path}: {exc}") from exc
        if "labels" in data:
            names = {str(k): int(v) for k, v in data["labels"].items()}
            spec.channels = _channels_from_names(names)
        if "roi_size" in data:
            spec.roi_size = tuple(int(v) for v in data["roi_size"])  # type: ignore[assignment]
        if data.get("spacing"):
            spec.spacing = tuple(float(v) for v in data["spacing"])  # type: ignore[assignment]
        spec.normalisation = str(data.get("normalisation", spec.normalisation))
        spec.softmax = bool(data.get("softmax", spec.softmax))
        return spec


def _channels_from_names(labels: dict[str, int]) -> dict[str, list[int]]:
    """Our classes from a name -> channel map; unknown names count as background."""
    channels: dict[str, list[int]] = {name: [] for name in CLASSES}
    for name, channel in labels.items():
        lowered = name.lower().replace("_", " ")
        ours = next(
            (c for c, words in _SYNONYMS.items() if any(w in lowered for w in words)),
            "background",
        )
        channels[ours].append(channel)
    if not channels["peripheral_zone"] and not channels["transition_zone"]:
        # A whole-gland model: call the gland peripheral zone so it still measures the gland.
        gland = [c for n, c in labels.items() if "prostat" in n.lower() or "gland" in n.lower()]
        channels["peripheral_zone"] = gland
    return channels


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        with item.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                digest.update(block)
    return digest.hexdigest()[:12]


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelError("ai.device is cuda but torch sees no CUDA device")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _foreign_runner(
    predictor: Callable[[torch.Tensor], torch.Tensor], spec: ForeignSpec, device: torch.device
) -> Callable[[np.ndarray[Any, Any], tuple[float, float, float], float, Progress | None], Any]:
    """Sliding-window inference (MONAI) of any tensor -> tensor predictor, bounded in memory
    by the patch size, mapped onto our classes at the volume's grid."""
    from monai.inferers.utils import sliding_window_inference

    def run(
        volume: np.ndarray[Any, Any],
        spacing: tuple[float, float, float],
        scale: float,
        progress: Progress | None,
    ) -> np.ndarray[Any, Any]:
        image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        if spec.normalisation == "zscore":
            image = (image - image.mean()) / (image.std() + 1e-6)
        target = list(volume.shape)
        if spec.spacing is not None:
            target = [
                max(1, round(n * s / w))
                for n, s, w in zip(volume.shape, spacing, spec.spacing, strict=True)
            ]
            image = F.interpolate(image, size=target, mode="trilinear", align_corners=False)
        # scale < 1 (after a CUDA out-of-memory error): smaller in-plane windows, same pixels;
        # a model run at another resolution than it learnt fails worse than one with less
        # context (MODEL_CARD.md of the shipped model).
        roi = [
            min(max(16, round(r * (scale if axis else 1.0))) if axis else r, t)
            for axis, (r, t) in enumerate(zip(spec.roi_size, target, strict=True))
        ]
        if progress:
            progress(0.05)
        logits = sliding_window_inference(
            image.to(device),
            roi,
            1,
            lambda x: predictor(x),
            overlap=0.25 if scale == 1.0 else 0.5,
            mode="gaussian",
        )
        if progress:
            progress(0.9)
        logits = torch.as_tensor(logits).float()
        probs = torch.softmax(logits, dim=1) if spec.softmax else logits
        if list(probs.shape[2:]) != list(volume.shape):
            probs = F.interpolate(probs, size=list(volume.shape), mode="trilinear")
        probs = probs[0].cpu()
        ours = torch.zeros((4, *volume.shape))
        for index, name in enumerate(CLASSES):
            for channel in spec.channels.get(name, []):
                if channel < probs.shape[0]:
                    ours[index] += probs[channel]
        mapped = {c for cs in spec.channels.values() for c in cs}
        for channel in range(probs.shape[0]):
            if channel not in mapped:
                ours[0] += probs[channel]  # classes we have no use for are background to us
        return ours.numpy()

    return run


def _foreign(
    name: str,
    weights: Path,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    spec: ForeignSpec,
    device: torch.device,
) -> Segmenter:
    return Segmenter(
        name, _fingerprint(weights), device.type, _foreign_runner(predictor, spec, device)
    )


def _native(folder: Path, device: torch.device) -> Segmenter:
    from server.ai import network

    net, spec = network.load_model(folder, device)

    def run(
        volume: np.ndarray[Any, Any],
        spacing: tuple[float, float, float],
        scale: float,
        progress: Progress | None,
    ) -> np.ndarray[Any, Any]:
        return network.predict(
            net, volume, spacing, spec, device=device, scale=scale, progress=progress
        )

    return Segmenter(folder.name, _fingerprint(folder / "model.pt"), device.type, run)


def _torchscript(path: Path, device: torch.device) -> Segmenter:
    try:
        module = torch.jit.load(str(path), map_location=device).eval()  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path} is not a TorchScript file: {exc}") from exc
    spec = ForeignSpec.read(path.with_suffix(".json"))
    return _foreign(path.stem, path, module, spec, device)


def _exported(path: Path, device: torch.device) -> Segmenter:
    try:
        program = torch.export.load(str(path))
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path} is not a torch.export program: {exc}") from exc
    module = program.module().to(device)
    spec = ForeignSpec.read(path.with_suffix(".json"))
    return _foreign(path.stem, path, module, spec, device)


def _onnx(path: Path, device: torch.device) -> Segmenter:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("ONNX models need onnxruntime (pip install onnxruntime)") from exc
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{path} is not a loadable ONNX model: {exc}") from exc
    input_name = session.get_inputs()[0].name

    def predictor(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)

    spec = ForeignSpec.read(path.with_suffix(".json"))
    return _foreign(path.stem, path, predictor, spec, device)


def _bundle(folder: Path, device: torch.device) -> Segmenter:
    """A MONAI bundle (https://docs.monai.io/en/stable/mb_specification.html)."""
    from monai.bundle.config_parser import ConfigParser

    configs = folder / "configs"
    metadata_path = configs / "metadata.json"
    labels: dict[str, int] | None = None
    if metadata_path.is_file():
        metadata = json.loads(metadata_path.read_text())
        outputs = metadata.get("network_data_format", {}).get("outputs", {})
        pred: dict[str, Any] = next(iter(outputs.values()), {}) if outputs else {}
        channel_def = pred.get("channel_def") or {}
        if channel_def:
            labels = {str(name): int(index) for index, name in channel_def.items()}
    torchscript = folder / "models" / "model.ts"
    weights = folder / "models" / "model.pt"
    spec = ForeignSpec.read(folder / "imaging-server.json", labels)
    if weights.is_file():
        config = next(
            (p for p in (configs / "inference.json", configs / "inference.yaml") if p.is_file()),
            None,
        )
        if config is None:
            raise ModelError(f"{folder}: a MONAI bundle needs configs/inference.json or .yaml")
        parser = ConfigParser()
        parser.read_config(str(config))
        if "network_def" not in parser:
            raise ModelError(f"{config} defines no network_def")
        net = parser.get_parsed_content("network_def")
        state = torch.load(weights, map_location=device, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # bundles saved by a trainer's checkpoint handler
        net.load_state_dict(state)
        net = net.to(device).eval()
        return _foreign(folder.name, weights, net, spec, device)
    if torchscript.is_file():
        module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(torchscript), map_location=device
        ).eval()
        return _foreign(folder.name, torchscript, module, spec, device)
    raise ModelError(f"{folder}: a MONAI bundle needs models/model.pt or models/model.ts")


def _nnunet(folder: Path, device: torch.device) -> Segmenter:
    """An nnU-Net v2 trained-model folder: the architecture from plans.json (built with
    dynamic-network-architectures, as nnU-Net does), weights from the first fold's
    checkpoint, patch size, spacing and labels from the plans and dataset.json."""
    try:
        import pydoc

        plans = json.loads((folder / "plans.json").read_text())
        dataset = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot read nnU-Net plans/dataset: {exc}") from exc
    checkpoints = sorted(folder.glob("fold_*/checkpoint_final.pth")) or sorted(
        folder.glob("fold_*/checkpoint_best.pth")
    )
    if not checkpoints:
        raise ModelError(f"{folder}: no fold_*/checkpoint_final.pth")
    checkpoint = torch.load(checkpoints[0], map_location=device, weights_only=False)
    name = checkpoint.get("init_args", {}).get("configuration") or next(
        iter(plans.get("configurations", {})), None
    )
    configuration = plans.get("configurations", {}).get(name)
    if not configuration or "architecture" not in configuration:
        raise ModelError(f"{folder}: plans.json has no usable configuration {name!r}")
    architecture = configuration["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key):
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(architecture["network_class_name"])
    if network_class is None:
        raise ModelError(
            f"{architecture['network_class_name']} is not importable: "
            "pip install dynamic-network-architectures"
        )
    labels = dataset.get("labels", {})
    channels_in = len(dataset.get("channel_names") or dataset.get("modality") or {"0": "T2"})
    kwargs.setdefault("deep_supervision", False)  # inference wants the full-resolution head
    net = network_class(  # type: ignore[operator]
        input_channels=channels_in, num_classes=len(labels), **kwargs
    )
    net.load_state_dict(checkpoint["network_weights"])
    net = net.to(device).eval()
    spec = ForeignSpec.read(
        folder / "imaging-server.json", {str(k): int(v) for k, v in labels.items()}
    )
    spec.roi_size = tuple(int(v) for v in configuration["patch_size"])  # type: ignore[assignment]
    spec.spacing = tuple(float(v) for v in configuration["spacing"])  # type: ignore[assignment]
    spec.normalisation = "zscore"
    return _foreign(folder.name, checkpoints[0], net, spec, device)


def load_segmenter(path: Path, device_setting: str = "auto", threads: int = 1) -> Segmenter:
    """The segmenter for ``path`` (see the module docstring for what it may be)."""
    torch.set_num_threads(max(1, threads))
    device = resolve_device(device_setting)
    if not path.exists():
        raise ModelError(f"model {path} does not exist")
    if path.is_dir():
        if (path / "model.json").is_file() and (path / "model.pt").is_file():
            return _native(path, device)
        if (path / "configs").is_dir():
            return _bundle(path, device)
        if (path / "plans.json").is_file() and (path / "dataset.json").is_file():
            return _nnunet(path, device)
        raise ModelError(
            f"{path}: not a model folder (model.json + model.pt, a MONAI bundle with configs/, "
            "or an nnU-Net results folder with plans.json and dataset.json)"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _onnx(path, device)
    if suffix == ".pt2":
        return _exported(path, device)
    if suffix in (".ts", ".pt", ".pth", ".jit"):
        return _torchscript(path, device)
    raise ModelError(f"{path}: unknown model file type {suffix!r} (.onnx, .pt2, .ts/.pt)")
