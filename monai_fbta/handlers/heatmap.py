"""Attention heatmaps: per-patch scores painted over the slide thumbnail, written as PNG.

A pathologist reads these as "where did the model look": each tissue patch gets its attention
(or contribution) score, rescaled to [0, 1] by rank so a few extreme patches do not wash the
map out, drawn with a perceptual colormap at 50% opacity over the thumbnail; background stays
uncoloured. A colour bar and the predicted class are drawn beside the map.
"""

from __future__ import annotations

import os
import numpy as np

from monai_fbta._io import atomic_open, inside, safe_name

__all__ = ["rank_normalise", "attention_to_grid", "render_heatmap", "write_heatmap", "HeatmapWriter"]


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Scores [N] -> [N] in [0, 1] by rank (ties share a rank); a constant input gives 0.5."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    if np.allclose(scores, scores[0]):
        return np.full_like(scores, 0.5)
    order = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    return order / max(scores.size - 1, 1)


def attention_to_grid(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    slide_size: tuple[int, int],
    grid_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Paint per-patch scores onto a grid the size of the thumbnail.

    Args:
        coords: [N, 2] level-0 (x, y) top-left patch corners.
        scores: [N] attention or contribution per patch.
        patch_size_level0: patch side at level 0, in pixels.
        slide_size: (width, height) at level 0.
        grid_shape: (rows, cols) of the output, usually the thumbnail's shape.

    Returns:
        (values [rows, cols] float in [0, 1], covered [rows, cols] bool).
    """
    rows, cols = grid_shape
    values = np.zeros(grid_shape, dtype=np.float64)
    counts = np.zeros(grid_shape, dtype=np.float64)
    normed = rank_normalise(scores)
    sx, sy = cols / slide_size[0], rows / slide_size[1]
    for (x, y), v in zip(np.asarray(coords), normed):
        c0, r0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        c1 = max(int(np.ceil((x + patch_size_level0) * sx)), c0 + 1)
        r1 = max(int(np.ceil((y + patch_size_level0) * sy)), r0 + 1)
        values[r0:r1, c0:c1] += v
        counts[r0:r1, c0:c1] += 1
    covered = counts > 0
    values[covered] /= counts[covered]
    return values, covered


def render_heatmap(
    thumbnail: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    slide_size: tuple[int, int],
    title: str = "",
    cmap: str = "inferno",
    alpha: float = 0.5,
) -> np.ndarray:
    """Overlay of scores on the thumbnail: uint8 [h, w, 3] (no axes, no colour bar)."""
    from matplotlib import colormaps

    thumb = np.asarray(thumbnail, dtype=np.float64)[..., :3] / 255.0
    values, covered = attention_to_grid(coords, scores, patch_size_level0, slide_size, thumb.shape[:2])
    colours = colormaps[cmap](values)[..., :3]
    out = thumb.copy()
    out[covered] = (1 - alpha) * thumb[covered] + alpha * colours[covered]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def write_heatmap(
    path: str,
    thumbnail: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    slide_size: tuple[int, int],
    title: str = "",
    cmap: str = "inferno",
) -> str:
    """Write a side-by-side PNG (thumbnail | overlay + colour bar) atomically; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    overlay = render_heatmap(thumbnail, coords, scores, patch_size_level0, slide_size, cmap=cmap)
    h, w = overlay.shape[:2]
    fig_w = 10.0
    fig_h = max(3.0, fig_w / 2 * h / max(w, 1) + 0.8)
    fig, axes = plt.subplots(1, 2, figsize=(fig_w, fig_h), constrained_layout=True)
    axes[0].imshow(np.asarray(thumbnail)[..., :3])
    axes[0].set_title("slide")
    axes[1].imshow(overlay)
    axes[1].set_title("attention (rank-normalised)")
    for ax in axes:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes[1], fraction=0.046, pad=0.02, label="low → high attention")
    if title:
        fig.suptitle(title)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


class HeatmapWriter:
    """Writes ``<output_dir>/<slide_id>_heatmap.png`` per slide (:func:`write_heatmap`; the id made a safe file name).

    ``attach(engine)`` registers on ``Events.ITERATION_COMPLETED``; the engine output (a dict, or a list of them)
    must hold ``slide_id``, ``image`` (slide path), ``coords [N, 2]``, ``attention [N]`` and the
    ``patch_size_level0_key``; with ``pred_name`` (and ``probs [C]``, ``pred``) the title names the prediction, as
    :class:`~monai_fbta.engines.inference.FBTAInferenceEvaluator`'s output does. Slides are opened with
    :func:`monai_fbta.data.slide.open_slide`; :attr:`written` lists the files.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        patch_size_level0_key: str = "patch_size_level0",
        thumbnail_size: int = 1024,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.patch_size_level0_key = patch_size_level0_key
        self.thumbnail_size = thumbnail_size
        self.written: list[str] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def write_one(self, slide_id: str, slide_path: str, coords, attention, patch_size_level0: float, title: str = "") -> str:
        """One slide's PNG from ``coords [N, 2]`` and ``attention [N]``; returns its path."""
        from monai_fbta.data.slide import open_slide

        with open_slide(slide_path) as slide:
            thumb = slide.thumbnail(self.thumbnail_size)
            size = slide.level_dimensions[0]
        out = inside(self.output_dir, f"{safe_name(slide_id)}_heatmap.png")
        write_heatmap(out, thumb, np.asarray(coords), np.asarray(attention, dtype=np.float64).ravel(),
                      float(patch_size_level0), size, title=title or slide_id)
        self.written.append(out)
        return out

    def __call__(self, engine) -> None:
        outputs = engine.state.output
        for item in outputs if isinstance(outputs, list) else [outputs]:
            self.write_one(str(item["slide_id"]), str(item["image"]), item["coords"], item["attention"],
                           float(item[self.patch_size_level0_key]), _title(item))


def _title(item: dict) -> str:
    """``"<slide_id>: <pred_name> (p=0.93)"``; ``""`` (the slide id alone) without ``pred_name``."""
    if not item.get("pred_name"):
        return ""
    title = f"{item['slide_id']}: {item['pred_name']}"
    if "probs" in item and "pred" in item:
        title += f" (p={float(np.asarray(item['probs']).ravel()[int(item['pred'])]):.2f})"
    return title
