"""The pure-PyTorch selective scan against the step-by-step recurrence, and its memory."""

from __future__ import annotations

import pytest
import torch

from monai_fbta.networks.selective_scan import selective_scan, selective_scan_naive

torch.set_num_threads(1)


def _inputs(batch=2, channels=6, states=4, length=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, channels, length), delta=r(batch, channels, length), A=-torch.rand(channels, states, generator=g) * 4,
        B=r(batch, states, length), C=r(batch, states, length), D=r(channels), z=r(batch, channels, length),
        delta_bias=r(channels),
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_matches_naive_recurrence(chunk_size):
    args = _inputs()
    expected = selective_scan_naive(**args, delta_softplus=True)
    got = selective_scan(**args, delta_softplus=True, chunk_size=chunk_size, backend="torch")
    assert got.shape == (2, 6, 37)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_matches_naive_without_optional_terms_and_long_decay():
    args = _inputs(length=300)
    args["delta"] = args["delta"].abs() * 3  # strong decay: the scan must stay finite and exact
    for key in ("D", "z", "delta_bias"):
        args.pop(key)
    expected = selective_scan_naive(**args)
    got = selective_scan(**args, chunk_size=32)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_gradients_match_naive():
    args = _inputs(length=20)
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    grads = []
    for fn in (selective_scan_naive, lambda **a: selective_scan(**a, chunk_size=6)):
        for v in leaves.values():
            v.grad = None
        fn(**leaves, delta_softplus=True).pow(2).sum().backward()
        grads.append({k: v.grad.clone() for k, v in leaves.items()})
    for k in leaves:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-4, rtol=1e-3), k


def test_saved_memory_is_linear_and_below_full_state():
    def saved(length: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        args = _inputs(batch=1, channels=32, states=16, length=length)
        args["u"].requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan(**args, delta_softplus=True, chunk_size=64)
        return sum(storages.values())

    small, large = saved(2000), saved(8000)
    assert 3.0 < large / small < 5.0
    assert large < 8000 * 32 * 16 * 4 / 2  # far below keeping every state [L, Dm, S]


def test_bad_backend():
    args = _inputs()
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**args, backend="cuda")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan(**args, backend="mamba_ssm")  # CPU tensors
