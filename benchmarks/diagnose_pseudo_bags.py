"""How many lesion patches does a pseudo-bag hold? Synthetic slides only: their generator wrote each lesion mask.

For every slide of ``--dataset-dir`` (a ``monai_fbta.synthetic`` set) with its store in ``--cache-dir`` (the patch
coordinates, and the KMeans clusters training cached: checked to be of ``--num-clusters`` C and ``--cluster-seed`` for
the stored features), a patch counts as lesion when at least half of it lies in the slide's tumour mask. The script
draws ``--draws`` pseudo-bags per slide with the sampler training uses (:func:`monai_fbta.transforms.sample_pseudo_bag`,
M patches per cluster) and prints, per class, the mean number and share of lesion patches in a pseudo-bag of each M
against those of the whole bag, and how many clusters per slide are mostly lesion. It reads the stores and writes
nothing (``--json`` aside)::

    python benchmarks/diagnose_pseudo_bags.py --dataset-dir DATA --cache-dir CACHE --num-clusters 16 --num-per-cluster 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, format_table  # noqa: E402

from monai_fbta.data.clustering import cached_clusters  # noqa: E402
from monai_fbta.data.store import SlideStore, store_path  # noqa: E402
from monai_fbta.transforms import sample_pseudo_bag  # noqa: E402


def lesion_patches(coords: np.ndarray, patch_size: int, mask: np.ndarray, downsample: int) -> np.ndarray:
    """``[N]`` bool: at least half of the level-0 patch at ``coords [N, 2]`` (x, y) lies in ``mask`` (``downsample``
    level-0 px per mask px)."""
    return np.array([mask[y // downsample:-(-(y + patch_size) // downsample),
                          x // downsample:-(-(x + patch_size) // downsample)].mean() >= 0.5 for x, y in coords], bool)


def slide_lesions(row: dict[str, Any], data_dir: Path, cache_dir: Path, num_clusters: int,
                  cluster_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(lesion [N] bool, clusters [N])`` of one datalist row, from its cached store and its tumour mask."""
    path = Path(store_path(cache_dir, row["slide_id"]))
    if not path.is_file():
        raise SystemExit(f"{row['slide_id']}: no store {path}; train or prepare with this --cache-dir first")
    with SlideStore(path) as store:
        clusters = cached_clusters(store, num_clusters, cluster_seed)
        if clusters is None:
            had = store.attrs("clusters") if "clusters" in store.names() else {}
            raise SystemExit(f"{row['slide_id']}: {path} holds no clusters of C={num_clusters}, seed {cluster_seed} for "
                             f"its present features (it has C={had.get('clusters_num_clusters')}, seed "
                             f"{had.get('clusters_seed')}); a training run with these settings caches them")
        coords, attrs = store.coords()
    mask = np.load(data_dir / row["tumour_mask"])
    return lesion_patches(coords, int(attrs["patch_size_level0"]), mask, int(row["mask_downsample"])), clusters


def pseudo_bag_lesions(lesion: np.ndarray, clusters: np.ndarray, num_per_cluster: int, draws: int,
                       rng: np.random.RandomState) -> tuple[float, float]:
    """Mean ``(lesion patches, lesion share)`` over ``draws`` pseudo-bags of ``num_per_cluster`` per cluster."""
    counts = [(lesion[idx].sum(), lesion[idx].mean())
              for idx in (sample_pseudo_bag(clusters, num_per_cluster, rng) for _ in range(draws))]
    return float(np.mean([c for c, _ in counts])), float(np.mean([s for _, s in counts]))


def summarise(per_slide: list[dict[str, Any]], num_per_cluster: list[int], class_names: list[str]) -> list[dict[str, Any]]:
    """One table row per class, then one for all slides."""
    groups = [(name, [s for s in per_slide if s["label"] == i]) for i, name in enumerate(class_names)]
    rows = []
    for name, slides in [*groups, ("all", per_slide)]:
        if not slides:
            continue
        row = {"class": name, "slides": len(slides), "N": round(np.mean([s["N"] for s in slides])),
               "lesion patches (share) in the bag": f"{np.mean([s['lesion'] for s in slides]):.1f} "
                                                   f"({np.mean([s['share'] for s in slides]):.3f})",
               "mostly-lesion clusters": f"{np.mean([s['lesion_clusters'] for s in slides]):.2f}"}
        for m in num_per_cluster:
            row[f"in a pseudo-bag, M={m}"] = (f"{np.mean([s[f'M{m}'][0] for s in slides]):.2f} "
                                              f"({np.mean([s[f'M{m}'][1] for s in slides]):.3f})")
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-dir", required=True, help="synthetic slides (datalist.json with tumour masks)")
    p.add_argument("--cache-dir", required=True, help="the stores training used (coords and clusters)")
    p.add_argument("--num-clusters", type=int, default=16, help="C the stores must be clustered with")
    p.add_argument("--cluster-seed", type=int, default=0, help="the KMeans seed of the cached clusters (the bundle's "
                   "cluster_seed)")
    p.add_argument("--num-per-cluster", type=int, nargs="+", default=[1, 2], help="M values to draw")
    p.add_argument("--draws", type=int, default=20, help="pseudo-bags drawn per slide and M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    data_dir, cache_dir = Path(args.dataset_dir), Path(args.cache_dir)
    datalist = json.loads((data_dir / "datalist.json").read_text())
    if not all("tumour_mask" in r for r in datalist["training"]):
        raise SystemExit(f"{data_dir / 'datalist.json'}: rows without 'tumour_mask' (not a monai_fbta.synthetic set)")
    rng = np.random.RandomState(args.seed)
    per_slide = []
    for row in datalist["training"]:
        lesion, clusters = slide_lesions(row, data_dir, cache_dir, args.num_clusters, args.cluster_seed)
        ids = np.unique(clusters)
        per_slide.append({"slide_id": row["slide_id"], "label": row["label"], "N": len(lesion),
                          "lesion": int(lesion.sum()), "share": float(lesion.mean()),
                          "lesion_clusters": int(sum(lesion[clusters == c].mean() >= 0.5 for c in ids)),
                          **{f"M{m}": pseudo_bag_lesions(lesion, clusters, m, args.draws, rng)
                             for m in args.num_per_cluster}})
    rows = summarise(per_slide, args.num_per_cluster, datalist["class_names"])
    print(f"{data_dir}: lesion patches (>= half in the tumour mask) per slide, C = {args.num_clusters}, "
          f"{args.draws} pseudo-bags per slide and M; mean count (share)\n")
    print(format_table(rows, markdown=True))
    payload = {"dataset_dir": str(data_dir), "num_clusters": args.num_clusters, "draws": args.draws, "table": rows,
               "slides": per_slide}
    finish(args, "pseudo_bags", payload)
    return payload


if __name__ == "__main__":
    main()
