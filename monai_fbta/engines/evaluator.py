"""FBTAEvaluator: slide-level inference ``y = f*_MIL(f_T(F^FB))`` over all patches, plus the vanilla path.

Per slide only the cached frozen bag ``features [1, N, D]`` is needed (no patch reading). Metrics
(macro one-vs-rest AUC, accuracy, balanced accuracy, macro F1) are ignite ``EpochMetric`` s named
``{prefix}_{name}`` for the FBTA path and ``{prefix}_{name}_vanilla`` for ``f*_MIL(F^FB)``. After each run
``engine.state.predictions`` holds one dict per slide and ``engine.state.confusion_matrix`` (and
``confusion_matrix_vanilla``) a ``[C, C]`` list of lists (rows: true class).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Events
from ignite.metrics import EpochMetric
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from monai_fbta._quiet import quiet_import
from monai_fbta.engines.utils import PrepareSlideBatch
from monai_fbta.networks.encode import autocast, resolve_amp_dtype
from monai_fbta.networks.inference import TranslatedMIL

quiet_import("monai.engines")
from monai.engines import Evaluator  # noqa: E402
from monai.engines.utils import IterationEvents, default_metric_cmp_fn  # noqa: E402

__all__ = ["SlideEvaluator", "FBTAEvaluator", "SLIDE_METRICS", "macro_auc"]


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC of ``probs [N, C]``; binary uses ``probs[:, 1]``; NaN when undefined."""
    num_classes = probs.shape[1]
    try:
        if num_classes == 2:
            return float(roc_auc_score(labels, probs[:, 1]))
        return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=np.arange(num_classes)))
    except ValueError as err:  # one class only in labels
        warnings.warn(f"AUC undefined on this set ({err}); reporting NaN", stacklevel=2)
        return float("nan")


def _on_probs(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[torch.Tensor, torch.Tensor], float]:
    return lambda pred, y: fn(pred.float().cpu().numpy(), y.long().cpu().numpy())


SLIDE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auc": macro_auc,
    "acc": lambda p, y: float(accuracy_score(y, p.argmax(1))),
    "bacc": lambda p, y: float(balanced_accuracy_score(y, p.argmax(1))),
    "f1": lambda p, y: float(f1_score(y, p.argmax(1), average="macro", labels=np.arange(p.shape[1]), zero_division=0)),
}


class SlideEvaluator(Evaluator):
    """One whole slide per iteration through :attr:`network` (a :class:`~monai_fbta.networks.TranslatedMIL`).

    The base of :class:`FBTAEvaluator` (metrics on labelled slides) and
    :class:`~monai_fbta.engines.inference.FBTAInferenceEvaluator` (predictions and attention of new slides). An
    iteration prepares the batch (``prepare_batch``, default :class:`~monai_fbta.engines.utils.PrepareSlideBatch`:
    ``features [1, N, D]``), runs :meth:`predict` under autocast (``amp``, ``amp_dtype``: see
    :func:`~monai_fbta.networks.encode.resolve_amp_dtype`), and sets ``engine.state.output`` and one entry of
    ``engine.state.predictions`` (reset every epoch) from :meth:`outputs`. ``val_handlers`` are attached after
    :meth:`epoch_completed`, so they see what it sets. Other arguments are MONAI ``Evaluator``'s.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        self.network = network
        self.amp_dtype = amp_dtype
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=PrepareSlideBatch() if prepare_batch is None else prepare_batch,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=None,
            amp=amp,
            decollate=False,
            amp_kwargs=amp_kwargs,
        )
        self.state.predictions = []
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_predictions)
        self.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        for handler in val_handlers or ():
            handler.attach(self)

    def _reset_predictions(self, engine: SlideEvaluator) -> None:
        engine.state.predictions = []

    def epoch_completed(self, engine: SlideEvaluator) -> None:
        """Runs at ``EPOCH_COMPLETED`` before the ``val_handlers`` (nothing here)."""

    def eval_mode(self):
        """A context with the network's parts (MIL head, translator) in eval mode, each restored after."""
        return self.mode(*self.network.children())

    def predict(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The network's outputs for one prepared slide batch (under ``no_grad`` and :meth:`eval_mode`)."""
        raise NotImplementedError

    def outputs(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(engine.state.output, the slide's entry of engine.state.predictions)`` from :meth:`predict`'s ``out``."""
        raise NotImplementedError

    def _iteration(self, engine: SlideEvaluator, batchdata: Mapping[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        with autocast(engine.state.device, resolve_amp_dtype(engine.state.device, engine.amp, engine.amp_dtype),
                      **engine.amp_kwargs):
            out = engine.predict(batch)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output, record = engine.outputs(batch, out)
        engine.state.predictions.append(record)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class FBTAEvaluator(SlideEvaluator):
    """Evaluate f*_MIL on translated (and raw) frozen bags of whole slides.

    Args:
        device: device to run on.
        val_data_loader: yields one slide per batch with ``features``, ``label`` and ``slide_id``.
        mil_head: the EMA teacher head f*_MIL (``FBTATrainer.inference_head``).
        translator: f_T; None evaluates only the vanilla path (then the metric names carry no suffix).
        prefix: metric name prefix (``"val"`` -> ``val_auc``, ``val_auc_vanilla`` ...).
        key_metric: which metric decides the best model (one of ``auc``, ``acc``, ``bacc``, ``f1``).
        report_vanilla: also report ``f*_MIL(F^FB)`` when a translator is given.
        translate_chunk_size: instances per translator call.
        kwargs: :class:`SlideEvaluator`'s other arguments (``prepare_batch``, ``val_handlers``, ``amp``, ``amp_dtype``...).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        mil_head: nn.Module,
        translator: nn.Module | None = None,
        prefix: str = "val",
        key_metric: str = "auc",
        report_vanilla: bool = True,
        translate_chunk_size: int | None = 16384,
        **kwargs: Any,
    ) -> None:
        if key_metric not in SLIDE_METRICS:
            raise ValueError(f"key_metric must be one of {sorted(SLIDE_METRICS)}, got {key_metric!r}")
        self.mil_head = mil_head
        self.translator = translator
        self.outputs_keys = ["pred"] + (["pred_vanilla"] if translator is not None and report_vanilla else [])
        metrics = {}
        for out_key in self.outputs_keys:
            suffix = "_vanilla" if out_key == "pred_vanilla" else ""
            for name, fn in SLIDE_METRICS.items():
                metrics[f"{prefix}_{name}{suffix}"] = EpochMetric(
                    _on_probs(fn), output_transform=lambda o, k=out_key: (o[k], o["label"]), check_compute_fn=False
                )
        key = f"{prefix}_{key_metric}"
        super().__init__(device, val_data_loader, TranslatedMIL(mil_head, translator, chunk_size=translate_chunk_size),
                         key_val_metric={key: metrics.pop(key)}, additional_metrics=metrics, **kwargs)

    def epoch_completed(self, engine: FBTAEvaluator) -> None:
        """``engine.state.confusion_matrix`` (and ``confusion_matrix_vanilla``): ``[C, C]``, rows the true class."""
        preds = engine.state.predictions
        if not preds:
            return
        labels = np.array([p["label"] for p in preds])
        for out_key in self.outputs_keys:
            probs = np.array([p[out_key] for p in preds])
            name = "confusion_matrix" + ("_vanilla" if out_key == "pred_vanilla" else "")
            cm = confusion_matrix(labels, probs.argmax(1), labels=np.arange(probs.shape[1]))
            setattr(engine.state, name, cm.tolist())

    def predict(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Class probabilities ``{"pred": [1, C], "pred_vanilla": [1, C]}`` for one prepared slide batch.

        Both are :attr:`network` (:class:`~monai_fbta.networks.TranslatedMIL`) on ``features [1, N, D]``; the
        vanilla path is the same call with ``translate=False``.
        """
        bag = batch["features"]
        with torch.no_grad(), self.eval_mode():
            out = {"pred": self.network(bag)}
            if "pred_vanilla" in self.outputs_keys:
                out["pred_vanilla"] = self.network(bag, translate=False)
        return out

    def outputs(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Output ``{"pred", "pred_vanilla"?, "label" [1], "slide_id"}`` (what the metrics read); the slide's record
        ``{"slide_id", "label": int, "pred": [C] list, "pred_vanilla"?}``."""
        label = batch["label"].reshape(-1).long()
        slide_id = batch.get("slide_id")
        record: dict[str, Any] = {"slide_id": slide_id, "label": int(label[0])}
        record.update({k: v[0].cpu().tolist() for k, v in out.items()})
        return {**out, "label": label, "slide_id": slide_id}, record
