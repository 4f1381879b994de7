"""FBTATrainer: one slide per iteration, the FBTA views, EMA teachers and the t/T curriculum.

Per iteration (batch size 1, the sample dict of :class:`monai_fbta.transforms.chain.FBTADataset`):

* views: ``frozen = F^FB`` (the whole cached bag ``features [1, N, D]``, as in the paper; ``frozen_bag="pseudo"``
  is a deviation that uses ``F^FB[S]``), ``e2e = f_TFE(pb_image)``, ``translated = f_T(F^FB[S])`` (``translated_bag=
  "full"``: ``f_T(F^FB)``); one shared
  MIL head predicts each view (views of equal shape are stacked into one batch ``[V, S, D]``);
* teacher logits ``f*_MIL(F^v)`` and the distillation target ``f*_TFE(pb_image_clean)`` without gradient;
* :class:`~monai_fbta.engines.losses.FBTALoss` with ``engine.state.curriculum`` = t/T;
* ``dataset.set_epoch(epoch - 1)`` at each epoch start when the dataset has it (new pseudo-bags);
* backward, optimiser step every ``accumulation_steps`` slides, then :data:`FBTAEvents.OPTIMIZER_STEP_COMPLETED`
  (the EMA handlers listen to it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Events

from monai_fbta._quiet import quiet_import
from monai_fbta.engines.losses import FBTALoss, validate_views
from monai_fbta.handlers.curriculum import CurriculumWeight
from monai_fbta.handlers.ema import ModelEMA
from monai_fbta.engines.utils import PrepareSlideBatch
from monai_fbta.handlers.events import OPTIMIZER_STEP_ATTR, FBTAEvents
from monai_fbta.networks.encode import autocast, encode_patches, resolve_amp_dtype
from monai_fbta.networks.mil_base import DEFAULT_BAG_CHUNK_SIZE, mil_logits
from monai_fbta.networks.translator import translate_bag

quiet_import("monai.engines")
from monai.engines import Trainer  # noqa: E402
from monai.engines.utils import IterationEvents, default_metric_cmp_fn  # noqa: E402
from monai.engines.workflow import Workflow  # noqa: E402

__all__ = ["FBTATrainer", "e2e_scale", "fbta_param_groups", "mil_logits"]


def e2e_scale(e2e: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean square of the e2e features f_TFE(patches) ``[1, S, D]`` over that of the frozen pseudo-bag F^FB[S]
    ``[1, S, D]`` of the same patches (a detached scalar): 1 at step 0 with frozen BatchNorm, 0.1-1.6 in the runs
    that learned, hundreds where the extractor ran away (docs/method.md, TransMIL section). Watched by
    ``ExtractorDriftWarning``."""
    with torch.no_grad():
        return e2e.float().pow(2).mean() / frozen.float().pow(2).mean().clamp_min(1e-12)


def fbta_param_groups(
    mil_head: nn.Module,
    translator: nn.Module | None = None,
    trainable_encoder: nn.Module | None = None,
    lr_mil: float = 2e-4,
    lr_translator: float = 2e-4,
    lr_encoder: float = 1e-5,
    weight_decay: float = 1e-4,
) -> list[dict]:
    """Optimiser parameter groups with one learning rate per trained module (defaults: docs/method.md)."""
    groups = [{"params": list(mil_head.parameters()), "lr": lr_mil, "weight_decay": weight_decay, "name": "mil_head"}]
    for name, module, lr in (("translator", translator, lr_translator), ("encoder", trainable_encoder, lr_encoder)):
        if module is not None:
            groups.append({"params": list(module.parameters()), "lr": lr, "weight_decay": weight_decay, "name": name})
    return groups


class FBTATrainer(Trainer):
    """MONAI trainer for FBTA and its ablations (``views`` from the loss: ``["frozen"]`` is vanilla MIL).

    Args:
        device: device to train on.
        max_epochs: epochs T (also the curriculum's T unless ``curriculum`` says otherwise).
        train_data_loader: yields one slide per batch (``batch_size=None`` or ``1``, see :class:`PrepareSlideBatch`).
        mil_head: the shared MIL head f_MIL, ``forward(x [B, N, D]) -> [B, C]``.
        optimizer: optimiser over the trained modules (see :func:`fbta_param_groups`).
        loss_function: :class:`FBTALoss`; its ``views`` are the views used.
        views: optional; must equal ``loss_function.views`` when given.
        translator: f_T (``forward(x, return_heads=True) -> (mean, heads [K, ...])``); needed for the
            ``translated`` view or ``L_dist``.
        trainable_encoder: f_TFE, ``[S, 3, H, W] -> [S, D]``; needed for the ``e2e`` view or ``L_dist``.
        teacher_head / teacher_encoder: :class:`ModelEMA` handlers; created here (and attached) when None. Every
            run has a head teacher, vanilla MIL too (its loss ignores it), so both are evaluated the same way.
        ema_momentum / ema_momentum_warmup / ema_warmup_steps: settings of the EMA handlers created here.
        curriculum: :class:`CurriculumWeight` (default ``CurriculumWeight()``), sets ``state.curriculum``.
        frozen_bag: ``"full"`` (default: the whole bag ``F^FB``, the paper's frozen view and plain two-stage MIL
            for ``views=["frozen"]``) or ``"pseudo"`` (``F^FB[S]`` only; a deviation, see docs/method.md).
        translated_bag: ``"pseudo"`` (default: ``f_T(F^FB[S])``, the method) or ``"full"`` (``f_T(F^FB)``, the bag
            inference sees; a deviation, see docs/method.md). ``L_dist`` uses the pseudo-bag either way.
        freeze_encoder_bn: keep f_TFE's BatchNorm layers in eval mode (running statistics of f_FFE) while
            training (default True): batch statistics of one slide's ``S`` patches would put the ``e2e`` view
            in another feature space than ``F^FB`` from the first step (f_TFE(x) != f_FFE(x) at initialisation).
        translator_cls_grad: let the translated view's cross-entropy (and consistency) train f_T (default True:
            the method, f_T learns from L_cls and L_dist jointly). False: f_T learns from L_dist only, the head
            still learns from the translated view (a deviation, see docs/method.md, "Where the gain is lost").
        encoder_warmup_epochs: the first epochs in which f_TFE is not trained (default 0; a deviation, see
            docs/method.md): the e2e view is encoded without gradient while the MIL head and f_T learn from the
            pretrained features, then f_TFE is fine-tuned (linear probing before fine-tuning).
        accumulation_steps: slides per optimiser step (loss divided by it; flushed at epoch end).
        amp, amp_dtype: autocast with :func:`~monai_fbta.networks.encode.resolve_amp_dtype`'s dtype (a GradScaler with fp16).
        grad_checkpointing / encoder_chunk_size: memory controls of the e2e extractor forward.
        prepare_batch: a ``PrepareBatch`` (default :class:`~monai_fbta.engines.utils.PrepareSlideBatch`).
        Other arguments are MONAI ``SupervisedTrainer``'s.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        mil_head: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: FBTALoss,
        views: Sequence[str] | None = None,
        translator: nn.Module | None = None,
        trainable_encoder: nn.Module | None = None,
        teacher_head: ModelEMA | None = None,
        teacher_encoder: ModelEMA | None = None,
        ema_momentum: float = 0.001,
        ema_momentum_warmup: float | None = None,
        ema_warmup_steps: int | None = None,
        curriculum: CurriculumWeight | None = None,
        frozen_bag: str = "full",
        translated_bag: str = "pseudo",
        freeze_encoder_bn: bool = True,
        translator_cls_grad: bool = True,
        encoder_warmup_epochs: int = 0,
        accumulation_steps: int = 1,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        grad_checkpointing: bool = False,
        encoder_chunk_size: int | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        self.views = validate_views(loss_function.views)
        if views is not None and validate_views(views) != self.views:
            raise ValueError(f"FBTATrainer: views {list(views)} differ from the loss's views {self.views}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
        if encoder_warmup_epochs < 0:
            raise ValueError(f"encoder_warmup_epochs must be >= 0, got {encoder_warmup_epochs!r}")
        for name, value in (("frozen_bag", frozen_bag), ("translated_bag", translated_bag)):
            if value not in ("pseudo", "full"):
                raise ValueError(f"{name} must be 'pseudo' or 'full', got {value!r}")
        needs_translator = "translated" in self.views or loss_function.uses_distillation
        needs_encoder = "e2e" in self.views or loss_function.uses_distillation
        if needs_translator and translator is None:
            raise ValueError(f"FBTATrainer: views {self.views} with lambda_dist={loss_function.lambda_dist} need a translator")
        if needs_encoder and trainable_encoder is None:
            raise ValueError(f"FBTATrainer: views {self.views} with lambda_dist={loss_function.lambda_dist} need a trainable_encoder")
        events = list(event_names or []) + [FBTAEvents]
        attrs = {FBTAEvents.OPTIMIZER_STEP_COMPLETED: OPTIMIZER_STEP_ATTR, **(event_to_attr or {})}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=PrepareSlideBatch() if prepare_batch is None else prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,
            amp=amp,
            event_names=events,
            event_to_attr=attrs,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.mil_head = mil_head
        self.translator = translator
        self.trainable_encoder = trainable_encoder if needs_encoder else None
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.frozen_bag, self.translated_bag = frozen_bag, translated_bag
        self.freeze_encoder_bn = freeze_encoder_bn
        self.translator_cls_grad = translator_cls_grad
        self.encoder_warmup_epochs = encoder_warmup_epochs
        self.accumulation_steps = accumulation_steps
        self.amp_dtype = amp_dtype
        self.grad_checkpointing = grad_checkpointing
        self.encoder_chunk_size = encoder_chunk_size
        self.optim_set_to_none = optim_set_to_none

        setattr(self.state, OPTIMIZER_STEP_ATTR, 0)
        self.state_dict_user_keys.append(OPTIMIZER_STEP_ATTR)
        ema_kw = {"momentum": ema_momentum, "momentum_warmup": ema_momentum_warmup, "warmup_steps": ema_warmup_steps}
        if teacher_head is None:  # vanilla MIL gets the same EMA teacher (unused by its loss, used for evaluation)
            teacher_head = ModelEMA(mil_head, name="ema_momentum_mil", **ema_kw)
        if teacher_encoder is None and loss_function.uses_distillation:
            teacher_encoder = ModelEMA(trainable_encoder, name="ema_momentum_encoder", **ema_kw)
        self.teacher_head, self.teacher_encoder = teacher_head, teacher_encoder
        self.curriculum = CurriculumWeight() if curriculum is None else curriculum
        self.add_event_handler(Events.EPOCH_STARTED, self._set_dataset_epoch)
        for handler in (self.curriculum, teacher_head, teacher_encoder, *(train_handlers or ())):
            if handler is not None:
                handler.attach(self)

    @staticmethod
    def _set_dataset_epoch(engine: FBTATrainer) -> None:
        """New pseudo-bags each epoch: ``dataset.set_epoch(epoch - 1)`` when the dataset has it (FBTADataset)."""
        dataset = getattr(engine.data_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(engine.state.epoch - 1)

    @property
    def inference_head(self) -> nn.Module:
        """f*_MIL, the EMA teacher of the MIL head (vanilla MIL has one too)."""
        return self.teacher_head.ema_model

    def run(self) -> None:  # type: ignore[override]
        """Train; a second call, or one after ``load_state_dict``, continues from the saved epoch."""
        fp16 = self.autocast_dtype == torch.float16 and torch.device(self.state.device).type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        Workflow.run(self)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of this run (:func:`~monai_fbta.networks.encode.resolve_amp_dtype`; ``None``: off)."""
        return resolve_amp_dtype(self.state.device, self.amp, self.amp_dtype)

    def _accumulation_flags(self) -> tuple[bool, bool]:
        """(zero the grads before this iteration, step the optimiser after it)."""
        acc, length = self.accumulation_steps, self.state.epoch_length
        if acc == 1:
            return True, True
        local = (self.state.iteration - 1) % length if length else self.state.iteration - 1
        last = length is not None and local + 1 == length
        return local % acc == 0, (local + 1) % acc == 0 or last

    def _set_train_mode(self) -> None:
        for module in (self.mil_head, self.translator, self.trainable_encoder):
            if module is not None:
                module.train()
        if self.freeze_encoder_bn and self.trainable_encoder is not None:
            for module in self.trainable_encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @property
    def encoder_warming_up(self) -> bool:
        """True in the first ``encoder_warmup_epochs`` epochs, when f_TFE gets no gradient."""
        return (self.state.epoch or 1) <= self.encoder_warmup_epochs

    def compute_views(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Features of each view ``{view: [1, S, D]}`` and the translator heads ``[K, 1, S, D]`` (or None)."""
        feats: dict[str, torch.Tensor] = {}
        heads = None
        slide = batch.get("slide_id", "?")
        try:
            if "frozen" in self.views:
                feats["frozen"] = batch["features" if self.frozen_bag == "full" else "pb_features"]
            full = self.translated_bag == "full"
            pseudo_translated = "translated" in self.views and not full
            if self.translator is not None and (pseudo_translated or self.loss_function.uses_distillation):
                mean, heads = self.translator(batch["pb_features"], return_heads=True)  # heads: L_dist's input
                if pseudo_translated:
                    feats["translated"] = mean
            if self.translator is not None and "translated" in self.views and full:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.translator_cls_grad):
                    feats["translated"] = translate_bag(self.translator, batch["features"], DEFAULT_BAG_CHUNK_SIZE)
            if "translated" in feats and not self.translator_cls_grad:
                feats["translated"] = feats["translated"].detach()
            if "e2e" in self.views:
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_warming_up):
                    e2e = encode_patches(
                        self.trainable_encoder, batch["pb_image"], self.encoder_chunk_size, self.grad_checkpointing
                    )
                feats["e2e"] = e2e.unsqueeze(0)
        except KeyError as err:
            raise KeyError(f"slide {slide}: the sample has no {err} needed by views {self.views}") from None
        return {v: feats[v] for v in self.views}, heads

    def view_logits(self, head: nn.Module, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{view: head(F^v) [1, C]}``; views of one shape go through the head as one batch."""
        tensors = list(feats.values())
        if len(tensors) > 1 and all(t.shape == tensors[0].shape for t in tensors):
            logits = mil_logits(head, torch.cat(tensors, 0))
            return dict(zip(feats, logits.split(tensors[0].shape[0])))
        return {v: mil_logits(head, t) for v, t in feats.items()}

    def _forward_loss(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        loss_fn = self.loss_function
        feats, heads = self.compute_views(batch)
        logits = self.view_logits(self.mil_head, feats)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        teacher_logits = target = None
        with torch.no_grad():
            if loss_fn.uses_teacher:
                detached = {v: f.detach() for v, f in feats.items()}
                teacher_logits = self.view_logits(self.teacher_head.ema_model, detached)
            if loss_fn.uses_distillation:
                target = encode_patches(
                    self.teacher_encoder.ema_model, batch["pb_image_clean"], self.encoder_chunk_size
                ).unsqueeze(0)
        curriculum = float(getattr(self.state, self.curriculum.attr, 1.0))
        terms = loss_fn(logits, batch["label"], teacher_logits, heads, target, curriculum)
        if "e2e" in feats and "pb_features" in batch:
            terms["e2e_scale"] = e2e_scale(feats["e2e"], batch["pb_features"])
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        return terms, logits

    def _iteration(self, engine: FBTATrainer, batchdata: Mapping[str, Any]) -> dict:  # type: ignore[override]
        """One slide: views, loss, backward, (accumulated) optimiser step, EMA event.

        ``engine.state.output``: ``loss``/``cls``/``cons``/``dist`` (floats), ``e2e_scale`` (float, when the e2e
        view ran: :func:`e2e_scale`), ``logits`` ``{view: [1, C]}``,
        ``pred`` (logits of the first view), ``label`` ``[1]``, ``slide_id``.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        zero_grad, step = engine._accumulation_flags()
        engine._set_train_mode()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(engine.state.device, engine.autocast_dtype, **engine.amp_kwargs):
            terms, logits = engine._forward_loss(batch)
        if not torch.isfinite(terms["loss"]):
            values = {k: float(v.detach()) for k, v in terms.items()}
            raise FloatingPointError(
                f"slide {batch.get('slide_id', '?')}: non-finite loss {values} at epoch {engine.state.epoch}, "
                f"iteration {engine.state.iteration}; no step was taken (check its features, or lower the learning rate)"
            )
        loss = terms["loss"] / engine.accumulation_steps
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:
            if engine.scaler is not None:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()
            setattr(engine.state, OPTIMIZER_STEP_ATTR, getattr(engine.state, OPTIMIZER_STEP_ATTR) + 1)
            engine.fire_event(FBTAEvents.OPTIMIZER_STEP_COMPLETED)
        detached = {v: t.detach().float() for v, t in logits.items()}
        engine.state.output = {
            **{k: float(v.detach()) for k, v in terms.items()},
            "logits": detached,
            "pred": detached[engine.views[0]],
            "label": batch["label"],
            "slide_id": batch.get("slide_id"),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
