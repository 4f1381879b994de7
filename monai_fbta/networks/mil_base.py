"""The MIL head interface shared by ABMIL, TransMIL and MambaMIL, and the pieces they reuse.

Every head maps a padded batch of bags to slide logits::

    logits = head(x)                                   # x [B, N, D] -> [B, num_classes]
    logits, attention = head(x, mask, return_attention=True)   # attention [B, N]

``mask`` is ``[B, N]`` bool, True for real instances (None = all real). Padded instances never
change the output, and ``attention`` is 0 on them and sums to 1 over the real instances of
each bag. Sequence models (TransMIL, MambaMIL) read the real instances of each bag with
:func:`run_per_bag`, so padding cannot leak through convolutions, scans or reorderings.

Bags longer than ``bag_chunk_size`` (default 2048) go through each head's chunked forward: the
same function, computed over segments of ``bag_chunk_size`` instances, each segment under
activation checkpointing when gradients are on. Softmax-weighted sums over the whole bag are
combined exactly from per-segment ``(logsumexp, weighted mean)`` pairs (:func:`combine_softmax_parts`),
so training memory is O(hidden) per instance (``[N, hidden]`` tensors and their gradients: none for
ABMIL, about 20 hidden-sized vectors per instance for MambaMIL at the backward peak) plus one segment's
activations, never an
``[N, heads, landmarks]`` attention kernel or ``[N, expand * hidden]`` scan inputs (docs/benchmarks.md,
"Peak memory").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "MILHead", "GatedAttentionPool", "masked_softmax", "run_per_bag", "mil_logits", "checkpointed",
    "segment_bounds", "combine_softmax_parts",
]

DEFAULT_BAG_CHUNK_SIZE = 2048


def checkpointed(fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)``, under activation checkpointing when gradients are on (activations recomputed in backward)."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def segment_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(length)`` in segments of at most ``size``."""
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def combine_softmax_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax-weighted sum over a sequence cut into segments.

    Segment ``i`` gives ``(lse_i [...], mean_i [..., D])`` with ``lse_i = logsumexp(s_i)`` and
    ``mean_i = softmax(s_i) @ v_i``; the result is ``softmax(cat(s)) @ cat(v)`` ``[..., D]``.
    """
    weights = torch.softmax(torch.stack([lse for lse, _ in parts]), dim=0)  # [segments, ...]
    return sum(w[..., None] * mean for w, (_, mean) in zip(weights, parts))  # type: ignore[return-value]


def mil_logits(head: nn.Module, bag: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, C]`` of a MIL head for ``bag [B, N, D]`` (a tuple/dict output gives its logits)."""
    out = head(bag)
    if isinstance(out, Mapping):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` where ``mask`` is True; exactly 0 where it is False."""
    if mask is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask.to(scores.dtype)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): ``a = softmax(w^T (tanh(V h) * sigmoid(U h)))``.

    ``forward(h [B, N, D], mask [B, N] | None) -> (pooled [B, D], attention [B, N])``.
    """

    def __init__(self, in_features: int, attention_dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(in_features, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(in_features, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(self.value(h) * self.gate(h)).squeeze(-1)  # [B, N]
        attention = masked_softmax(scores, mask)
        pooled = torch.einsum("bn,bnd->bd", attention, h)
        return pooled, attention

    def forward_chunked(
        self,
        x: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        chunk_size: int,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(transform(x), mask)`` over segments of ``chunk_size`` instances, exactly.

        ``x [B, N, *]`` is what ``transform`` maps row-wise to ``h [B, n, D]`` (e.g. the head's
        projection); neither ``h`` nor the attention branches are ever held for all N at once.
        """

        def segment(x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, ...]:
            h = transform(x[:, start:stop])
            scores = self.score(self.value(h) * self.gate(h)).squeeze(-1)  # [B, n]
            if mask is not None:
                scores = scores.masked_fill(~mask[:, start:stop], torch.finfo(scores.dtype).min)
            return torch.logsumexp(scores, 1), torch.einsum("bn,bnd->bd", torch.softmax(scores, 1), h), scores

        parts = [checkpointed(segment, x, a, b) for a, b in segment_bounds(x.shape[1], chunk_size)]
        pooled = combine_softmax_parts([(lse, mean) for lse, mean, _ in parts])
        scores = torch.cat([s for _, _, s in parts], dim=1)
        return pooled, masked_softmax(scores, mask)


def run_per_bag(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``fn([1, n_b, D]) -> (logits [1, C], attention [1, n_b])`` to the real instances of each bag.

    Returns ``(logits [B, C], attention [B, N])`` with attention 0 at padded positions. Without a
    mask the whole batch goes through ``fn`` in one call.
    """
    if mask is None:
        return fn(x)
    logits, attention = [], x.new_zeros(x.shape[:2])
    for b in range(x.shape[0]):
        index = mask[b].nonzero().squeeze(1)
        bag_logits, bag_attention = fn(x[b : b + 1, index])
        logits.append(bag_logits)
        attention = attention.index_put((torch.full_like(index, b), index), bag_attention[0].to(attention.dtype))
    return torch.cat(logits), attention


class MILHead(nn.Module):
    """Base class: validates the bag and mask, standardises the features, subclasses implement :meth:`_forward`.

    Every head first maps ``x -> (x - feature_mean) / feature_std`` with two buffers of shape ``[D]``
    (identity until :meth:`set_feature_stats` is called; saved in the state dict, so exported and EMA
    models apply the same map). Features of a randomly initialised or domain-shifted extractor often
    share a large common offset with little spread between patches; without standardisation
    attention MIL cannot even fit its training set on them (see docs/method.md).

    Args:
        in_features: instance feature size D.
        num_classes: number of slide classes.
        hidden: width of the first projection (default 512).
        dropout: dropout probability used by the head.
        bag_chunk_size: bags with more instances take the chunked forward (module docstring); None = never.

    ``trace_refusal`` (class attribute): None if ``torch.jit.trace`` gives a network that is right for every bag
    size N; otherwise why it is not, and tracing raises that instead of freezing an N-specific graph.
    """

    trace_refusal: str | None = None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.0,
        bag_chunk_size: int | None = DEFAULT_BAG_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or hidden < 1:
            raise ValueError(
                f"{type(self).__name__}: in_features, num_classes and hidden must be >= 1, "
                f"got {in_features}, {num_classes}, {hidden}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        if bag_chunk_size is not None and bag_chunk_size < 1:
            raise ValueError(f"{type(self).__name__}: bag_chunk_size must be >= 1 or None, got {bag_chunk_size}")
        self.bag_chunk_size = bag_chunk_size
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = hidden
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> MILHead:
        """Standardise inputs with per-feature ``mean [D]`` and ``std [D]`` (e.g. over the training patches)."""
        mean, std = torch.as_tensor(mean).float().reshape(-1), torch.as_tensor(std).float().reshape(-1)
        if mean.shape != (self.in_features,) or std.shape != (self.in_features,):
            raise ValueError(f"{type(self).__name__}: feature stats must have shape [{self.in_features}], "
                             f"got {list(mean.shape)} and {list(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"{type(self).__name__}: feature stats contain NaN or inf")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(eps))
        return self

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - feature_mean) / feature_std`` for ``x [..., D]``."""
        return (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)

    def _project_segments(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``self.projection(standardise(x))`` per segment of ``bag_chunk_size`` rows: ``[B, n_i, hidden]`` each."""
        project = lambda rows: self.projection(self.standardise(rows))  # noqa: E731
        return [checkpointed(project, x[:, a:b]) for a, b in segment_bounds(x.shape[1], self.bag_chunk_size)]

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised ``x [B, N, D]``, ``mask [B, N] | None`` -> ``(logits [B, C], attention [B, N])``."""
        raise NotImplementedError

    def _forward_chunked(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_forward` for a long bag, from the *raw* ``x`` (standardised segment by segment)."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        if self.trace_refusal is not None and torch.jit.is_tracing():
            raise RuntimeError(f"{name} cannot be exported with torch.jit.trace: {self.trace_refusal}, so the traced "
                               "network would be right only for the bag size it was traced with. Serve model.pt "
                               "with configs/inference.json instead (TorchScript export works for ABMIL)")
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: expected x of shape [B, N, {self.in_features}], got {list(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: empty bag (N = 0)")
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"{name}: mask shape {list(mask.shape)} does not match x {list(x.shape[:2])}")
            mask = mask.to(device=x.device, dtype=torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise ValueError(f"{name}: every bag needs at least one real instance (a mask row is all False)")
            if bool(mask.all()):
                mask = None
        if self.bag_chunk_size is not None and x.shape[1] > self.bag_chunk_size:
            logits, attention = self._forward_chunked(x, mask)
        else:
            logits, attention = self._forward(self.standardise(x), mask)
        return (logits, attention) if return_attention else logits
