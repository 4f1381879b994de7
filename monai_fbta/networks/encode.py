"""Running a patch encoder: the one autocast rule and the one encode helper.

Every path that runs a network under ``amp`` asks :func:`resolve_amp_dtype` for the dtype and enters
:func:`autocast` (feature extraction, the trainer's forward, the evaluator, inference); every path that turns
patches ``[S, 3, H, W]`` into features ``[S, D]`` calls :func:`encode_patches` (the trainer's e2e view and
distillation target with gradients and optional checkpointing; frozen extraction through :func:`encode_batch`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["resolve_amp_dtype", "autocast", "prepare_encoder", "encode_patches", "encode_batch"]


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp_dtype(device: torch.device | str, amp: bool, amp_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (``None``: autocast off).

    ``amp_dtype`` when given; else on CUDA bf16 where supported, otherwise fp16 (the trainer then adds a
    ``GradScaler``); on a CPU bf16 only with native support (AVX512-BF16/AMX), otherwise off (it would be slower).
    """
    if not amp:
        return None
    if amp_dtype is not None:
        return amp_dtype
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else None


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype | None, **kwargs) -> Iterator[None]:
    """``torch.autocast`` on ``device``'s type with ``dtype`` (from :func:`resolve_amp_dtype`); nothing when ``None``."""
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype, **kwargs):
        yield


def prepare_encoder(encoder: nn.Module, device: torch.device | str, channels_last: bool) -> nn.Module:
    """Frozen eval-mode encoder on ``device`` (channels_last when asked)."""
    encoder = encoder.eval().requires_grad_(False).to(device)
    return encoder.to(memory_format=torch.channels_last) if channels_last else encoder


def encode_patches(
    encoder: nn.Module,
    images: torch.Tensor,
    chunk_size: int | None = None,
    grad_checkpointing: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """``encoder`` over ``images [S, 3, H, W]`` in chunks of ``chunk_size`` -> ``[S, D]``.

    With ``grad_checkpointing`` (and gradients enabled) each chunk's activations are recomputed in backward, so
    training memory is that of one chunk plus the ``[S, D]`` outputs. ``channels_last``: the input memory format.
    """
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    chunks = images.split(chunk_size) if chunk_size else (images,)
    use_ckpt = grad_checkpointing and torch.is_grad_enabled()
    outs = [checkpoint(encoder, c, use_reentrant=False) if use_ckpt else encoder(c) for c in chunks]
    return torch.cat(outs, 0).flatten(1)


def encode_batch(
    encoder: nn.Module, x: torch.Tensor, device: torch.device | str, amp_dtype: torch.dtype | None, channels_last: bool
) -> torch.Tensor:
    """Frozen features: ``x`` float ``[B, 3, H, W]`` -> float32 ``[B, D]`` on the CPU (inference mode, autocast)."""
    x = x.to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device, amp_dtype):
        out = encode_patches(encoder, x, channels_last=channels_last)
    return out.float().cpu()
