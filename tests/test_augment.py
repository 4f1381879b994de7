"""Pathology augmentations (transforms/augment.py): HED jitter vs skimage, per-patch flips/rotations equal to MONAI's,
contrast/noise, the e2e augmentation Compose."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed

from monai.transforms import RandFlipd

from monai_fbta.transforms import (
    PerPatchd,
    RandContrastNoise,
    RandFlipRotate90,
    RandFlipRotate90d,
    RandHEDJitter,
    RandHEDJitterd,
    hed_to_rgb,
    make_e2e_augmentation,
    rgb_to_hed,
)

torch.set_num_threads(1)


def test_hed_conversion_matches_skimage():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    hed = rgb_to_hed(x)
    ref = rgb2hed(x[1].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(hed[1].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(hed_to_rgb(hed)[1].permute(1, 2, 0).numpy(), hed2rgb(ref), atol=1e-6)


def test_hed_jitter_per_patch_and_identity():
    x = torch.rand(6, 3, 8, 8)
    assert torch.allclose(RandHEDJitter(prob=1.0, sigma=0.0, bias=0.0)(x), hed_to_rgb(rgb_to_hed(x)), atol=1e-6)
    assert torch.equal(RandHEDJitter(prob=0.0)(x), x)
    jit = RandHEDJitter(prob=1.0, sigma=0.3, bias=0.05).set_random_state(0)
    same = x[:1].repeat(6, 1, 1, 1)
    out = jit(same)
    assert out.shape == same.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out[0], out[1]), "patches of a stack get independent draws"
    single = jit(x[0])
    assert single.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="expects"):
        jit(torch.rand(8, 8))


def test_hed_jitterd_same_draw_for_all_keys():
    x = torch.rand(3, 3, 8, 8)
    d = RandHEDJitterd(["a", "b"], prob=1.0, sigma=0.3).set_random_state(1)({"a": x, "b": x.clone()})
    assert torch.equal(d["a"], d["b"])


def test_e2e_augmentation_per_patch_reproducible():
    base = torch.rand(1, 3, 16, 16)
    x = base.repeat(32, 1, 1, 1)
    aug = make_e2e_augmentation(keys="pb_image").set_random_state(5)
    out = aug({"pb_image": x})["pb_image"]
    assert type(out) is torch.Tensor and out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    distinct = {tuple(p.flatten()[:20].tolist()) for p in out}
    assert len(distinct) > 8, "each patch gets its own draw"
    again = make_e2e_augmentation(keys="pb_image").set_random_state(5)({"pb_image": x})["pb_image"]
    assert torch.equal(out, again)
    assert not torch.equal(out, aug({"pb_image": x})["pb_image"])


def test_flip_rotate90_matches_monai_per_patch():
    """Each patch gets exactly MONAI's Flip(axis 0) / Flip(axis 1) / Rotate90(k) as drawn; all 16 codes occur."""
    from monai.transforms import AdjustContrast, Flip, Rotate90

    x = torch.rand(200, 3, 8, 8)
    aug = RandFlipRotate90(prob_flip=0.5, prob_rot90=0.5).set_random_state(3)
    out = aug(x)
    codes = aug._code
    assert set(codes.tolist()) == set(range(16))
    for i, code in enumerate(codes.tolist()):
        ref = x[i]
        for axis, bit in ((0, 1), (1, 2)):
            if code & bit:
                ref = Flip(spatial_axis=axis)(ref)
        ref = Rotate90(k=code // 4, spatial_axes=(0, 1))(ref) if code >= 4 else ref
        assert torch.equal(out[i], torch.as_tensor(ref).as_subclass(torch.Tensor)), code
    d = RandFlipRotate90d(["a", "b"]).set_random_state(0)({"a": x, "b": x.clone()})
    assert torch.equal(d["a"], d["b"]), "the same draw for every key"

    contrast = RandContrastNoise(prob_contrast=1.0, gamma=(0.5, 2.0), prob_noise=0.0).set_random_state(1)
    y = contrast(x[:4])
    for i in range(4):
        ref = AdjustContrast(float(contrast._gamma[i]))(x[i])
        torch.testing.assert_close(y[i], torch.as_tensor(ref).as_subclass(torch.Tensor).clamp(0, 1), rtol=1e-5, atol=1e-5)
    noisy = RandContrastNoise(prob_contrast=0.0, prob_noise=1.0, noise_std=0.1).set_random_state(2)(x[:4] * 0.5 + 0.25)
    assert 0 < float((noisy - (x[:4] * 0.5 + 0.25)).abs().mean()) < 0.1


def test_per_patch_flip_keys_stay_aligned():
    x = torch.rand(10, 3, 8, 8)
    per = PerPatchd(["a", "b"], RandFlipd(["a", "b"], prob=0.5, spatial_axis=0)).set_random_state(0)
    d = per({"a": x, "b": x.clone()})
    assert torch.equal(d["a"], d["b"])
    flipped = [not torch.equal(d["a"][i], x[i]) for i in range(10)]
    assert 0 < sum(flipped) < 10


@pytest.mark.parametrize("transform", [RandHEDJitter(prob=1.0, sigma=0.0, bias=0.0),
                                       RandContrastNoise(prob_contrast=0.0, prob_noise=0.0)])
def test_colour_augmentations_refuse_images_outside_0_1_instead_of_clipping_them(transform):
    """An identity draw on a 0-255 image used to return it clipped to [0, 1] (max 254.96 -> 1.0), and uint8 input
    came back as {0, 1}; MONAI's LoadImage gives 0-255 images, so say so instead."""
    x = torch.rand(2, 3, 8, 8)
    assert transform(x).shape == x.shape  # in range: runs
    with pytest.raises(ValueError, match=r"expects RGB in \[0, 1\], got values in \[.*255"):
        transform(x * 255)
    with pytest.raises(TypeError, match="expects float RGB in .* got torch.uint8"):
        transform((x * 255).to(torch.uint8))
    assert RandFlipRotate90()((x * 255).to(torch.uint8)).dtype == torch.uint8  # geometry takes any range


def test_patch_encoder_refuses_integer_images():
    from monai_fbta.networks import PatchEncoder

    encoder = PatchEncoder("tiny_cnn").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(encoder(x)).all()
    with pytest.raises(TypeError, match=r"expected float images in \[0, 1\], got torch.uint8"):
        encoder((x * 255).to(torch.uint8))  # used to return all-NaN features


@pytest.mark.parametrize("transform", [RandHEDJitter(prob=1.0), RandHEDJitter(prob=0.0), RandFlipRotate90(),
                                       RandContrastNoise()])
def test_stack_transforms_keep_a_metatensor_and_its_metadata(transform):
    from monai.data import MetaTensor

    x = MetaTensor(torch.rand(3, 3, 8, 8), meta={"slide_id": "s1"})
    out = transform(x)
    assert isinstance(out, MetaTensor) and out.meta["slide_id"] == "s1" and out.shape == x.shape
    assert type(transform(torch.rand(3, 3, 8, 8))) is torch.Tensor
