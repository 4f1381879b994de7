"""benchmarks/bench_accuracy.py: plan, argument handling and the summary table (no bundle run: too slow here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_shares_runs_between_tables_and_puts_abmil_first(bench):
    runs = bench.plan_runs(["abmil", "transmil"], seeds=[0, 1])
    keys = [r["key"] for r in runs]
    # ABMIL: 4 ablation settings (its frozen and FBTA rows are the main table's); TransMIL: vanilla and FBTA
    assert len(set(keys)) == 6 and len(runs) == 12
    assert all(r["head"] == "abmil" for r in runs[:8])
    e2e = next(r for r in runs if r["views"] == ("e2e",))
    assert e2e["extra"] == {"cons_weight": 0, "lambda_dist": 0}


def test_quick_args_and_bundle_command(bench, tmp_path):
    args = bench.parse_args(["--quick", "--workdir", str(tmp_path), "--override", "num_workers=0"])
    assert args.seeds == [0] and args.heads == ["abmil"] and args.epochs == 2
    run = bench.plan_runs(args.heads, args.seeds)[1]
    cmd = bench.bundle_command(run, args, tmp_path / "r", tmp_path)
    i = cmd.index("--views")
    assert cmd[i + 1] == '["e2e"]' and cmd[cmd.index("--num_workers") + 1] == "0"
    assert "--encoder_weights" not in cmd  # the first run makes the shared extractor


def test_summary_mean_std_and_missing_rows(bench):
    results = {bench.run_key("abmil", ("frozen",), {}): [{"bacc": 0.5, "auc": 0.6}, {"bacc": 0.7, "auc": 0.8}]}
    main, ablation = bench.summarise(results, ["abmil"])
    assert main[0]["test balanced acc"] == "0.600 ± 0.141" and main[0]["seeds"] == 2
    assert main[1]["seeds"] == 0 and ablation[0]["test macro AUC"] == "0.700 ± 0.141"
