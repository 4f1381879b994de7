"""Frozen feature extraction over a datalist (FBTA step 1): resumable and torchrun-sharded.

Per slide: tile (or reuse the coords already in its store), read every patch with a
DataLoader over coordinate batches (each worker opens its own slide handle), run the frozen
encoder under ``torch.inference_mode()`` with autocast and channels_last, and store
``features`` ``fp16 [N, D]`` beside ``coords`` ``int64 [N, 2]`` in ``<out_dir>/<slide_id>.h5``.

Files in ``out_dir`` that monai_fbta did not write (e.g. CLAM features named ``<slide_id>.h5``)
are never overwritten: :class:`~monai_fbta.data.store.StoreError` before any work.
Resumable: a slide whose store opens, is complete, and whose ``fingerprint`` (encoder name and
a hash of its weights, every tiling setting, and the slide file itself: size, modification time,
a hash of its first and last MiB, the mpp override) matches is skipped; otherwise it is recomputed
and the ``note`` column of the report says why (e.g. ``slide file changed (size, content)``). Every
store write is atomic (temp file + ``os.replace``); temp files left by a killed run are removed on the rerun.
Under ``torch.distributed`` each rank processes ``rows[rank::world_size]``; rank 0 writes
``<out_dir>/extraction_report.csv``. CLI::

    python -m monai_fbta.data.extraction --datalist slides.csv --out features/ --encoder tiny_cnn
    torchrun --nproc_per_node=2 -m monai_fbta.data.extraction --datalist ... --out ...
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from monai_fbta._io import atomic_open, remove_stale_temps, safe_name
from monai_fbta.data.errors import SlideError, SlideNotFoundError, SlideReadError
from monai_fbta.data.slide import SlideCache, open_slide, patches_to_tensor
from monai_fbta.data.store import (
    StoreError, add_arrays, check_ours, read_attrs, read_coords, slide_id_of, store_is_complete, store_path, write_coords,
)
from monai_fbta.networks.encode import encode_batch, prepare_encoder, resolve_amp_dtype

__all__ = [
    "SlideResult",
    "ExtractionReport",
    "PatchBatches",
    "patch_loader",
    "encode_slide_patches",
    "encode_batch",
    "extract_features",
    "encoder_fingerprint",
    "slide_fingerprint",
    "main",
]

REPORT_NAME = "extraction_report.csv"
_REPORT_FIELDS = ("slide_id", "status", "n_patches", "seconds", "error", "note")
_MIB = 1 << 20


# ----------------------------------------------------------------------------- results


@dataclass
class SlideResult:
    """One row of the extraction summary. ``status``: ``"done"``, ``"skipped"`` or ``"error"``;
    ``note``: why a cached store was recomputed (e.g. ``slide file changed (...)``), or what was dropped."""

    slide_id: str
    status: str
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    note: str = ""


@dataclass
class ExtractionReport:
    """All slides' results (every rank's, when distributed) and where the CSV was written."""

    results: list[SlideResult] = field(default_factory=list)
    csv_path: str | None = None

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "error"]

    def by_id(self) -> dict[str, SlideResult]:
        return {r.slide_id: r for r in self.results}

    def table(self) -> str:
        """Fixed-width summary table (one line per slide, then totals)."""
        rows = [("slide", "status", "n_patches", "seconds", "error / note")]
        rows += [(r.slide_id, r.status, str(r.n_patches), f"{r.seconds:.2f}", r.error or r.note) for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        counts = {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "error")}
        lines.append(f"{len(self.results)} slides: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        return "\n".join(line.rstrip() for line in lines)


def _write_csv_atomic(path: str, results: Sequence[SlideResult]) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_REPORT_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


# ----------------------------------------------------------------------------- identity


def encoder_fingerprint(encoder: torch.nn.Module) -> dict[str, str]:
    """``{"encoder": name, "weights": sha1 of the state dict}``: identifies the frozen extractor."""
    digest = hashlib.sha1()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    name = getattr(encoder, "name", None) or type(encoder).__name__
    return {"encoder": str(name), "weights": digest.hexdigest()}


def slide_fingerprint(path: str | os.PathLike, mpp: float | None = None) -> dict[str, Any]:
    """Identity of a slide file: ``size``, ``mtime_ns``, ``head_tail_sha1`` (sha1 of its first and
    last MiB, 2 MiB read at most) and the ``mpp`` override (``None``: the file's own).

    The path is not part of it: a slide moved with its times kept keeps its features; a different or
    rewritten file (other size, content at either end, or modification time) does not.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SlideNotFoundError(path, "file not found")
    st = os.stat(path)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if st.st_size > _MIB:
            f.seek(max(_MIB, st.st_size - _MIB))
            digest.update(f.read(_MIB))
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "head_tail_sha1": digest.hexdigest(),
            "mpp": None if mpp is None else float(mpp)}


def _describe_change(stored: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> str | None:
    """Why a store made with fingerprint ``stored`` is stale for ``expected`` (``None``: it is not)."""
    if not isinstance(stored, Mapping):
        return "the store has no fingerprint"
    if "slide" not in stored:
        return "the store predates slide fingerprints (which slide file made it is unknown)"
    reasons = []
    slide_diff = [k for k in expected["slide"] if stored["slide"].get(k) != expected["slide"][k]]
    if slide_diff:
        names = {"size": "size", "mtime_ns": "modification time", "head_tail_sha1": "content", "mpp": "mpp override"}
        reasons.append("slide file changed (" + ", ".join(names.get(k, k) for k in slide_diff) + ")")
    other = [k for k in sorted(set(stored) | set(expected)) if k != "slide" and not _same_value(stored.get(k), expected.get(k))]
    if other:
        reasons.append("settings changed (" + ", ".join(f"{k}: {stored.get(k)!r} -> {expected.get(k)!r}"
                                                         if k != "weights" else "encoder weights" for k in other) + ")")
    return "; ".join(reasons) or None


def _same_value(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _tiling_fingerprint(tiling_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tiling_kwargs[k] for k in sorted(tiling_kwargs) if k != "mask"}


# ----------------------------------------------------------------------------- patch batches


class PatchBatches(Dataset):
    """Item ``i`` = float ``[b, 3, out_size, out_size]`` patches of coordinate batch ``i``.

    Each DataLoader worker opens its own slide handle (:class:`SlideCache`). A read failure
    comes back as ``{"error": message}`` (exception types do not survive worker pickling); with
    ``skip_bad`` the batch is reread patch by patch and comes back as ``{"x": patches, "bad":
    [(row in batch, message), ...]}`` (the bad rows hold white pixels, to be dropped).
    """

    def __init__(
        self, slide_path: str, coords: np.ndarray, level: int, read_size: int, out_size: int, batch_size: int,
        backend: str = "auto", mpp: float | None = None, skip_bad: bool = False,
    ) -> None:
        self.slide_path = slide_path
        self.coords = np.asarray(coords, dtype=np.int64)
        self.level, self.read_size, self.out_size = level, read_size, out_size
        self.batch_size = batch_size
        self.skip_bad = skip_bad
        self.cache = SlideCache(max_open=1, backend=backend, mpp=mpp)

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.batch_size)

    def __getitem__(self, i: int):
        coords = self.coords[i * self.batch_size : (i + 1) * self.batch_size]
        try:
            patches = self.cache.get(self.slide_path).read_patches(coords, self.level, self.read_size)
        except SlideError as e:
            if not (self.skip_bad and isinstance(e, SlideReadError)):
                return {"error": str(e)}
            return self._one_by_one(coords)
        return patches_to_tensor(patches, self.out_size)

    def _one_by_one(self, coords: np.ndarray) -> dict[str, Any]:
        slide = self.cache.get(self.slide_path)
        patches = np.full((len(coords), self.read_size, self.read_size, 3), 255, np.uint8)
        bad = []
        for j, xy in enumerate(coords):
            try:
                patches[j] = slide.read_patches(xy[None], self.level, self.read_size)[0]
            except SlideReadError as e:
                bad.append((j, str(e)))
        return {"x": patches_to_tensor(patches, self.out_size), "bad": bad}


def patch_loader(batches: PatchBatches, num_workers: int, device: torch.device) -> DataLoader:
    """The extraction DataLoader over ``batches`` (one item = one coordinate batch): ``num_workers`` reader
    processes with 4 batches prefetched each (0: read in this process), pinned memory on CUDA."""
    return DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False,
    )


def encode_slide_patches(
    encoders: Mapping[str, torch.nn.Module], row: Mapping[str, Any], coords: np.ndarray, attrs: Mapping[str, Any],
    batch_size: int = 256, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The patches at ``coords`` of the slide of ``row`` (read at its store's ``attrs``: ``patch_level``,
    ``patch_size_level``, ``patch_size``, as extraction reads them, once) through each of ``encoders``:
    ``{name: [len(coords), D] float32 on the CPU}``. A read failure raises :class:`SlideReadError` naming the slide."""
    if not len(coords):
        raise SlideError(row["image"], "no patch coordinates to read")
    device = torch.device(device)
    batches = PatchBatches(os.fspath(row["image"]), coords, int(attrs["patch_level"]), int(attrs["patch_size_level"]),
                           int(attrs["patch_size"]), batch_size, mpp=row.get("mpp"))
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    for x in patch_loader(batches, 0, device):
        if isinstance(x, dict):
            raise SlideReadError(row["image"], f"reading patches failed: {x.get('error', x)}")
        for name, encoder in encoders.items():
            feats[name].append(encode_batch(encoder, x, device, None, False))
    return {name: torch.cat(f) for name, f in feats.items()}


# ----------------------------------------------------------------------------- one slide


def _coords_for(row: Mapping[str, Any], path: str, tiling_kwargs: Mapping[str, Any], coords_fp: Mapping[str, Any], backend: str):
    """Reuse the store's coords when their fingerprint (tiling settings and slide file; for imported
    coords the slide file only) matches, else tile and write them. ``attrs["fingerprint"]`` is the one stored."""
    from monai_fbta.data.tiling import tile_slide

    if store_is_complete(path, required=("coords",)):
        coords, attrs = read_coords(path)
        if _describe_change(*_comparable(attrs.get("fingerprint"), coords_fp)) is None:
            return coords, attrs
    with open_slide(row["image"], backend=backend, mpp=row.get("mpp")) as slide:
        coords, attrs = tile_slide(slide, **tiling_kwargs)
    write_coords(path, coords, attrs, fingerprint=coords_fp)
    return coords, {**attrs, "fingerprint": dict(coords_fp)}


def _comparable(stored: Any, expected: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
    """An imported store (fingerprint with ``"imported"``, see :mod:`monai_fbta.data.importing`) is judged
    by its slide file and encoder only: its coords define the tiling."""
    if isinstance(stored, Mapping) and "imported" in stored:
        keys = [k for k in ("slide", "encoder", "weights") if k in expected]
        return {k: stored.get(k) for k in keys}, {k: expected[k] for k in keys}
    return stored, expected


def _extract_slide(
    row: Mapping[str, Any], path: str, encoder: torch.nn.Module, settings: Mapping[str, Any],
    coords_fp: Mapping[str, Any], progress: bool,
) -> tuple[int, str]:
    """Tile (unless its coords are reusable)/read/encode one slide and store its features.

    Returns N and a note (which patches were dropped, with ``skip_bad_patches``)."""
    from tqdm.auto import tqdm

    coords, attrs = _coords_for(row, path, settings["tiling_kwargs"], coords_fp, settings["backend"])
    fingerprints = (attrs["fingerprint"], {**attrs["fingerprint"], **settings["encoder_fp"]})
    device: torch.device = settings["device"]
    batches = PatchBatches(
        os.fspath(row["image"]), coords, int(attrs["patch_level"]), int(attrs["patch_size_level"]),
        int(attrs["patch_size"]), settings["batch_size"], settings["backend"], row.get("mpp"), settings["skip_bad_patches"],
    )
    loader = patch_loader(batches, settings["num_workers"], device)
    feats: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    with tqdm(total=len(coords), desc=slide_id_of(row), unit="patch", leave=False, disable=not progress) as bar:
        for i, batch in enumerate(loader):
            if isinstance(batch, dict):
                if "error" in batch:
                    raise SlideReadError(row["image"], f"reading patches failed: {batch['error']}")
                bad += [(i * settings["batch_size"] + int(j), msg) for j, msg in batch["bad"]]
                batch = batch["x"]
            feats.append(encode_batch(encoder, batch, device, settings["amp_dtype"], settings["channels_last"]))
            bar.update(len(batch))
    features = torch.cat(feats).numpy()
    note = ""
    if bad:
        if len(bad) == len(coords):
            raise SlideReadError(row["image"], f"no patch could be read; first error: {bad[0][1]}")
        dropped = np.array([j for j, _ in bad])
        note = f"dropped {len(bad)} of {len(coords)} patches that could not be read (skip_bad_patches); first: {bad[0][1]}"
        print(f"slide {slide_id_of(row)}: {note}", file=sys.stderr, flush=True)
        fingerprints = tuple({**fp, "dropped_patches": len(bad)} for fp in fingerprints)
        keep = np.setdiff1d(np.arange(len(coords)), dropped)
        write_coords(path, coords[keep], {**attrs, "num_patches": len(keep), "dropped_coords": coords[dropped[:1000]].tolist()},
                     fingerprint=fingerprints[0])
        coords, features = coords[keep], features[keep]
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise SlideError(row["image"], f"the encoder produced NaN/inf features for {int(bad.sum())} of {len(bad)} "
                         f"patches (first at level-0 {tuple(int(v) for v in coords[np.argmax(bad)])}); nothing stored")
    add_arrays(path, {"features": features}, {"feature_dim": int(features.shape[1])}, fingerprints[1],
               feature_dtype=settings["dtype"])
    return len(coords), note


def _stale_reason(path: str, coords_fp: Mapping[str, Any], features_fp: Mapping[str, Any], allow_dropped: bool) -> str | None:
    """``None`` when the store at ``path`` can be reused as is; else why it is (re)computed (``""``: no store yet).

    A store whose unreadable patches were dropped is reused only when ``allow_dropped`` (``skip_bad_patches``)."""
    if not os.path.exists(path):
        return ""
    if not store_is_complete(path):
        return "the cached store was incomplete"
    for name, expected in (("coords", coords_fp), ("features", features_fp)):
        stored = read_attrs(path, name).get("fingerprint")
        if allow_dropped and isinstance(stored, dict):
            stored.pop("dropped_patches", None)
        why = _describe_change(*_comparable(stored, expected))
        if why:
            return why
    return None


# ----------------------------------------------------------------------------- public entry


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _normalise_rows(rows: Iterable[Mapping[str, Any] | str | os.PathLike]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        row = dict(row) if isinstance(row, Mapping) else {"image": os.fspath(row)}
        if "image" not in row:
            raise ValueError(f"datalist row has no 'image' (slide path): {row}")
        row["slide_id"] = slide_id_of(row)
        out.append(row)
    counts = Counter(safe_name(r["slide_id"]) for r in out)
    dupes = sorted({r["slide_id"] for r in out if counts[safe_name(r["slide_id"])] > 1})
    if dupes:
        raise ValueError(f"duplicate slide ids in the datalist (stores would collide): {dupes}")
    return out


def extract_features(
    datalist_rows: Iterable[Mapping[str, Any] | str | os.PathLike],
    out_dir: str | os.PathLike,
    encoder: torch.nn.Module | str,
    tiling_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: Any = np.float16,
    amp: bool = True,
    channels_last: bool = True,
    skip_errors: bool = True,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    backend: str = "auto",
    encoder_kwargs: Mapping[str, Any] | None = None,
    write_report: bool = True,
    skip_bad_patches: bool = False,
) -> ExtractionReport:
    """Extract and store frozen features of every slide (see the module docstring).

    Args:
        datalist_rows: dicts with ``"image"`` (slide path) and optional ``"slide_id"``, ``"mpp"``
            (override), or plain paths.
        out_dir: folder of the per-slide ``.h5`` stores (created).
        encoder: a frozen ``nn.Module`` (``[B, 3, H, W]`` float in ``[0, 1]`` -> ``[B, D]``) or a name
            for :func:`monai_fbta.networks.registry.build_encoder` (with ``encoder_kwargs``).
        tiling_kwargs: passed to :func:`monai_fbta.data.tiling.tile_slide` (``patch_size``,
            ``target_mpp``, ``tissue_threshold``, ...); part of the fingerprint.
        batch_size: patches per forward pass; num_workers: DataLoader reader processes.
        device: default CUDA when available, else CPU.
        dtype: stored feature dtype (fp16).
        amp, amp_dtype: autocast (see :func:`~monai_fbta.networks.encode.resolve_amp_dtype`); channels_last: memory format.
        skip_errors: record a failing slide (any error, e.g. :class:`SlideError`) in the report and go on (``False``: raise).
        progress: tqdm bars (slides, and patches of the current slide) on rank 0.
        write_report: print the summary table and write ``extraction_report.csv`` (rank 0).
        skip_bad_patches: a patch that cannot be read (e.g. a corrupt JPEG tile) is dropped from the
            slide's bag, and the report's ``note`` says how many and where (``False``: the slide is an error).

    Returns:
        :class:`ExtractionReport` with every slide of every rank.
    """
    rows = _normalise_rows(datalist_rows)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(encoder, str):
        from monai_fbta.networks.registry import build_encoder

        encoder = build_encoder(encoder, **dict(encoder_kwargs or {}))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiling_kwargs = dict(tiling_kwargs or {})
    tiling_fp = _tiling_fingerprint(tiling_kwargs)
    settings = {
        "tiling_kwargs": tiling_kwargs,
        "tiling_fp": tiling_fp,
        "encoder_fp": {**encoder_fingerprint(encoder), "dtype": np.dtype(dtype).name},
        "device": dev,
        "amp_dtype": resolve_amp_dtype(dev, amp, amp_dtype),
        "channels_last": channels_last,
        "batch_size": int(batch_size),
        "num_workers": int(num_workers),
        "dtype": dtype,
        "backend": backend,
        "skip_bad_patches": bool(skip_bad_patches),
    }
    _refuse_foreign_files(out_dir, rows)
    encoder = prepare_encoder(encoder, dev, channels_last)
    rank, world = _dist_info()
    mine = rows[rank::world]
    show = progress and rank == 0

    from tqdm.auto import tqdm

    results: list[SlideResult] = []
    for row in tqdm(mine, desc="slides", unit="slide", disable=not show):
        path = store_path(out_dir, row["slide_id"])
        remove_stale_temps(path)
        start = time.perf_counter()
        try:
            coords_fp = {**tiling_fp, "slide": slide_fingerprint(row["image"], row.get("mpp"))}
            why = _stale_reason(path, coords_fp, {**coords_fp, **settings["encoder_fp"]}, settings["skip_bad_patches"])
            if why is None:
                n = int(read_coords(path)[0].shape[0])
                results.append(SlideResult(row["slide_id"], "skipped", n, time.perf_counter() - start))
                continue
            if why:
                print(f"slide {row['slide_id']}: recomputing its cached features: {why}", file=sys.stderr, flush=True)
            n, dropped = _extract_slide(row, path, encoder, settings, coords_fp, show)
            note = "; ".join(x for x in (why, dropped) if x)
            results.append(SlideResult(row["slide_id"], "done", n, time.perf_counter() - start, note=note))
        except Exception as e:  # one bad slide must not stop a long run: recorded in the report, unless fail-fast
            if not skip_errors:
                raise
            message = str(e) if isinstance(e, SlideError) else f"{row['image']}: {type(e).__name__}: {e}"
            print(f"slide {row['slide_id']} skipped: {message}", file=sys.stderr, flush=True)
            results.append(SlideResult(row["slide_id"], "error", 0, time.perf_counter() - start, message))

    results = _gather(results, rows, world)
    report = ExtractionReport(results)
    if write_report and rank == 0:
        report.csv_path = os.path.join(out_dir, REPORT_NAME)
        _write_csv_atomic(report.csv_path, results)
        print(report.table(), flush=True)
    return report


def _refuse_foreign_files(out_dir: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Before any work: raise :class:`StoreError` naming every store path that holds a file we did not write."""
    problems = []
    for row in rows:
        try:
            check_ours(store_path(out_dir, row["slide_id"]))
        except StoreError as e:
            problems.append(str(e))
    if problems:
        raise StoreError(out_dir, f"{len(problems)} file(s) in the feature cache were not written by monai_fbta, "
                         "nothing was changed:\n  " + "\n  ".join(problems))


def _gather(results: list[SlideResult], rows: Sequence[Mapping[str, Any]], world: int) -> list[SlideResult]:
    """Every rank's results, in datalist order."""
    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, [asdict(r) for r in results])
        results = [SlideResult(**r) for part in parts for r in part]
    order = {row["slide_id"]: i for i, row in enumerate(rows)}
    return sorted(results, key=lambda r: order[r.slide_id])


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m monai_fbta.data.extraction", description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", required=True, help="slide_id,path,label CSV or MONAI datalist JSON (see load_datalist)")
    p.add_argument("--classes", default=None, help="comma-separated class names when labels are names")
    p.add_argument("--out", required=True, help="output folder of per-slide .h5 stores")
    p.add_argument("--encoder", default="resnet50", help="encoder name for build_encoder (e.g. tiny_cnn)")
    p.add_argument("--weights", default=None, help="local weights file for the encoder")
    p.add_argument("--seed", type=int, default=0, help="seed for a randomly initialised encoder")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--tissue-threshold", type=float, default=0.5)
    p.add_argument("--assume-mpp", type=float, default=None, help="pixel size for slides without one")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop at the first bad slide")
    p.add_argument("--skip-bad-patches", action="store_true", help="drop unreadable patches (corrupt tiles) instead of the slide")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; works under ``torchrun`` (gloo on CPU, nccl on GPU). Exit 1 when a slide failed."""
    args = _parse_args(argv)
    import torch.distributed as dist

    started = False
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and args.device in (None, "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        started = True
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    try:
        from monai_fbta.data.datalist import load_datalist
        from monai_fbta.networks.registry import build_encoder

        torch.manual_seed(args.seed)
        kwargs = {"weights": args.weights} if args.weights else {}
        encoder = build_encoder(args.encoder, **kwargs)
        tiling = {"patch_size": args.patch_size, "target_mpp": args.target_mpp, "tissue_threshold": args.tissue_threshold}
        if args.assume_mpp is not None:
            tiling["assume_mpp"] = args.assume_mpp
        report = extract_features(
            load_datalist(args.datalist, classes=args.classes.split(",") if args.classes else None, check_files=False),
            args.out, encoder, tiling, batch_size=args.batch_size,
            num_workers=args.num_workers, device=device, amp=not args.no_amp,
            channels_last=not args.no_channels_last, skip_errors=not args.strict, progress=not args.no_progress,
            skip_bad_patches=args.skip_bad_patches,
        )
        if started:  # success path only: a rank that raised must not wait here for ranks still in a collective
            # gloo's worker threads drop the last collective's tensors just after wait() returns; a rank that
            # exited at once could reach interpreter shutdown while a worker still needed the GIL for that,
            # and abort ("terminate called without an active exception", SIGABRT) after a complete run.
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
