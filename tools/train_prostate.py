"""Train the prostate phantom network (server/ai/network.py) on tools/phantom.py volumes.

    python -m tools.train_prostate --out models/prostate-phantom --phantoms 400 --epochs 18

That run (the shipped model) took 30 minutes on one CPU thread; see its MODEL_CARD.md.

Deterministic on one machine: phantoms are seeds ``--first-seed`` (1000) and up, disjoint from
the held-out seeds 1..N that tools/eval_prostate.py scores; crops, augmentation and weight
initialisation come from fixed seeds.  The phantoms are generated once and kept in memory at
the network's resolution (about 1 MB each), then each step trains on random crops of them.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from server.ai.network import ModelSpec, build_network, preprocess
from tools.phantom import make_phantom


def labels_to_grid(labels: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Labels (z, y, x) to soft targets (4, z, y', x') on the network's in-plane grid.

    Each coarse voxel gets the fraction of each class it covers.  A hard argmax would have to
    break the many 50/50 ties along every border, and breaking them towards the lower class
    index shrank lesions by about 10% and the gland by about 2% in our first model.
    """
    onehot = F.one_hot(torch.from_numpy(labels).long(), 4).permute(0, 3, 1, 2).float()
    small = F.interpolate(onehot, size=size, mode="area")  # (z, 4, y', x')
    return small.permute(1, 0, 2, 3).contiguous()


def build_pool(
    seeds: list[int], spec: ModelSpec, log_every: int = 50
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image (z, y', x') float16, soft targets (4, z, y', x') uint8 in 1/255) per seed."""
    pool = []
    start = time.perf_counter()
    for n, seed in enumerate(seeds, 1):
        ph = make_phantom(seed)
        image = preprocess(ph.t2, ph.spacing, spec)[0, 0]
        soft = labels_to_grid(ph.labels, (image.shape[1], image.shape[2]))
        pool.append((image.half(), (soft * 255).round().to(torch.uint8)))
        if n % log_every == 0:
            print(f"  {n}/{len(seeds)} phantoms, {time.perf_counter() - start:.0f}s", flush=True)
    return pool


def sample_crop(
    rng: np.random.Generator,
    image: torch.Tensor,
    targets: torch.Tensor,
    crop: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random crop, centred on a lesion (30%), on the gland (40%) or anywhere (30%).

    Lesions are a small fraction of the voxels; biasing crops towards them is what makes
    the network see enough of them without weighting the loss.  Returns the image crop
    (z, y, x) and the soft-target crop (4, z, y, x) as floats.
    """
    pad = [max(0, c - s) for c, s in zip(crop, image.shape, strict=True)]
    if any(pad):
        spec_pad = (0, pad[2], 0, pad[1], pad[0] // 2, pad[0] - pad[0] // 2)
        image = F.pad(image[None, None].float(), spec_pad, mode="replicate")[0, 0]
        targets = F.pad(targets[None].float(), spec_pad, mode="replicate")[0]
    u = rng.random()
    target = None
    if u < 0.3 and bool((targets[3] > 127).any()):
        target = targets[3] > 127
    elif u < 0.7:
        target = targets[0] < 128
    if target is not None:
        idx = torch.nonzero(target)
        centre = idx[int(rng.integers(len(idx)))].tolist()
        # jitter so the structure is not always in the middle of the crop
        centre = [
            c + int(rng.integers(-s // 4, s // 4 + 1)) for c, s in zip(centre, crop, strict=True)
        ]
    else:
        centre = [int(rng.integers(0, s)) for s in image.shape]
    starts = [
        int(min(max(c - k // 2, 0), s - k))
        for c, k, s in zip(centre, crop, image.shape, strict=True)
    ]
    sl = tuple(slice(a, a + k) for a, k in zip(starts, crop, strict=True))
    return image[sl].float(), targets[(slice(None), *sl)].float() / 255.0


def augment(
    rng: np.random.Generator, image: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flip and intensity changes the percentile normalisation does not remove."""
    if rng.random() < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)  # x is the last axis of both
    gamma = math.exp(rng.uniform(-0.35, 0.35))
    image = image.clamp(0, 1) ** gamma
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    if rng.random() < 0.3:
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = image + torch.randn(image.shape, generator=gen) * rng.uniform(0.0, 0.03)
    return image, labels


def train(
    out: Path,
    *,
    phantoms: int,
    epochs: int,
    batch: int,
    lr: float,
    crop: tuple[int, int, int],
    first_seed: int,
    spec: ModelSpec,
    seed: int = 0,
) -> dict[str, Any]:
    """Train and write ``model.pt`` (float16 state_dict) and ``model.json`` to ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    seeds = list(range(first_seed, first_seed + phantoms))
    t0 = time.perf_counter()
    print(f"generating {phantoms} training phantoms (seeds {seeds[0]}..{seeds[-1]})", flush=True)
    pool = build_pool(seeds, spec)
    t_pool = time.perf_counter() - t0

    net = build_network(spec)
    params = sum(p.numel() for p in net.parameters())
    print(f"network: {params} parameters", flush=True)
    # soft targets: DiceCELoss takes them as they are when they have one channel per class
    loss_fn = DiceCELoss(softmax=True, batch=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    steps_per_epoch = max(1, phantoms // batch)
    total = epochs * steps_per_epoch
    warmup = min(100, total // 10)

    def lr_at(step: int) -> float:
        # short warm-up, then cosine decay to 2% of the peak
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    net.train()
    step = 0
    for epoch in range(1, epochs + 1):
        losses = []
        t_epoch = time.perf_counter()
        for _ in range(steps_per_epoch):
            images, targets = [], []
            for _ in range(batch):
                image, labels = pool[int(rng.integers(len(pool)))]
                img, lab = augment(rng, *sample_crop(rng, image, labels, crop))
                images.append(img[None])
                targets.append(lab)
            x = torch.stack(images)
            y = torch.stack(targets)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        print(
            f"epoch {epoch:3d}/{epochs}: loss {np.mean(losses):.4f} lr {lr_at(step - 1):.2e} "
            f"{time.perf_counter() - t_epoch:.0f}s (total {time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    train_seconds = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    net.eval()
    # float16 halves the file; load_state_dict copies the values back into float32
    # parameters.  Weight noise of float16's rounding size (2**-11 relative) changed the
    # argmax of about 4 voxels in a million on held-out phantoms.
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, out / "model.pt")
    spec.to_json(out / "model.json")
    return {
        "parameters": params,
        "bytes": (out / "model.pt").stat().st_size,
        "phantom_seconds": t_pool,
        "train_seconds": train_seconds,
        "steps": total,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/prostate-phantom"))
    parser.add_argument("--phantoms", type=int, default=400, help="training phantoms")
    parser.add_argument("--first-seed", type=int, default=1000, help="first training seed")
    parser.add_argument("--epochs", type=int, default=18, help="passes of --phantoms crops")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--crop", type=int, nargs=3, default=(16, 96, 96), metavar=("Z", "Y", "X"))
    parser.add_argument("--channels", type=int, nargs="+", default=None)
    parser.add_argument("--res-units", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval", type=int, default=20, help="held-out phantoms to score (0: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = ModelSpec()
    if args.channels:
        spec = replace(spec, channels=tuple(args.channels))
    if args.res_units is not None:
        spec = replace(spec, num_res_units=args.res_units)
    info = train(
        args.out,
        phantoms=args.phantoms,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        crop=tuple(args.crop),
        first_seed=args.first_seed,
        spec=spec,
    )
    print(
        f"wrote {args.out}/model.pt ({info['bytes'] / 1e6:.2f} MB, {info['parameters']} "
        f"parameters) after {info['train_seconds'] / 60:.1f} min "
        f"({info['phantom_seconds']:.0f}s generating phantoms, {info['steps']} steps)",
        flush=True,
    )
    if args.eval:
        from tools.eval_prostate import evaluate, markdown

        result = evaluate(args.out, list(range(1, args.eval + 1)), threads=args.threads)
        print(markdown(result))


if __name__ == "__main__":
    main()
