"""Score a prostate model folder on held-out phantoms (tools/phantom.py seeds 1..N by default).

    python -m tools.eval_prostate models/prostate-phantom --phantoms 20 --json /tmp/eval.json

Metrics (per phantom, then averaged):

- gland Dice: argmax > 0 against labels > 0; PZ and TZ Dice: class 1 and class 2 as labelled
  (lesion voxels belong to neither, in truth and in prediction alike);
- lesion sensitivity: a true lesion is detected when a predicted lesion component (class 3,
  26-connected, at least ``--min-lesion-ml``) overlaps it;
- false positives per volume: predicted lesion components that overlap no true lesion;
- lesion volume error: for each detected lesion, predicted minus true volume, where the
  predicted volume is that of the components overlapping it;
- seconds per volume: ``server.ai.network.predict`` alone, on ``--threads`` CPU threads.

Training uses seeds 1000 and up (tools/train_prostate.py), so these seeds are never trained on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from server.ai.network import load_model, predict
from tools.phantom import LESION, PERIPHERAL, TRANSITION, Phantom, make_phantom

MIN_LESION_ML = 0.02  # as server/ai/analysis.py: smaller components are noise


@dataclass
class PhantomScore:
    seed: int
    gland_dice: float
    pz_dice: float
    tz_dice: float
    lesions: int
    detected: int
    detected_pz: int
    lesions_pz: int
    false_positives: int
    volume_errors_ml: list[float] = field(default_factory=list)
    volume_errors_rel: list[float] = field(default_factory=list)
    seconds: float = 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components (SimpleITK, fully connected), labelled 1..n."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labelled = sitk.ConnectedComponent(image, True)
    array = sitk.GetArrayFromImage(labelled)
    return array, int(array.max())


def score_phantom(
    seed: int, probs: np.ndarray, phantom: Phantom, min_lesion_ml: float, seconds: float
) -> PhantomScore:
    """Compare one prediction (class probabilities) with the phantom's truth."""
    pred = probs.argmax(axis=0).astype(np.uint8)
    truth = phantom.labels
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    comp, n = components(pred == LESION)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    kept = [k for k in range(1, n + 1) if sizes[k] * voxel_ml >= min_lesion_ml]
    matched: set[int] = set()
    detected = detected_pz = lesions_pz = 0
    errors_ml: list[float] = []
    errors_rel: list[float] = []
    for les in phantom.lesions:
        inside = phantom.lesion_ids == les.label_id
        hits = [k for k in np.unique(comp[inside]) if k in kept]
        lesions_pz += les.zone == "peripheral"
        if hits:
            detected += 1
            detected_pz += les.zone == "peripheral"
            matched.update(int(k) for k in hits)
            predicted_ml = float(sum(sizes[k] for k in hits)) * voxel_ml
            errors_ml.append(predicted_ml - les.volume_ml)
            errors_rel.append((predicted_ml - les.volume_ml) / les.volume_ml)
    return PhantomScore(
        seed=seed,
        gland_dice=dice(pred > 0, truth > 0),
        pz_dice=dice(pred == PERIPHERAL, truth == PERIPHERAL),
        tz_dice=dice(pred == TRANSITION, truth == TRANSITION),
        lesions=len(phantom.lesions),
        detected=detected,
        detected_pz=detected_pz,
        lesions_pz=lesions_pz,
        false_positives=len([k for k in kept if k not in matched]),
        volume_errors_ml=errors_ml,
        volume_errors_rel=errors_rel,
        seconds=seconds,
    )


def evaluate(
    model_dir: Path,
    seeds: list[int],
    *,
    threads: int = 1,
    min_lesion_ml: float = MIN_LESION_ML,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the model on each seed's phantom and aggregate the scores."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    net, spec = load_model(model_dir, device)
    scores: list[PhantomScore] = []
    # one untimed call first: the first forward pass pays for oneDNN's kernel selection
    warm = make_phantom(seeds[0])
    predict(net, warm.t2, warm.spacing, spec, device=device)
    for seed in seeds:
        phantom = make_phantom(seed)
        start = time.perf_counter()
        probs = predict(net, phantom.t2, phantom.spacing, spec, device=device)
        seconds = time.perf_counter() - start
        s = score_phantom(seed, probs, phantom, min_lesion_ml, seconds)
        scores.append(s)
        if verbose:
            print(
                f"seed {seed:3d}: gland {s.gland_dice:.3f} pz {s.pz_dice:.3f} "
                f"tz {s.tz_dice:.3f} lesions {s.detected}/{s.lesions} fp {s.false_positives} "
                f"{seconds:.2f}s",
                flush=True,
            )
    return summarise(scores, model_dir, threads, min_lesion_ml)


def summarise(
    scores: list[PhantomScore], model_dir: Path, threads: int, min_lesion_ml: float
) -> dict[str, Any]:
    lesions = sum(s.lesions for s in scores)
    lesions_pz = sum(s.lesions_pz for s in scores)
    errors_ml = [e for s in scores for e in s.volume_errors_ml]
    errors_rel = [e for s in scores for e in s.volume_errors_rel]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    return {
        "model": str(model_dir),
        "phantoms": len(scores),
        "seeds": [s.seed for s in scores],
        "threads": threads,
        "min_lesion_ml": min_lesion_ml,
        "gland_dice": mean([s.gland_dice for s in scores]),
        "gland_dice_min": min(s.gland_dice for s in scores),
        "pz_dice": mean([s.pz_dice for s in scores]),
        "tz_dice": mean([s.tz_dice for s in scores]),
        "lesions": lesions,
        "detected": sum(s.detected for s in scores),
        "sensitivity": sum(s.detected for s in scores) / lesions if lesions else float("nan"),
        "sensitivity_pz": (sum(s.detected_pz for s in scores) / lesions_pz)
        if lesions_pz
        else float("nan"),
        "sensitivity_tz": (sum(s.detected - s.detected_pz for s in scores) / (lesions - lesions_pz))
        if lesions > lesions_pz
        else float("nan"),
        "false_positives_per_volume": mean([float(s.false_positives) for s in scores]),
        "lesion_volume_error_ml": mean(errors_ml),
        "lesion_volume_abs_error_ml": mean([abs(e) for e in errors_ml]),
        "lesion_volume_abs_error_rel": mean([abs(e) for e in errors_rel]),
        "seconds_per_volume": mean([s.seconds for s in scores]),
        "per_phantom": [asdict(s) for s in scores],
    }


def markdown(result: dict[str, Any]) -> str:
    """The summary as a Markdown table (what MODEL_CARD.md quotes)."""
    r = result
    rows = [
        ("held-out phantoms (seeds)", f"{r['phantoms']} ({r['seeds'][0]}..{r['seeds'][-1]})"),
        ("gland Dice (mean / min)", f"{r['gland_dice']:.3f} / {r['gland_dice_min']:.3f}"),
        ("peripheral zone Dice", f"{r['pz_dice']:.3f}"),
        ("transition zone Dice", f"{r['tz_dice']:.3f}"),
        (
            "lesion sensitivity (all / PZ / TZ)",
            f"{r['sensitivity']:.3f} ({r['detected']}/{r['lesions']}) / "
            f"{r['sensitivity_pz']:.3f} / {r['sensitivity_tz']:.3f}",
        ),
        ("false-positive lesions per volume", f"{r['false_positives_per_volume']:.2f}"),
        (
            "lesion volume error, mean signed / mean absolute",
            f"{r['lesion_volume_error_ml']:+.3f} mL / {r['lesion_volume_abs_error_ml']:.3f} mL "
            f"({100 * r['lesion_volume_abs_error_rel']:.0f}%)",
        ),
        (
            f"inference per volume ({r['threads']} CPU thread{'s' if r['threads'] > 1 else ''})",
            f"{r['seconds_per_volume']:.2f} s",
        ),
    ]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("models/prostate-phantom"))
    parser.add_argument("--phantoms", type=int, default=20, help="held-out seeds 1..N")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-lesion-ml", type=float, default=MIN_LESION_ML)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quiet", action="store_true", help="no per-phantom lines")
    args = parser.parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + args.phantoms))
    result = evaluate(
        args.model,
        seeds,
        threads=args.threads,
        min_lesion_ml=args.min_lesion_ml,
        verbose=not args.quiet,
    )
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
