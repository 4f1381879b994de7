"""pipeline/prepare.py: the frozen encoder kept in the ckpt_dir, splits that follow their datalist, strict preprocessing."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def test_frozen_encoder_weights_are_kept_in_the_ckpt_dir(tmp_path):
    from monai_fbta.networks.encoder import PatchEncoder
    from monai_fbta.pipeline.prepare import frozen_encoder

    given = tmp_path / "pretrained.pt"
    torch.save(PatchEncoder("tiny_cnn").backbone.state_dict(), given)
    enc = frozen_encoder("tiny_cnn", given, tmp_path / "run1")
    assert enc.weights_file == str(tmp_path / "run1" / "frozen_encoder_tiny_cnn.pt")
    assert frozen_encoder("tiny_cnn", given, tmp_path / "run1").weights_file == enc.weights_file  # same weights: reused
    other = tmp_path / "other.pt"
    torch.save(PatchEncoder("tiny_cnn").backbone.state_dict(), other)
    with pytest.raises(ValueError, match="other.pt differs from .*run1/frozen_encoder_tiny_cnn.pt"):
        frozen_encoder("tiny_cnn", other, tmp_path / "run1")
