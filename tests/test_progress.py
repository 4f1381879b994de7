"""handlers/progress.py: LossProgressBar stays off when stderr is not a terminal."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    import io
    import sys

    from monai_fbta.handlers import LossProgressBar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert LossProgressBar().tqdm_kwargs["disable"] is True
    assert LossProgressBar(disable=False).tqdm_kwargs["disable"] is False
