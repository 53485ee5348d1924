"""Model loaders: each foreign format with a small model made here, and the shipped model.

The foreign models are a 1x1x1 convolution whose bias makes one output channel win everywhere;
their label maps put that channel on "peripheral zone" under a different number, so a loader
that ignores the label map (or the sidecar) answers the wrong class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.ai.models import ModelError, Segmenter, load_segmenter

SHAPE = (10, 40, 36)  # not a multiple of any patch size: the sliding window must pad
# Channel order of the test models: 0 background, 1 transition, 2 peripheral, 3 lesion.
NAMES = {"background": 0, "transition zone": 1, "peripheral zone": 2, "tumor": 3}
PERIPHERAL = 1  # our class number


def _conv() -> torch.nn.Conv3d:
    conv = torch.nn.Conv3d(1, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, 0.0, 6.0, 0.0]))  # channel 2 wins
    return conv.eval()


def _volume() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)


def _check(segmenter: Segmenter) -> None:
    for scale in (1.0, 0.5):  # 0.5: the worker's retry after running out of GPU memory
        probabilities = segmenter(_volume(), (3.0, 0.5, 0.5), scale=scale)
        assert probabilities.shape == (4, *SHAPE)
        assert np.allclose(probabilities.sum(0), 1.0, atol=1e-4)
        assert (probabilities.argmax(0) == PERIPHERAL).all()


def _sidecar(path: Path) -> None:
    path.write_text(json.dumps({"labels": NAMES, "roi_size": [8, 32, 32]}))


def test_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(_conv()), str(path))
    _sidecar(tmp_path / "net.json")
    _check(load_segmenter(path, "cpu"))


def test_torch_export(tmp_path: Path) -> None:
    path = tmp_path / "net.pt2"
    dims = {"input": {2: torch.export.Dim("z"), 3: torch.export.Dim("y"), 4: torch.export.Dim("w")}}
    program = torch.export.export(_conv(), (torch.zeros(1, 1, 8, 32, 32),), dynamic_shapes=dims)
    torch.export.save(program, str(path))
    _sidecar(tmp_path / "net.json")
    _check(load_segmenter(path, "cpu"))


def test_onnx(tmp_path: Path) -> None:
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        _conv(),
        (torch.zeros(1, 1, 8, 32, 32),),
        str(path),
        dynamo=False,
        input_names=["image"],
        dynamic_axes={"image": {0: "b", 2: "z", 3: "y", 4: "x"}},
    )
    _sidecar(tmp_path / "net.json")
    _check(load_segmenter(path, "cpu"))


def test_monai_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "prostate_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    network = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 4}
    network["kernel_size"] = 1
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": network}))
    channel_def = {str(v): k for k, v in NAMES.items()}
    metadata = {"network_data_format": {"outputs": {"pred": {"channel_def": channel_def}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save(_conv().state_dict(), bundle / "models" / "model.pt")
    segmenter = load_segmenter(bundle, "cpu")
    assert segmenter.name == "prostate_bundle"
    _check(segmenter)


def test_nnunet_results_folder(tmp_path: Path) -> None:
    pytest.importorskip(
        "dynamic_network_architectures", reason="tools/setup installs dynamic-network-architectures"
    )
    folder = tmp_path / "Dataset042_Prostate" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    plans = {
        "configurations": {
            "3d_fullres": {
                "patch_size": [8, 32, 32],
                "spacing": [3.0, 0.5, 0.5],
                "architecture": arch,
            }
        }
    }
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "PZ": 1, "TZ": 2}}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kwargs = dict(arch["arch_kwargs"])  # type: ignore[call-overload]
    for key in ("conv_op", "norm_op", "nonlin"):
        kwargs[key] = {
            "conv_op": torch.nn.Conv3d,
            "norm_op": torch.nn.InstanceNorm3d,
            "nonlin": torch.nn.LeakyReLU,
        }[key]
    net = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=False, **kwargs)
    torch.save(
        {"network_weights": net.state_dict(), "init_args": {"configuration": "3d_fullres"}},
        folder / "fold_0" / "checkpoint_final.pth",
    )
    segmenter = load_segmenter(folder, "cpu")
    probabilities = segmenter(_volume(), (3.0, 0.5, 0.5))
    assert probabilities.shape == (4, *SHAPE)
    assert np.allclose(probabilities.sum(0), 1.0, atol=1e-4)
    assert probabilities[3].max() == 0  # this dataset has no lesion label


def test_unknown_and_missing_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_segmenter(tmp_path / "nothing", "cpu")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="unknown model file type"):
        load_segmenter(tmp_path / "weights.bin", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        load_segmenter(tmp_path / "empty", "cpu")
    (tmp_path / "broken.ts").write_bytes(b"not torchscript")
    with pytest.raises(ModelError, match="TorchScript"):
        load_segmenter(tmp_path / "broken.ts", "cpu")
