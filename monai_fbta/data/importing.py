"""Bring existing CLAM / TRIDENT patch coordinates and features into our store format.

A CLAM or TRIDENT ``.h5`` holds ``coords`` ``[N, 2]`` (level-0 top-left ``(x, y)``; attrs
``patch_level`` + ``patch_size`` for CLAM, ``patch_size`` at ``target_magnification`` +
``patch_size_level0`` for TRIDENT) and, after feature extraction, ``features`` ``[N, D]``.
:func:`import_features` writes ``<out>/<slide_id>.h5`` in our layout, with the store marker and a
fingerprint that records the source, the slide file and the encoder that made the features, so
:func:`~monai_fbta.data.extraction.extract_features` with that encoder reuses it (``skipped``)
instead of extracting again; coords without features are reused and only encoded. The source file
is never modified. Before writing, the coords must fit the slide and (``verify`` patches) our
encoder must reproduce the imported features, so features from another encoder, other weights or
other preprocessing are refused rather than silently mixed with ours. CLI::

    python -m monai_fbta.data.importing --datalist slides.csv --h5-dir clam/features/h5_files \\
        --out cache/ --encoder resnet50_trunc --weights resnet50.pth
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_fbta.data.errors import SlideError
from monai_fbta.data.store import StoreError, add_arrays, check_ours, dataset_names, read_array, read_trident_coords, write_coords

__all__ = ["import_features", "main"]


def _geometry(path: str, attrs: Mapping[str, Any]) -> dict[str, int]:
    """``patch_level``, ``patch_size_level`` (read size at that level) and ``patch_size_level0``."""
    if attrs["format"] == "clam":
        level, size = int(attrs["patch_level"]), int(attrs["patch_size"])
        return {"patch_level": level, "patch_size_level": size, "patch_size_level0": int(attrs.get("patch_size_level0", size))}
    if attrs["format"] == "trident" and "patch_size_level0" in attrs:
        size0 = int(attrs["patch_size_level0"])
        return {"patch_level": 0, "patch_size_level": size0, "patch_size_level0": size0}
    raise StoreError(path, f"cannot tell the patch geometry from its coords attrs {sorted(attrs)} (format {attrs['format']})")


def _check_fits(path: str, coords: np.ndarray, geometry: Mapping[str, int], slide_path: str, mpp: float | None) -> str:
    """Raise when the coords cannot belong to the slide; returns the backend that opened it."""
    from monai_fbta.data.slide import open_slide

    with open_slide(slide_path, mpp=mpp) as slide:
        w0, h0 = slide.level_dimensions[0]
        if geometry["patch_level"] >= slide.level_count:
            raise StoreError(path, f"patch_level {geometry['patch_level']} but {slide_path} has {slide.level_count} levels")
        if len(coords) and (coords.min() < 0 or coords[:, 0].max() >= w0 or coords[:, 1].max() >= h0):
            raise StoreError(path, f"coords reach ({coords[:, 0].max()}, {coords[:, 1].max()}) but {slide_path} is "
                             f"{w0}x{h0} px at level 0: are these the coordinates of another slide?")
        return slide.backend


def _verify(path: str, slide_path: str, coords: np.ndarray, features: np.ndarray, geometry: Mapping[str, int],
            patch_size: int, encoder: torch.nn.Module, n: int, seed: int = 0) -> float:
    """Re-encode ``n`` random patches; raise unless each matches its imported feature (cosine >= 0.99). Returns the minimum cosine."""
    from monai_fbta.data.slide import open_slide, patches_to_tensor

    rows = np.sort(np.random.default_rng(seed).choice(len(coords), min(n, len(coords)), replace=False))
    with open_slide(slide_path) as slide:
        patches = patches_to_tensor(slide.read_patches(coords[rows], geometry["patch_level"], geometry["patch_size_level"]), patch_size)
    with torch.inference_mode():
        ours = encoder.eval()(patches).float()
    theirs = torch.as_tensor(features[rows], dtype=torch.float32)
    if ours.shape != theirs.shape:
        raise StoreError(path, f"features are {features.shape[1]}-dimensional but the encoder gives {ours.shape[1]}")
    cos = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=1).min())
    if not cos >= 0.99:
        raise StoreError(path, f"the encoder does not reproduce the imported features (cosine similarity down to "
                         f"{cos:.3f} on {len(rows)} patches): another encoder, other weights or other preprocessing "
                         "made them; import them with that encoder (or verify=0 at your own risk)")
    return cos


def import_features(
    h5_path: str | os.PathLike,
    slide_path: str | os.PathLike,
    out_path: str | os.PathLike,
    encoder: torch.nn.Module | str | None = None,
    weights: str | os.PathLike | None = None,
    patch_size: int | None = None,
    mpp: float | None = None,
    verify: int = 8,
) -> dict[str, Any]:
    """Write the CLAM/TRIDENT ``h5_path`` of ``slide_path`` as our store ``out_path``.

    Args:
        h5_path: source ``.h5`` (``coords [N, 2]``, optional ``features [N, D]``); never modified.
        slide_path: the slide those coordinates were taken from (checked: they must fit it).
        out_path: our store, e.g. :func:`~monai_fbta.data.store.store_path` ``(cache_dir, slide_id)``.
            A file there that we did not write is refused (:class:`StoreError`), so it cannot be the source.
        encoder: the frozen encoder that made the features (``nn.Module`` or a registry name, with
            ``weights``); required when the file has features.
        patch_size: encoder input size in px (default: the file's ``patch_size``).
        mpp: pixel-size override for the slide (as in the datalist).
        verify: patches re-encoded to check the features came from ``encoder`` (0: trust them).

    Returns:
        ``{"n_patches", "feature_dim" (0 without features), "format", "min_cosine" (or None)}``.
    """
    from monai_fbta.data.extraction import encoder_fingerprint, slide_fingerprint

    h5_path, slide_path, out_path = os.fspath(h5_path), os.fspath(slide_path), os.fspath(out_path)
    check_ours(out_path)  # before any work
    coords, attrs = read_trident_coords(h5_path)
    if attrs["format"] == "monai_fbta":
        raise StoreError(h5_path, "is already a monai_fbta store: copy it instead of importing it")
    geometry = _geometry(h5_path, attrs)
    patch_size = int(patch_size or attrs["patch_size"])
    backend = _check_fits(h5_path, coords, geometry, slide_path, mpp)
    features = read_array(h5_path, "features") if "features" in dataset_names(h5_path) else None
    min_cos = None
    enc_fp: dict[str, str] = {}
    if features is not None:
        if features.ndim != 2 or len(features) != len(coords):
            raise StoreError(h5_path, f"features have shape {features.shape} for {len(coords)} coords")
        if not np.isfinite(features).all():
            raise StoreError(h5_path, "features contain NaN/inf")
        if encoder is None:
            raise ValueError(f"{h5_path}: name the encoder that made these features (encoder=, weights=)")
        if isinstance(encoder, str):
            from monai_fbta.networks.registry import build_encoder

            encoder = build_encoder(encoder, **({"weights": weights} if weights is not None else {}))
        enc_fp = encoder_fingerprint(encoder)
        if verify > 0:
            min_cos = _verify(h5_path, slide_path, coords, features, geometry, patch_size, encoder, verify)
    source = {"format": attrs["format"], "file": os.path.abspath(h5_path)}
    coords_fp = {"imported": source, "slide": slide_fingerprint(slide_path, mpp)}
    store_attrs = {
        **geometry, "patch_size": patch_size, "slide_path": slide_path, "backend": backend, "num_patches": len(coords),
        "imported_from": source["file"], "import_format": attrs["format"],
        "source_attrs": {k: v for k, v in attrs.items() if k != "format"},
    }
    write_coords(out_path, coords, store_attrs, fingerprint=coords_fp)
    if features is not None:
        add_arrays(out_path, {"features": features}, {"feature_dim": int(features.shape[1])},
                   {**coords_fp, **enc_fp, "dtype": features.dtype.name}, feature_dtype=None)
    return {"n_patches": len(coords), "feature_dim": 0 if features is None else int(features.shape[1]),
            "format": attrs["format"], "min_cosine": min_cos}


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m monai_fbta.data.importing", description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", required=True, help="slide_id,path,label CSV or MONAI datalist JSON (see load_datalist)")
    p.add_argument("--classes", default=None, help="comma-separated class names when labels are names")
    p.add_argument("--h5-dir", required=True, help="folder of CLAM/TRIDENT <slide_id>.h5 files")
    p.add_argument("--out", required=True, help="our feature cache folder (the cache_dir of training/inference)")
    p.add_argument("--encoder", default=None, help="encoder that made the features (registry name, e.g. resnet50_trunc)")
    p.add_argument("--weights", default=None, help="local weights file of that encoder")
    p.add_argument("--patch-size", type=int, default=None, help="encoder input size in px (default: the file's patch_size)")
    p.add_argument("--verify", type=int, default=8, help="patches re-encoded to check the features (0: trust them)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Import every datalist slide's ``<h5-dir>/<slide_id>.h5``; exit 1 when any failed."""
    from monai_fbta.data.datalist import load_datalist
    from monai_fbta.data.store import slide_id_of, store_path

    args = _parse_args(argv)
    encoder: torch.nn.Module | str | None = args.encoder
    if args.encoder:
        from monai_fbta.networks.registry import build_encoder

        encoder = build_encoder(args.encoder, **({"weights": args.weights} if args.weights else {}))
    failed = 0
    classes = args.classes.split(",") if args.classes else None
    for row in load_datalist(args.datalist, classes=classes, check_files=False):
        sid = slide_id_of(row)
        try:
            info = import_features(os.path.join(args.h5_dir, f"{sid}.h5"), row["image"], store_path(args.out, sid),
                                   encoder, patch_size=args.patch_size, mpp=row.get("mpp"), verify=args.verify)
            print(f"{sid}: imported {info['n_patches']} patches ({info['format']}, feature_dim {info['feature_dim']})")
        except (SlideError, ValueError) as e:
            failed += 1
            print(f"{sid}: not imported: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
