"""TransMIL (Shao et al., NeurIPS 2021) with Nystrom attention, linear in the bag size.

Written from the papers (TransMIL; Nystromformer, Xiong et al., AAAI 2021), not from their code.

Layout: Linear(D -> hidden) + ReLU, a class token, transformer layer 1 (Nystrom attention), PPEG,
transformer layer 2, LayerNorm, linear classifier on the class token. Each layer is
``x + Attention(LayerNorm(x))`` as in TransMIL (no feed-forward block).

Two choices differ from the reference implementation and are deliberate:

* Only the class token is read out after layer 2, so layer 2 computes the class token's attention
  row *exactly* (``softmax(q_cls K^T / sqrt(d)) V``, O(N) time and memory) instead of a Nystrom
  approximation of all N rows. The prediction and the heatmap use that exact row.
* PPEG pads the instance tokens to a square by repeating the first tokens, convolves, then crops
  back to N, so every instance appears once in the attention (the padding never enters it).

Bags longer than ``bag_chunk_size`` take :meth:`TransMIL._forward_chunked`: the same computation
segment by segment under checkpointing. Nystrom attention factors into per-row terms
(``softmax(q_i K~^T)``) and softmax-weighted sums over all tokens (landmark means,
``softmax(Q~ K^T) V``, the class-token row), which are combined exactly across segments; PPEG is
computed over bands of grid rows with a 3-row halo; the value-residual convolution over rows with a
16-row halo. Memory: a few ``[N, hidden]`` tensors instead of ``[heads, N, landmarks]`` kernels.

Heatmap attention (``return_attention=True``): the class-token attention of layer 2, averaged
over heads, restricted to the instance tokens and renormalised to sum to 1 per bag.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_fbta.networks.mil_base import (
    DEFAULT_BAG_CHUNK_SIZE, MILHead, checkpointed, combine_softmax_parts, run_per_bag, segment_bounds,
)

__all__ = ["TransMIL", "NystromAttention", "PPEG", "segment_means", "iterative_pinv"]


def segment_means(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Means of ``num_segments`` contiguous, near-equal segments along dim -2: ``[..., n, d] -> [..., m, d]``."""
    n = x.shape[-2]
    segment = torch.arange(n, device=x.device) * num_segments // n  # sizes differ by at most 1
    sums = x.new_zeros(*x.shape[:-2], num_segments, x.shape[-1]).index_add(-2, segment, x)
    counts = torch.bincount(segment, minlength=num_segments).to(x.dtype)
    return sums / counts[:, None]


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of ``a [..., m, m]`` by the Nystromformer iteration."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm = a.abs().sum(-1).amax(-1, keepdim=True) * a.abs().sum(-2).amax(-1, keepdim=True)
    z = a.transpose(-1, -2) / norm[..., None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention with a depthwise-conv residual on the values.

    ``forward(x [B, n, dim]) -> [B, n, dim]``; memory O(n * num_landmarks). Bags with
    ``n <= num_landmarks`` use exact softmax attention (it is cheaper there).
    ``class_token(x) -> (out [B, 1, dim], attention [B, heads, n])`` gives the exact output and
    attention row of token 0 only, in O(n).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"NystromAttention: dim {dim} is not divisible by heads {heads}")
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        pad = residual_kernel // 2
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(pad, 0), groups=heads, bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each [B, h, n, d]
        return q * self.scale, k, v

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, h, n, d = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        if x.shape[1] <= self.num_landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            q_l, k_l = segment_means(q, self.num_landmarks), segment_means(k, self.num_landmarks)
            kernel1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # [B, h, n, m]
            kernel2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # [B, h, m, m]
            kernel3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # [B, h, m, n]
            out = (kernel1 @ iterative_pinv(kernel2, self.pinv_iterations)) @ (kernel3 @ v)
        return self._merge(out + self.residual(v))

    def class_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._split(x)
        attention = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), dim=-1)  # [B, h, 1, n]
        pad = self.residual.padding[0]
        residual = self.residual(v[:, :, : pad + 1])[:, :, :1]  # the conv output at token 0
        return self._merge(attention @ v + residual), attention[:, :, 0]


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convs over the tokens laid out on a square.

    ``forward(x [B, 1 + n, C]) -> [B, 1 + n, C]``; token 0 (the class token) passes through.
    The n instance tokens are padded to ``ceil(sqrt(n))**2`` by repeating the first tokens, and
    the padding is cropped off again after the convolutions.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        b, n, c = tokens.shape
        side = math.ceil(math.sqrt(n))
        index = torch.arange(side * side, device=x.device) % n
        grid = tokens[:, index].transpose(1, 2).reshape(b, c, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)[:, :n]], dim=1)

    def forward_chunked(self, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """:meth:`forward` over bands of grid rows (about ``chunk_size`` tokens each), exactly."""
        tokens = x[:, 1:]
        n = tokens.shape[1]
        side = math.ceil(math.sqrt(n))
        halo = max(conv.padding[0] for conv in self.convs)
        bands = [checkpointed(self._band, tokens, r0, r1, side, halo)
                 for r0, r1 in segment_bounds(math.ceil(n / side), max(1, chunk_size // side))]
        return torch.cat([x[:, :1], *bands], dim=1)[:, : 1 + n]

    def _band(self, tokens: torch.Tensor, r0: int, r1: int, side: int, halo: int) -> torch.Tensor:
        """Grid rows ``[r0, r1)`` of the PPEG output as tokens ``[B, (r1 - r0) * side, C]``."""
        b, n, c = tokens.shape
        w0, w1 = max(0, r0 - halo), min(side, r1 + halo)  # the band and the rows its kernels reach
        index = torch.arange(w0 * side, w1 * side, device=tokens.device) % n
        grid = tokens[:, index].transpose(1, 2).reshape(b, c, w1 - w0, side)
        grid = (grid + sum(conv(grid) for conv in self.convs))[:, :, r0 - w0 : r1 - w0]
        return grid.flatten(2).transpose(1, 2)


class _TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))``."""

    def __init__(self, dim: int, heads: int, num_landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads, num_landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(x))

    def class_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attention = self.attention.class_token(self.norm(x))
        return x[:, :1] + out, attention

    def _qkv(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attention._split(self.norm(rows))  # each [B, h, r, d]

    def forward_chunked(self, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """:meth:`forward` for ``x [B, n, dim]`` segment by segment (module docstring), exactly."""
        att, n = self.attention, x.shape[1]
        if n <= att.num_landmarks:
            return self.forward(x)
        bounds = segment_bounds(n, chunk_size)
        m = att.num_landmarks
        segment = torch.arange(n, device=x.device) * m // n  # as segment_means
        counts = torch.bincount(segment, minlength=m).to(x.dtype)[:, None]

        def landmark_sums(x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            q, k, _ = self._qkv(x[:, start:stop])
            zeros = q.new_zeros(*q.shape[:2], m, q.shape[-1])
            return zeros.index_add(2, segment[start:stop], q), zeros.index_add(2, segment[start:stop], k)

        sums = [checkpointed(landmark_sums, x, a, b) for a, b in bounds]
        q_l, k_l = sum(s[0] for s in sums) / counts, sum(s[1] for s in sums) / counts  # [B, h, m, d]

        def kernel3_v(x: torch.Tensor, start: int, stop: int, q_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            _, k, v = self._qkv(x[:, start:stop])
            scores = q_l @ k.transpose(-1, -2)  # [B, h, m, r]
            return torch.logsumexp(scores, -1), torch.softmax(scores, -1) @ v

        kernel3_v_all = combine_softmax_parts([checkpointed(kernel3_v, x, a, b, q_l) for a, b in bounds])
        kernel2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # [B, h, m, m]
        right = iterative_pinv(kernel2, att.pinv_iterations) @ kernel3_v_all  # [B, h, m, d]
        pad = att.residual.padding[0]

        def rows_out(x: torch.Tensor, start: int, stop: int, k_l: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            lo, hi = max(0, start - pad), min(n, stop + pad)  # the rows the residual kernel reaches
            q, _, v = self._qkv(x[:, lo:hi])
            keep = slice(start - lo, stop - lo)
            out = torch.softmax(q[:, :, keep] @ k_l.transpose(-1, -2), dim=-1) @ right + att.residual(v)[:, :, keep]
            return x[:, start:stop] + att._merge(out)

        return torch.cat([checkpointed(rows_out, x, a, b, k_l, right) for a, b in bounds], dim=1)

    def class_token_chunked(self, x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`class_token` segment by segment, exactly: ``(out [B, 1, dim], attention [B, heads, n])``."""
        att = self.attention
        pad = att.residual.padding[0]
        q0, _, v_head = self._qkv(x[:, : pad + 1])
        q0 = q0[:, :, :1]

        def row_part(x: torch.Tensor, start: int, stop: int, q0: torch.Tensor) -> tuple[torch.Tensor, ...]:
            _, k, v = self._qkv(x[:, start:stop])
            scores = q0 @ k.transpose(-1, -2)  # [B, h, 1, r]
            return torch.logsumexp(scores, -1), torch.softmax(scores, -1) @ v, scores

        parts = [checkpointed(row_part, x, a, b, q0) for a, b in segment_bounds(x.shape[1], chunk_size)]
        row = combine_softmax_parts([(lse, mean) for lse, mean, _ in parts])  # [B, h, 1, d]
        attention = torch.softmax(torch.cat([s for _, _, s in parts], dim=-1), dim=-1)[:, :, 0]
        residual = att.residual(v_head)[:, :, :1]  # the conv output at token 0
        return x[:, :1] + att._merge(row + residual), attention


class TransMIL(MILHead):
    """TransMIL head; see the module docstring for the layout and the attention it returns.

    Args:
        in_features: instance feature size D.
        num_classes: number of slide classes.
        hidden: projection / transformer width (default 512).
        dropout: dropout after the projection and on the attention outputs.
        heads: attention heads (default 8).
        num_landmarks: Nystrom landmarks (default ``hidden // 2``, as in TransMIL).
        class_token_std: the class token starts as ``N(0, class_token_std**2)``; 1, as in TransMIL's reference
            code (0.02, the ViT convention, let the head memorise its training bags first; docs/heads.md).
        bag_chunk_size: bags longer than this take the chunked forward (module docstring).

    Bags in a padded batch are processed one at a time on their real instances (B is usually 1 in
    MIL), so padding cannot reach PPEG or the attention.
    """

    trace_refusal = ("its attention (exact or Nystrom) and its PPEG grid (ceil(sqrt(N)) per side) are chosen from "
                     "the bag size N in Python")

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.0,
        heads: int = 8,
        num_landmarks: int | None = None,
        bag_chunk_size: int | None = DEFAULT_BAG_CHUNK_SIZE,
        class_token_std: float = 1.0,
    ) -> None:
        super().__init__(in_features, num_classes, hidden, dropout, bag_chunk_size)
        landmarks = num_landmarks or max(1, hidden // 2)
        self.projection = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * class_token_std)
        self.layer1 = _TransLayer(hidden, heads, landmarks, dropout)
        self.ppeg = PPEG(hidden)
        self.layer2 = _TransLayer(hidden, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def _with_class_token(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # [B, 1 + N, hidden]

    def _readout(self, cls_token: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits from the class token ``[B, 1, hidden]``; heatmap from its attention ``[B, heads, 1 + N]``."""
        attention = attention[:, :, 1:].mean(1)
        attention = attention / attention.sum(-1, keepdim=True)
        return self.classifier(self.norm(cls_token[:, 0])), attention

    def _forward_bags(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ppeg(self.layer1(self._with_class_token(self.projection(x))))
        return self._readout(*self.layer2.class_token(h))

    def _forward_bags_chunked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.bag_chunk_size
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), *self._project_segments(x)], dim=1)
        h = self.ppeg.forward_chunked(self.layer1.forward_chunked(h, chunk), chunk)
        return self._readout(*self.layer2.class_token_chunked(h, chunk))

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_per_bag(x, mask, self._forward_bags)

    def _forward_chunked(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_per_bag(x, mask, self._forward_bags_chunked)
