"""MIL heads: shapes, masking, gradients, determinism, attention, linear memory, toy training."""

from __future__ import annotations

import pytest
import torch

from monai_fbta.networks import ABMIL, MambaMIL, TransMIL, build_mil_head
from monai_fbta.networks.transmil import iterative_pinv, segment_means

torch.set_num_threads(1)
D = 16
HEADS = {
    "abmil": dict(hidden=32, attention_dim=16),
    "transmil": dict(hidden=32, heads=4, num_landmarks=8),
    "mambamil": dict(hidden=32, d_state=4, rate=3, chunk_size=8),
}


def make(name: str, seed: int = 0, dropout: float = 0.0, in_features: int = D) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mil_head(name, in_features=in_features, num_classes=3, dropout=dropout, **HEADS[name])


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_shapes_and_attention_sum(name, n):
    head = make(name).eval()
    x = torch.randn(2, n, D)
    with torch.no_grad():
        logits = head(x)
        logits2, attention = head(x, return_attention=True)
    assert logits.shape == (2, 3) and attention.shape == (2, n)
    assert torch.allclose(logits, logits2)
    assert torch.isfinite(logits).all()
    assert (attention >= 0).all()
    assert torch.allclose(attention.sum(1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_padding_mask_matches_unpadded_bags(name):
    head = make(name).eval()
    lengths = (40, 23)
    bags = [torch.randn(n, D) for n in lengths]
    x = torch.randn(2, max(lengths), D) * 100  # padding full of large garbage
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for b, bag in enumerate(bags):
        x[b, : len(bag)] = bag
        mask[b, : len(bag)] = True
    with torch.no_grad():
        logits, attention = head(x, mask, return_attention=True)
        for b, bag in enumerate(bags):
            ref_logits, ref_attention = head(bag[None], return_attention=True)
            assert torch.allclose(logits[b], ref_logits[0], atol=1e-5)
            assert torch.allclose(attention[b, : len(bag)], ref_attention[0], atol=1e-6)
    assert attention[1, lengths[1] :].abs().sum() == 0
    assert torch.allclose(attention.sum(1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_gradients_reach_every_parameter(name):
    head = make(name).train()
    x = torch.randn(2, 40, D)  # > num_landmarks: the Nystrom path of TransMIL runs
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    logits, attention = head(x, mask, return_attention=True)
    (logits.pow(2).sum() + (attention * torch.randn_like(attention)).sum()).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("name", HEADS)
def test_deterministic_with_seed(name):
    x = torch.randn(1, 50, D)
    outs = []
    for _ in range(2):
        head = make(name, seed=7, dropout=0.2).train()
        torch.manual_seed(3)
        outs.append(head(x, return_attention=True))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    other = make(name, seed=8, dropout=0.2).train()
    torch.manual_seed(3)
    assert not torch.allclose(other(x), outs[0][0])


def test_bad_inputs_raise():
    head = make("abmil")
    with pytest.raises(ValueError, match=r"\[B, N, 16\]"):
        head(torch.randn(3, D))
    with pytest.raises(ValueError, match="mask shape"):
        head(torch.randn(1, 5, D), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one real instance"):
        head(torch.randn(1, 5, D), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty bag"):
        head(torch.randn(1, 0, D))


def test_nystrom_pieces():
    x = torch.arange(10.0).view(1, 10, 1)
    assert torch.allclose(segment_means(x, 3)[0, :, 0], torch.tensor([1.5, 5.0, 8.0]))  # segments 0-3, 4-6, 7-9
    a = torch.softmax(torch.randn(2, 6, 6), dim=-1)
    assert torch.allclose(iterative_pinv(a, 20), torch.linalg.pinv(a), atol=1e-3)


def test_transmil_class_token_starts_at_unit_scale_as_in_the_reference():
    """TransMIL's reference code draws the class token from N(0, 1); the ViT scale 0.02 was a deviation (heads.md)."""
    torch.manual_seed(0)
    std = TransMIL(8, 3, hidden=512).cls_token.std().item()
    assert 0.9 < std < 1.1, std
    vit_scale = build_mil_head("transmil", in_features=8, num_classes=3, options={"class_token_std": 0.02})
    assert 0.01 < vit_scale.cls_token.std().item() < 0.03  # the earlier init, reachable from a bundle's mil_kwargs


def _saved_bytes(head: torch.nn.Module, n: int) -> int:
    """Bytes autograd keeps for backward (distinct storages) for one bag of n instances."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head(torch.randn(1, n, 8, requires_grad=True))
    return sum(storages.values())


def test_transmil_memory_is_linear_in_bag_size():
    torch.manual_seed(0)
    head = TransMIL(8, 2, hidden=32, heads=4, num_landmarks=16, bag_chunk_size=None)  # the whole-bag forward
    small, large = _saved_bytes(head, 5000), _saved_bytes(head, 20000)
    # linear: ~4x for 4x the instances; quadratic attention would be ~16x
    assert 3.0 < large / small < 5.0, (small, large)


def _toy_bags(count: int, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Bags of 10-50 Gaussian instances; a bag is positive iff one instance carries the marker."""
    marker = torch.zeros(32)
    marker[:4] = 3.0
    bags, labels = [], torch.arange(count) % 2
    for label in labels:
        bag = torch.randn(int(torch.randint(10, 51, (1,), generator=generator)), 32, generator=generator)
        if label:
            bag[int(torch.randint(len(bag), (1,), generator=generator))] += marker
        bags.append(bag)
    return bags, labels


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", HEADS)
def test_trains_to_100_percent_on_toy_bags(name):
    generator = torch.Generator().manual_seed(0)
    bags, labels = _toy_bags(64, generator)
    head = make(name, in_features=32)
    head.classifier.reset_parameters()
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-3)

    def accuracy() -> float:
        head.eval()
        with torch.no_grad():
            predictions = torch.stack([head(bag[None])[0].argmax() for bag in bags])
        head.train()
        return (predictions == labels).float().mean().item()

    for _epoch in range(40):
        for i in torch.randperm(len(bags), generator=generator).tolist():
            loss = torch.nn.functional.cross_entropy(head(bags[i][None]), labels[i : i + 1])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if accuracy() == 1.0:
            break
    assert accuracy() == 1.0


@pytest.mark.parametrize("name", ["abmil", "transmil", "mambamil"])
def test_feature_stats_standardise_the_input_and_travel_with_the_state_dict(name):
    torch.manual_seed(0)
    head = build_mil_head(name, in_features=8, num_classes=2, hidden=16).eval()
    x = torch.randn(1, 12, 8) * 0.1 + 5.0  # large common offset, little spread (random-init extractor)
    mean, std = x[0].mean(0), x[0].std(0)
    plain = head(((x - mean) / std).float())
    head.set_feature_stats(mean, std)
    assert torch.allclose(head(x), plain, atol=1e-5)
    copy = build_mil_head(name, in_features=8, num_classes=2, hidden=16).eval()
    copy.load_state_dict(head.state_dict())
    assert torch.equal(copy.feature_mean, mean) and torch.allclose(copy(x), plain, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        head.set_feature_stats(mean[:3], std)
    with pytest.raises(ValueError, match="NaN"):
        head.set_feature_stats(mean * float("nan"), std)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("n, chunk, masked", [(600, 64, False), (451, 50, True), (97, 5, False)])
def test_chunked_forward_equals_the_whole_bag_forward(name, n, chunk, masked):
    """Long bags go through the chunked, checkpointed forward: same logits, attention and gradients."""
    head = make(name).double()
    head.set_feature_stats(torch.randn(D), torch.rand(D) + 0.5)
    x = torch.randn(2, n, D, dtype=torch.double)
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    results = []
    for bag_chunk_size in (None, chunk):
        head.zero_grad()
        head.bag_chunk_size = bag_chunk_size
        logits, attention = head(x, mask, return_attention=True)
        (logits * torch.arange(1.0, 4.0, dtype=torch.double)).sum().backward()
        results.append((logits, attention, [p.grad.clone() for p in head.parameters()]))
    (whole_logits, whole_att, whole_grads), (chunk_logits, chunk_att, chunk_grads) = results
    torch.testing.assert_close(chunk_logits, whole_logits)
    torch.testing.assert_close(chunk_att, whole_att)
    for chunked, whole in zip(chunk_grads, whole_grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)  # MambaMIL scans in float32


def _saved_floats_per_instance(head: torch.nn.Module, n_small: int = 1000, n_large: int = 4000) -> float:
    """Autograd-saved floats per extra instance of the forward pass (the bag itself excluded)."""
    def saved(n: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, n, D)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head(x)
        for t in (x, *head.parameters()):
            storages.pop(t.untyped_storage().data_ptr(), None)
        return sum(storages.values())

    return (saved(n_large) - saved(n_small)) / (n_large - n_small) / 4


@pytest.mark.parametrize("name", HEADS)
def test_chunked_training_keeps_a_few_hidden_vectors_per_instance(name):
    """With gradients on, a chunked bag keeps O(hidden) per instance, far below the whole-bag forward
    (TransMIL's [heads, N, landmarks] kernels, MambaMIL's [N, expand * hidden] scan inputs)."""
    head = make(name)
    hidden = head.hidden
    head.bag_chunk_size = None
    whole = _saved_floats_per_instance(head)
    head.bag_chunk_size = 250
    chunked = _saved_floats_per_instance(head)
    assert chunked <= 5 * hidden, (chunked, whole)
    assert chunked < whole / 3, (chunked, whole)


@pytest.mark.parametrize("name", HEADS)
def test_torch_jit_trace_is_right_at_every_bag_size_or_refused(name):
    """Tracing freezes Python-level choices made from N. ABMIL has none, so its trace is right at other bag sizes
    (chunked ones included); TransMIL and MambaMIL make some (exact vs Nystrom attention, the PPEG grid, the scan's
    reordering), and tracing them raises instead of writing a network that is right only at the traced N."""
    head = make(name).eval()
    head.bag_chunk_size = 64
    if name != "abmil":
        with pytest.raises(RuntimeError, match=f"{type(head).__name__} cannot be exported with torch.jit.trace"):
            torch.jit.trace(head, torch.randn(1, 50, D))
        return
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(head, torch.randn(1, 50, D))
    for n in (1, 7, 333):
        x = torch.randn(1, n, D)
        assert torch.allclose(traced(x), head(x), atol=1e-5), n
