"""networks/inference.py: TranslatedMIL is the one prediction path (the evaluator's and inference's); chunking is exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from monai_fbta.engines import FBTAEvaluator
from monai_fbta.networks import ABMIL, FeatureTranslator, TranslatedMIL

torch.set_num_threads(1)
D, C = 16, 3


def _nets(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return ABMIL(D, C, hidden=16, attention_dim=8).eval(), FeatureTranslator(D, num_heads=3, hidden=16, init_scale=1.0).eval()


def _bags(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(1, int(k), D, generator=g) for k in torch.randint(5, 60, (n,), generator=g)]


@torch.no_grad()
def test_the_former_three_paths_equal_the_formula():
    """Reference: the formula the three former paths computed, written out here (softmax(MIL(f_T(bag)))):
    ``TranslatedMIL.forward``, ``FBTAEvaluator.predict`` (translated and vanilla) and inference's
    ``predict_bag`` (probabilities and attention), now all one module."""
    head, translator = _nets()
    network = TranslatedMIL(head, translator)
    bags = _bags()
    ev = FBTAEvaluator("cpu", DataLoader([{"features": b[0], "label": torch.tensor(0)} for b in bags], batch_size=1),
                       head, translator)
    for bag in bags:
        logits, attention = head(translator(bag), return_attention=True)
        expected = torch.softmax(logits, -1)
        expected_vanilla = torch.softmax(head(bag), -1)
        torch.testing.assert_close(network(bag), expected)  # TranslatedMIL.forward
        out = ev.predict({"features": bag})  # FBTAEvaluator.predict
        torch.testing.assert_close(out["pred"], expected)
        torch.testing.assert_close(out["pred_vanilla"], expected_vanilla)
        probs, att = network(bag, return_attention=True)  # inference (was report.predict_bag)
        torch.testing.assert_close(probs, expected)
        torch.testing.assert_close(att, attention)
        assert att.shape == bag.shape[:2] and float(att.sum()) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(network(bag, translate=False), expected_vanilla)
        assert not torch.allclose(expected, expected_vanilla)  # the translator is not the identity here
        torch.testing.assert_close(TranslatedMIL(head, translator, channels_first=True)(bag.transpose(1, 2)), expected)
    assert head.training is False and translator.training is False


@torch.no_grad()
def test_chunked_translation_equals_unchunked():
    head, translator = _nets(1)
    bag = torch.randn(1, 53, D)
    whole = TranslatedMIL(head, translator, chunk_size=None)(bag, return_attention=True)
    chunked = TranslatedMIL(head, translator, chunk_size=7)(bag, return_attention=True)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
