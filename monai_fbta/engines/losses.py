"""FBTA training objective: classification, teacher consistency and translator distillation.

``L = L_cls + w_cons * c * L_cons + lambda_dist * L_dist`` with ``c = t/T`` the curriculum weight
(see :class:`monai_fbta.handlers.CurriculumWeight`) and, for V views and K translator heads:

* ``L_cls  = 1/V sum_v CE(f_MIL(F^v), y)``
* ``L_cons = 1/V sum_v (1 - cos(softmax f_MIL(F^v), softmax f*_MIL(F^v)))`` (teacher detached)
* ``L_dist = 1/K sum_k MSE(head_k(F^FB[S]), f*_TFE(X^SB))`` (target detached)

``views=["frozen"]`` is vanilla MIL: only ``L_cls`` is computed, no teacher or translator needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VIEWS", "FBTALoss", "validate_views"]

VIEWS = ("frozen", "e2e", "translated")


def validate_views(views: Sequence[str]) -> list[str]:
    """Return ``views`` as a list after checking it is a non-empty, duplicate-free subset of :data:`VIEWS`."""
    views = [views] if isinstance(views, str) else list(views)
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise ValueError(f"views must be a non-empty list of distinct names from {VIEWS}, got {views}")
    return views


class FBTALoss(nn.Module):
    """The FBTA loss; returns a dict ``{"loss", "cls", "cons", "dist"}`` of scalar tensors, plus each view's
    detached cross-entropy ``cls_<view>`` (logs only) when there is more than one view.

    Args:
        views: views used for classification, a subset of ``("frozen", "e2e", "translated")``.
        lambda_dist: weight of ``L_dist`` (0 disables distillation).
        cons_weight: weight of ``L_cons`` on top of the curriculum weight (0 disables the teacher).
        label_smoothing: passed to ``F.cross_entropy``.
    """

    def __init__(
        self,
        views: Sequence[str] = VIEWS,
        lambda_dist: float = 1.0,
        cons_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.views = validate_views(views)
        if lambda_dist < 0 or cons_weight < 0 or not 0 <= label_smoothing < 1:
            raise ValueError("lambda_dist and cons_weight must be >= 0 and label_smoothing in [0, 1)")
        self.lambda_dist = float(lambda_dist)
        self.cons_weight = float(cons_weight)
        self.label_smoothing = float(label_smoothing)

    @property
    def vanilla(self) -> bool:
        """True for ``views == ["frozen"]``: plain MIL, ``L = L_cls``."""
        return self.views == ["frozen"]

    @property
    def uses_teacher(self) -> bool:
        """Whether ``L_cons`` is active (needs teacher logits)."""
        return not self.vanilla and self.cons_weight > 0

    @property
    def uses_distillation(self) -> bool:
        """Whether ``L_dist`` is active (needs translator heads and the EMA-extractor target)."""
        return not self.vanilla and self.lambda_dist > 0

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        label: torch.Tensor,
        teacher_logits: Mapping[str, torch.Tensor] | None = None,
        translator_heads: torch.Tensor | None = None,
        distill_target: torch.Tensor | None = None,
        curriculum: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Compute every term.

        Args:
            logits: student logits per view, each ``[B, C]``.
            label: class indices ``[B]``.
            teacher_logits: EMA-teacher logits per view ``[B, C]`` (required when :attr:`uses_teacher`).
            translator_heads: per-head translations of ``F^FB[S]``, ``[K, B, S, D]`` (when :attr:`uses_distillation`).
            distill_target: ``f*_TFE(X^SB)``, ``[B, S, D]`` (when :attr:`uses_distillation`).
            curriculum: ``t/T`` in ``[0, 1]``.
        """
        missing = [v for v in self.views if v not in logits]
        if missing:
            raise KeyError(f"FBTALoss: logits missing for views {missing}")
        label = label.reshape(-1).long()
        first = logits[self.views[0]]
        zero = first.new_zeros(())
        per_view = [F.cross_entropy(logits[v].float(), label, label_smoothing=self.label_smoothing) for v in self.views]
        cls = torch.stack(per_view).mean()
        cons = zero
        if self.uses_teacher:
            if teacher_logits is None:
                raise ValueError("FBTALoss: teacher_logits are required when cons_weight > 0")
            cons = torch.stack([self.consistency(logits[v], teacher_logits[v]) for v in self.views]).mean()
        dist = zero
        if self.uses_distillation:
            if translator_heads is None or distill_target is None:
                raise ValueError("FBTALoss: translator_heads and distill_target are required when lambda_dist > 0")
            dist = self.distillation(translator_heads, distill_target)
        loss = cls + self.cons_weight * float(curriculum) * cons + self.lambda_dist * dist
        terms = {"loss": loss, "cls": cls, "cons": cons, "dist": dist}
        if len(self.views) > 1:  # each view's CE, for the logs only (detached)
            terms.update({f"cls_{v}": ce.detach() for v, ce in zip(self.views, per_view)})
        return terms

    @staticmethod
    def consistency(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``mean_b (1 - cos(softmax(student_b), softmax(teacher_b)))``; no gradient to ``teacher``."""
        p = torch.softmax(student.float(), dim=-1)
        q = torch.softmax(teacher.detach().float(), dim=-1)
        return (1.0 - F.cosine_similarity(p, q, dim=-1)).mean()

    @staticmethod
    def distillation(heads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``1/K sum_k MSE(heads[k], target)`` for ``heads [K, ...]`` and ``target [...]`` (detached)."""
        target = target.detach().float()
        return torch.stack([F.mse_loss(h.float(), target) for h in heads]).mean()
