"""Pathology augmentations for the end-to-end view (FBTA step 4).

* :class:`RandHEDJitter` / :class:`RandHEDJitterd`: stain jitter in HED space (Tellez et al.):
  ``stains' = alpha * stains + beta`` per channel, ``alpha ~ U(1-sigma, 1+sigma)``,
  ``beta ~ U(-bias, bias)``, using the Ruifrok-Johnston matrices of ``skimage.color`` and the
  same log/exp conversion as ``skimage.color.rgb2hed``/``hed2rgb`` (re-written in torch).
* :class:`PerPatchd`: applies a single-image MONAI transform independently to every patch of a
  stack ``[S, 3, H, W]`` (MONAI's transforms expect one channel-first image).
* :func:`make_e2e_augmentation`: flips (both axes), rot90, HED jitter, contrast and noise.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    Lambdad,
    MapTransform,
    Randomizable,
    RandomizableTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
)

__all__ = ["rgb_to_hed", "hed_to_rgb", "RandHEDJitter", "RandHEDJitterd", "PerPatchd", "make_e2e_augmentation"]

_LOG_ADJUST = float(np.log(1e-6))


def _matrix(name: str, like: torch.Tensor) -> torch.Tensor:
    from skimage import color

    return torch.as_tensor(getattr(color, name), dtype=like.dtype, device=like.device)


def _mix(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``out[..., d, h, w] = sum_c x[..., c, h, w] * matrix[c, d]`` (a batched matmul; faster than einsum)."""
    return (matrix.T @ x.flatten(-2)).view_as(x)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` RGB in ``[0, 1]`` -> HED stain concentrations (``skimage.color.rgb2hed``)."""
    od = torch.log(rgb.clamp_min(1e-6)) / _LOG_ADJUST
    return _mix(od, _matrix("hed_from_rgb", rgb)).clamp_min(0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (``skimage.color.hed2rgb``), clipped to ``[0, 1]``."""
    return torch.exp(_mix(hed * _LOG_ADJUST, _matrix("rgb_from_hed", hed))).clamp(0, 1)


class RandHEDJitter(RandomizableTransform):
    """Random HED stain jitter of ``[3, H, W]`` or, independently per patch, ``[S, 3, H, W]``.

    Args:
        prob: probability of jittering (per patch for stacks).
        sigma: scale jitter, ``alpha ~ U(1 - sigma, 1 + sigma)`` per stain channel.
        bias: shift jitter, ``beta ~ U(-bias, bias)`` per stain channel.
    """

    def __init__(self, prob: float = 0.5, sigma: float = 0.05, bias: float = 0.05) -> None:
        RandomizableTransform.__init__(self, prob)
        self.sigma = sigma
        self.bias = bias
        self._alpha = np.ones((1, 3))
        self._beta = np.zeros((1, 3))
        self._apply = np.ones(1, dtype=bool)

    def randomize(self, num: int) -> None:
        self._apply = self.R.random_sample(num) < self.prob
        self._alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, size=(num, 3))
        self._beta = self.R.uniform(-self.bias, self.bias, size=(num, 3))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        x = torch.as_tensor(img).as_subclass(torch.Tensor)  # plain tensor: MetaTensor ops are slow
        single = x.ndim == 3
        stack = x.unsqueeze(0) if single else x
        if stack.ndim != 4 or stack.shape[1] != 3:
            raise ValueError(f"RandHEDJitter expects [3, H, W] or [S, 3, H, W], got {tuple(x.shape)}")
        if randomize:
            self.randomize(stack.shape[0])
        if not self._apply.any():
            return x
        idx = torch.as_tensor(np.flatnonzero(self._apply), device=stack.device)
        sel = stack[idx].float()
        alpha = torch.as_tensor(self._alpha[self._apply], dtype=sel.dtype, device=sel.device)[..., None, None]
        beta = torch.as_tensor(self._beta[self._apply], dtype=sel.dtype, device=sel.device)[..., None, None]
        out = stack.float().clone()
        out[idx] = hed_to_rgb(rgb_to_hed(sel) * alpha + beta)
        out = out.to(stack.dtype)
        return out[0] if single else out


class RandHEDJitterd(Randomizable, MapTransform):
    """Dictionary form of :class:`RandHEDJitter` (same draw for all ``keys`` of a sample)."""

    def __init__(
        self, keys: KeysCollection, prob: float = 0.5, sigma: float = 0.05, bias: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.jitter = RandHEDJitter(prob, sigma, bias)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.jitter.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.jitter.randomize(1 if data is None else data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            d[key] = self.jitter(img, randomize=first)
            first = False
        return d


class PerPatchd(Randomizable, MapTransform):
    """Apply ``transform`` (a single-image dictionary transform) to each patch of ``[S, C, H, W]``.

    Patch ``s`` of every key is passed as ``{key: d[key][s]}``, so each patch gets its own random
    draw, and the same draw for all keys. Output is a plain ``torch.Tensor`` stack (MONAI's
    metadata is dropped).
    """

    def __init__(self, keys: KeysCollection, transform, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:  # randomness lives in ``transform``
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        num = len(d[keys[0]])
        outs: dict[Hashable, list[torch.Tensor]] = {k: [] for k in keys}
        for s in range(num):
            patch = self.transform({k: d[k][s] for k in keys})
            for k in keys:
                outs[k].append(torch.as_tensor(patch[k]).as_subclass(torch.Tensor))
        for k in keys:
            d[k] = torch.stack(outs[k]) if outs[k] else torch.as_tensor(d[k])
        return d


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).clamp(0.0, 1.0)


def make_e2e_augmentation(
    keys: KeysCollection = ("pb_image",),
    prob_flip: float = 0.5,
    prob_rot90: float = 0.5,
    prob_hed: float = 0.5,
    hed_sigma: float = 0.05,
    hed_bias: float = 0.05,
    prob_contrast: float = 0.3,
    contrast_gamma: Sequence[float] = (0.8, 1.25),
    prob_noise: float = 0.2,
    noise_std: float = 0.02,
) -> Compose:
    """MONAI ``Compose`` augmenting every patch of ``d[key]`` ``[S, 3, H, W]`` (float ``[0, 1]``)
    independently: :class:`RandHEDJitterd` (vectorised over the stack, per-patch draws), then per
    patch (:class:`PerPatchd`) ``RandFlipd`` (H and W), ``RandRotate90d``, ``RandAdjustContrastd``,
    ``RandGaussianNoised``, and a clamp to ``[0, 1]``.

    Seed it with ``.set_random_state(seed)``.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    per_patch = Compose(
        [
            RandFlipd(keys, prob=prob_flip, spatial_axis=0),
            RandFlipd(keys, prob=prob_flip, spatial_axis=1),
            RandRotate90d(keys, prob=prob_rot90, max_k=3, spatial_axes=(0, 1)),
            RandAdjustContrastd(keys, prob=prob_contrast, gamma=tuple(contrast_gamma)),
            RandGaussianNoised(keys, prob=prob_noise, std=noise_std),
            Lambdad(keys, func=_clamp01),
        ]
    )
    return Compose([RandHEDJitterd(keys, prob=prob_hed, sigma=hed_sigma, bias=hed_bias), PerPatchd(keys, per_patch)])
