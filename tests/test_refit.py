"""TranslatorRefit / fit_translator: refitting f_T on the training patches encoded by the trained extractor."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_fbta.handlers import TranslatorRefit, fit_translator, r_squared
from monai_fbta.networks import FeatureTranslator

ROWS = [{"image": "a.tiff", "slide_id": "a"}]


def test_fit_translator_fits_a_non_linear_map_in_place_and_restores_the_mode():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=gen)
    y = x + x.abs() - 0.5 * x.roll(1, dims=1)  # a residual, non-linear map of each patch's features
    translator = FeatureTranslator(8, num_heads=3, hidden=32).train()
    before = [p.detach().clone() for p in translator.parameters()]
    got = fit_translator(translator, x, y, epochs=30, lr=3e-3, batch_size=128, seed=0)
    assert got["dist_after"] < 0.05 * got["dist_before"] and got["r2"] > 0.95, got
    assert translator.training, "the translator's mode is restored"
    assert all(p.grad is None for p in translator.parameters()), "a stale gradient would be stepped on by AdamW later"
    assert any(not torch.equal(a, b) for a, b in zip(before, translator.parameters())), "fitted in place"
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(translator(x), y) == pytest.approx(got["dist_after"], rel=1e-4)
    with pytest.raises(ValueError, match=r"frozen \[M, D\]"):
        fit_translator(translator, x[:10], y[:9])


def test_translator_refit_schedule_and_resume_keep_the_translated_gradient_off():
    refit = TranslatorRefit(ROWS, "cache", start_epoch=10, every=5)
    assert [e for e in range(1, 31) if refit.due(e)] == [10, 15, 20, 25, 30]
    assert [e for e in range(1, 31) if TranslatorRefit(ROWS, "cache", start_epoch=3).due(e)] == [3]
    engine = Engine(lambda e, b: None)
    engine.translator_cls_grad = True
    engine.state.epoch = 9
    refit.started(engine)
    assert engine.translator_cls_grad, "before the first refit f_T still learns from the translated view"
    engine.state.epoch = 12  # resumed after a refit
    refit.started(engine)
    assert engine.translator_cls_grad is False


def test_translator_refit_refuses_bad_settings():
    with pytest.raises(ValueError, match="start_epoch must be >= 1"):
        TranslatorRefit(ROWS, "cache", start_epoch=0)
    with pytest.raises(ValueError, match="no training slides"):
        TranslatorRefit([], "cache", start_epoch=1)
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 5
    with pytest.raises(ValueError, match="after the last epoch"):
        TranslatorRefit(ROWS, "cache", start_epoch=6).attach(engine)


def test_r_squared_is_one_for_the_target_zero_for_its_mean_and_refuses_other_shapes():
    target = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(0))
    assert r_squared(target, target) == pytest.approx(1.0)
    mean = target.reshape(-1, 4).mean(0).expand_as(target)
    assert r_squared(mean, target) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        r_squared(target[:, :29], target)
