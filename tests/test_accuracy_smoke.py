"""benchmarks/bench_accuracy.py: plan, argument handling, summary tables and target checks (no bundle run: too slow)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark, process_holding


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_accuracy")


def test_plan_shares_runs_between_tables_orders_heads_and_seeds(bench):
    runs = bench.plan_runs(["transmil", "abmil"], seeds=[0, 1], folds=[0, 1, 2])
    names = [bench.run_name(r) for r in runs]
    assert len(names) == len(set(names))
    # ABMIL: vanilla, FBTA, its translated-head stage (both seeds), their no-EMA twins and e2e+frozen (first seed);
    # TransMIL: vanilla, FBTA, translated-head stage
    abmil = [r for r in runs if r["head"] == "abmil"]
    assert len(abmil) == 3 * (6 + 3)
    phases = [r["phase"] for r in runs]
    assert phases == sorted(phases) and [r["head"] for r in runs[: 4 * 3]] == ["abmil"] * 12, (
        "ABMIL vanilla / FBTA / its second stage / ablation come first, then TransMIL, then ABMIL's second seed")
    assert [r["head"] for r in runs[12:21]] == ["transmil"] * 9 and {r["seed"] for r in runs[21:30]} == {1}
    assert runs[-1]["extra"].get("ema_momentum") == 1.0
    assert {r["seed"] for r in runs if r["extra"].get("ema_momentum") == 1.0} == {0}
    assert sum(r["head"] == "transmil" for r in runs) == 3 * 3
    for i, r in enumerate(runs):  # a second stage runs after the FBTA run whose last.pt it reads
        if r["stage"]:
            source = [j for j, q in enumerate(runs) if q["key"] == bench.source_key(r)
                      and (q["fold"], q["seed"]) == (r["fold"], r["seed"])]
            assert len(source) == 1 and source[0] < i, bench.run_name(r)
    assert all(r["extra"]["mil_hidden"] == 128 for r in runs if r["head"] == "transmil"), "CPU-sized TransMIL"
    e2e = next(r for r in runs if r["views"] == ("frozen", "e2e"))
    assert e2e["extra"] == {"lambda_dist": 0}
    every = bench.plan_runs(["transmil", "abmil"], seeds=[0, 1], folds=[0, 1, 2], every_seed=True)
    assert sum(r["head"] == "transmil" for r in every) == 2 * 3 * 3, "every_seed: TransMIL's main rows, both seeds"
    assert len(every) == len(runs) + 3 * 3, "the ablation and no-EMA rows still run the first seed only"


def test_quick_args_and_bundle_command(bench, tmp_path):
    args = bench.parse_args(["--quick", "--workdir", str(tmp_path), "--override", "num_workers=0"])
    assert args.seeds == [0] and args.folds == [0] and args.heads == ["abmil"] and args.epochs == 2
    run = bench.plan_runs(args.heads, args.seeds, args.folds)[1]
    cmd = bench.bundle_command(run, args, tmp_path / "r", tmp_path)
    assert cmd[cmd.index("--views") + 1] == '["frozen", "e2e", "translated"]'
    assert cmd[cmd.index("--fold") + 1] == "0" and cmd[cmd.index("--num_workers") + 1] == "0"
    assert cmd[cmd.index("--translated_bag") + 1] == "full"
    assert "--encoder_weights" not in cmd  # the first run makes the shared extractor
    staged = next(r for r in bench.plan_runs(args.heads, args.seeds, args.folds) if r["stage"])
    cmd = bench.bundle_command(staged, args, tmp_path / "r2", tmp_path)
    assert cmd[cmd.index("--config_file") + 1] == f"['{bench.BUNDLE_CONFIG}','{bench.BUNDLE_CONFIG.parent / bench.HEAD_OVERLAY}']"
    assert cmd[cmd.index("--fbta_checkpoint") + 1] == str(tmp_path / "runs" / bench.run_name(run) / "last.pt")
    assert cmd[cmd.index("--views") + 1] == '["translated"]'
    assert "fbta_checkpoint" not in bench.run_identity(staged, args, tmp_path / "r2", tmp_path)["overrides"]


def test_summary_tables_and_targets(bench):
    def res(bacc, fold, seed=0):
        return {"bacc": bacc, "auc": 0.9, "fold": fold, "seed": seed}

    results = {
        bench.run_key("abmil", ("frozen",), {}): [res(0.5, 0), res(0.7, 1)],
        bench.run_key("abmil", bench.ALL_VIEWS, {}): [res(0.9, 0), res(0.8, 1), res(0.85, 0, seed=1)],
    }
    tables = bench.summarise(results, ["abmil"])
    main = {r["method"]: r for r in tables["main"]}
    assert main["ABMIL"]["test balanced acc"] == "0.600 ± 0.141" and main["ABMIL"]["folds x seeds"] == "2 x 1"
    assert main["ABMIL + FBTA"]["folds x seeds"] == "2 x 2"
    assert tables["ablation"][1]["folds x seeds"] == "0"
    targets = bench.checks(tables)
    assert targets["ABMIL + FBTA test bacc"]["met"] is True
    assert targets["ABMIL + FBTA - ABMIL (test bacc)"]["value"] == pytest.approx(0.25)
    assert targets["ablation: e2e+frozen - frozen"]["met"] is None, "a missing row is not a pass"
    tm = bench.HEAD_OVERRIDES["transmil"]
    results[bench.run_key("transmil", ("frozen",), tm)] = [res(0.6, 0)]
    results[bench.run_key("transmil", ("translated",), tm, bench.TRANSLATED_HEAD)] = [res(0.7, 0), res(0.9, 0, seed=1)]
    tables = bench.summarise(results, ["abmil", "transmil"])
    targets = bench.checks(tables)
    name = bench.HEAD_NAMES["transmil"]
    assert targets[f"{name} + FBTA + translated-head stage - {name} (test bacc)"]["value"] == pytest.approx(0.2), (
        "a main row averages every seed the study ran for it")
    assert tables["ablation"][2]["folds x seeds"] == "2 x 1", "other tables read the first seed of a shared run"
    assert targets[f"{name} + FBTA - {name} (test bacc)"]["met"] is None, "no TransMIL FBTA run: not a pass"
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    bench.draw_bars(tables)(ax)  # each bar says how many folds x seeds it averages
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["ABMIL (2 x 1)", "ABMIL + FBTA (2 x 2)"]


def test_paired_gains_pair_runs_by_fold_and_seed_and_take_the_interval_over_fold_means(bench):
    def res(bacc, fold, seed):
        return {"bacc": bacc, "auc": 0.9, "fold": fold, "seed": seed}

    vanilla = [res(0.5, f, s) for f in range(3) for s in range(2)]
    stage = [res(0.5 + 0.1 * f + (0.2 if s else 0.0), f, s) for f in range(3) for s in range(2)]
    results = {bench.run_key("abmil", ("frozen",), {}): vanilla,
               bench.run_key("abmil", ("translated",), {}, bench.TRANSLATED_HEAD): stage + [res(0.9, 4, 0)]}
    gains = bench.paired_gains(results, ["abmil"])
    assert list(gains) == ["ABMIL + FBTA + translated-head stage"], "a row without runs has no gain"
    g = gains["ABMIL + FBTA + translated-head stage"]
    assert g["vs"] == "ABMIL" and (g["folds"], g["seeds"]) == (3, 2), "fold 4 has no vanilla run to pair with"
    assert g["gain"] == pytest.approx(0.2) and (g["ahead"], g["level"], g["behind"]) == (5, 1, 0)
    # per-fold means 0.1, 0.2, 0.3: sd 0.1 over 3 folds, t(0.975, 2) = 4.303
    assert g["interval"] == pytest.approx([0.2 - 4.303 * 0.1 / 3 ** 0.5, 0.2 + 4.303 * 0.1 / 3 ** 0.5], abs=1e-3)
    row = bench.paired_gain_rows(gains)[0]
    assert row["comparison"] == "ABMIL + FBTA + translated-head stage - ABMIL"
    assert row["95% interval over folds"] == "-0.048 to +0.448" and row["runs ahead / level / behind"] == "5 / 1 / 0"


def test_given_frozen_extractor_is_shared_and_a_different_one_refused(bench, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    first, other = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights a")
    other.write_bytes(b"weights b")
    assert bench.share_encoder(None, shared) == {"weights": "random init (saved by the first run)", "sha256": None}
    record = bench.share_encoder(str(first), shared)
    assert (shared / "frozen_encoder_tiny_cnn.pt").read_bytes() == b"weights a" and record["sha256"]
    assert bench.share_encoder(str(first), shared) == record  # the same file again: fine (a resumed study)
    with pytest.raises(SystemExit, match="another frozen extractor"):
        bench.share_encoder(str(other), shared)
    args = bench.parse_args(["--quick", "--workdir", str(tmp_path)])
    cmd = bench.bundle_command(bench.plan_runs(args.heads, args.seeds, args.folds)[0], args, tmp_path / "r", shared)
    assert cmd[cmd.index("--encoder_weights") + 1] == str(shared / "frozen_encoder_tiny_cnn.pt")


def test_study_records_the_training_settings_of_the_config_it_ran(bench, tmp_path):
    import json

    settings = bench.recorded_settings(bench.BUNDLE_CONFIG)
    config = json.loads(bench.BUNDLE_CONFIG.read_text())
    assert settings["lr_mil"] == config["lr_mil"] and settings["num_epochs"] == config["num_epochs"]
    assert set(settings) == set(bench.RECORDED_SETTINGS)
    older = tmp_path / "train.json"  # a study summarised with the config its runs had, not today's defaults
    older.write_text(json.dumps({**config, "lr_mil": 0.001}))
    assert bench.recorded_settings(older)["lr_mil"] == 0.001
    ran = bench.recorded_settings(older, {"num_epochs": 40, "lr_mil": "0.0003"})  # the study's --epochs / --override
    assert ran["num_epochs"] == 40 and ran["lr_mil"] == "0.0003"


def test_time_estimate_scales_with_the_epochs(bench):
    runs = bench.plan_runs(["abmil"], seeds=[0], folds=[0, 1], tables=("main",))
    twenty = bench.estimate_s(runs, prepared=True)
    assert twenty == pytest.approx(2 * (bench.RUN_S["vanilla"] + bench.RUN_S["fbta"] + bench.RUN_S["translated_head"]))
    assert bench.estimate_s(runs, prepared=True, epochs=40) == pytest.approx(2 * twenty)


def test_validation_record_is_the_bundles_selected_epoch_the_e2e_start_and_the_other_tie_rules(bench, tmp_path):
    csv_path = tmp_path / "train_metrics.csv"
    csv_path.write_text("epoch,cls_e2e,val_auc,val_bacc\n1,1.10,0.50,0.33\n2,0.95,0.90,0.60\n3,0.80,0.90,0.80\n"
                        "4,0.70,0.90,0.70\n")
    record = bench.validation_record(csv_path, last=2)
    assert record == {"best_epoch": 2, "epochs_trained": 4, "val_auc": 0.9, "val_bacc": 0.6, "e2e_start_epoch": 3,
                      "val_auc_last2": pytest.approx(0.9), "val_bacc_last2": pytest.approx(0.75),
                      "tied_epochs": 3, "val_bacc_last_tied": 0.7, "val_bacc_max_tied": 0.8}
    untied = {**record, "best_epoch": 4, "val_auc": 0.7, "tied_epochs": 1, "val_bacc_last_tied": 0.6, "val_bacc_max_tied": 0.6}
    summary = bench.validation_summary({"k": [record, untied], "old": [{"bacc": 1}]})
    assert summary == {"k": {"runs": 2, "val_auc": pytest.approx(0.8), "val_bacc": pytest.approx(0.6),
                             "best_in_last_4_epochs": 2, "runs_with_tied_best_auc": 1,
                             "val_bacc_last_tied": pytest.approx(0.65), "val_bacc_max_tied": pytest.approx(0.7),
                             "e2e_start_epochs": [3, 3]}}


def test_validation_by_fold_averages_seeds_within_a_fold_and_skips_rows_without_runs(bench):
    def run(fold, seed, auc, bacc):
        return {"fold": fold, "seed": seed, "val_auc": auc, "val_bacc": bacc, "val_auc_last5": auc - 0.1,
                "val_bacc_last5": bacc - 0.1}

    vanilla = bench.run_key("abmil", ("frozen",), {})
    results = {vanilla: [run(0, 0, 0.9, 0.6), run(0, 1, 0.7, 0.8), run(1, 0, 1.0, 1.0)]}
    rows = bench.validation_by_fold(results, ["abmil"], [0, 1, 2], ("main",))
    assert rows == [{"method": "ABMIL", "fold 0": "0.800 / 0.700", "fold 1": "1.000 / 1.000", "fold 2": "-",
                     "mean": "0.867 / 0.800", "mean of the last 5 epochs": "0.767 / 0.700"}]


def test_finished_run_is_reused_only_with_the_settings_it_had(bench, tmp_path):
    import json

    def study(*extra):
        args = bench.parse_args(["--quick", "--workdir", str(tmp_path / "w"), "--dataset-dir", str(tmp_path / "d"),
                                 *extra])
        run = bench.plan_runs(args.heads, args.seeds, args.folds)[0]
        shared = tmp_path / "w" / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        return run, args, tmp_path / "w" / "runs" / bench.run_name(run), shared

    run, args, run_dir, shared = study()
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "test_metrics.json").write_text(json.dumps({"metrics": {"test_bacc": 1.0, "test_auc": 1.0}}))
    with pytest.raises(SystemExit, match="without settings.json"):  # a run of unknown settings is not reused
        bench.run_one(run, args, shared)
    (run_dir / bench.RUN_RECORD).write_text(json.dumps(bench.run_identity(run, args, run_dir, shared)))
    bench.check_finished_run(run_dir, bench.run_identity(run, args, run_dir, shared))  # the same study resumed
    moved = bench.run_identity(run, args, tmp_path / "elsewhere", shared)
    bench.check_finished_run(run_dir, moved)  # the workdir's own paths are not settings
    for extra, changed in ((["--epochs", "3"], "--num_epochs: '2' -> '3'"),
                           (["--override", "lr_mil=0.001"], "--lr_mil: None -> '0.001'")):
        run2, args2, _, _ = study(*extra)
        with pytest.raises(SystemExit, match=changed):
            bench.run_one(run2, args2, shared)
    (shared / "frozen_encoder_tiny_cnn.pt").write_bytes(b"another extractor")
    with pytest.raises(SystemExit, match="encoder_sha256"):
        bench.check_finished_run(run_dir, bench.run_identity(run, args, run_dir, shared))


def test_existing_slides_must_have_the_requested_synthetic_settings(bench, tmp_path):
    import json

    datalist = tmp_path / "datalist.json"
    config = {"size": 2048, "tumour_fraction": 0.08, "stain_jitter": 2.0, "seed": 1, "num_classes": 3}
    datalist.write_text(json.dumps({"config": config, "training": [{}] * 120}))
    bench.check_dataset(datalist, dict(bench.DATA))
    with pytest.raises(SystemExit, match=r"seed=1 \(asked 3\)"):
        bench.check_dataset(datalist, {**bench.DATA, "seed": 3})
    with pytest.raises(SystemExit, match=r"num_slides=120 \(asked 12\)"):
        bench.check_dataset(datalist, {**bench.DATA, "num_slides": 12})
    kinds = bench.parse_data_value("pleomorphic,glandular,cords")  # --data classes=...: another morphology
    assert kinds == ["pleomorphic", "glandular", "cords"]
    assert (bench.parse_data_value("3"), bench.parse_data_value("0.05")) == (3, 0.05)
    with pytest.raises(SystemExit, match=r"classes=None \(asked \['pleomorphic'"):
        bench.check_dataset(datalist, {**bench.DATA, "classes": kinds})
    datalist.write_text(json.dumps({"config": {**config, "classes": kinds}, "training": [{}] * 120}))
    bench.check_dataset(datalist, {**bench.DATA, "classes": kinds})
    with pytest.raises(SystemExit, match=r"classes=\['pleomorphic', 'glandular', 'cords'\] \(asked None\)"):
        bench.check_dataset(datalist, dict(bench.DATA))  # other classes do not pass for the default ones
    datalist.write_text(json.dumps({"config": {**config, "classes": []}, "training": [{}] * 120}))
    bench.check_dataset(datalist, dict(bench.DATA))  # written by the present generator with the default classes
    datalist.write_text(json.dumps({"training": []}))  # a user's own datalist: not the synthetic benchmark
    with pytest.raises(SystemExit, match="no synthetic generator settings"):
        bench.check_dataset(datalist, dict(bench.DATA))


def test_a_run_in_progress_in_another_process_is_left_alone(bench, tmp_path):
    """A second bench on the same workdir stops, naming the holder, instead of deleting a live run's folder; the
    kernel frees the lock when its holder dies, however it dies."""
    import json

    args = bench.parse_args(["--quick", "--workdir", str(tmp_path / "w"), "--dataset-dir", str(tmp_path / "d")])
    run = bench.plan_runs(args.heads, args.seeds, args.folds)[0]
    shared = tmp_path / "w" / "shared"
    shared.mkdir(parents=True)
    run_dir = tmp_path / "w" / "runs" / bench.run_name(run)
    (run_dir / "eval").mkdir(parents=True)
    partial = "epoch,val_auc,val_bacc\n1,0.50,0.33\n"
    (run_dir / "eval" / "train_metrics.csv").write_text(partial)  # what the live run has written so far
    lock = run_dir.parent / f".{run_dir.name}.lock"
    take = f"from monai_fbta._io import exclusive_lock\nheld = exclusive_lock({str(lock)!r}, 'run')\nheld.__enter__()"
    with process_holding(take) as holder:
        with pytest.raises(SystemExit, match=rf"run {run_dir.name} is in use by another process .*{holder.pid}"):
            bench.run_one(run, args, shared)
        assert (run_dir / "eval" / "train_metrics.csv").read_text() == partial  # not deleted, not restarted
    (run_dir / "eval" / "test_metrics.json").write_text(json.dumps({"metrics": {"test_bacc": 1.0, "test_auc": 1.0}}))
    (run_dir / bench.RUN_RECORD).write_text(json.dumps(bench.run_identity(run, args, run_dir, shared)))
    assert bench.run_one(run, args, shared)["bacc"] == 1.0  # the killed holder's lock is free again
