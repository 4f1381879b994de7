"""One synthetic slide in memory: :func:`render_slide` -> ``(rgb uint8 [H, W, 3], abnormal-region mask bool)``.

Stroma, lumens, stromal nuclei and the abnormal regions whose nuclei carry the class (:data:`CLASS_NAMES`), with a
per-slide stain (:class:`SyntheticSlideConfig` holds every setting); the package docstring and
``docs/synthetic_data.md`` describe the design. :mod:`.tiff` writes a slide to disk, :mod:`.dataset` whole datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

__all__ = ["CLASS_NAMES", "SyntheticSlideConfig", "render_slide"]

CLASS_NAMES = ("inflammation", "pleomorphic", "glandular", "cords")
"""What the abnormal regions hold, per label: 0 dense small round lymphocytes; 1 enlarged,
irregular, vesicular nuclei with nucleoli; 2 columnar nuclei in rings around small lumens
(glands); 3 medium round nuclei in single-file chains."""

_H_OD = np.array([0.59, 0.74, 0.32], np.float32)  # haematoxylin optical density direction (RGB)
_E_OD = np.array([0.20, 0.86, 0.47], np.float32)  # eosin optical density direction (RGB)


@dataclass
class SyntheticSlideConfig:
    """Parameters of one synthetic slide (all lengths in level-0 pixels unless noted).

    ``tumour_fraction`` is the share of the *tissue* area covered by abnormal regions;
    ``stain_jitter`` scales the per-slide colour variation (0 switches it off);
    ``mask_downsample`` is the level-0 pixels per pixel of the saved region mask;
    ``smallest_level``: pyramid levels are added until the longest side is at most this;
    ``classes``: the morphology of each label, names from :data:`CLASS_NAMES` (default: the first
    ``num_classes`` of them), e.g. ``("pleomorphic", "glandular", "cords")`` for another kind of difference.
    """

    size: int = 4096
    mpp: float = 0.5
    tile: int = 256
    jpeg_quality: int = 90
    num_classes: int = 3
    tumour_fraction: float = 0.15
    tissue_fraction: tuple[float, float] = (0.4, 0.6)
    stain_jitter: float = 1.0
    mask_downsample: int = 16
    smallest_level: int = 1024
    seed: int = 0
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be 2..{len(CLASS_NAMES)}, got {self.num_classes}")
        self.classes = tuple(self.classes)
        if self.classes:
            unknown = [c for c in self.classes if c not in CLASS_NAMES]
            if unknown or len(set(self.classes)) != len(self.classes) or len(self.classes) != self.num_classes:
                raise ValueError(f"classes must be {self.num_classes} different names from {list(CLASS_NAMES)} "
                                 f"(one per class), got {list(self.classes)}")
        if self.size < 256:
            raise ValueError(f"size must be at least 256 px, got {self.size}")
        if not 0.0 < self.tumour_fraction <= 0.5:
            raise ValueError(f"tumour_fraction must be in (0, 0.5], got {self.tumour_fraction}")
        if not 0.1 <= self.mpp <= 2.0:
            raise ValueError(f"mpp must be in [0.1, 2.0] um/px, got {self.mpp}")
        if self.tile % 16 or self.tile <= 0:
            raise ValueError(f"tile must be a positive multiple of 16, got {self.tile}")
        lo, hi = self.tissue_fraction
        if not 0.05 <= lo <= hi <= 0.9:
            raise ValueError(f"tissue_fraction must satisfy 0.05 <= lo <= hi <= 0.9, got {self.tissue_fraction}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The morphology of each label, in label order."""
        return self.classes or CLASS_NAMES[: self.num_classes]

    def digest(self) -> str:
        """Short hash of every field: a slide written under another config is not reused. ``classes`` at its
        default is left out, so slides written before it existed keep their hash."""
        fields = dataclasses.asdict(self)
        if not self.classes:
            del fields["classes"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class _Nuclei:
    """Ellipse parameters, one entry per nucleus (px): centre, semi-axes ``a >= b``, angle."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    intensity: np.ndarray
    style: np.ndarray  # 0 fine chromatin, 1 dense (lymphocyte), 2 vesicular + nucleolus, irregular

    @staticmethod
    def concat(parts: Sequence[_Nuclei]) -> _Nuclei:
        fields = [f.name for f in dataclasses.fields(_Nuclei)]
        if not parts:
            return _Nuclei(*(np.zeros(0, np.float32) for _ in fields))
        return _Nuclei(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def mass(self) -> float:
        """Approximate haematoxylin mass (area x intensity) of all nuclei."""
        profile = np.where(self.style == 2, 0.6, 0.85)
        return float(np.sum(np.pi * self.a * self.b * self.intensity * profile))


def _make_nuclei(x, y, a_um, aspect, theta, intensity, style, px_per_um) -> _Nuclei:
    n = len(x)
    a = np.asarray(a_um, np.float32) * px_per_um * np.ones(n, np.float32)
    return _Nuclei(
        np.asarray(x, np.float32), np.asarray(y, np.float32), a, a * np.asarray(aspect, np.float32),
        np.asarray(theta, np.float32) * np.ones(n, np.float32), np.asarray(intensity, np.float32),
        np.full(n, style, np.int8),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Gaussian-smoothed white noise, normalised to zero mean and unit std, float32 ``shape``."""
    z = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return (z - z.mean()) / (z.std() + 1e-6)


def _tissue_field(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Low-res signed field ``[h, w]``: > 0 is tissue (a few irregular blobs with small holes)."""
    h, w = shape
    blobs = _smooth_noise(rng, shape, max(h, w) / 14)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    edge = np.maximum(np.abs((yy + 0.5) / h - 0.5), np.abs((xx + 0.5) / w - 0.5))
    blobs = blobs - 40.0 * np.maximum(edge - 0.38, 0)  # keep tissue off the slide border
    holes = _smooth_noise(rng, shape, 1.3)
    hole_thr = np.quantile(holes, 0.965)
    field = np.minimum(blobs - np.quantile(blobs, 1.0 - fraction), hole_thr - holes)
    return field.astype(np.float32)


def _harmonic_radius(rng: np.random.Generator, angle: np.ndarray, amount: float, orders=(2, 3, 5)) -> np.ndarray:
    """``1 + sum_k c_k cos(k angle + phi_k)``: an irregular, star-free outline around a centre."""
    out = np.ones_like(angle)
    for k in orders:
        out += amount / k * rng.uniform(0.5, 1.0) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return out


def _draw_regions(rng: np.random.Generator, tissue_lo: np.ndarray, fraction: float) -> np.ndarray:
    """Low-res bool mask of a few irregular abnormal regions covering ``fraction`` of the tissue."""
    target = fraction * tissue_lo.sum()
    n = int(rng.integers(2, 6))
    depth = ndi.distance_transform_edt(tissue_lo)
    radius = math.sqrt(target / n / np.pi)
    centres: list[tuple[int, int]] = []
    for _ in range(n):
        ok = depth > min(radius * 0.7, depth.max() * 0.6)
        for cy, cx in centres:  # keep regions apart
            ys, xs = np.ogrid[0 : tissue_lo.shape[0], 0 : tissue_lo.shape[1]]
            ok &= (ys - cy) ** 2 + (xs - cx) ** 2 > (2.2 * radius) ** 2
        cand = np.flatnonzero(ok) if ok.any() else np.flatnonzero(depth > 0)
        centres.append(divmod(int(rng.choice(cand)), tissue_lo.shape[1]))
    yy, xx = np.mgrid[0 : tissue_lo.shape[0], 0 : tissue_lo.shape[1]].astype(np.float32)
    outlines = [(cy, cx, _harmonic_radius(rng, np.arctan2(yy - cy, xx - cx), 0.5)) for cy, cx in centres]
    region = np.zeros_like(tissue_lo)
    for _ in range(4):  # grow the radius until the covered tissue reaches the target
        region = np.zeros_like(tissue_lo)
        for cy, cx, outline in outlines:
            region |= np.hypot(yy - cy, xx - cx) < radius * outline
        region &= tissue_lo
        parts, n_parts = ndi.label(region)
        sizes = np.bincount(parts.ravel(), minlength=n_parts + 1)
        region = (sizes >= 0.2 * np.pi * radius * radius)[parts] & (parts > 0)  # drop slivers
        got = region.sum()
        if got == 0 or abs(got - target) < 0.08 * target:
            break
        radius *= math.sqrt(target / got) ** 0.8
    return region


def _sample_points(rng, n: int, allowed, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` uniform points ``(x, y)`` (px) where ``allowed(x, y)`` is True (rejection sampling)."""
    xs, ys, got, tries = [], [], 0, 0
    while got < n and tries < 30:
        m = max(4 * (n - got), 64)
        x = rng.uniform(0, size[1], m).astype(np.float32)
        y = rng.uniform(0, size[0], m).astype(np.float32)
        keep = allowed(x, y)
        xs.append(x[keep])
        ys.append(y[keep])
        got += int(keep.sum())
        tries += 1
    x, y = np.concatenate(xs)[:n], np.concatenate(ys)[:n]
    return x, y


# mean stain mass (um^2 x intensity) of one stromal nucleus as drawn by _stromal_nuclei
_STROMAL_MASS_UM2 = 0.95 * 0.85 * np.pi * (0.7 * 5.5 * 5.5 * 0.34 + 0.3 * 3.2 * 3.2 * 0.825)


def _stromal_nuclei(rng, x, y, fibre_angle: float, px_per_um: float) -> _Nuclei:
    """Normal stroma: 70% spindle fibroblasts along the fibres, 30% small oval cells."""
    n = len(x)
    spindle = rng.random(n) < 0.7
    a_um = np.where(spindle, rng.uniform(4.5, 6.5, n), rng.uniform(2.8, 3.6, n))
    aspect = np.where(spindle, rng.uniform(0.28, 0.4, n), rng.uniform(0.7, 0.95, n))
    theta = np.where(spindle, fibre_angle + rng.normal(0, 0.35, n), rng.uniform(0, np.pi, n))
    return _make_nuclei(x, y, a_um, aspect, theta, rng.uniform(0.8, 1.1, n), 0, px_per_um)


def _region_nuclei(rng, kind: int, area_px: float, in_region, lumens, fibre_angle: float, ppu: float, shape) -> _Nuclei:
    """Nuclei of the abnormal regions of morphology ``CLASS_NAMES[kind]`` with matched stain mass per area."""
    mass_target = 0.19 * area_px  # haematoxylin mass per region area, equal for every class
    lx, ly, lr = lumens

    def free(x, y):  # inside a region and clear of every lumen
        ok = in_region(x, y)
        if len(lx):
            d2 = (x[:, None] - lx[None]) ** 2 + (y[:, None] - ly[None]) ** 2
            ok &= np.all(d2 > (lr[None] + 4.5 * ppu) ** 2, axis=1)
        return ok

    parts: list[_Nuclei] = []
    if kind == 2:  # columnar nuclei in a ring around each lumen
        for cx, cy, r in zip(lx, ly, lr):
            b_um = rng.uniform(1.9, 2.4)
            ring = r + rng.uniform(4.5, 5.5) * ppu
            k = int(2 * np.pi * ring / ((2 * b_um + 0.9) * ppu))
            ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi)
            rr = ring + rng.normal(0, 0.5 * ppu, k)
            parts.append(_make_nuclei(cx + rr * np.cos(ang), cy + rr * np.sin(ang), rng.uniform(4.0, 5.0, k),
                                      b_um / 4.5, ang, rng.uniform(1.0, 1.25, k), 0, ppu))
        rest = max(mass_target - _Nuclei.concat(parts).mass(), 0.0)
        n = int(rest / (_STROMAL_MASS_UM2 * ppu * ppu))
        x, y = _sample_points(rng, n, free, shape)
        parts.append(_stromal_nuclei(rng, x, y, fibre_angle, ppu))
    elif kind == 3:  # single-file chains of medium round nuclei
        mass, per = 0.0, np.pi * (3.8 * ppu) ** 2 * 0.9 * 1.2 * 0.85
        while mass < mass_target:
            k = int(rng.integers(5, 13))
            x0, y0 = _sample_points(rng, 1, free, shape)
            if not len(x0):
                break
            a_um = rng.uniform(3.4, 4.2, k)
            step = np.cumsum(np.r_[0, (2 * a_um[:-1] * 0.95 + 0.6) * ppu])
            heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.12, k))
            x = x0[0] + np.cumsum(np.r_[0, np.diff(step) * np.cos(heading[1:])])
            y = y0[0] + np.cumsum(np.r_[0, np.diff(step) * np.sin(heading[1:])])
            keep = free(x.astype(np.float32), y.astype(np.float32))
            chain = _make_nuclei(x[keep], y[keep], a_um[keep], rng.uniform(0.85, 1.0, keep.sum()),
                                 rng.uniform(0, np.pi, keep.sum()), rng.uniform(1.05, 1.3, keep.sum()), 0, ppu)
            parts.append(chain)
            mass += chain.mass() if len(chain.x) else per
    else:
        if kind == 0:  # lymphocytes: small, round, dark, crowded
            a_um, aspect, inten, style = (2.7, 3.4), (0.85, 1.0), (1.25, 1.5), 1
        else:  # pleomorphic: large, irregular, vesicular, variable
            a_um, aspect, inten, style = (5.0, 9.0), (0.6, 0.95), (0.95, 1.4), 2
        mean_a = np.mean(a_um) * ppu
        per = np.pi * mean_a * mean_a * np.mean(aspect) * np.mean(inten) * (0.6 if style == 2 else 0.85)
        n = int(mass_target / per)
        x, y = _sample_points(rng, n, free, shape)
        n = len(x)
        parts.append(_make_nuclei(x, y, rng.uniform(*a_um, n), rng.uniform(*aspect, n), rng.uniform(0, np.pi, n),
                                  rng.uniform(*inten, n), style, ppu))
    return _Nuclei.concat(parts)


def _stamp_disks(canvas: np.ndarray, values_fn, x, y, radius_px: np.ndarray, chunk: int = 1500) -> None:
    """Add stamps into ``canvas [H, W]`` (in place).

    Stamps are grouped by window size; ``values_fn(idx, u, v)`` gets the nucleus indices and
    the pixel offsets ``u, v [n, s, s]`` from each (sub-pixel) centre and returns ``[n, s, s]``.
    """
    h, w = canvas.shape
    flat = canvas.reshape(-1)
    half = np.ceil(radius_px).astype(np.int64) + 2
    half = (half + 3) // 4 * 4  # few distinct window sizes
    for r in np.unique(half):
        sel = np.flatnonzero(half == r)
        offs = np.arange(-r, r + 1, dtype=np.float32)
        for s in range(0, len(sel), chunk):
            idx = sel[s : s + chunk]
            ix, iy = np.round(x[idx]).astype(np.int64), np.round(y[idx]).astype(np.int64)
            u = offs[None, None, :] + (ix - x[idx]).astype(np.float32)[:, None, None]
            v = offs[None, :, None] + (iy - y[idx]).astype(np.float32)[:, None, None]
            u, v = np.broadcast_to(u, (len(idx), 2 * r + 1, 2 * r + 1)), np.broadcast_to(v, (len(idx), 2 * r + 1, 2 * r + 1))
            vals = values_fn(idx, u, v)
            px = ix[:, None, None] + offs.astype(np.int64)[None, None, :]
            py = iy[:, None, None] + offs.astype(np.int64)[None, :, None]
            inside = (px >= 0) & (px < w) & (py >= 0) & (py < h) & (vals > 0)
            np.add.at(flat, (py * w + px)[inside], vals[inside])


def _stamp_nuclei(canvas: np.ndarray, nuc: _Nuclei, rng: np.random.Generator) -> None:
    """Draw nuclei as soft ellipses with chromatin texture into the haematoxylin map (in place)."""
    if not len(nuc.x):
        return
    irregular = (nuc.style == 2).astype(np.float32)
    radius = nuc.a * (1.0 + 0.45 * irregular)
    # per nucleus: harmonic outline coefficients (cos/sin for orders 2, 3) and nucleolus offset
    coef = rng.normal(0, 0.07, (len(nuc.x), 4)).astype(np.float32) * irregular[:, None]
    nucleolus = rng.uniform(-0.35, 0.35, (len(nuc.x), 2)).astype(np.float32)

    def values(idx, u, v):
        c, s = np.cos(nuc.theta[idx])[:, None, None], np.sin(nuc.theta[idx])[:, None, None]
        a, b = nuc.a[idx][:, None, None], nuc.b[idx][:, None, None]
        pu, pv = (u * c + v * s) / a, (-u * s + v * c) / b
        rho = np.sqrt(pu * pu + pv * pv)
        k = coef[idx]
        if np.any(k):
            t = np.arctan2(pv, pu)
            rho = rho / (1 + k[:, 0, None, None] * np.cos(2 * t) + k[:, 1, None, None] * np.sin(2 * t)
                         + k[:, 2, None, None] * np.cos(3 * t) + k[:, 3, None, None] * np.sin(3 * t))
        inside = np.clip((1.0 - rho) * b + 0.5, 0.0, 1.0)  # ~1 px anti-aliased edge
        grain = rng.random(rho.shape, dtype=np.float32)
        style = nuc.style[idx][:, None, None]
        fine = 0.72 + 0.28 * grain
        dense = 0.9 + 0.1 * grain
        nl = nucleolus[idx]
        dot = np.exp(-((pu - nl[:, 0, None, None]) ** 2 + (pv - nl[:, 1, None, None]) ** 2) / 0.02)
        vesicular = 0.3 + 0.3 * grain + 0.7 * np.clip(rho, 0, 1) ** 4 + 0.9 * dot
        tex = np.where(style == 1, dense, np.where(style == 2, vesicular, fine))
        return inside * tex * nuc.intensity[idx][:, None, None]

    _stamp_disks(canvas, values, nuc.x, nuc.y, radius)


def _stamp_lumens(canvas: np.ndarray, x, y, r) -> None:
    """Soft disks of 1 (clear glass) into ``canvas`` (in place; values may exceed 1, clip after)."""
    rr = np.asarray(r, np.float32)
    _stamp_disks(canvas, lambda idx, u, v: np.clip(rr[idx][:, None, None] - np.sqrt(u * u + v * v) + 0.5, 0, 1), x, y, rr)


def _place_lumens(rng, in_region, region_area_px: float, ppu: float, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small round lumens in the regions (same for every class), kept apart by dart throwing."""
    spacing = 48 * ppu
    n = int(region_area_px / spacing**2)
    x, y = _sample_points(rng, 6 * n + 8, in_region, shape)
    keep: list[int] = []
    for i in range(len(x)):
        if len(keep) >= n:
            break
        if all((x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2 > spacing**2 for j in keep):
            keep.append(i)
    r = rng.uniform(5.0, 9.0, len(keep)).astype(np.float32) * ppu
    return x[keep], y[keep], r


def _upsample(lo: np.ndarray, q: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``lo [..., h, w]`` by the integer ``q`` (pixel-centre aligned, edges
    clamped), cropped to ``shape``. Output pixel ``m*q + p`` mixes two neighbours with a weight
    that depends only on the phase ``p``, so each axis is ``q`` strided slice operations."""
    lead = [(0, 0)] * (lo.ndim - 2)
    pad = np.pad(lo.astype(np.float32, copy=False), lead + [(1, 1), (1, 1)], mode="edge")
    h, w = lo.shape[-2:]
    phases = []
    for p in range(q):
        s = (p + 0.5) / q - 0.5
        phases.append((p, int(np.floor(s)) + 1, np.float32(s - np.floor(s))))
    cols = np.empty(lo.shape[:-2] + (h + 2, w * q), np.float32)
    for p, off, f in phases:
        np.multiply(pad[..., off : off + w], 1 - f, out=cols[..., p::q])
        cols[..., p::q] += pad[..., off + 1 : off + 1 + w] * f
    out = np.empty(lo.shape[:-2] + (h * q, w * q), np.float32)
    for p, off, f in phases:
        np.multiply(cols[..., off : off + h, :], 1 - f, out=out[..., p::q, :])
        out[..., p::q, :] += cols[..., off + 1 : off + 1 + h, :] * f
    return out[..., : shape[0], : shape[1]]


def _stroma_texture(rng: np.random.Generator, shape: tuple[int, int], ppu: float) -> tuple[np.ndarray, float]:
    """Wavy collagen-fibre eosin texture in [0, 1] ``[H, W]`` and its mean fibre angle (radians).

    Phase = a plane wave (the fibres) + a low-frequency warp (a few long waves plus smooth noise
    that bends and breaks the fibres); a second noise field makes the stroma denser or looser.
    The warp and density are drawn at 1/8 resolution and upsampled.
    """
    h, w = shape
    q = 8
    lo = (-(-h // q), -(-w // q))
    angle = float(rng.uniform(0, np.pi))
    yy, xx = np.mgrid[0 : lo[0], 0 : lo[1]].astype(np.float32) * q
    warp = 1.6 * _smooth_noise(rng, lo, 1.25 * ppu / 2)
    for _ in range(3):
        f = 2 * np.pi / (rng.uniform(60, 160) * ppu)
        d = rng.uniform(0, 2 * np.pi)
        warp += rng.uniform(2.0, 5.0) * np.sin(f * (np.cos(d) * xx + np.sin(d) * yy) + rng.uniform(0, 2 * np.pi))
    density = np.clip(0.75 + 0.3 * _smooth_noise(rng, lo, 1.25 * ppu / 2), 0.3, 1.2)
    warp, density = _upsample(np.stack([warp, density]), q, shape)
    k = 2 * np.pi / (rng.uniform(5.0, 7.0) * ppu)
    # the phase gradient runs across the fibres, so fibres lie along `angle`
    x, y = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    warp += (-k * np.sin(angle) * x)[None, :]
    warp += (k * np.cos(angle) * y)[:, None]
    np.sin(warp, out=warp)
    warp += 1.0
    warp *= 0.5
    warp *= warp  # thinner bright gaps between fibres
    warp *= density
    return warp, angle


def _stain(rng: np.random.Generator, jitter: float) -> dict[str, np.ndarray | float]:
    """Per-slide stain: OD vectors, concentration scales and background (colour jitter)."""
    def vec(base):
        v = base + rng.normal(0, 0.035 * jitter, 3).astype(np.float32)
        return (v / np.linalg.norm(v)).astype(np.float32)

    return {
        "h": vec(_H_OD), "e": vec(_E_OD),
        "h_scale": float(1 + rng.uniform(-0.12, 0.12) * jitter),
        "e_scale": float(1 + rng.uniform(-0.15, 0.15) * jitter),
        "bg": (rng.uniform(0.03, 0.06) + rng.normal(0, 0.006 * jitter, 3)).astype(np.float32),
    }


def render_slide(cfg: SyntheticSlideConfig, label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide of class ``label`` (morphology ``cfg.class_names[label]``).

    Returns ``rgb`` uint8 ``[H, W, 3]`` (``H = W = cfg.size``) and the abnormal-region mask,
    bool ``[ceil(H / d), ceil(W / d)]`` with ``d = cfg.mask_downsample`` (pixel ``(i, j)`` covers
    level-0 rows ``i*d:(i+1)*d`` and columns ``j*d:(j+1)*d``).
    """
    if not 0 <= label < cfg.num_classes:
        raise ValueError(f"label must be in 0..{cfg.num_classes - 1}, got {label}")
    h = w = int(cfg.size)
    d = int(cfg.mask_downsample)
    ppu = 1.0 / cfg.mpp
    lo_shape = (-(-h // d), -(-w // d))
    stain = _stain(rng, cfg.stain_jitter)

    field_lo = _tissue_field(rng, lo_shape, float(rng.uniform(*cfg.tissue_fraction)))
    tissue_lo = field_lo > 0
    region = _draw_regions(rng, tissue_lo, cfg.tumour_fraction)
    field = _upsample(field_lo, d, (h, w))

    def pixel(x, y):  # (row, col, inside-the-image) of float point coordinates
        xi, yi = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        return np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1), inside

    def in_tissue(x, y):
        r, c, inside = pixel(x, y)
        return inside & (field[r, c] > 0.05)

    def in_region(x, y):
        r, c, _ = pixel(x, y)
        return region[r // d, c // d] & in_tissue(x, y)

    def in_stroma(x, y):
        r, c, _ = pixel(x, y)
        return in_tissue(x, y) & ~region[r // d, c // d]

    region_area = float(region.sum()) * d * d
    texture, fibre_angle = _stroma_texture(rng, (h, w), ppu)
    lumens = _place_lumens(rng, in_region, region_area, ppu, (h, w))
    stroma_area = float((field > 0).sum()) - region_area
    xs, ys = _sample_points(rng, int(stroma_area / (21 * ppu) ** 2), in_stroma, (h, w))
    nuclei = _Nuclei.concat([
        _stromal_nuclei(rng, xs, ys, fibre_angle, ppu),
        _region_nuclei(rng, CLASS_NAMES.index(cfg.class_names[label]), region_area, in_region, lumens, fibre_angle,
                       ppu, (h, w)),
    ])

    conc_h = np.zeros((h, w), np.float32)
    _stamp_nuclei(conc_h, nuclei, rng)
    clear = np.zeros((h, w), np.float32)
    _stamp_lumens(clear, *lumens)
    rgb = _compose(field, texture, conc_h, clear, stain, rng)
    return rgb, region


def _compose(field, texture, conc_h, clear, stain, rng, rows: int = 256) -> np.ndarray:
    """Beer-Lambert colour: ``rgb = 255 exp(-(bg + c_H h + c_E e))``, computed in row strips."""
    h, w = field.shape
    out = np.empty((h, w, 3), np.uint8)
    hv, ev, bg = stain["h"], stain["e"], stain["bg"]
    # slow density variation across the slide (separable, cheap)
    yy, xx = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    fy, fx = rng.uniform(1.5, 4.0, 2) * 2 * np.pi / max(h, w)
    vy, vx = 1 + 0.12 * np.sin(fy * yy + rng.uniform(0, 6.3)), 1 + 0.12 * np.sin(fx * xx + rng.uniform(0, 6.3))
    for y0 in range(0, h, rows):
        sl = slice(y0, y0 + rows)
        alpha = np.clip(field[sl] * 300.0 + 0.5, 0.0, 1.0) * (1.0 - np.clip(clear[sl], 0.0, 1.0))
        grain = rng.random(alpha.shape, dtype=np.float32)
        c_e = alpha * (0.2 + 0.55 * texture[sl] + 0.08 * grain) * (vy[sl, None] * vx[None, :]) * stain["e_scale"]
        c_h = (np.minimum(conc_h[sl], 1.8) + 0.07 * alpha) * stain["h_scale"] * alpha
        od = bg + c_h[..., None] * hv + c_e[..., None] * ev
        np.exp(-od, out=od)
        out[sl] = np.clip(od * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
