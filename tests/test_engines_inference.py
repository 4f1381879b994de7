"""FBTAInferenceEvaluator: one TranslatedMIL call per slide, and everything the inference handlers read in its output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from monai_fbta.engines import FBTAInferenceEvaluator, PrepareSlideBatch
from monai_fbta.engines.inference import slide_size
from monai_fbta.networks import ABMIL, FeatureTranslator, TranslatedMIL

torch.set_num_threads(1)
D, C = 8, 3


def _network() -> TranslatedMIL:
    torch.manual_seed(0)
    network = TranslatedMIL(ABMIL(D, C, hidden=8, attention_dim=4), FeatureTranslator(D, num_heads=2, hidden=8, init_scale=1.0))
    network.metadata = {"class_names": ["x", "y", "z"]}
    return network.eval()


def _samples(n: int = 3) -> list[dict]:
    """What ``LoadStored(keys=["coords", "features"])`` yields for unlabelled slides (label -1)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        num = 5 + 4 * i
        out.append({"slide_id": f"s{i}", "image": f"/nowhere/s{i}.tif", "label": -1,
                    "features": torch.randn(num, D, generator=g), "coords": torch.arange(num * 2).reshape(num, 2) * 64,
                    "coords_meta_dict": {"patch_size_level0": 64, "slide_width": 1000 + i, "slide_height": 800}})
    return out


class _Collect:
    """A handler keeping a copy of each output (as a writer would read it)."""

    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.outputs.append(dict(e.state.output)))


def test_output_holds_what_handlers_need_and_equals_the_network():
    network, samples, seen = _network(), _samples(), _Collect()
    loader = DataLoader(samples, batch_size=None)
    evaluator = FBTAInferenceEvaluator("cpu", loader, network, prepare_batch=PrepareSlideBatch(), val_handlers=[seen])
    evaluator.run()
    assert len(seen.outputs) == len(samples)
    for out, sample in zip(seen.outputs, samples):
        with torch.no_grad():
            probs, attention = network(sample["features"][None], return_attention=True)
        n = len(sample["features"])
        assert out["slide_id"] == sample["slide_id"] and out["image"] == sample["image"] and out["label"] is None
        torch.testing.assert_close(out["probs"], probs[0])
        assert out["probs"].shape == (C,) and out["pred"] == int(probs[0].argmax())
        assert out["pred_name"] == ["x", "y", "z"][out["pred"]]
        assert out["attention"].shape == (n,) and np.allclose(out["attention"], attention[0].numpy())
        assert out["coords"].dtype == np.int64 and np.array_equal(out["coords"], sample["coords"].numpy())
        assert out["patch_size_level0"] == 64.0 and out["num_patches"] == n
        assert out["slide_size"] == (sample["coords_meta_dict"]["slide_width"], 800)
    records = evaluator.state.predictions  # light per-slide records: no per-patch arrays
    assert [r["slide_id"] for r in records] == ["s0", "s1", "s2"]
    assert not {"attention", "coords"} & set(records[0]) and isinstance(records[0]["probs"], list)
    assert network.mil_head.training is False


def test_labels_class_names_and_layout():
    samples = _samples(2)
    samples[1]["label"] = 2
    evaluator = FBTAInferenceEvaluator("cpu", DataLoader(samples, batch_size=None), _network(), class_names=["a", "b", "c"])
    evaluator.run()
    assert [r["label"] for r in evaluator.state.predictions] == [None, 2]
    assert {r["pred_name"] for r in evaluator.state.predictions} <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="channels_first=False"):
        FBTAInferenceEvaluator("cpu", [], TranslatedMIL(ABMIL(D, C), channels_first=True), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="give class_names"):
        FBTAInferenceEvaluator("cpu", [], TranslatedMIL(ABMIL(D, C)))


def test_slide_size_from_the_store_attrs_else_from_the_slide(tmp_path):
    from slide_factory import tissue_rect_image, write_slide

    path = write_slide(tmp_path / "s.tif", tissue_rect_image(320, 448, (32, 32, 288, 288)), levels=2, tile=64)
    assert slide_size({"slide_width": 7, "slide_height": 9}, path) == (7, 9)
    assert slide_size({"patch_size_level0": 64}, path) == (448, 320)  # e.g. a store imported from CLAM/TRIDENT
