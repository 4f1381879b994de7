"""pipeline.infer: inference as an evaluator with handlers (run_inference builds what inference.json declares)."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from conftest import check_attention_outputs, tiny_model, write_csv
from slide_factory import TILING, tissue_slide

from monai_fbta.data.datalist import DatalistError
from monai_fbta.data.slide import open_slide
from monai_fbta.data.store import read_array, read_coords
from monai_fbta.handlers import PredictionsCSV
from monai_fbta.handlers.checkpoint import build_inference_network
from monai_fbta.handlers.heatmap import write_heatmap
from monai_fbta.pipeline.infer import InferenceError, InferencePreprocessor, inference_evaluator, run_inference
from monai_fbta.pipeline.prepare import frozen_encoder

torch.set_num_threads(1)


def test_outputs_are_the_network_on_the_cached_features(tmp_path):
    """predictions.csv, the heatmap PNG and the attention CSV/GeoJSON are what the writers make of the network's
    probabilities and attention on the slide's cached features (the heatmap byte for byte, titled with the prediction)."""
    model = tiny_model(tmp_path, TILING)
    slides = [tissue_slide(tmp_path / "s.tif"), tissue_slide(tmp_path / "t.tif", size=640)]
    out = tmp_path / "out"
    records = run_inference(model, slides, out, batch_size=8)
    assert [r["slide_id"] for r in records] == ["s", "t"]
    network = build_inference_network(model)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0]) == ["slide_id", "prob_a", "prob_b", "pred", "pred_name"]
    for row, record, size in zip(rows, records, (512, 640)):
        sid = row["slide_id"]
        store = out / "cache" / f"{sid}.h5"
        coords, attrs = read_coords(store)
        with torch.no_grad():
            probs, attention = network(torch.as_tensor(read_array(store, "features"))[None], return_attention=True)
        probs, attention = probs[0], attention[0].numpy()
        pred = int(probs.argmax())
        assert [row["prob_a"], row["prob_b"]] == [f"{float(p):.6f}" for p in probs]
        assert (int(row["pred"]), row["pred_name"]) == (pred, "ab"[pred]) == (record["pred"], record["pred_name"])
        assert record["probs"] == pytest.approx(probs.tolist(), abs=1e-6) and record["num_patches"] == len(coords)
        check_attention_outputs(out / "attention" / f"{sid}_attention.csv", out / "attention" / f"{sid}_attention.geojson",
                                coords, attention, attrs["patch_size_level0"], (size, size))
        with open_slide(record["image"]) as slide:
            thumb = slide.thumbnail(1024)
        expected = write_heatmap(str(tmp_path / f"{sid}_expected.png"), thumb, coords, attention,
                                 attrs["patch_size_level0"], (size, size), title=f"{sid}: {'ab'[pred]} (p={float(probs[pred]):.2f})")
        assert (out / "heatmaps" / f"{sid}_heatmap.png").read_bytes() == open(expected, "rb").read()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_slide_failing_extraction_is_skipped_and_named_and_strict_raises(tmp_path, caplog):
    model = tiny_model(tmp_path, TILING)
    slides = tmp_path / "slides"
    slides.mkdir()
    tissue_slide(slides / "good.tif")
    tissue_slide(slides / "nompp.tif", mpp=None)  # no pixel size: tiling fails
    network = build_inference_network(model)
    meta = network.metadata
    encoder = frozen_encoder(meta["encoder_name"], meta["encoder_weights"], tmp_path / "models")
    cache = tmp_path / "cache"
    preprocess = InferencePreprocessor(slides, cache, encoder, meta["tiling"], meta["class_names"], batch_size=8, strict=True)
    with pytest.raises(RuntimeError, match=r"call run\(\) first"):
        preprocess.data
    with caplog.at_level(logging.ERROR, logger="fbta.inference"):
        preprocess.run()
    assert "slide nompp skipped" in caplog.text and "no pixel size" in caplog.text
    assert list(preprocess.failed) == ["nompp"] and [r["slide_id"] for r in preprocess.data] == ["good"]

    evaluator = inference_evaluator(network, preprocess.data, cache, handlers=[PredictionsCSV(tmp_path / "p.csv")])
    evaluator.run()
    assert [r["slide_id"] for r in csv.DictReader(open(tmp_path / "p.csv"))] == ["good"]  # the others are predicted first
    with pytest.raises(InferenceError, match=r"strict mode: a slide failed: 1 slide\(s\) predicted; 1 failed .* "
                                             r"first failure: nompp: .*nompp.tif: no pixel size"):
        preprocess.finish()

    InferencePreprocessor(slides, cache, encoder, meta["tiling"], meta["class_names"], batch_size=8).run().finish()
    with pytest.raises(InferenceError, match=r"no slide could be predicted: .* 1 failed .* first failure: nompp"):
        InferencePreprocessor(slides / "nompp.tif", cache, encoder, meta["tiling"], batch_size=8).run()
    with pytest.raises(Exception, match="nompp.tif: no pixel size"):  # fail_fast: the slide's own error, at once
        InferencePreprocessor(slides, tmp_path / "c2", encoder, meta["tiling"], batch_size=8, fail_fast=True).run()


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


def test_inference_reads_datalist_labels_with_the_model_class_names(tmp_path):
    model = tiny_model(tmp_path, TILING)  # classes ["a", "b"]
    slide = tissue_slide(tmp_path / "s.tif")
    good = write_csv(tmp_path / "good.csv", [{"slide_id": "s", "path": slide, "label": "b"}])
    records = run_inference(model, good, tmp_path / "out", heatmaps=False, batch_size=8)
    assert [r["label"] for r in records] == [1]
    bad = write_csv(tmp_path / "bad.csv", [{"slide_id": "s", "path": slide, "label": "tumour"}])
    with pytest.raises(DatalistError, match=r"unknown label 'tumour' \(known classes \['a', 'b'\]\)"):
        run_inference(model, bad, tmp_path / "out2", heatmaps=False)


def test_inference_raises_when_nothing_or_in_strict_mode_something_failed(tmp_path):
    model = tiny_model(tmp_path, TILING)
    slides = tmp_path / "slides"
    slides.mkdir()
    tissue_slide(slides / "nompp.tif", mpp=None)
    with pytest.raises(InferenceError, match=r"no slide could be predicted: 0 slide\(s\) predicted .* 1 failed .*--assume_mpp"):
        run_inference(model, slides, tmp_path / "out", heatmaps=False, batch_size=8)
    assert len(run_inference(model, slides, tmp_path / "out", heatmaps=False, batch_size=8, assume_mpp=0.5)) == 1

    tissue_slide(slides / "good.tif")
    out = tmp_path / "out_strict"
    assert [r["slide_id"] for r in run_inference(model, [str(slides / "good.tif"), str(slides / "nompp.tif")], out,
                                                 heatmaps=False, batch_size=8)] == ["good"]
    with pytest.raises(InferenceError, match="strict mode: a slide failed"):
        run_inference(model, slides, out, heatmaps=False, batch_size=8, strict=True)
    with open(out / "predictions.csv") as f:
        assert [r["slide_id"] for r in csv.DictReader(f)] == ["good"]  # what worked is still written


def test_a_model_refuses_a_frozen_encoder_it_was_not_trained_with(tmp_path):
    """A frozen_encoder file of another run beside model.pt (easy to do when zipping bundles) gave other features
    and other probabilities with rc 0: model.pt now records its encoder's weights digest and checks it."""
    from monai_fbta.handlers.checkpoint import RunMismatchError
    from monai_fbta.data.extraction import encoder_fingerprint
    from monai_fbta.networks.encoder import PatchEncoder
    from monai_fbta.pipeline.prepare import model_frozen_encoder

    model = tiny_model(tmp_path, TILING)
    meta = build_inference_network(model).metadata
    encoder = model_frozen_encoder(meta, model.parent)
    assert encoder_fingerprint(encoder)["weights"] == meta["encoder_digest"]
    kept = model.parent / "frozen_encoder_tiny_cnn.pt"
    torch.save(PatchEncoder("tiny_cnn").backbone.state_dict(), kept)  # another run's random weights
    with pytest.raises(RunMismatchError, match="holds other weights .* than the frozen encoder this model was trained on"):
        model_frozen_encoder(meta, model.parent)
    with pytest.raises(RunMismatchError, match="holds other weights"):
        run_inference(model, tmp_path / "slides", tmp_path / "out")
    assert model_frozen_encoder(dict(meta, encoder_digest=None), model.parent)  # a model.pt from before the digest


def test_a_folder_input_names_what_it_does_not_read(tmp_path, caplog):
    from monai_fbta.pipeline.infer import inference_rows

    tissue_slide(tmp_path / "s1.tif")
    (tmp_path / "thumb.png").write_bytes(b"png")
    (tmp_path / "more").mkdir()
    (tmp_path / "labels.csv").write_text("slide_id,path,label\n")
    with caplog.at_level(logging.WARNING, logger="fbta.inference"):
        assert [r["slide_id"] for r in inference_rows(tmp_path)] == ["s1"]
    assert "2 entries are not read" in caplog.text and "more/, thumb.png" in caplog.text
    assert "labels.csv" not in caplog.text
