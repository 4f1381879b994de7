"""monai_fbta.networks.encode: the one autocast rule and the one encode helper, used by every engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import monai_fbta
from monai_fbta.networks import encode
from monai_fbta.networks.encode import autocast, encode_batch, encode_patches, prepare_encoder, resolve_amp_dtype


@pytest.mark.parametrize("native", [True, False])
def test_the_autocast_rule(monkeypatch, native):
    monkeypatch.setattr(encode, "_cpu_has_bf16", lambda: native)
    assert resolve_amp_dtype("cpu", amp=False) is None
    assert resolve_amp_dtype("cpu", amp=True) == (torch.bfloat16 if native else None)
    assert resolve_amp_dtype("cpu", amp=True, amp_dtype=torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert resolve_amp_dtype(torch.device("cuda", 0), amp=True) == (torch.bfloat16 if native else torch.float16)


def test_engines_follow_the_rule(monkeypatch):
    """FBTATrainer and FBTAEvaluator autocast with resolve_amp_dtype's dtype (off on a CPU without bf16)."""
    from monai_fbta.engines import FBTAEvaluator, FBTALoss, FBTATrainer
    from monai_fbta.networks.abmil import ABMIL

    head = ABMIL(8, 2, hidden=4, attention_dim=4)
    seen = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    data = [{"features": torch.randn(5, 8), "pb_features": torch.randn(3, 8), "label": i, "slide_id": f"s{i}"} for i in (0, 1)]
    for native in (True, False):
        monkeypatch.setattr(encode, "_cpu_has_bf16", lambda native=native: native)
        trainer = FBTATrainer("cpu", 1, data, head, torch.optim.SGD(head.parameters(), lr=0.0), FBTALoss(views=["frozen"]),
                              amp=True)
        assert trainer.autocast_dtype == (torch.bfloat16 if native else None)
        trainer.run()
        FBTAEvaluator("cpu", data, head, amp=True).run()
    assert seen == [torch.bfloat16] * 4  # the native-bf16 CPU: two slides trained, two evaluated; none without


def test_no_other_autocast_rule():
    """Only networks/encode.py calls torch.autocast or decides an amp dtype."""
    package = Path(monai_fbta.__file__).parent
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "encode.py" and ("torch.autocast(" in p.read_text() or "is_bf16_supported" in p.read_text())]
    assert not offenders, offenders


def test_encode_helpers():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    images = torch.rand(7, 3, 16, 16)
    whole = encode_patches(encoder, images)
    assert whole.shape == (7, 4)
    torch.testing.assert_close(encode_patches(encoder, images, chunk_size=3, channels_last=True), whole)
    with autocast("cpu", None):  # off: a no-op
        torch.testing.assert_close(encode_patches(encoder, images), whole)
    frozen = prepare_encoder(encoder, "cpu", channels_last=True)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    out = encode_batch(frozen, images, torch.device("cpu"), None, channels_last=True)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, whole.detach())
    # gradient checkpointing: same values and gradients
    images.requires_grad_(True)
    encoder.train().requires_grad_(True)
    g1 = torch.autograd.grad(encode_patches(encoder, images, 3, grad_checkpointing=True).sum(), images)[0]
    g2 = torch.autograd.grad(encode_patches(encoder, images, 3).sum(), images)[0]
    torch.testing.assert_close(g1, g2)
