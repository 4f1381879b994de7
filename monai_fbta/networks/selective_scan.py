"""Mamba's selective scan (S6) in pure PyTorch, with the mamba-ssm CUDA kernel used when available.

The recurrence, per channel d and state n (Gu & Dao 2023)::

    dt_t = softplus(delta_t + delta_bias)            (or delta_t when delta_softplus=False)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = <C_t, h_t> + D * u_t,   then  y_t *= silu(z_t)  when z is given

Shapes follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``: ``u, delta, z [B, Dm, L]``,
``A [Dm, S]``, ``B, C [B, S, L]``, ``D, delta_bias [Dm]``; returns ``y [B, Dm, L]``.

:func:`selective_scan` (the PyTorch path) cuts the sequence into chunks of ``chunk_size`` steps.
The decays ``exp(dt * A)`` (in (0, 1], so nothing can overflow) and inputs ``dt * B * u`` of a
chunk are computed in one vectorised pass, then the state is stepped through the chunk (one
multiply-add per step; on CPU this beat a log-depth Hillis-Steele scan ~3x) and carried to the
next chunk. With gradients on, each chunk runs under activation checkpointing, so memory is
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
    decay = torch.exp(dt[..., None] * A[:, None, :])  # [B, Dm, T, S], in (0, 1]
    drive = (dt * u)[..., None] * B.transpose(1, 2)[:, None]  # [B, Dm, T, S]
    states, state = [], h0
    for decay_t, drive_t in zip(decay.unbind(2), drive.unbind(2)):  # unbind: one backward for all steps
        state = decay_t * state + drive_t  # a multiply-add per step; the heavy work is vectorised above
        states.append(state)
    h = torch.stack(states, dim=2)  # [B, Dm, T, S]
    y = (h * C.transpose(1, 2)[:, None]).sum(-1)
    return y, h[:, :, -1].clone()  # clone: the carried state must not keep the whole chunk alive


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
    chunk_size: int = 256,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan; shapes in the module docstring.

    Args:
        backend: ``"auto"`` (mamba-ssm's CUDA kernel when it is importable and ``u`` is on CUDA,
            else PyTorch), ``"torch"`` or ``"mamba_ssm"``.
        chunk_size: steps per chunk of the PyTorch path (memory ~ chunk_size * Dm * S per chunk).
        initial_state: ``h_0 [B, Dm, S]`` (float32; default zeros), to continue a scan over the next
            part of a sequence. mamba-ssm's kernel takes no initial state, so this uses the PyTorch path.
        return_last_state: also return ``h_L [B, Dm, S]`` (float32).
    """
    if backend not in ("auto", "torch", "mamba_ssm"):
        raise ValueError(f"selective_scan: backend must be 'auto', 'torch' or 'mamba_ssm', got {backend!r}")
    kernel = _mamba_ssm_fn()
    if backend == "mamba_ssm" and (kernel is None or not u.is_cuda):
        raise RuntimeError("selective_scan: backend='mamba_ssm' needs the mamba-ssm package and CUDA tensors")
    if backend == "mamba_ssm" and initial_state is not None:
        raise RuntimeError("selective_scan: mamba-ssm's kernel takes no initial_state; use backend='auto' or 'torch'")
    if backend != "torch" and kernel is not None and u.is_cuda and initial_state is None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")

    dt, A32, B32, C32, u32 = _discretise_inputs(delta, delta_bias, delta_softplus), A.float(), B.float(), C.float(), u.float()
    h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.float()
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, h))
    ys = []
    chunks = (t.split(chunk_size, dim=2) for t in (u32, dt, B32, C32))  # views; one SplitBackward each
    for u_c, dt_c, B_c, C_c in zip(*chunks):
        args = (h, u_c, dt_c, A32, B_c, C_c)
        y, h = checkpoint(_scan_chunk, *args, use_reentrant=False) if use_checkpoint else _scan_chunk(*args)
        ys.append(y)
    y = _finish(torch.cat(ys, dim=-1), u, D, z)
    return (y, h) if return_last_state else y
