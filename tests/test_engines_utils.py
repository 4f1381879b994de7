"""monai_fbta.engines.utils: PrepareSlideBatch, the engines' batch preparation."""

from __future__ import annotations

import pytest
import torch
from test_trainer import D, _sample
from torch.utils.data import DataLoader

from monai_fbta.engines import PrepareSlideBatch


def test_prepare_slide_batch_takes_a_sample_or_a_batch_of_one():
    """PrepareSlideBatch: an uncollated sample and a default-collated batch of one give the same engine inputs."""
    sample = _sample(0, n=30)
    prepare = PrepareSlideBatch()
    direct = prepare(next(iter(DataLoader([sample], batch_size=None))), "cpu")
    collated = prepare(next(iter(DataLoader([sample], batch_size=1))), "cpu")
    assert direct.keys() == collated.keys()
    for key in ("features", "pb_features", "pb_image", "pb_image_clean", "label"):  # what the engines read
        assert torch.equal(direct[key], collated[key]), key
    assert direct["slide_id"] == collated["slide_id"] == "slide0"
    assert direct["features"].shape == (1, 30, D) and direct["pb_image"].ndim == 4 and direct["label"].shape == (1,)
    with pytest.raises(ValueError, match="one slide per batch"):
        prepare(next(iter(DataLoader([sample, sample], batch_size=2))), "cpu")
