"""Shared helpers of the benchmark scripts: device choice, machine facts, peak-memory meters,
fresh-subprocess runs, linear fits, tables, and atomic JSON/plot output.

Peak memory on the CPU is the growth of the process's peak resident set (``VmHWM``) over its
resident set just before the measured step; the peak is reset first through
``/proc/self/clear_refs`` (Linux >= 4.0) so a warm-up does not hide it. On CUDA it is
``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the step.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from monai_fbta._io import atomic_open
from monai_fbta.environment import software_environment

__all__ = [
    "add_common_args", "resolve_device", "start_run", "machine_info", "rss_mb", "PeakMemory", "SavedTensorMeter",
    "run_child", "child_main", "linear_fit", "timed", "format_table", "print_table", "write_json", "save_plot",
    "mem_available_mb", "print_ratios", "finish", "ratio", "tiled_slide", "interleaved", "median", "cpu_seconds", "timed_cpu",
    "DATA_DIR",
]


DATA_DIR = os.environ.get("FBTA_BENCH_DATA", os.path.join("/tmp", "fbta_bench_data"))
"""Where benchmarks keep the slides they generate between runs (``$FBTA_BENCH_DATA``; outside the repository)."""


def add_common_args(parser, threads: int | None = None) -> None:
    """``--device``, ``--threads``, ``--json PATH``, ``--plot PATH`` (every benchmark has them)."""
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--plot", metavar="PATH", help="also draw a PNG plot here")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def start_run(args, title: str) -> tuple[torch.device, dict[str, Any]]:
    """Apply ``--threads``, resolve ``--device`` and print ``title`` with the device and CPU load.

    Returns ``(device, machine_info)``.
    """
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    print(f"{title} on {device}, load {info['load_avg_1m']:.2f} on {info['cpu_count']} CPUs", flush=True)
    return device, info


def mem_available_mb() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (inf where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Date, host facts and the load average when the run started (other jobs skew timings)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(device) if device is not None else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "mem_total_gb": round(_meminfo_kb("MemTotal") / 2**20, 1),
        "packages": software_environment(),
    }
    return info


def _meminfo_kb(key: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_mb() -> float:
    """Current resident set of this process (MiB)."""
    return _status_mb("VmRSS")


class PeakMemory:
    """Peak extra memory of the code run inside ``with PeakMemory(device) as m:`` -> ``m.peak_mb``.

    CPU: ``VmHWM - VmRSS`` at entry, after resetting ``VmHWM`` (``m.method`` says ``"rss"``; where the
    reset is not allowed it falls back to ``ru_maxrss``, which is only right if nothing before
    peaked higher: ``"rss-noreset"``). CUDA: ``max_memory_allocated - memory_allocated`` at entry.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak_mb = float("nan")
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "cuda_max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "rss"
        except OSError:
            self.method = "rss-noreset"
        self._base = rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        else:
            self.peak_mb = max(0.0, _status_mb("VmHWM") - self._base)


class SavedTensorMeter:
    """Bytes autograd keeps for backward: unique storages packed by ``saved_tensors_hooks`` inside the
    ``with`` block, excluding ``exclude`` tensors (parameters, input patches: they exist anyway).

    This is the activation memory at the end of the forward pass, the quantity that grows with the
    bag; it does not include transient buffers, gradients or optimiser state.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._skip:
            self._seen[ptr] = storage.nbytes()
        return t

    @property
    def mb(self) -> float:
        return sum(self._seen.values()) / 2**20

    @contextmanager
    def __call__(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def run_child(
    script: str, args: Sequence[str], timeout: float | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python script --child ... args`` in a fresh process; its last stdout line is a JSON dict.

    ``env`` adds environment variables for the child. A failure (non-zero exit, e.g. killed for
    memory) returns ``{"error": ...}`` instead of raising.
    """
    cmd = [sys.executable, script, *args]
    env = {**os.environ, **(env or {})}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"no JSON result from {' '.join(cmd)}"}
    return json.loads(lines[-1])


def child_main(fn: Callable[..., Mapping[str, Any]], **kwargs: Any) -> None:
    """Print ``fn(**kwargs)`` as one JSON line (the child side of :func:`run_child`)."""
    print(json.dumps(dict(fn(**kwargs))), flush=True)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b * x`` -> ``(a, b)`` (needs two distinct x)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if len(set(xs.tolist())) < 2:
        raise ValueError("a linear fit needs at least two distinct sizes")
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """``(seconds, fn())`` with CUDA synchronised around the call."""
    sync = device is not None and torch.device(device).type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


# the labels of a study's rows: "<head>", "<head> + FBTA", "<head> + FBTA + translated-head stage"
FBTA_SUFFIX = " + FBTA"
TRANSLATED_HEAD_SUFFIX = " + FBTA + translated-head stage"


def mean_std(values: Sequence[float]) -> str:
    """``"0.753 ± 0.079"`` (sample std; 0 for one value), or ``"-"`` without values."""
    if not len(values):
        return "-"
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.3f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.3f}"


def parse_mean_std(cell: str) -> tuple[float, float]:
    """The inverse of :func:`mean_std`: ``(mean, std)``, ``(nan, 0.0)`` for ``"-"``."""
    if cell == "-":
        return float("nan"), 0.0
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


def format_interval(interval: Sequence[float]) -> str:
    """``[-0.012, 0.31]`` -> ``"-0.012 to +0.310"``; ``"-"`` when undefined (one fold)."""
    lo, hi = interval
    return "-" if lo != lo or hi != hi else f"{lo:+.3f} to {hi:+.3f}"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, markdown: bool = False) -> str:
    """Rows of dicts as an aligned text table (or a Markdown table)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in cells)])


def print_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    print(f"\n{title}\n{format_table(rows, columns)}")


def print_ratios(ratios: Mapping[str, Mapping[str, Any]]) -> None:
    """``{name: {"value": x, "target": "...", "met": bool}}`` as lines."""
    print("\nRatios (measured in this run):")
    for name, r in ratios.items():
        met = r.get("met")
        flag = "" if met is None else ("  [target met]" if met else "  [target MISSED]")
        print(f"  {name}: {r['value']:.3g}  (target {r.get('target', '-')}){flag}")


def ratio(value: float, target: str, met: bool | None) -> dict[str, Any]:
    """One entry of the ``ratios`` dict printed by :func:`print_ratios` and stored in the JSON."""
    return {"value": float(value), "target": target, "met": None if met is None else bool(met)}


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (:func:`monai_fbta._io.atomic_open`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def save_plot(path: str | os.PathLike, draw: Callable[[Any], None], figsize=(6.4, 4.2)) -> None:
    """Draw with ``draw(ax)`` and save a PNG atomically (matplotlib Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
        fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=120, format="png", bbox_inches="tight")  # long axis labels stay whole
    finally:
        plt.close(fig)


def finish(args, name: str, payload: dict[str, Any], draw: Callable[[Any], None] | None = None) -> None:
    """Write ``--json`` / ``--plot`` outputs when asked (payload gains ``benchmark`` and ``command``)."""
    payload.setdefault("benchmark", name)
    payload.setdefault("command", " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]))
    if getattr(args, "json", None):
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    if getattr(args, "plot", None) and draw is not None:
        save_plot(args.plot, draw)
        print(f"wrote {args.plot}")


def median(values: Iterable[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    values = list(values)
    return float(np.median(values)) if values else float("nan")


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended (DataLoader workers)."""
    t = os.times()  # children: 10 ms ticks; this process: process_time's finer clock
    return time.process_time() + t.children_user + t.children_system


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(wall seconds, CPU seconds, fn())``: CPU time is what other jobs on a shared machine change least."""
    cpu = cpu_seconds()
    wall, out = timed(fn)
    return wall, cpu_seconds() - cpu, out


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: bool = True,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of every call of ``fns`` run A, B, A, B, ... ``repeats`` times (load drift hits each alike).

    One untimed call of each first when ``warmup``. Returns ``{name: [seconds, ...]}``; the CPU seconds of each
    call are appended to ``cpu[name]`` when ``cpu`` is given.
    """
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, used, _ = timed_cpu(fn)
            times[name].append(wall)
            if cpu is not None:
                cpu.setdefault(name, []).append(used)
    return times


def _texture_bank(rng: np.random.Generator, count: int, tile: int) -> np.ndarray:
    """``count`` H&E-pink textured ``[tile, tile, 3]`` uint8 tiles (smooth variation plus grain)."""
    from scipy import ndimage as ndi

    low = ndi.zoom(rng.random((count, tile // 32, tile // 32, 3), dtype=np.float32), (1, 32, 32, 1), order=1)
    pink = np.array([200, 120, 180], np.float32)
    bank = np.clip(pink * (0.75 + 0.5 * low), 0, 255).astype(np.uint8)
    return bank ^ rng.integers(0, 24, bank.shape, dtype=np.uint8)


def _level_tiles(shape: tuple[int, int], box: tuple[int, int, int, int], bank: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """Row-major ``[tile, tile, 3]`` tiles of one level ``shape`` (h, w): textured inside ``box`` (x0, y0, x1, y1
    in this level's pixels), white elsewhere."""
    tile = bank.shape[1]
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = box
    for ty in range(0, shape[0], tile):
        for tx in range(0, shape[1], tile):
            out = np.full((tile, tile, 3), 255, np.uint8)
            cy0, cy1 = max(y0 - ty, 0), min(y1 - ty, tile)
            cx0, cx1 = max(x0 - tx, 0), min(x1 - tx, tile)
            if cy1 > cy0 and cx1 > cx0:
                out[cy0:cy1, cx0:cx1] = bank[rng.integers(len(bank))][cy0:cy1, cx0:cx1]
            yield out


def _small_level(shape: tuple[int, int], box: tuple[int, int, int, int], bank: np.ndarray, seed: int) -> np.ndarray:
    """One small level as an array (for the thumbnail page), from the same tiles as :func:`_level_tiles`."""
    tile = bank.shape[1]
    tiles = _level_tiles(shape, box, bank, seed)
    grid = [[next(tiles) for _ in range(0, shape[1], tile)] for _ in range(0, shape[0], tile)]
    return np.concatenate([np.concatenate(row, 1) for row in grid], 0)[: shape[0], : shape[1]]


def tiled_slide(path: str | os.PathLike, tissue_tiles: tuple[int, int], margin_tiles: int = 2, tile: int = 256,
                mpp: float = 0.5, quality: int = 90, seed: int = 0) -> str:
    """An Aperio-style pyramidal JPEG TIFF of ``tissue_tiles`` (rows, cols) textured tiles inside a white margin.

    Written tile by tile (memory stays small for slides of 10^4-10^5 patches) with the layout of
    :func:`monai_fbta.synthetic.tiff.write_pyramidal_tiff`: level 0, a small thumbnail page, then levels at
    downsample 2, 4, ... down to <= 1024 px. ``tile``-px patches at ``mpp`` tile the tissue exactly: tiling at
    ``patch_size=tile``, ``target_mpp=mpp`` gives ``rows * cols`` patches. Kept when it exists with the same
    settings (recorded in the file's ImageDescription), so benchmarks can cache it between runs.
    """
    import tifffile

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tag = f"bench tiled_slide {tissue_tiles[0]}x{tissue_tiles[1]} m{margin_tiles} t{tile} mpp{mpp:g} q{quality} s{seed}"
    if os.path.isfile(path):
        try:
            with tifffile.TiffFile(path) as tf:
                if tag in (tf.pages[0].description or ""):
                    return path
        except Exception:  # unreadable (e.g. a killed write): rewrite it
            pass
    rng = np.random.default_rng(seed)
    bank = _texture_bank(rng, 16, tile)
    rows, cols = tissue_tiles
    h, w = (rows + 2 * margin_tiles) * tile, (cols + 2 * margin_tiles) * tile
    box0 = (margin_tiles * tile, margin_tiles * tile, (margin_tiles + cols) * tile, (margin_tiles + rows) * tile)
    shapes = [(h, w)]
    while max(shapes[-1]) > 1024 and min(shapes[-1]) >= 32:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    small = shapes[-1]
    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": quality}, metadata=None)
    tmp = f"{path}.{os.getpid()}.tmp"
    with tifffile.TiffWriter(tmp, bigtiff=h * w * 3 > 2**32 - 2**28) as tw:
        for i, shape in enumerate(shapes):
            scale = 2**i
            box = tuple(v // scale for v in box0)
            data = _level_tiles(shape, box, bank, seed + i)
            if i == 0:
                tw.write(data, shape=(*shape, 3), dtype=np.uint8, tile=(tile, tile),
                         description=f"{head}|AppMag = {10 / mpp:g}|MPP = {mpp:g}|{tag}",
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **common)
                thumb = _small_level(small, tuple(v // 2 ** (len(shapes) - 1) for v in box0), bank, seed)
                tw.write(thumb, rowsperstrip=16, description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> "
                         f"{thumb.shape[1]}x{thumb.shape[0]} - ", **common)
            else:
                tw.write(data, shape=(*shape, 3), dtype=np.uint8, tile=(tile, tile),
                         description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {shape[1]}x{shape[0]} - ({tile}x{tile})",
                         **common)
    os.replace(tmp, path)
    return path
