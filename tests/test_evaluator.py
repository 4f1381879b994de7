"""FBTAEvaluator: metrics of both paths on bags with known predictions; the chunked translation it relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_trainer import D
from torch.utils.data import DataLoader

from monai_fbta.engines import FBTAEvaluator, translate_bag
from monai_fbta.networks.translator import FeatureTranslator

torch.set_num_threads(1)


class _MeanLogits(nn.Module):
    """A head whose logits are the mean instance feature (D == C): predictions are known in advance."""

    def forward(self, x, mask=None, return_attention=False):
        return x.mean(1)


class _Negate(nn.Module):
    def forward(self, x, return_heads=False):
        return -x


def _known_bags(scores, labels):
    return [
        {"slide_id": f"s{i}", "label": torch.tensor(y), "features": torch.tensor(s, dtype=torch.float32)[None].repeat(5, 1)}
        for i, (s, y) in enumerate(zip(scores, labels))
    ]


def test_evaluator_metrics_on_known_predictions():
    # vanilla logits rank the slides perfectly; the "translator" negates them, so the FBTA path is always wrong
    data = _known_bags([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]], [0, 0, 1, 1])
    ev = FBTAEvaluator("cpu", DataLoader(data, batch_size=1), _MeanLogits(), _Negate())
    ev.run()
    m = ev.state.metrics
    assert m["val_auc_vanilla"] == 1.0 and m["val_acc_vanilla"] == 1.0 and m["val_f1_vanilla"] == 1.0
    assert m["val_auc"] == 0.0 and m["val_acc"] == 0.0 and m["val_bacc"] == 0.0
    assert ev.state.confusion_matrix == [[0, 2], [2, 0]] and ev.state.confusion_matrix_vanilla == [[2, 0], [0, 2]]
    assert ev.state.key_metric_name == "val_auc"
    assert [p["slide_id"] for p in ev.state.predictions] == ["s0", "s1", "s2", "s3"]
    assert ev.state.predictions[0]["pred_vanilla"] == pytest.approx(torch.tensor([2.0, 0.0]).softmax(0).tolist())


def test_evaluator_three_classes_and_no_translator():
    data = _known_bags([[3, 0, 0], [0, 3, 0], [0, 0, 3], [1, 2, 0], [0, 0, 1], [2, 0, 0]], [0, 1, 2, 1, 2, 1])
    ev = FBTAEvaluator("cpu", DataLoader(data, batch_size=1), _MeanLogits(), prefix="test", key_metric="bacc")
    ev.run()
    m = ev.state.metrics
    assert set(m) == {"test_auc", "test_acc", "test_bacc", "test_f1"}
    assert m["test_acc"] == pytest.approx(5 / 6)  # slide 5 (class 1) is predicted as class 0
    assert m["test_bacc"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert ev.state.confusion_matrix == [[1, 0, 0], [1, 2, 0], [0, 0, 2]]
    assert 0.5 < m["test_auc"] < 1.0


def test_translate_bag_chunks_are_exact():
    translator = FeatureTranslator(D, num_heads=3)
    bag = torch.randn(1, 50, D)
    torch.testing.assert_close(translate_bag(translator, bag, chunk_size=7), translator(bag))
