"""Mamba's selective scan (S6) in pure PyTorch, with the mamba-ssm CUDA kernel used when available.

The recurrence, per channel d and state n (Gu & Dao 2023)::

    dt_t = softplus(delta_t + delta_bias)            (or delta_t when delta_softplus=False)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = <C_t, h_t> + D * u_t,   then  y_t *= silu(z_t)  when z is given

Shapes follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``: ``u, delta, z [B, Dm, L]``,
``A [Dm, S]``, ``B, C [B, S, L]``, ``D, delta_bias [Dm]``; returns ``y [B, Dm, L]``.

:func:`selective_scan` (the PyTorch path) cuts the sequence into chunks of ``chunk_size`` steps.
Inside a chunk the linear recurrence is an associative scan done in log2(chunk) parallel steps
(Hillis-Steele, products of decays in (0, 1], so it cannot overflow); the state is carried from
chunk to chunk. With gradients on, each chunk runs under activation checkpointing, so memory is
O(L * Dm) for inputs/outputs plus O(chunk * Dm * S) for one chunk, never O(L * Dm * S) or O(L^2).
:func:`selective_scan_naive` is the step-by-step reference used by the tests.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["selective_scan", "selective_scan_naive", "mamba_ssm_available"]


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension build
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm``'s CUDA selective scan can be imported."""
    return _mamba_ssm_fn() is not None


def _discretise_inputs(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Reference: the recurrence one step at a time (slow; O(L) Python steps)."""
    dt = _discretise_inputs(delta, delta_bias, delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A.float()) * h + (dt[:, :, t] * u[:, :, t].float())[..., None] * B[
            :, None, :, t
        ].float()
        ys.append((h * C[:, None, :, t].float()).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z)


def _scan_chunk(
    h0: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: ``h0 [B, Dm, S]``, ``u, dt [B, Dm, T]``, ``B, C [B, S, T]`` -> ``(y [B, Dm, T], h_T [B, Dm, S])``."""
    decay = torch.exp(dt[..., None] * A[:, None, :])  # [B, Dm, T, S]
    drive = (dt * u)[..., None] * B.transpose(1, 2)[:, None]  # [B, Dm, T, S]
    steps, offset = decay.shape[2], 1
    while offset < steps:  # inclusive scan of (decay, drive) pairs: (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)
        drive = torch.cat([drive[:, :, :offset], decay[:, :, offset:] * drive[:, :, :-offset] + drive[:, :, offset:]], 2)
        decay = torch.cat([decay[:, :, :offset], decay[:, :, offset:] * decay[:, :, :-offset]], 2)
        offset *= 2
    h = decay * h0[:, :, None] + drive
    return torch.einsum("bdts,bst->bdt", h, C), h[:, :, -1].clone()  # clone: do not keep the chunk alive


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Selective scan; shapes in the module docstring.

    Args:
        backend: ``"auto"`` (mamba-ssm's CUDA kernel when it is importable and ``u`` is on CUDA,
            else PyTorch), ``"torch"`` or ``"mamba_ssm"``.
        chunk_size: steps per chunk of the PyTorch path (memory ~ chunk_size * Dm * S per chunk).
    """
    if backend not in ("auto", "torch", "mamba_ssm"):
        raise ValueError(f"selective_scan: backend must be 'auto', 'torch' or 'mamba_ssm', got {backend!r}")
    kernel = _mamba_ssm_fn()
    if backend == "mamba_ssm" and (kernel is None or not u.is_cuda):
        raise RuntimeError("selective_scan: backend='mamba_ssm' needs the mamba-ssm package and CUDA tensors")
    if backend != "torch" and kernel is not None and u.is_cuda:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")

    dt, A32, B32, C32, u32 = _discretise_inputs(delta, delta_bias, delta_softplus), A.float(), B.float(), C.float(), u.float()
    h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    ys = []
    for start in range(0, u.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        args = (h, u32[:, :, part], dt[:, :, part], A32, B32[:, :, part], C32[:, :, part])
        y, h = checkpoint(_scan_chunk, *args, use_reentrant=False) if use_checkpoint else _scan_chunk(*args)
        ys.append(y)
    return _finish(torch.cat(ys, dim=-1), u, D, z)
