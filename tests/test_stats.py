"""handlers/stats.py: the loss-logging handlers (every loss term in each iteration line) and loss_terms."""

from __future__ import annotations

import torch
import torch.nn as nn
from conftest import stepping_engine

from monai_fbta.handlers import loss_terms, training_log_handlers

torch.set_num_threads(1)


def test_stats_handler_logs_every_loss_term(capsys):
    engine = stepping_engine(nn.Linear(2, 2))
    for handler in training_log_handlers(name="fbta.test", progress=True):
        handler.attach(engine)
    engine.run(range(2), max_epochs=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "Iter:" in line]
    assert len(lines) == 2
    for term in ("loss", "cls", "cons", "dist"):
        assert all(f"{term}: " in line for line in lines)
    assert loss_terms({"loss": torch.tensor(2.0), "logits": None}) == {"loss": 2.0}
