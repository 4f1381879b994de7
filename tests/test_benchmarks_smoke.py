"""Smoke tests of the benchmark scripts: argument parsing, the meters, the smallest configs, the report.

Tiny models and sizes only; the figures themselves come from running the scripts (benchmarks/README.md).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from conftest import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
common = importlib.import_module("_common")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_linear_fit_and_table():
    assert common.linear_fit([1, 2, 4], [3, 5, 9]) == pytest.approx((1.0, 2.0))
    with pytest.raises(ValueError):
        common.linear_fit([2, 2], [1, 3])
    text = common.format_table([{"a": 1, "b": 2.5}, {"a": 10, "b": float("nan")}])
    assert text.splitlines()[0].split() == ["a", "b"] and "2.5" in text and "-" in text.splitlines()[-1]
    md = common.format_table([{"a": 1}], markdown=True)
    assert md.splitlines()[:2] == ["| a |", "|---|"]


def test_saved_tensor_meter_counts_activations_not_excluded():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(1024, 256)
    meter = common.SavedTensorMeter(exclude=[w])
    with meter():
        (x @ w).relu().sum()
    # matmul saves x (1 MiB, w excluded); relu saves its output (1 MiB)
    assert meter.mb == pytest.approx(2.0, rel=0.01)


def test_peak_memory_sees_a_transient_allocation():
    with common.PeakMemory(torch.device("cpu")) as peak:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del t
    assert peak.method.startswith("rss")
    assert 48 <= peak.peak_mb < 512


def _child_json(capsys, module, argv):
    module.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_memory_children_fbta_and_checkpointing(capsys):
    bench = importlib.import_module("bench_memory")
    common_args = ["--encoder", "tiny_cnn", "--patch", "32", "--chunk", "8", "--threads", "1", "--device", "cpu"]
    fbta = _child_json(capsys, bench, ["--child", "fbta_abmil", "300", "--pseudo-bag", "12", *common_args])
    assert fbta["patches_through_encoder"] == 12 and fbta["saved_mb"] > 0 and fbta["peak_mb"] >= 0
    direct = _child_json(capsys, bench, ["--child", "direct", "64", *common_args])
    ckpt = _child_json(capsys, bench, ["--child", "direct_ckpt", "64", *common_args])
    assert direct["patches_through_encoder"] == 64
    assert ckpt["saved_mb"] < 0.5 * direct["saved_mb"]  # checkpointing keeps only chunk outputs


def test_memory_rejects_unknown_config():
    bench = importlib.import_module("bench_memory")
    with pytest.raises(SystemExit, match="unknown config"):
        bench.main(["--configs", "nope", "--n", "10", "--device", "cpu"])


def test_epoch_time_and_inference_tiny_then_report(tmp_path, capsys):
    epoch = importlib.import_module("bench_epoch_time")
    infer = importlib.import_module("bench_inference")
    report = importlib.import_module("report")
    results, images = tmp_path / "results", tmp_path / "images"
    out = epoch.main(["--slides", "2", "--slide-size", "320", "--patch", "32", "--encoder", "tiny_cnn", "--clusters", "4",
                      "--epochs", "1", "--device", "cpu", "--json", str(results / "epoch_time.json"),
                      "--plot", str(images / "bench_epoch_time.png")])
    assert [r["method"] for r in out["rows"]] == ["vanilla", "fbta", "direct_e2e_ckpt"]
    assert all(r["s_per_epoch"] > 0 for r in out["rows"])
    n = sum(out["patches_per_slide"])
    assert out["rows"][2]["patches_through_extractor_per_epoch"] == n
    assert out["rows"][1]["patches_through_extractor_per_epoch"] <= 2 * 4
    assert (images / "bench_epoch_time.png").stat().st_size > 1000

    inf = infer.main(["--reextract-tiles", "2", "4", "--heatmap-tiles", "4", "4", "--encoder", "tiny_cnn", "--heads", "2",
                      "--repeats", "1", "--workers", "0", "--device", "cpu", "--data-dir", str(tmp_path / "slides"),
                      "--workdir", str(tmp_path / "work"), "--json", str(results / "inference.json")])
    read_encode, mil, reextract = (r["seconds"] for r in inf["rows"][:3])
    assert [r["patches"] for r in inf["rows"]] == [8] * 6 + [16] * 3  # both sides on the same slide; all measured
    assert reextract == pytest.approx(read_encode + mil) and all(r["seconds"] > 0 for r in inf["rows"])
    assert all(c["same_class"] for c in inf["checks"].values())
    assert (tmp_path / "work" / "out" / "heatmaps" / "bench_hm_heatmap.png").is_file()

    md = tmp_path / "benchmarks.md"
    report.main(["--results-dir", str(results), "--images-dir", str(images), "--out", str(md)])
    text = md.read_text()
    saved = json.loads((results / "epoch_time.json").read_text())
    assert saved["command"] in text and saved["machine"]["date"] in text
    assert f"{saved['rows'][0]['s_per_epoch']:.3g}" in text
    assert "images/bench_epoch_time.png" in text and "Slide inference" in text


def test_run_all_parses_printed_json():
    run_all = importlib.import_module("run_all")
    assert run_all._parse_json_stdout("noise\n[\n {\"a\": 1}\n]\n") == [{"a": 1}]
    with pytest.raises(ValueError):
        run_all._parse_json_stdout("no json here")


def test_frozen_pipeline_and_scaling_tiny(tmp_path):
    pipeline = importlib.import_module("bench_frozen_pipeline")
    out = pipeline.main(["--encoder", "tiny_cnn", "--tiles", "2", "4", "--repeats", "1", "--workers", "0",
                         "--profile-patches", "8", "--kmeans-n", "200", "--kmeans-d", "16", "--clusters", "4",
                         "--iterations", "2", "--device", "cpu", "--data-dir", str(tmp_path)])
    assert [r["run"] for r in out["rows"]] == ["bare forward", "extraction, 0 reader worker(s)"]
    assert out["rows"][0]["patches"] == 8 and all(r["patches_per_s"] > 0 for r in out["rows"])
    assert set(out["ratios"]) == {"extraction, 0 reader worker(s) / bare forward"}
    assert all(v > 0 for v in out["profile_ms_per_patch"].values())
    scaling = importlib.import_module("bench_scaling")
    out = scaling.main(["--slides", "2", "--tiles", "2", "2", "--encoder", "tiny_cnn", "--repeats", "1",
                        "--skip", "training", "--device", "cpu", "--data-dir", str(tmp_path)])
    assert [(r["what"], r["processes"], r["patches_or_slides"]) for r in out["rows"]] == [("extraction", 1, 8), ("extraction", 2, 8)]


def test_report_shows_the_accuracy_plot_and_the_study_on_other_data_after_it(tmp_path):
    report = importlib.import_module("report")
    results, images = tmp_path / "results", tmp_path / "images"
    results.mkdir()
    images.mkdir()
    (images / "bench_accuracy.png").write_bytes(b"png")
    table = {"main": [{"method": "ABMIL", "test balanced acc": "0.5 ± 0.1"}], "ablation": [{"views": "frozen"}]}
    for name in ("accuracy", "accuracy_medium", "memory"):
        payload = {"tables": table, "data": {"seed": name}, "frozen_encoder": {"weights": "w.pt", "sha256": "ab12"},
                   "bundle_settings": {"lr_mil": 0.0001}}
        (results / f"{name}.json").write_text(json.dumps(payload if name != "memory" else {"rows": [{"n": 1}]}))
    text = report.render(str(results), str(images), str(tmp_path / "benchmarks.md"))
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles[:2] == ["## " + report.TITLES["accuracy"], "## Accuracy study, variant `medium` (other data, extractor or settings)"]
    assert "![accuracy](images/bench_accuracy.png)" in text  # the section's own plot, not one named after a table
    assert "Frozen extractor of every run: w.pt (sha256 ab12)" in text
    assert "Bundle training settings (`--config` with the study's `--epochs`; the bundle overrides above come on top): {'lr_mil': 0.0001}" in text


def test_report_summarises_the_current_pipeline_studies_first_with_their_plot(tmp_path):
    report = importlib.import_module("report")
    results, images = tmp_path / "results", tmp_path / "images"
    results.mkdir()
    rows = [{"method": "ABMIL", "test balanced acc": "0.750 ± 0.080", "folds x seeds": "5 x 3"},
            {"method": "ABMIL + FBTA", "test balanced acc": "0.800 ± 0.050", "folds x seeds": "5 x 3"},
            {"method": "ABMIL + FBTA + translated-head stage", "test balanced acc": "0.880 ± 0.050", "folds x seeds": "5 x 3"}]
    data = {"size": 3072, "tumour_fraction": 0.05, "seed": 3}
    gains = {"ABMIL + FBTA + translated-head stage": {"vs": "ABMIL", "gain": 0.13, "interval": [0.051, 0.2]}}
    (results / "accuracy_translated_head.json").write_text(json.dumps(
        {"tables": {"main": rows}, "data": data, "paired_gains": gains}))
    (results / "accuracy_kinds_translated_head.json").write_text(json.dumps(  # a study without the second stage's row
        {"tables": {"main": rows[:2]}, "data": {**data, "classes": ["a", "b", "c"]}}))
    (results / "accuracy_medium.json").write_text(json.dumps({"tables": {"main": rows}, "data": data}))  # not a summary study
    md = tmp_path / "docs" / "benchmarks.md"
    report.main(["--results-dir", str(results), "--images-dir", str(images), "--out", str(md)])
    text = md.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")][0] == "## At a glance: the bundle's current pipeline"
    table = [line for line in text.split("## Accuracy")[0].splitlines() if line.startswith("| ABMIL")]
    assert table == [
        "| ABMIL | 3072 px, lesions 5%, generator seed 3 | 0.750 ± 0.080 | 0.800 ± 0.050 | 0.880 ± 0.050 | +0.130 (+0.051 to "
        "+0.200) | 5 x 3 | `accuracy_translated_head.json` |",
        "| ABMIL | 3072 px, lesions 5%, generator seed 3, classes a / b / c | 0.750 ± 0.080 | 0.800 ± 0.050 | - | - | 5 x 3 "
        "| `accuracy_kinds_translated_head.json` |"]
    assert (images / "bench_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "![summary](../images/bench_summary.png)" in text


def test_sweep_mil_head_reports_when_the_head_leaves_chance_on_validation_only(tmp_path):
    """Bags whose label is carried by 3 of 40 instances: the head leaves chance; test slides are never read."""
    from monai_fbta.data.store import add_arrays, store_path, write_coords

    sweep = load_benchmark("sweep_mil_head")
    rng = np.random.default_rng(0)
    (tmp_path / "shared").mkdir()
    ids = [f"s{i}" for i in range(32)]
    labels = {s: i % 2 for i, s in enumerate(ids)}
    for s in ids:
        feats = rng.normal(size=(40, 8)).astype(np.float32)
        feats[:3, 0] += 4.0 if labels[s] else -4.0
        path = store_path(tmp_path / "cache", s)
        write_coords(path, np.zeros((40, 2), dtype=np.int64))
        add_arrays(path, {"features": feats})
    folds = [{"train": ids[:16], "val": ids[16:24], "test": ids[24:]}]
    (tmp_path / "shared" / "splits.json").write_text(json.dumps({"folds": folds}))
    (tmp_path / "datalist.json").write_text(json.dumps(
        {"training": [{"slide_id": s, "label": labels[s]} for s in ids], "num_classes": 2}))
    for s in ids[24:]:  # a test store that is read would fail the run
        Path(store_path(tmp_path / "cache", s)).write_bytes(b"not an HDF5 file")
    rows = sweep.main(["--workdir", str(tmp_path), "--dataset-dir", str(tmp_path), "--pairs", "[[0, 0]]",
                       "--epochs", "8", "--grid", "lr=[0.003]", "hidden=[16]", "attention_dim=[8]"])
    assert [r["setting"] for r in rows] == [{"lr": 0.003, "hidden": 16, "attention_dim": 8}]  # a head argument too
    assert rows[0]["start_epoch"][0] is not None and rows[0]["best_val_auc"] > 0.9
    with pytest.raises(TypeError, match="no_such_argument"):  # a misspelt key is not silently ignored
        sweep.main(["--workdir", str(tmp_path), "--dataset-dir", str(tmp_path), "--pairs", "[[0, 0]]",
                    "--epochs", "1", "--grid", "no_such_argument=[1]"])


def test_diagnose_pseudo_bags_counts_lesion_patches_of_cached_clusters(tmp_path, capsys):
    """Two 'clusters' of features, one of them exactly the patches in the lesion mask: a pseudo-bag of M per cluster
    holds M lesion patches of 2M, against 4 of 16 in the whole bag."""
    from monai_fbta.data.clustering import cluster_store
    from monai_fbta.data.store import add_arrays, store_path, write_coords

    bench = load_benchmark("diagnose_pseudo_bags")
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir(), cache.mkdir()
    coords = np.array([(x, y) for y in range(0, 256, 64) for x in range(0, 256, 64)])  # 16 patches of 64 px
    mask = np.zeros((16, 16), bool)  # 16 level-0 px per mask px: the top-left 128 x 128 px are lesion
    mask[:8, :8] = True
    np.save(data / "s0_tumour_mask.npy", mask)
    lesion = (coords[:, 0] < 128) & (coords[:, 1] < 128)
    path = store_path(cache, "s0")
    write_coords(path, coords, {"patch_size_level0": 64})
    add_arrays(path, {"features": np.where(lesion[:, None], 5.0, -5.0) + np.random.default_rng(0).normal(0, .1, (16, 4))},
               fingerprint={"encoder": "test"})
    assert sorted(np.bincount(cluster_store(path, 2, seed=0))) == [4, 12]
    (data / "datalist.json").write_text(json.dumps({"class_names": ["a", "b"], "training": [
        {"slide_id": "s0", "label": 1, "tumour_mask": "s0_tumour_mask.npy", "mask_downsample": 16}]}))
    out = bench.main(["--dataset-dir", str(data), "--cache-dir", str(cache), "--num-clusters", "2",
                      "--num-per-cluster", "1", "3", "--draws", "5"])
    slide = out["slides"][0]
    assert (slide["N"], slide["lesion"], slide["share"], slide["lesion_clusters"]) == (16, 4, 0.25, 1)
    assert slide["M1"] == (1.0, 0.5) and slide["M3"] == (3.0, 0.5)
    assert [r["class"] for r in out["table"]] == ["b", "all"] and "3.00 (0.500)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no clusters of C=3"):  # clusters of other settings are not read as these
        bench.main(["--dataset-dir", str(data), "--cache-dir", str(cache), "--num-clusters", "3"])


def test_diagnose_views_r_squared_of_the_translation():
    """diagnose_views.r_squared: 1 for a perfect translation, 0 for the target's per-feature mean, and a clear
    exit when the two bags have different patches."""
    diagnose = load_benchmark("diagnose_views")
    target = torch.randn(1, 50, 4, generator=torch.Generator().manual_seed(0))
    assert diagnose.r_squared(target, target) == pytest.approx(1.0)
    assert diagnose.r_squared(target.mean(1, keepdim=True).expand_as(target), target) == pytest.approx(0.0, abs=1e-12)
    assert diagnose.r_squared(target + 0.1 * torch.randn_like(target), target) < 1
    with pytest.raises(SystemExit, match="differ in shape"):
        diagnose.r_squared(target[:, :49], target)


def test_translation_ceiling_maps_and_head_training_learn_what_they_are_given():
    """translation_ceiling: the ridge map recovers a linear map, the MLP fits a non-linear one that ridge cannot, and a fresh ABMIL head learns bags whose label is carried by one instance's feature."""
    from monai_fbta.networks import build_mil_head

    ceiling = load_benchmark("translation_ceiling")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=gen)
    a, b = torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    assert ceiling.fit_ridge(x, x @ a + b, alpha=1e-6)(x) == pytest.approx(x @ a + b, abs=1e-3)
    y = x + x.abs()  # no linear map fits |x|
    ridge_error = F.mse_loss(ceiling.fit_ridge(x, y)(x), y)
    assert F.mse_loss(ceiling.fit_mlp(x, y, hidden=64, epochs=30, batch_size=128)(x), y) < 0.5 * ridge_error

    def bags(n: int) -> tuple[list[torch.Tensor], list[int]]:
        out, labels = [], []
        for i in range(n):
            bag = torch.randn(20, 8, generator=gen)
            bag[0, 0] += 4.0 * (i % 2)  # class 1: one instance with a large first feature
            out.append(bag)
            labels.append(i % 2)
        return out, labels

    head = build_mil_head("abmil", in_features=8, num_classes=2, hidden=16)
    got = ceiling.train_head(head, bags(40), bags(20), epochs=15, lr=5e-3, weight_decay=1e-4, seed=0)
    assert got["val_auc"] > 0.9 and 1 <= got["best_epoch"] <= 15, got
