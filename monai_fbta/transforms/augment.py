"""Pathology augmentations for the end-to-end view (FBTA step 4).

* :class:`RandHEDJitter` / :class:`RandHEDJitterd`: stain jitter in HED space (Tellez et al.):
  ``stains' = alpha * stains + beta`` per channel, ``alpha ~ U(1-sigma, 1+sigma)``,
  ``beta ~ U(-bias, bias)``, using the Ruifrok-Johnston matrices of ``skimage.color`` and the
  same log/exp conversion as ``skimage.color.rgb2hed``/``hed2rgb`` (re-written in torch).
* :class:`RandFlipRotate90` / :class:`RandFlipRotate90d`, :class:`RandContrastNoise` / :class:`RandContrastNoised`:
  MONAI's flip/rot90/contrast/noise draws per patch, vectorised over a stack ``[S, 3, H, W]``.
* :class:`PerPatchd`: applies a single-image MONAI transform independently to every patch of a
  stack ``[S, 3, H, W]`` (MONAI's transforms expect one channel-first image; ~10 ms per patch).
* :func:`make_e2e_augmentation`: flips (both axes), rot90, HED jitter, contrast and noise.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.data.meta_tensor import MetaTensor  # noqa: E402
from monai.transforms import Compose, MapTransform, Randomizable, RandomizableTransform  # noqa: E402

__all__ = [
    "rgb_to_hed", "hed_to_rgb", "RandStackTransform", "RandStackd", "RandHEDJitter", "RandHEDJitterd", "RandFlipRotate90",
    "RandFlipRotate90d", "RandContrastNoise", "RandContrastNoised", "PerPatchd", "make_e2e_augmentation",
]

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


class RandStackTransform(RandomizableTransform):
    """Base of the stack augmentations: ``[3, H, W]`` or ``[S, 3, H, W]`` in, same shape out.

    Each patch of a stack gets its own draw (applied with probability ``prob``), and the work is
    vectorised over the stack (MONAI's single-image transforms cost ~10 ms per patch in Python).
    Subclasses draw their parameters in :meth:`draw` and transform the selected patches in :meth:`apply`; those
    with ``unit_range = True`` read colours as RGB in ``[0, 1]`` and refuse other input (a 0-255 or integer image
    would otherwise come back silently clipped to ``[0, 1]``).
    """

    unit_range = False

    def __init__(self, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self._apply = np.ones(1, dtype=bool)

    def draw(self, num: int) -> None:
        """Draw the per-patch parameters of ``num`` patches (``self.R``)."""

    def apply(self, sel: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Transform ``sel [s, 3, H, W]`` (float; a copy, may be changed in place), the patches ``rows``
        (indices into the stack) of this draw."""
        raise NotImplementedError

    def randomize(self, num: int) -> None:
        self._apply = self.R.random_sample(num) < self.prob
        self.draw(num)

    def _check_unit_range(self, stack: torch.Tensor) -> None:
        name = type(self).__name__
        if not stack.is_floating_point():
            raise TypeError(f"{name} expects float RGB in [0, 1], got {stack.dtype}: scale it first, e.g. "
                            "ScaleIntensityRange(0, 255, 0, 1) or x.float() / 255")
        lo, hi = torch.aminmax(stack)
        if float(lo) < -1e-3 or float(hi) > 1 + 1e-3:
            raise ValueError(f"{name} expects RGB in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]: scale "
                             "it first, e.g. ScaleIntensityRange(0, 255, 0, 1) for 0-255 images")

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        x = torch.as_tensor(img).as_subclass(torch.Tensor)  # plain tensor: MetaTensor ops are slow
        single = x.ndim == 3
        stack = x.unsqueeze(0) if single else x
        if stack.ndim != 4 or stack.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects [3, H, W] or [S, 3, H, W], got {tuple(x.shape)}")
        if randomize:
            self.randomize(stack.shape[0])
        if not self._apply.any():
            return self._like(x, img)
        if self.unit_range:
            self._check_unit_range(stack)
        rows = np.flatnonzero(self._apply)
        idx = torch.as_tensor(rows, device=stack.device)
        out = stack.float().clone()
        out[idx] = self.apply(stack[idx].float(), rows)
        out = out.to(stack.dtype)
        return self._like(out[0] if single else out, img)

    @staticmethod
    def _like(out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """``out`` as a MetaTensor with ``img``'s metadata when ``img`` is one (the work runs on plain tensors)."""
        if not isinstance(img, MetaTensor):
            return out
        return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)


class RandHEDJitter(RandStackTransform):
    """Random HED stain jitter of ``[3, H, W]`` or, independently per patch, ``[S, 3, H, W]``.

    Args:
        prob: probability of jittering (per patch for stacks).
        sigma: scale jitter, ``alpha ~ U(1 - sigma, 1 + sigma)`` per stain channel.
        bias: shift jitter, ``beta ~ U(-bias, bias)`` per stain channel.
    """

    unit_range = True

    def __init__(self, prob: float = 0.5, sigma: float = 0.05, bias: float = 0.05) -> None:
        super().__init__(prob)
        self.sigma = sigma
        self.bias = bias
        self._alpha = np.ones((1, 3))
        self._beta = np.zeros((1, 3))

    def draw(self, num: int) -> None:
        self._alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, size=(num, 3))
        self._beta = self.R.uniform(-self.bias, self.bias, size=(num, 3))

    def apply(self, sel: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        alpha = torch.as_tensor(self._alpha[rows], dtype=sel.dtype, device=sel.device)[..., None, None]
        beta = torch.as_tensor(self._beta[rows], dtype=sel.dtype, device=sel.device)[..., None, None]
        return hed_to_rgb(rgb_to_hed(sel) * alpha + beta)


class RandFlipRotate90(RandStackTransform):
    """Per patch: flip rows (``prob_flip``), flip columns (``prob_flip``), then rot90 by ``k ~ U{1,2,3}``
    (``prob_rot90``): the same distribution as MONAI's ``RandFlip(axis 0) -> RandFlip(axis 1) ->
    RandRotate90(max_k=3)`` per patch, done as at most 16 batched ops over ``[S, 3, H, W]`` (square patches)."""

    def __init__(self, prob_flip: float = 0.5, prob_rot90: float = 0.5) -> None:
        super().__init__(1.0)
        self.prob_flip, self.prob_rot90 = prob_flip, prob_rot90
        self._code = np.zeros(1, dtype=np.int64)

    def draw(self, num: int) -> None:
        flips = (self.R.random_sample((num, 2)) < self.prob_flip).astype(np.int64)
        k = np.where(self.R.random_sample(num) < self.prob_rot90, self.R.randint(1, 4, size=num), 0)
        self._code = flips[:, 0] + 2 * flips[:, 1] + 4 * k  # 0..15

    def apply(self, sel: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        out = sel  # a copy already (RandStackTransform indexes the stack); each group is read before it is written
        codes = self._code[rows]
        for code in np.unique(codes):
            if code == 0:
                continue
            idx = torch.as_tensor(np.flatnonzero(codes == code), device=sel.device)
            group = sel[idx]
            dims = [d for d, bit in ((-2, 1), (-1, 2)) if code & bit]
            if dims:
                group = group.flip(dims)
            out[idx] = torch.rot90(group, int(code) // 4, dims=(-2, -1)) if code >= 4 else group
        return out


class RandContrastNoise(RandStackTransform):
    """Per patch, like MONAI's ``RandAdjustContrast`` then ``RandGaussianNoise``: with ``prob_contrast``,
    ``x = (x - min) / range ** gamma * range + min`` with ``gamma ~ U(gamma)``; with ``prob_noise``, add
    ``N(0, sigma)`` noise with ``sigma ~ U(0, noise_std)``; then clamp to ``[0, 1]``. Input: RGB in ``[0, 1]``."""

    unit_range = True

    def __init__(self, prob_contrast: float = 0.3, gamma: Sequence[float] = (0.8, 1.25), prob_noise: float = 0.2,
                 noise_std: float = 0.02) -> None:
        super().__init__(1.0)
        self.prob_contrast, self.gamma = prob_contrast, tuple(gamma)
        self.prob_noise, self.noise_std = prob_noise, noise_std
        self._gamma = np.ones(1)
        self._sigma = np.zeros(1)
        self._noise_seed = 0

    def draw(self, num: int) -> None:
        self._gamma = np.where(self.R.random_sample(num) < self.prob_contrast, self.R.uniform(*self.gamma, size=num), 1.0)
        self._sigma = np.where(self.R.random_sample(num) < self.prob_noise, self.R.uniform(0, self.noise_std, size=num), 0.0)
        self._noise_seed = int(self.R.randint(0, 2**31 - 1))

    def apply(self, sel: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        out = sel  # a copy already (RandStackTransform indexes the stack)
        gamma, sigma = self._gamma[rows], self._sigma[rows]
        shape = (-1, 1, 1, 1)
        if (gamma != 1.0).any():  # only the patches drawn for contrast: pow is the costly op
            idx = torch.as_tensor(np.flatnonzero(gamma != 1.0), device=sel.device)
            part = sel[idx]
            lo = part.amin(dim=(1, 2, 3), keepdim=True)
            span = part.amax(dim=(1, 2, 3), keepdim=True) - lo
            g = torch.as_tensor(gamma[gamma != 1.0], dtype=sel.dtype, device=sel.device).view(shape)
            out[idx] = ((part - lo) / (span + 1e-7)) ** g * span + lo
        if (sigma > 0).any():
            idx = torch.as_tensor(np.flatnonzero(sigma > 0), device=sel.device)
            gen = torch.Generator(device=sel.device).manual_seed(self._noise_seed)
            noise = torch.randn((len(idx), *sel.shape[1:]), generator=gen, device=sel.device, dtype=sel.dtype)
            out[idx] += torch.as_tensor(sigma[sigma > 0], dtype=sel.dtype, device=sel.device).view(shape) * noise
        return out.clamp_(0.0, 1.0)


class RandStackd(Randomizable, MapTransform):
    """Dictionary form of a :class:`RandStackTransform` (``self.array``): the same draw for all ``keys`` of a sample."""

    array: RandStackTransform

    def __init__(self, keys: KeysCollection, array: RandStackTransform, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.array = array

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.array.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.array.randomize(1 if data is None else data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            d[key] = self.array(torch.as_tensor(d[key]), randomize=first)
            first = False
        return d


class RandHEDJitterd(RandStackd):
    """Dictionary form of :class:`RandHEDJitter`."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, sigma: float = 0.05, bias: float = 0.05,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RandHEDJitter(prob, sigma, bias), allow_missing_keys)

    @property
    def jitter(self) -> RandHEDJitter:
        return self.array


class RandFlipRotate90d(RandStackd):
    """Dictionary form of :class:`RandFlipRotate90`."""

    def __init__(self, keys: KeysCollection, prob_flip: float = 0.5, prob_rot90: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RandFlipRotate90(prob_flip, prob_rot90), allow_missing_keys)


class RandContrastNoised(RandStackd):
    """Dictionary form of :class:`RandContrastNoise`."""

    def __init__(self, keys: KeysCollection, prob_contrast: float = 0.3, gamma: Sequence[float] = (0.8, 1.25),
                 prob_noise: float = 0.2, noise_std: float = 0.02, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RandContrastNoise(prob_contrast, gamma, prob_noise, noise_std), allow_missing_keys)


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
    independently, vectorised over the stack: :class:`RandHEDJitterd`, :class:`RandFlipRotate90d`
    (flips on both axes, rot90), :class:`RandContrastNoised` (contrast, Gaussian noise, clamp to ``[0, 1]``).

    Seed it with ``.set_random_state(seed)``.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    return Compose([
        RandHEDJitterd(keys, prob=prob_hed, sigma=hed_sigma, bias=hed_bias),
        RandFlipRotate90d(keys, prob_flip=prob_flip, prob_rot90=prob_rot90),
        RandContrastNoised(keys, prob_contrast=prob_contrast, gamma=contrast_gamma, prob_noise=prob_noise,
                           noise_std=noise_std),
    ])
