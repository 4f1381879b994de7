"""FBTALoss: every term against its definition, gradients stopped where the method says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_fbta.engines.losses import FBTALoss


def _inputs(views=("frozen", "e2e", "translated"), C=3, K=4, S=5, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {v: torch.randn(1, C, generator=g, requires_grad=True) for v in views}
    teacher = {v: torch.randn(1, C, generator=g, requires_grad=True) for v in views}
    heads = torch.randn(K, 1, S, D, generator=g, requires_grad=True)
    target = torch.randn(1, S, D, generator=g, requires_grad=True)
    return logits, torch.tensor([2]), teacher, heads, target


def test_terms_match_definitions():
    logits, y, teacher, heads, target = _inputs()
    loss_fn = FBTALoss(lambda_dist=0.5, cons_weight=2.0)
    out = loss_fn(logits, y, teacher, heads, target, curriculum=0.3)
    views = list(logits)
    cls = sum(-torch.log_softmax(logits[v], -1)[0, 2] for v in views) / len(views)
    cons = 0.0
    for v in views:
        p, q = logits[v].softmax(-1)[0], teacher[v].softmax(-1)[0]
        cons = cons + 1 - (p @ q) / (p.norm() * q.norm())
    cons = cons / len(views)
    dist = sum(((heads[k] - target) ** 2).mean() for k in range(heads.shape[0])) / heads.shape[0]
    torch.testing.assert_close(out["cls"], cls)
    torch.testing.assert_close(out["cons"], cons)
    torch.testing.assert_close(out["dist"], dist)
    torch.testing.assert_close(out["loss"], cls + 2.0 * 0.3 * cons + 0.5 * dist)
    assert all(out[k] > 0 for k in ("cls", "cons", "dist"))
    for v in views:  # each view's CE is reported for the logs, detached
        torch.testing.assert_close(out[f"cls_{v}"], -torch.log_softmax(logits[v], -1)[0, 2].detach())
        assert not out[f"cls_{v}"].requires_grad


def test_no_gradient_to_teacher_or_target():
    logits, y, teacher, heads, target = _inputs()
    FBTALoss()(logits, y, teacher, heads, target, curriculum=1.0)["loss"].backward()
    assert all(teacher[v].grad is None for v in teacher)
    assert target.grad is None
    assert heads.grad is not None and heads.grad.abs().sum() > 0
    assert all(logits[v].grad.abs().sum() > 0 for v in logits)


def test_curriculum_zero_drops_consistency_from_total():
    logits, y, teacher, heads, target = _inputs()
    out = FBTALoss(lambda_dist=1.0)(logits, y, teacher, heads, target, curriculum=0.0)
    assert out["cons"] > 0
    torch.testing.assert_close(out["loss"], out["cls"] + out["dist"])


def test_vanilla_is_cross_entropy_only():
    logits, y, *_ = _inputs(views=("frozen",))
    loss_fn = FBTALoss(views=["frozen"], label_smoothing=0.1)
    assert loss_fn.vanilla and not loss_fn.uses_teacher and not loss_fn.uses_distillation
    out = loss_fn(logits, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits["frozen"], y, label_smoothing=0.1))
    assert out["cons"] == 0 and out["dist"] == 0


def test_disabled_terms_need_no_inputs():
    logits, y, *_ = _inputs(views=("e2e",))
    out = FBTALoss(views=["e2e"], lambda_dist=0.0, cons_weight=0.0)(logits, y)
    torch.testing.assert_close(out["loss"], out["cls"])


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="views"):
        FBTALoss(views=["frozen", "bogus"])
    with pytest.raises(ValueError, match="views"):
        FBTALoss(views=[])
    logits, y, *_ = _inputs()
    with pytest.raises(ValueError, match="teacher_logits"):
        FBTALoss()(logits, y)
    with pytest.raises(KeyError, match="e2e"):
        FBTALoss()({"frozen": logits["frozen"]}, y)
