"""Self-supervised pretraining of a frozen extractor on unlabelled synthetic slides (SimCLR), for the accuracy study.

The paper adapts an ImageNet-pretrained extractor end to end; no pretrained weights can be downloaded on the
machines we measure on, and a random-init extractor is a poor starting point for end-to-end learning from slide
labels (docs/method.md, "Experiments"). This script makes the honest offline stand-in: ``tiny_cnn`` trained with
SimCLR's contrastive loss (Chen et al., 2020) on random tissue crops of slides that **no study run uses** (a
synthetic set drawn with another generator seed, labels never read). Its weights are then the frozen extractor
f_FFE of every row of the study (``bench_accuracy.py --encoder-weights``), so vanilla MIL and FBTA start from the
same features.

Views: two crops of ``patch_size`` from one ``1.25 x patch_size`` tissue window, each with flips / rot90, a strong
HED stain jitter (the study's slides vary their stain a lot) and contrast / noise (our own augmentations,
:mod:`monai_fbta.transforms.augment`). Loss: NT-Xent with temperature 0.2 over a batch of ``2 B`` views, through a
2-layer projection head that is dropped afterwards.

    python benchmarks/pretrain_ssl.py --out /tmp/ssl_tiny_cnn.pt --slides-dir /tmp/ssl_slides
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monai_fbta._io import atomic_open

# unlabelled pretraining slides: the study's generator settings with another seed, so no study slide is seen
PRETRAIN_DATA = {"num_slides": 24, "size": 2048, "tumour_fraction": 0.15, "stain_jitter": 2.0, "seed": 1001}


def slide_files(slides_dir: Path) -> list[Path]:
    """The pyramidal TIFF / SVS slides directly in ``slides_dir``, sorted."""
    return sorted(p for p in slides_dir.glob("*") if p.suffix.lower() in (".tif", ".tiff", ".svs"))


def load_tissue_windows(slides_dir: Path, window: int, per_slide: int, rng: np.random.Generator) -> np.ndarray:
    """``[W, window, window, 3]`` uint8 level-0 windows drawn at random from the tissue (< 50% bright background),
    read region by region (a whole gigapixel level 0 is never loaded)."""
    from monai_fbta.data.slide import open_slide

    paths = slide_files(slides_dir)
    if not paths:
        raise FileNotFoundError(f"no .tif/.tiff/.svs slide in {slides_dir}")
    windows = []
    for path in paths:
        with open_slide(path) as slide:
            width, height = slide.level_dimensions[0]
            kept = tries = 0
            while kept < per_slide and tries < per_slide * 50:
                tries += 1
                y, x = int(rng.integers(0, height - window)), int(rng.integers(0, width - window))
                crop = slide.read_region((x, y), 0, (window, window))
                if (crop.mean(-1) > 220).mean() < 0.5:
                    windows.append(crop)
                    kept += 1
    if not windows:
        raise ValueError(f"no tissue window of {window} px found in the slides of {slides_dir}")
    return np.stack(windows)


class Views:
    """Two augmented views ``[B, 3, P, P]`` of a batch of windows ``[B, 3, W, W]`` in ``[0, 1]``."""

    def __init__(self, patch_size: int, seed: int) -> None:
        from monai_fbta.transforms.augment import RandContrastNoise, RandFlipRotate90, RandHEDJitter

        self.patch_size = patch_size
        self.steps = [RandFlipRotate90(prob_flip=0.5, prob_rot90=0.5), RandHEDJitter(prob=1.0, sigma=0.3, bias=0.1),
                      RandContrastNoise(prob_contrast=0.5, gamma=(0.7, 1.4), prob_noise=0.3, noise_std=0.03)]
        for i, step in enumerate(self.steps):
            step.set_random_state(seed + i)
        self.rng = np.random.default_rng(seed)

    def one(self, windows: torch.Tensor) -> torch.Tensor:
        b, _, w, _ = windows.shape
        ys, xs = self.rng.integers(0, w - self.patch_size + 1, size=(2, b))
        out = torch.stack([windows[i, :, y:y + self.patch_size, x:x + self.patch_size] for i, (y, x) in enumerate(zip(ys, xs))])
        for step in self.steps:
            out = step(out)
        return out

    def __call__(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.one(windows), self.one(windows)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's loss for projections ``z1, z2 [B, P]``: each view must pick its partner among the other ``2B - 1``."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def pretrain(args) -> dict:
    from monai_fbta.networks.encoder import encoder_features
    from monai_fbta.networks.registry import build_encoder

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # never replace a file this run did not write
        raise SystemExit(f"--out {out} exists: choose another path or pass --overwrite")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    slides_dir = Path(args.slides_dir)
    if not slides_dir.exists() or not any(slides_dir.iterdir()):  # only a new or empty folder gets generated slides
        from monai_fbta.synthetic import generate_dataset

        generate_dataset(slides_dir, num_classes=3, **PRETRAIN_DATA)
    window = int(round(args.patch_size * 1.25))
    windows = torch.from_numpy(load_tissue_windows(slides_dir, window, args.windows_per_slide, rng)).permute(0, 3, 1, 2)
    encoder = build_encoder("tiny_cnn")
    dim = encoder_features("tiny_cnn")
    projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 32))
    params = list(encoder.parameters()) + list(projector.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=args.steps)
    views = Views(args.patch_size, args.seed)
    encoder.train()
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        idx = torch.from_numpy(rng.choice(len(windows), size=args.batch_size, replace=False))
        v1, v2 = views(windows[idx].float().div_(255.0))
        loss = nt_xent(projector(encoder(v1)), projector(encoder(v2)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}: NT-Xent {np.mean(losses[-50:]):.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        torch.save(encoder.backbone.state_dict(), f)
    print(f"wrote {out} (tiny_cnn backbone state_dict; pass it as --encoder_weights)")
    return {"windows": len(windows), "first_loss": float(np.mean(losses[:50])), "last_loss": float(np.mean(losses[-50:])),
            "seconds": time.perf_counter() - start}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="weights file to write (tiny_cnn backbone state_dict)")
    p.add_argument("--slides-dir", required=True, help="unlabelled slides (.tif/.tiff/.svs; labels are never read); "
                   f"a missing or empty folder gets synthetic slides generated with {PRETRAIN_DATA}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--windows-per-slide", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return pretrain(args)


if __name__ == "__main__":
    main()
