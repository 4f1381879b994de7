"""Data preparation used by the bundle: find (or make) the slides, preprocess them, split them.

The three steps are plain functions a script can call::

    rows = find_or_make_dataset("/slides", datalist="/slides/labels.csv", classes=["a", "b"])
    rows = preprocess(rows, cache_dir="cache", encoder=frozen_encoder, tiling={"patch_size": 256})
    parts = split_rows(rows, "models/splits.json", fold=0)   # {"train": rows, "val": rows, "test": rows}

:class:`Preprocessor` is the three as one component the bundle names by ``_target_``; its work happens in
:meth:`Preprocessor.run`, an explicit step of the bundle's ``preprocessing`` / ``training`` / ``evaluating``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from functools import cached_property
from typing import Any

import ignite.distributed as idist
import torch

from monai_fbta.data.datalist import (
    DatalistError,
    class_problems,
    datalist_digest,
    load_datalist,
    load_splits,
    make_splits,
    save_splits,
    select_fold,
)

__all__ = ["Preprocessor", "SLIDE_EXTENSIONS", "feature_stats", "default_class_names", "frozen_encoder",
           "model_frozen_encoder", "find_or_make_dataset", "preprocess", "split_rows"]

logger = logging.getLogger("fbta.prepare")

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def _slides_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS)


def frozen_encoder(name: str, weights: str | os.PathLike | None, ckpt_dir: str | os.PathLike) -> torch.nn.Module:
    """The frozen extractor f_FFE, with its weights kept in ``ckpt_dir`` (the bundle's ``models/``).

    The backbone's weights live in ``ckpt_dir/frozen_encoder_<name>.pt``, so later runs (resume, evaluation,
    inference) and a copy of the bundle on another machine find them beside ``model.pt``. The file is written
    once (atomically): from ``weights`` (a local file or a pretrained tag), or from a random initialisation
    when ``weights`` is ``None`` (demos and tests: nothing can be downloaded offline). When it exists it is
    used; given ``weights`` that differ from it are refused (``ValueError``): that folder belongs to another run.
    Returns ``copy_frozen(encoder)``; its ``weights_file`` attribute names the file in ``ckpt_dir``.
    """
    from monai_fbta._io import atomic_open
    from monai_fbta.networks.encoder import PatchEncoder, copy_frozen, same_weights

    saved = Path(ckpt_dir) / f"frozen_encoder_{name}.pt"
    same_file = weights is not None and saved.is_file() and Path(weights).resolve() == saved.resolve()
    if saved.is_file() and weights is not None and not same_file:
        encoder = PatchEncoder(name, weights=weights)
        kept = PatchEncoder(name, weights=saved)
        if not same_weights(encoder.backbone.state_dict(), kept.backbone.state_dict()):
            raise ValueError(f"--encoder_weights {os.fspath(weights)} differs from {saved}, the frozen encoder of the run "
                             "in this --ckpt_dir: use a new --ckpt_dir for other encoder weights")
    elif not saved.is_file():
        encoder = PatchEncoder(name, weights=weights)
        if weights is None:
            logger.warning("no encoder weights given: %s starts from random weights, saved to %s", name, saved)
        with atomic_open(saved, "wb") as f:
            torch.save(encoder.backbone.state_dict(), f)
    encoder = copy_frozen(PatchEncoder(name, weights=saved))
    encoder.weights_file = os.fspath(saved)
    return encoder


def model_frozen_encoder(metadata: Mapping[str, Any], ckpt_dir: str | os.PathLike) -> torch.nn.Module:
    """The frozen extractor of a trained ``model.pt`` (its ``metadata``), from the file beside it in ``ckpt_dir``.

    Refused (:class:`~monai_fbta.handlers.checkpoint.RunMismatchError`) when its weights are not the ones the model
    was trained on (``metadata["encoder_digest"]``; models saved before it existed are not checked): a
    ``frozen_encoder_<name>.pt`` of another run gives other features and wrong predictions without any error.
    """
    from monai_fbta.data.extraction import encoder_fingerprint
    from monai_fbta.handlers.checkpoint import RunMismatchError

    encoder = frozen_encoder(metadata["encoder_name"], metadata["encoder_weights"], ckpt_dir)
    expected = metadata.get("encoder_digest")
    if expected is None:
        return encoder
    found = encoder_fingerprint(encoder)["weights"]
    if found != expected:
        raise RunMismatchError(f"{encoder.weights_file} holds other weights (digest {found}) than the frozen encoder "
                               f"this model was trained on ({expected}): its features, and so the predictions, would "
                               "be wrong. Put the training run's own frozen_encoder file beside model.pt")
    return encoder


def default_class_names(
    dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None, num_classes: int
) -> list[str] | None:
    """Class names when the user gave none: those of a synthetic dataset (made now or earlier), else None.

    ``None`` means the datalist's labels must be integer class indices (names are then ``class_<i>``).
    """
    if datalist:
        return None
    folder = Path(dataset_dir)
    marker = folder / "datalist.json"
    if marker.is_file():
        import json

        with open(marker) as f:
            names = json.load(f).get("class_names")
        return list(names) if names else None
    if not _slides_in(folder) and not (folder / "labels.csv").is_file():
        from monai_fbta.synthetic import CLASS_NAMES

        return list(CLASS_NAMES[:num_classes])
    return None


def find_or_make_dataset(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    synthetic: Mapping[str, Any] | None = None,
    check_files: bool = True,
    check_slides: bool = False,
) -> list[dict[str, Any]]:
    """Rows ``{"slide_id", "image", "label", "case_id"}`` of the dataset to train on.

    Validated before any long work (:func:`~monai_fbta.data.datalist.load_datalist`; ``check_slides``
    also opens each slide's header), so every problem of the table is reported at once.

    * ``datalist`` given (CSV ``slide_id,path,label[,case_id]`` or MONAI datalist JSON): load it,
      relative paths against ``dataset_dir``.
    * else ``dataset_dir/labels.csv`` exists: load it (with a warning naming the differences when the synthetic
      generator wrote it with other settings than ``synthetic``: those slides are used as they are).
    * else ``dataset_dir`` holds no slide: generate the synthetic demo dataset there
      (:func:`monai_fbta.synthetic.generate_dataset` with ``synthetic`` as arguments).
    * else (slides but no labels): a :class:`DatalistError` saying what to pass.
    """
    folder = Path(dataset_dir)
    if datalist:
        return load_datalist(datalist, classes=classes, base_dir=folder, check_files=check_files, check_slides=check_slides)
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        slides = _slides_in(folder)
        if slides:
            raise DatalistError(
                str(folder),
                [f"found {len(slides)} slides but no labels.csv: pass --datalist /path/to/labels.csv "
                 "(columns slide_id,path,label[,case_id]) or a MONAI datalist JSON"],
            )
        from monai_fbta.synthetic import generate_dataset

        settings = dict(synthetic or {})
        logger.info("no slides in %s: generating the synthetic demo dataset %s", folder, settings)
        generate_dataset(folder, **settings)
    elif synthetic:
        from monai_fbta.synthetic import generated_settings_differences

        differences = generated_settings_differences(folder, **synthetic)
        if differences:
            logger.warning("the synthetic slides in %s were generated with other settings than --synthetic (%s): "
                           "training on them as they are; delete the folder to generate the asked ones",
                           folder, "; ".join(differences))
    return load_datalist(labels_csv, classes=classes, base_dir=folder, check_files=check_files, check_slides=check_slides)


def preprocess(
    rows: Sequence[Mapping[str, Any]],
    cache_dir: str | os.PathLike,
    encoder: torch.nn.Module,
    tiling: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    skip_errors: bool = True,
    min_slides: int = 1,
    num_clusters: int | None = None,
    cluster_seed: int = 0,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """Tile, extract frozen features and (with ``num_clusters``) cluster every slide into ``cache_dir``.

    Everything is cached and resumable; returns the rows that worked.

    Slides that fail (corrupt, no tissue, ...) are listed in ``cache_dir/extraction_report.csv`` and
    left out, loudly; with ``skip_errors=False`` the first failure raises, with ``strict`` any failure
    raises once every slide was tried. Fewer than ``min_slides`` usable slides is an error.
    """
    from monai_fbta.data.extraction import extract_features
    from monai_fbta.data.store import slide_id_of

    report = extract_features(
        rows, cache_dir, encoder, tiling_kwargs=dict(tiling or {}), batch_size=batch_size,
        num_workers=num_workers, device=device, skip_errors=skip_errors,
    )
    failed = {r.slide_id for r in report.failed}
    kept = [dict(r) for r in rows if slide_id_of(r) not in failed]
    if failed:
        logger.warning("%d slide(s) skipped, see %s: %s", len(failed), os.path.join(cache_dir, "extraction_report.csv"),
                       ", ".join(sorted(failed)))
    if len(kept) < min_slides or (strict and failed):
        why = f"only {len(kept)} usable slide(s), need {min_slides}" if len(kept) < min_slides else "strict mode"
        raise RuntimeError(f"{why}: {len(failed)} slide(s) failed in preprocessing into {cache_dir} "
                           f"(see {os.path.join(cache_dir, 'extraction_report.csv')})")
    if num_clusters:
        from monai_fbta.data.clustering import cluster_store
        from monai_fbta.data.store import store_path

        for row in kept:
            cluster_store(store_path(cache_dir, slide_id_of(row)), num_clusters, cluster_seed)
    return kept


def feature_stats(rows: Sequence[Mapping[str, Any]], cache_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std ``[D]`` over every patch of ``rows`` (the training slides), from their stores.

    Used to standardise the MIL head's input (:meth:`monai_fbta.networks.MILHead.set_feature_stats`).
    """
    from monai_fbta.data.store import read_array, slide_id_of, store_path

    total, total_sq, count = None, None, 0
    for row in rows:
        feats = torch.as_tensor(read_array(store_path(cache_dir, slide_id_of(row)), "features")).double()
        total = feats.sum(0) if total is None else total + feats.sum(0)
        total_sq = (feats**2).sum(0) if total_sq is None else total_sq + (feats**2).sum(0)
        count += feats.shape[0]
    if not count:
        raise ValueError(f"no features to compute statistics from ({len(rows)} slides in {cache_dir})")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def split_rows(
    rows: Sequence[Mapping[str, Any]],
    splits_file: str | os.PathLike,
    fold: int = 0,
    num_folds: int = 5,
    seed: int = 0,
    val_fraction: float | None = 0.2,
    test_fraction: float | None = None,
    usable: Collection[str] | None = None,
    trained: Sequence[str | os.PathLike] = (),
) -> dict[str, list[dict[str, Any]]]:
    """``{"train", "val", "test"}`` rows of ``fold``; the splits are made once and saved to ``splits_file``.

    The split is made from all of ``rows`` (the datalist), so a slide that fails in preprocessing, or is fixed
    later, never moves other slides between parts; the slides not in ``usable`` (those without features; None:
    all usable) are then left out of their part, with a warning naming them. The file records the rows'
    :func:`~monai_fbta.data.datalist.datalist_digest` and the split settings; it is reused only for the same rows
    and settings, and remade (with a warning) otherwise, unless one of the files ``trained`` exists (a run trained
    on the file's split: its ``last.pt``, ``model.pt``), in which case it is refused: a new split could put that
    run's training slides in the test set. A splits file without them (made by hand or by an older version) is
    used as given when it names exactly these slides, and refused, not replaced, when it does not.
    """
    ids = sorted(str(r["slide_id"]) for r in rows)
    made_with = {"datalist_sha256": datalist_digest(rows), "num_folds": num_folds, "seed": seed,
                 "val_fraction": val_fraction, "test_fraction": test_fraction}
    splits = None
    if os.path.isfile(splits_file):
        splits = load_splits(splits_file)
        if "datalist_sha256" not in splits:
            known = sorted({s for f in splits["folds"][:1] for part in f.values() for s in part})
            if known != ids:
                raise DatalistError(str(splits_file), [
                    "lists other slides than the datalist and was not written by monai-fbta, so it is not replaced: "
                    "fix it, remove it, or use a new --ckpt_dir"])
            logger.warning("%s: using the given splits as they are", splits_file)
        else:
            changed = " and ".join("datalist" if k == "datalist_sha256" else k
                                   for k, v in made_with.items() if splits.get(k) != v)
            used_by = [os.fspath(p) for p in trained if os.path.isfile(p)]
            if changed and used_by:
                raise DatalistError(str(splits_file), [
                    f"was made for another {changed}, and {used_by[0]} was trained on its split: a new split could "
                    "put that run's training slides in the test set, so it is not remade. Use a new --ckpt_dir for "
                    "this data, or --resume False to start over here (replacing the old run's files)"])
            if changed:
                logger.warning("%s was made for another %s: making new splits", splits_file, changed)
                splits = None
    if splits is None:
        splits = dict(make_splits(rows, num_folds=num_folds, seed=seed, val_fraction=val_fraction,
                                  test_fraction=test_fraction), **made_with)
        save_splits(splits, splits_file)
    parts = select_fold(splits, fold, rows)
    if usable is not None:
        usable = set(usable)
        left_out = {name: [r["slide_id"] for r in part if r["slide_id"] not in usable] for name, part in parts.items()}
        if any(left_out.values()):
            logger.warning("fold %d: %d slide(s) without features are left out of their part (%s); the other slides "
                           "keep theirs", fold, sum(map(len, left_out.values())),
                           "; ".join(f"{name}: {ids}" for name, ids in left_out.items() if ids))
        emptied = [name for name, part in parts.items() if part and len(left_out[name]) == len(part)]
        if emptied:
            raise DatalistError(str(splits_file), [f"fold {fold}: no slide of its {name} part has features (failed in "
                                                   f"preprocessing: {left_out[name]}); see extraction_report.csv"
                                                   for name in emptied])
        parts = {name: [r for r in part if r["slide_id"] in usable] for name, part in parts.items()}
    logger.info("fold %d: %s", fold, {k: len(v) for k, v in parts.items()})
    if not parts.get("val"):
        logger.warning("fold %d has no validation slides (--val_fraction 0): the bundle then chooses model.pt on the "
                       "training slides' own metrics, which flatter it; --val_fraction 0.2 chooses it on held-out "
                       "slides", fold)
    return parts


LEARNED_SLIDES_FILE = "learned_slides.json"
"""Beside ``splits.json``: the slide files a run's checkpoints learned from (:meth:`Preprocessor.run`)."""


class Preprocessor:
    """The bundle's data preparation: find (or make) the dataset, tile + extract + cluster it, split it.

    Building it does nothing; :attr:`rows` validates the table (cheap, no slide is read); :meth:`run` does the
    (cached, resumable) work of :func:`preprocess` and :func:`split_rows`; :meth:`part` gives a split's rows.

    Args:
        dataset_dir, datalist, class_names, synthetic, check_slides: see :func:`find_or_make_dataset`.
        cache_dir, encoder, tiling, batch_size, num_workers, device, strict, num_clusters, cluster_seed:
            see :func:`preprocess`; ``fail_fast``: stop at the first failing slide (``skip_errors=False``).
        splits_file, fold, num_folds, split_seed, val_fraction: see :func:`split_rows`.
        num_classes: when given, a label outside ``0 .. num_classes - 1`` or a class without slides is an error.
        resume: False when the run starts over in its folder; True protects the split its checkpoints were trained
            on (:func:`split_rows`'s ``trained``).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        cache_dir: str | os.PathLike,
        encoder: torch.nn.Module,
        splits_file: str | os.PathLike,
        datalist: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        check_slides: bool = False,
        tiling: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        fail_fast: bool = False,
        strict: bool = False,
        num_clusters: int | None = None,
        cluster_seed: int = 0,
        fold: int = 0,
        num_folds: int = 5,
        split_seed: int = 0,
        val_fraction: float | None = 0.2,
        num_classes: int | None = None,
        resume: bool = True,
    ) -> None:
        self.dataset_dir, self.datalist, self.class_names = dataset_dir, datalist, class_names
        self.synthetic, self.check_slides = synthetic, check_slides
        self.cache_dir, self.encoder, self.tiling = cache_dir, encoder, tiling
        self.extract_kwargs = {"batch_size": batch_size, "num_workers": num_workers, "device": device,
                               "skip_errors": not fail_fast, "strict": strict, "num_clusters": num_clusters,
                               "cluster_seed": cluster_seed}
        self.splits_file = splits_file
        self.split_kwargs = {"fold": fold, "num_folds": num_folds, "seed": split_seed, "val_fraction": val_fraction}
        self.num_classes, self.resume = num_classes, resume
        self.parts: dict[str, list[dict[str, Any]]] | None = None

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        """The datalist rows (validated; the synthetic demo dataset is generated here when the folder is empty)."""
        rows = find_or_make_dataset(self.dataset_dir, self.datalist, self.class_names, self.synthetic,
                                    check_slides=self.check_slides)
        if self.num_classes is not None:
            problems = class_problems(rows, self.num_classes, self.class_names)
            if problems:
                raise DatalistError(os.fspath(self.datalist or self.dataset_dir), problems)
        return rows

    def run(self) -> Preprocessor:
        """Extract and cluster every slide into ``cache_dir`` (cached), then split the datalist and leave out the
        slides that failed (:func:`split_rows`)."""
        kept = preprocess(self.rows, self.cache_dir, self.encoder, self.tiling, **self.extract_kwargs)
        folder = Path(self.splits_file).parent
        trained = [p for p in (folder / "last.pt", folder / "model.pt") if self.resume and p.is_file()]
        self.parts = split_rows(self.rows, self.splits_file, **self.split_kwargs,
                                usable=[r["slide_id"] for r in kept], trained=trained)
        self._check_learned_slides(folder / LEARNED_SLIDES_FILE, trained)
        print(len(kept), "slides ready in", self.cache_dir, flush=True)
        return self

    def _check_learned_slides(self, record: Path, trained: Sequence[Path]) -> None:
        """Refuse to go on with a run trained on other pixels; else record what its slides are.

        ``record`` (beside ``splits.json``) maps each training and validation slide to its file's fingerprint
        (:func:`~monai_fbta.data.extraction.slide_fingerprint`, as its feature store recorded it). When files of a
        trained run exist (``trained``), a slide whose file changed since is refused: the cache recomputes its
        features, but the checkpoint learned from the old ones. Otherwise (a new run) the record is (re)written.
        """
        from monai_fbta._io import atomic_open
        from monai_fbta.data.store import read_attrs, store_path
        from monai_fbta.handlers.checkpoint import RunMismatchError

        learned = {r["slide_id"]: read_attrs(store_path(self.cache_dir, r["slide_id"]), "coords").get("fingerprint", {})
                   .get("slide") for name in ("train", "val") for r in self.part(name)}
        if trained and record.is_file():
            with open(record) as f:
                saved = json.load(f)
            changed = sorted(s for s, fp in learned.items() if s in saved and saved[s] != fp)
            if changed:
                raise RunMismatchError(
                    f"{trained[0]} was trained on other pixels: the file(s) of {len(changed)} of its training or "
                    f"validation slide(s) changed since ({', '.join(changed[:5])}; their features were recomputed, see "
                    f"extraction_report.csv in {self.cache_dir}). Use a new --ckpt_dir for the new slides, or "
                    "--resume False to start over here")
            learned = {**saved, **learned}
        if idist.get_rank() == 0:  # one writer under torchrun; every rank read the same stores
            with atomic_open(record, "w") as f:
                json.dump(learned, f, indent=1, sort_keys=True)

    def part(self, name: str) -> list[dict[str, Any]]:
        """Rows of split ``name`` (``"train"``, ``"val"`` or ``"test"``); :meth:`run` must have run."""
        if self.parts is None:
            raise RuntimeError("Preprocessor.part: call run() first (the bundle's steps do: '$@prepare.run()')")
        return self.parts[name]

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std ``[D]`` of the training slides (:func:`feature_stats`)."""
        return feature_stats(self.part("train"), self.cache_dir)
