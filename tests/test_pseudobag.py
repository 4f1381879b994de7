"""Stratified pseudo-bag sampling: coverage, no repeats, |S| = sum min(M, |c|), order, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_fbta.transforms.pseudobag import PseudoBagSample, PseudoBagSampled, sample_pseudo_bag


def _clusters(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # uneven clusters: sizes 1..7 and two big ones, labels not contiguous, shuffled slide order
    sizes = {0: 1, 3: 2, 4: 3, 9: 7, 11: 40, 20: 5, 21: 1}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    return rng.permutation(labels)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_sampling_invariants(m):
    clusters = _clusters()
    idx = PseudoBagSample(m).set_random_state(0)(clusters).numpy()
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0), "sorted and without repeats"
    assert idx.min() >= 0 and idx.max() < len(clusters)
    labels, counts = np.unique(clusters, return_counts=True)
    assert len(idx) == np.minimum(m, counts).sum()
    got_labels, got_counts = np.unique(clusters[idx], return_counts=True)
    assert np.array_equal(got_labels, labels), "every non-empty cluster covered"
    assert np.array_equal(got_counts, np.minimum(m, counts))


def test_sampling_is_reproducible_and_varies():
    clusters = _clusters()
    a = PseudoBagSample(1).set_random_state(7)
    b = PseudoBagSample(1).set_random_state(7)
    first = a(clusters)
    assert torch.equal(first, b(clusters))
    draws = {tuple(a(clusters).tolist()) for _ in range(10)} | {tuple(first.tolist())}
    assert len(draws) > 1, "randomize must change the draw"
    # randomize=False reuses the previous draw
    last = a(clusters)
    assert torch.equal(a(clusters, randomize=False), last)


def test_sampling_is_uniform_within_cluster():
    clusters = np.zeros(4, dtype=int)
    rng = np.random.RandomState(0)
    hits = np.bincount(np.concatenate([sample_pseudo_bag(clusters, 1, rng) for _ in range(2000)]), minlength=4)
    assert hits.min() > 400, hits  # each of 4 patches ~500 times


def test_sampling_edge_cases():
    rng = np.random.RandomState(0)
    assert sample_pseudo_bag(np.zeros(0, int), 1, rng).shape == (0,)
    assert np.array_equal(sample_pseudo_bag(np.arange(5), 2, rng), np.arange(5))
    with pytest.raises(ValueError, match="num_per_cluster"):
        PseudoBagSample(0)


def test_dictionary_form_gathers_rows():
    clusters = torch.as_tensor(_clusters())
    n = len(clusters)
    feats = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)
    coords = np.stack([np.arange(n), np.arange(n) * 2], 1).astype(np.int64)
    t = PseudoBagSampled(num_per_cluster=2).set_random_state(3)
    d = t({"features": feats, "coords": coords, "clusters": clusters})
    idx = d["pb_index"]
    assert torch.equal(d["pb_features"], feats[idx])
    assert np.array_equal(d["pb_coords"].numpy(), coords[idx.numpy()])
    assert d["features"] is feats
    with pytest.raises(KeyError, match="clusters"):
        t({"features": feats, "coords": coords})
