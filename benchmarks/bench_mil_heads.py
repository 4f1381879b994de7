"""Forward+backward time and peak memory of each MIL head on this CPU.

Each (head, N) runs in a fresh subprocess so measurements do not leak between configs:
the head is built (default sizes: hidden 512), a bag ``[1, N, D]`` is made, one warm-up pass runs
on a 256-instance bag, then ``--repeats`` timed passes of forward + ``logits.sum().backward()``.

* ``time_s``: median wall time of one forward+backward pass.
* ``peak_mb``: growth of the process's peak resident set (``resource.getrusage(...).ru_maxrss``)
  over its resident set just before the timed passes: the extra RAM one pass needs (activations,
  attention/scan temporaries, gradients), as the OS sees it.

Usage: ``python benchmarks/bench_mil_heads.py [--n 1000 10000 50000] [--dim 1024] [--json]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _child(head_name: str, n: int, dim: int, repeats: int, threads: int) -> dict:
    import torch

    from monai_fbta.networks import build_mil_head

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = build_mil_head(head_name, in_features=dim, num_classes=2).train()
    x = torch.randn(1, n, dim)

    def step(bag: torch.Tensor) -> None:
        head.zero_grad(set_to_none=True)
        head(bag).sum().backward()

    step(torch.randn(1, 256, dim))
    head.zero_grad(set_to_none=True)
    rss_before = _rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"head": head_name, "n": n, "dim": dim, "time_s": statistics.median(times), "peak_mb": max(0.0, peak - rss_before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=["abmil", "transmil", "mambamil"])
    parser.add_argument("--n", nargs="+", type=int, default=[1000, 10000, 50000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-n", nargs="*", default=[], metavar="HEAD=N",
                        help="skip bags larger than N for HEAD (e.g. mambamil=10000: its CPU scan needs ~30 GB at 50k)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--child", nargs=2, metavar=("HEAD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.dim, args.repeats, args.threads)))
        return

    max_n = {k: int(v) for k, v in (item.split("=", 1) for item in args.max_n)}
    rows = []
    for head in args.heads:
        for n in args.n:
            if n > max_n.get(head, n):
                rows.append({"head": head, "n": n, "dim": args.dim, "error": [f"skipped: N > --max-n {head}={max_n[head]}"]})
                continue
            cmd = [sys.executable, __file__, "--child", head, str(n), "--dim", str(args.dim),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"head": head, "n": n, "dim": args.dim, "error": done.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if not args.json:
                print(rows[-1], file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'head':<10}{'N':>8}{'fwd+bwd s':>12}{'peak MB':>10}{'s / 1k inst':>13}")
    for row in rows:
        if "error" in row:
            print(f"{row['head']:<10}{row['n']:>8}  failed: {row['error']}")
        else:
            print(f"{row['head']:<10}{row['n']:>8}{row['time_s']:>12.3f}{row['peak_mb']:>10.0f}{1000 * row['time_s'] / row['n']:>13.4f}")


if __name__ == "__main__":
    main()
