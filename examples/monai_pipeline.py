"""monai-fbta pieces inside a plain MONAI pipeline (no bundle, no FBTATrainer).

Tiles a slide, clusters random-init features, samples a pseudo-bag, reads and augments its
patches with MONAI's own Compose, and scores the bag with an ABMIL head plus a feature translator.

    python examples/monai_pipeline.py                      # makes a small synthetic slide
    python examples/monai_pipeline.py --slide my.svs       # or uses yours
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

# monai_fbta first: it imports MONAI with cuCIM/nvImageCodec's native load messages silenced
from monai_fbta.transforms import (
    ClusterFeaturesd,
    PseudoBagSampled,
    ReadPatchesd,
    TissueTiled,
    make_e2e_augmentation,
)
from monai.transforms import Compose, EnsureTyped, Lambdad  # noqa: E402  (after monai_fbta, see above)

from monai_fbta.synthetic import SyntheticSlideConfig, render_slide, write_pyramidal_tiff
from monai_fbta.networks import ABMIL, FeatureTranslator, PatchEncoder


def make_slide(folder: Path) -> str:
    """A 1024 px synthetic H&E-like pyramidal TIFF (0.5 um/px)."""
    import numpy as np

    rgb, _ = render_slide(SyntheticSlideConfig(size=1024), label=1, rng=np.random.default_rng(0))
    path = folder / "example.tiff"
    write_pyramidal_tiff(path, rgb, mpp=0.5, smallest_level=256)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", help="slide file (default: a generated one)")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        slide = args.slide or make_slide(Path(tmp))
        encoder = PatchEncoder("tiny_cnn").eval()
        def encode(patches: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return encoder(patches)

        pipeline = Compose([
            TissueTiled(keys="image", coords_key="coords", patch_size=args.patch_size, target_mpp=0.5),
            # reads at the level and size TissueTiled recorded in coords_meta_dict: [N, 3, P, P] in [0, 1]
            ReadPatchesd(keys="coords", slide_key="image", out_keys="patches", out_size=args.patch_size),
            Lambdad(keys="patches", func=encode, overwrite="features"),  # frozen bag F^FB [N, D]
            ClusterFeaturesd(keys="features", out_keys="clusters", num_clusters=args.clusters),
            PseudoBagSampled(keys=("features", "coords"), cluster_key="clusters", num_per_cluster=1),
            ReadPatchesd(keys="pb_coords", slide_key="image", out_keys="pb_image", out_size=args.patch_size),
            make_e2e_augmentation(keys="pb_image"),                     # flips, rot90, HED jitter, ...
            EnsureTyped(keys=("pb_features", "pb_image")),
        ])
        pipeline.set_random_state(seed=0)
        sample = pipeline({"image": slide, "label": 1})
    head, translator = ABMIL(in_features=encoder.out_features, num_classes=3).eval(), FeatureTranslator(encoder.out_features)
    with torch.no_grad():
        logits, attention = head(translator(sample["pb_features"][None].float()), return_attention=True)
    print(f"{len(sample['coords'])} tissue patches, pseudo-bag of {len(sample['pb_index'])} "
          f"(images {tuple(sample['pb_image'].shape)}), class probabilities {torch.softmax(logits, -1)[0].tolist()}")
    return {"sample": sample, "logits": logits, "attention": attention}


if __name__ == "__main__":
    main()
