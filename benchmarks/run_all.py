"""Run every benchmark, one at a time, writing ``benchmarks/results/<name>.json`` and
``docs/images/bench_<name>.png``; then ``python benchmarks/report.py`` renders ``docs/benchmarks.md``.

Our scripts take ``--json``/``--plot`` paths and record the machine themselves. The others
(``bench_mil_heads`` prints JSON; ``bench_read_patches`` writes it) are
wrapped here into the same envelope: ``{"benchmark", "command", "machine", "results"}``.

    python benchmarks/run_all.py [--only memory epoch_time] [--quick] [--device cpu]

``--quick`` uses tiny sizes (seconds, for checking that everything runs, not for quoting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import machine_info, write_json  # noqa: E402

# name -> (script, kind, full args, quick args); kind: "own" (--json/--plot PATH), "json_path", "json_stdout"
BENCHMARKS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "accuracy": ("bench_accuracy.py", "own", [], ["--quick"]),
    "memory": ("bench_memory.py", "own", [], [
        "--encoder", "tiny_cnn", "--patch", "32", "--n", "200", "400", "--heads", "abmil", "--direct-n", "8", "16",
        "--pseudo-bag", "20"]),
    "epoch_time": ("bench_epoch_time.py", "own", ["--encoder", "tiny_cnn", "--patch", "128", "--slide-size", "6144"], [
        "--slides", "2", "--slide-size", "512", "--encoder", "tiny_cnn", "--clusters", "8"]),
    "inference": ("bench_inference.py", "own", [], [
        "--reextract-tiles", "4", "8", "--heatmap-tiles", "8", "8", "--encoder", "tiny_cnn", "--heads", "2", "--repeats", "1",
        "--workers", "0", "--data-dir", "/tmp/fbta_bench_quick"]),
    "read_patches": ("bench_read_patches.py", "json_path", [], ["--n", "40"]),
    "frozen_pipeline": ("bench_frozen_pipeline.py", "own", ["--tiles", "16", "24"], [
        "--encoder", "tiny_cnn", "--tiles", "4", "8", "--repeats", "1", "--profile-patches", "32", "--kmeans-n", "2000",
        "--kmeans-d", "64", "--clusters", "8", "--iterations", "3", "--data-dir", "/tmp/fbta_bench_quick"]),
    "scaling": ("bench_scaling.py", "own", ["--tiles", "4", "8", "--epochs", "3"], [
        "--slides", "2", "--tiles", "2", "4", "--encoder", "tiny_cnn", "--repeats", "1", "--epochs", "2",
        "--data-dir", "/tmp/fbta_bench_quick"]),
    "mil_heads": ("bench_mil_heads.py", "json_stdout", ["--max-n", "mambamil=10000"],
                  ["--n", "500", "--dim", "64", "--heads", "abmil"]),
}


def _parse_json_stdout(text: str):
    """The JSON document printed by a script (after any other lines)."""
    for i, line in enumerate(text.splitlines()):
        if line.startswith(("{", "[")):
            return json.loads("\n".join(text.splitlines()[i:]))
    raise ValueError("no JSON in the output")


def run_one(name: str, quick: bool, device: str | None, results_dir: str, images_dir: str) -> int:
    script, kind, full, quick_args = BENCHMARKS[name]
    path = os.path.join(HERE, script)
    extra = list(quick_args if quick else full)
    if device and kind == "own":
        extra += ["--device", device]
    out_json = os.path.join(results_dir, f"{name}.json")
    cmd = [sys.executable, path, *extra]
    tmp = None
    if kind == "own":
        cmd += ["--json", out_json, "--plot", os.path.join(images_dir, f"bench_{name}.png")]
    elif kind == "json_path":
        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        cmd += ["--json", tmp]
    else:
        cmd += ["--json"]
    shown = " ".join(["python", os.path.relpath(path, ROOT), *cmd[2:]])
    print(f"\n=== {name}: {shown}", flush=True)
    machine = machine_info()
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, text=True, stdout=None if kind != "json_stdout" else subprocess.PIPE)
        if done.returncode != 0:
            print(f"{name} failed with exit {done.returncode}", flush=True)
            return done.returncode
        if kind != "own":
            if kind == "json_path":
                with open(tmp) as f:
                    results = json.load(f)
            else:
                results = _parse_json_stdout(done.stdout)
                print(json.dumps(results, indent=2))
            json_arg = ["--json", "OUT.json"] if kind == "json_path" else ["--json"]
            command = " ".join(["python", os.path.relpath(path, ROOT), *extra, *json_arg])
            write_json(out_json, {"benchmark": name, "command": command,
                                  "machine": machine, "wall_s": time.perf_counter() - start, "results": results})
            print(f"wrote {out_json}")
        return 0
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    p.add_argument("--device", help="passed to our benchmarks (default: cuda when available)")
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--images-dir", default=os.path.join(ROOT, "docs", "images"))
    p.add_argument("--report", action="store_true", help="render docs/benchmarks.md afterwards")
    args = p.parse_args(argv)
    failed = [n for n in (args.only or BENCHMARKS) if run_one(n, args.quick, args.device, args.results_dir, args.images_dir)]
    if args.report:
        from report import main as report_main

        report_main(["--results-dir", args.results_dir])
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
