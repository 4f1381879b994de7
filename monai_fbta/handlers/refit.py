"""Refit the translator f_T on the training slides' patches encoded by the trained extractor (a deviation).

In the method f_T learns from ``L_dist`` on each step's pseudo-bag (C·M patches of one slide) while f_TFE moves.
On our benchmark it did not reproduce the trained features (R^2 below 0 on every fold; docs/method.md, "Where the
gain is lost"), so translation-based inference did not carry what f_TFE learned. :class:`TranslatorRefit` fits f_T
to f*_TFE on many patches of every training slide at chosen epochs, and from the first refit on the translated
view no longer trains f_T through the classification loss, so the head learns to read the refitted translation.
:func:`translator_from_run` does the same once for a finished FBTA run, for a second stage that trains a head on the
refitted translation alone (``configs/translated_head.json``). Inference is unchanged: ``f*_MIL(f_T(F^FB))``, no
patch is read or encoded again.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from monai_fbta._io import file_sha256
from monai_fbta.engines.losses import FBTALoss
from monai_fbta.handlers.log_file import LogFile
from monai_fbta.networks.translator import FeatureTranslator

__all__ = ["TRANSLATED_HEAD_KEYS", "TranslatorRefit", "checkpoint_sha256", "fit_translator", "r_squared",
           "training_patch_pairs", "translator_from_run"]

logger = logging.getLogger("fbta.train")


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - SSE / SST`` of ``pred`` against ``target`` (both ``[..., D]``, one row per patch; SST about the target's
    per-feature mean over all patches), in float64."""
    if pred.shape != target.shape:
        raise ValueError(f"r_squared: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.double().reshape(-1, pred.shape[-1]), target.double().reshape(-1, target.shape[-1])
    sst = (target - target.mean(0)).pow(2).sum()
    return float(1 - (pred - target).pow(2).sum() / sst.clamp_min(1e-12))


def fit_translator(
    translator: nn.Module, frozen: torch.Tensor, target: torch.Tensor, epochs: int = 30, lr: float = 1e-3,
    batch_size: int = 512, weight_decay: float = 1e-4, seed: int = 0,
) -> dict[str, float]:
    """Fit ``translator`` (``forward(x, return_heads=True) -> (mean, heads [K, ...])``) in place so that each head
    maps ``frozen [M, D]`` to ``target [M, D']``: ``L_dist`` (:meth:`FBTALoss.distillation`) with AdamW over
    shuffled mini-batches. Returns ``{"dist_before", "dist_after", "r2"}`` (R^2 of the mean head on the fitted
    patches). The translator's training mode is restored and its gradients are left ``None``."""
    if frozen.ndim != 2 or frozen.shape[0] != target.shape[0] or not len(frozen):
        raise ValueError(f"fit_translator: expected frozen [M, D] and target [M, D'] with M > 0, "
                         f"got {list(frozen.shape)} and {list(target.shape)}")
    param = next(translator.parameters())
    x, y = frozen.to(param.device, torch.float32), target.to(param.device, torch.float32)
    was_training = translator.training

    def dist() -> tuple[float, float]:
        translator.eval()
        with torch.no_grad():
            pred = torch.cat([translator(part) for part in x.split(8192)])
        return float((pred - y).pow(2).mean()), r_squared(pred, y)

    before, _ = dist()
    opt = torch.optim.AdamW(translator.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    translator.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            idx = idx.to(x.device)
            opt.zero_grad(set_to_none=True)
            _, heads = translator(x[idx], return_heads=True)
            FBTALoss.distillation(heads, y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)  # no stale gradient for the training run's optimiser to step on
    after, r2 = dist()
    translator.train(was_training)
    return {"dist_before": before, "dist_after": after, "r2": r2}


def training_patch_pairs(
    rows: Sequence[Mapping[str, Any]], cache_dir: str | os.PathLike, encoder: nn.Module, device: torch.device | str,
    patches_per_slide: int | None = 512, seed: int = 0, batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F^FB of the drawn patches [M, D], encoder(same patches) [M, D'])`` over the slides ``rows``: up to
    ``patches_per_slide`` patches per slide (``None``: all), drawn by ``seed`` and the slide id, their frozen features
    from the slide's store in ``cache_dir`` and the patches read from the slide file."""
    import zlib

    from monai_fbta.data.extraction import encode_slide_patches
    from monai_fbta.data.store import read_array, read_coords, slide_id_of, store_path

    frozen, trained = [], []
    for row in rows:
        path = store_path(cache_dir, slide_id_of(row))
        coords, attrs = read_coords(path)
        feats = read_array(path, "features")
        idx = np.arange(len(coords))
        if patches_per_slide is not None and len(idx) > patches_per_slide:
            rng = np.random.default_rng([seed, zlib.crc32(slide_id_of(row).encode())])
            idx = np.sort(rng.choice(len(idx), patches_per_slide, replace=False))
        frozen.append(torch.as_tensor(np.asarray(feats[idx]), dtype=torch.float32))
        trained.append(encode_slide_patches({"t": encoder}, row, coords[idx], attrs, batch_size, torch.device(device))["t"])
    return torch.cat(frozen), torch.cat(trained)


class TranslatorRefit:
    """At the end of epochs ``start_epoch``, ``start_epoch + every``, ...: encode up to ``patches_per_slide``
    patches of each training slide with the EMA extractor f*_TFE, refit f_T to them from the cached frozen
    features F^FB of the same patches (:func:`fit_translator`), and from then on stop the translated view's
    classification gradient into f_T (``trainer.translator_cls_grad = False``; ``L_dist`` still trains it).
    ``attach(trainer)`` to an :class:`~monai_fbta.engines.FBTATrainer` with a translator and an EMA extractor;
    attach it before the validation and checkpoint handlers so both see the refitted f_T.

    Each refit reads ``len(rows) x patches_per_slide`` patches (an extraction pass over a sample of the training
    slides) and is logged with its ``L_dist`` before and after and its R^2; ``engine.state.translator_refit``
    keeps ``{epoch: those figures}``. The patches drawn are fixed by ``seed`` and the slide id. Under
    torch.distributed every rank fits the same, then rank 0's weights are broadcast.

    Args:
        rows: the training slides (datalist rows with ``image`` and ``slide_id``).
        cache_dir: their feature stores (coords and ``features``).
        start_epoch: the first epoch after which to refit (>= 1).
        every: refit again every this many epochs (0: only once).
        patches_per_slide: patches drawn per slide (``None``: all).
        epochs / lr / batch_size / weight_decay: :func:`fit_translator`'s settings.
        seed: seeds the patch draw and the fit's shuffling.
        batch_size_read: patches read and encoded per batch.
    """

    def __init__(
        self, rows: Sequence[Mapping[str, Any]], cache_dir: str, start_epoch: int, every: int = 0,
        patches_per_slide: int | None = 512, epochs: int = 30, lr: float = 1e-3, batch_size: int = 512,
        weight_decay: float = 1e-4, seed: int = 0, batch_size_read: int = 256,
    ) -> None:
        if start_epoch < 1 or every < 0 or (patches_per_slide is not None and patches_per_slide < 1):
            raise ValueError(f"TranslatorRefit: start_epoch must be >= 1, every >= 0 and patches_per_slide >= 1 or "
                             f"None; got {start_epoch}, {every}, {patches_per_slide}")
        if not rows:
            raise ValueError("TranslatorRefit: no training slides to refit the translator on")
        self.rows, self.cache_dir = list(rows), str(cache_dir)
        self.start_epoch, self.every, self.patches_per_slide = int(start_epoch), int(every), patches_per_slide
        self.fit_kwargs = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay}
        self.seed, self.batch_size_read = int(seed), int(batch_size_read)

    def due(self, epoch: int) -> bool:
        """Whether to refit after ``epoch``."""
        if epoch < self.start_epoch:
            return False
        return epoch == self.start_epoch or (self.every > 0 and (epoch - self.start_epoch) % self.every == 0)

    def patch_pairs(self, encoder: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F^FB [M, D], f*_TFE [M, D'])`` of the drawn patches (:func:`training_patch_pairs`)."""
        return training_patch_pairs(self.rows, self.cache_dir, encoder, device, self.patches_per_slide, self.seed,
                                    self.batch_size_read)

    def started(self, engine: Engine) -> None:
        """On (re)start: a run resumed after its first refit keeps the translated view's gradient off f_T."""
        if (engine.state.epoch or 0) >= self.start_epoch:
            engine.translator_cls_grad = False

    def epoch_completed(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if not self.due(epoch):
            return
        teacher = getattr(engine, "teacher_encoder", None)
        translator = getattr(engine, "translator", None)
        if teacher is None or translator is None:
            raise RuntimeError("TranslatorRefit: the trainer has no EMA extractor or no translator (a vanilla run?)")
        translator = getattr(translator, "module", translator)  # DistributedDataParallel: fit the module itself
        device = torch.device(engine.state.device)
        frozen, trained = self.patch_pairs(teacher.ema_model, device)
        figures = fit_translator(translator, frozen, trained, seed=self.seed + epoch, **self.fit_kwargs)
        _broadcast_from_rank0(translator)
        engine.translator_cls_grad = False
        if not hasattr(engine.state, "translator_refit"):
            engine.state.translator_refit = {}
        engine.state.translator_refit[epoch] = {**figures, "patches": len(frozen)}
        logger.info("epoch %d: refitted f_T on %d patches of %d training slides: L_dist %.4f -> %.4f, R^2 %.3f",
                    epoch, len(frozen), len(self.rows), figures["dist_before"], figures["dist_after"], figures["r2"])

    def attach(self, engine: Engine) -> None:
        max_epochs = getattr(engine.state, "max_epochs", None)
        if max_epochs is not None and self.start_epoch > max_epochs:
            raise ValueError(f"TranslatorRefit: start_epoch {self.start_epoch} is after the last epoch ({max_epochs}): "
                             "the translator would never be refitted")
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank hold rank 0's parameters (no-op without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for p in module.parameters():
            torch.distributed.broadcast(p.data, src=0)


# run-identity keys in which a translated-head run differs from the FBTA run it reads (the frozen extractor's
# weights are compared by content: each run keeps its own copy of the file)
TRANSLATED_HEAD_KEYS = ("views", "frozen_bag", "translated_bag", "encoder_weights", "translator_source", "training")


def checkpoint_sha256(path: str | os.PathLike | None) -> str | None:
    """The first 16 hex digits of the file's sha256 (``None`` for ``None``): which FBTA checkpoint a translated-head
    run read, kept in its run identity so that it resumes only on the same one."""
    return None if path is None else file_sha256(path)


def translator_from_run(
    checkpoint: str | os.PathLike, encoder: nn.Module, frozen_encoder: nn.Module,
    rows: Sequence[Mapping[str, Any]], cache_dir: str | os.PathLike, identity: Mapping[str, Any],
    patches_per_slide: int | None = 512, seed: int = 0, device: torch.device | str = "cpu",
    log_file: LogFile | None = None, **fit_kwargs: Any,
) -> FeatureTranslator:
    """The translated-head stage's f_T (a deviation, docs/method.md): the FBTA run's translator refitted to its
    trained extractor, then frozen.

    Builds a :class:`~monai_fbta.networks.FeatureTranslator` of the checkpoint's shape (D, K, hidden) with f_T's
    weights from the FBTA run's training ``checkpoint`` (its ``last.pt``), loads its EMA extractor f*_TFE into a
    copy of ``encoder`` (the bundle's trainable-extractor definition), refits f_T to f*_TFE on up to
    ``patches_per_slide`` patches of each training slide ``rows`` (:func:`training_patch_pairs`,
    :func:`fit_translator` with ``fit_kwargs``) and turns its gradients off. The head then trains on
    ``f_T(F^FB)`` alone and inference stays ``f*_MIL(f_T(F^FB))``. The bundle overlay makes it the
    ``translator_def``, so no other definition can take its place unnoticed. ``log_file`` (the training run's
    :class:`~monai_fbta.handlers.LogFile`) is opened first, so the run's ``train.log`` holds the refit's lines too.

    Refuses (:class:`~monai_fbta.handlers.checkpoint.RunMismatchError`) a checkpoint of another run: its run
    identity must equal ``identity`` except in :data:`TRANSLATED_HEAD_KEYS`, the frozen extractor beside it must hold
    the weights of ``frozen_encoder``, and it must hold a trained extractor (not a vanilla run).
    """
    from monai_fbta.handlers.checkpoint import RunMismatchError, _load, check_identity
    from monai_fbta.networks.encoder import same_weights

    if log_file is not None:
        log_file.open()  # the refit runs while the config is resolved, before the engine attaches its handlers
    what = f"--fbta_checkpoint {os.fspath(checkpoint)}"
    blob = _load(checkpoint)
    saved = blob.get("run_identity")
    check_identity(None if saved is None else {k: v for k, v in saved.items() if k not in TRANSLATED_HEAD_KEYS},
                   {k: v for k, v in identity.items() if k not in TRANSLATED_HEAD_KEYS}, what,
                   "give the last.pt of the FBTA run trained on these slides, classes, fold and settings")
    missing = [k for k in ("ema_encoder", "translator") if k not in blob]
    if missing:
        raise RunMismatchError(f"{what} has no {' or '.join(missing)}: it is not an FBTA run (vanilla MIL trains no "
                               "extractor); give the last.pt of a run with the e2e view")
    kept = Path(checkpoint).parent / f"frozen_encoder_{identity.get('encoder_name')}.pt"
    if not kept.is_file():
        raise RunMismatchError(f"{what}: its frozen extractor {kept} is missing, so its features cannot be checked "
                               "against this run's")
    ours = getattr(frozen_encoder, "backbone", frozen_encoder).state_dict()
    if not same_weights(ours, torch.load(kept, map_location="cpu", weights_only=True)):
        raise RunMismatchError(f"{what}: its frozen extractor {kept} differs from this run's --encoder_weights, so "
                               "the cached features differ; give the FBTA run's frozen extractor as --encoder_weights")
    device = torch.device(device)
    translator = FeatureTranslator.from_state_dict(blob["translator"]).to(device)
    trained = copy.deepcopy(encoder)
    trained.load_state_dict(blob["ema_encoder"])
    trained.to(device).eval()
    state = blob.get("trainer", {})  # ignite's state_dict: iteration (or epoch), epoch_length, max_epochs
    epoch = state.get("epoch") or state.get("iteration", 0) // max(1, state.get("epoch_length") or 1)
    logger.info("refitting f_T to the trained extractor of %s (epoch %s of %s) on up to %s patches of each of %d "
                "training slides", checkpoint, epoch, state.get("max_epochs", "?"),
                patches_per_slide or "all", len(rows))
    if isinstance(state.get("max_epochs"), int) and epoch < state["max_epochs"]:
        logger.warning("the FBTA run of %s stopped at epoch %d of %d: its extractor is not fully trained (resume that "
                       "run first unless this is what you want)", checkpoint, epoch, state["max_epochs"])
    frozen, target = training_patch_pairs(rows, cache_dir, trained, device, patches_per_slide, seed)
    figures = fit_translator(translator, frozen, target, seed=seed, **fit_kwargs)
    logger.info("refitted f_T on %d patches: L_dist %.4f -> %.4f, R^2 %.3f; f_T is now fixed",
                len(frozen), figures["dist_before"], figures["dist_after"], figures["r2"])
    _broadcast_from_rank0(translator)  # under torchrun every rank holds rank 0's fit (GPU fits may differ in rounding)
    translator.requires_grad_(False)
    return translator
