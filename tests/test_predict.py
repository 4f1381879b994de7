"""One prediction path: ``TranslatedMIL`` is the predictor of the evaluator and of inference; attention outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import check_attention_outputs, tiny_model
from slide_factory import TILING, tissue_slide
from torch.utils.data import DataLoader

from monai_fbta.engines import FBTAEvaluator
from monai_fbta.handlers.attention import AttentionWriter, attention_geojson
from monai_fbta.networks import ABMIL, FeatureTranslator, TranslatedMIL
from monai_fbta.pipeline.infer import run_inference

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


def test_attention_writer_csv_and_geojson(tmp_path):
    coords = np.array([[0, 0], [64, 0], [64, 64], [100, 70]])
    attention = np.array([0.1, 0.4, 0.3, 0.2])
    csv_path, geo = AttentionWriter(tmp_path).write_one("s", coords, attention, 64, (140, 128))
    check_attention_outputs(csv_path, geo, coords, attention, 64, (140, 128))
    ring = json.load(open(geo))["features"][3]["geometry"]["coordinates"][0]
    assert max(p[0] for p in ring) == 140 and max(p[1] for p in ring) == 128  # clipped to the slide
    with pytest.raises(ValueError, match="outside the 100x100 slide"):
        attention_geojson(coords, attention, 64, (100, 100), "s")
    with pytest.raises(ValueError, match="4 patch coordinates but 3"):
        AttentionWriter(tmp_path / "x").write_one("s", coords, attention[:3], 64, (140, 128))
    assert not (tmp_path / "x").exists()

    from ignite.engine import Engine  # as an evaluator handler: attach(engine), one slide per iteration

    item = {"slide_id": "e", "coords": coords, "attention": attention, "patch_size_level0": 64, "slide_size": (140, 128)}
    writer = AttentionWriter(tmp_path / "engine")
    engine = Engine(lambda e, b: item)
    writer.attach(engine)
    engine.run([0])
    assert writer.written == [str(tmp_path / "engine" / "e_attention.csv"), str(tmp_path / "engine" / "e_attention.geojson")]
    check_attention_outputs(*writer.written, coords, attention, 64, (140, 128))


def test_inference_writes_attention_csv_and_geojson(tmp_path):
    """A tiny in-process inference: attention files match the network's attention on the cached features."""
    from monai_fbta.data.store import read_array, read_coords
    from monai_fbta.handlers.checkpoint import build_inference_network

    model = tiny_model(tmp_path, TILING)
    slide = tissue_slide(tmp_path / "s.tif")
    (record,) = run_inference(model, [slide], tmp_path / "out", heatmaps=False, batch_size=8)
    attention_csv, attention_geojson = (tmp_path / "out" / "attention" / f"s_attention.{ext}" for ext in ("csv", "geojson"))
    coords, attrs = read_coords(tmp_path / "out" / "cache" / "s.h5")
    feats = torch.as_tensor(read_array(tmp_path / "out" / "cache" / "s.h5", "features"))
    with torch.no_grad():
        probs, attention = build_inference_network(model)(feats[None], return_attention=True)
    assert record["probs"] == pytest.approx(probs[0].tolist(), abs=1e-6)
    check_attention_outputs(attention_csv, attention_geojson, coords, attention[0].numpy(),
                   attrs["patch_size_level0"], (512, 512))
