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


def test_monai_stats_handler_on_fbta_trainer_with_the_documented_output_transforms(capsys):
    """FBTATrainer's output is one dict per slide, not MONAI's list of per-sample dicts: StatsHandler's default
    ``x[0]`` does not apply, and docs/using_monai.md gives the transforms that do (both checked here)."""
    from test_trainer import _sample, _trainer

    from monai_fbta._quiet import quiet_import

    StatsHandler = quiet_import("monai.handlers").StatsHandler
    trainer = _trainer([_sample(0), _sample(1)], max_epochs=1)
    StatsHandler(name="user.terms", output_transform=loss_terms, epoch_log=False).attach(trainer)
    StatsHandler(name="user.loss", output_transform=lambda o: o["loss"], tag_name="train_loss",
                 epoch_log=False).attach(trainer)
    trainer.run()
    lines = [line for line in capsys.readouterr().out.splitlines() if "Iter:" in line]
    terms = [line for line in lines if "train_loss" not in line]
    assert len(terms) == 2 and len(lines) == 4, lines
    assert all(all(f"{t}: " in m for t in ("loss", "cls", "cons", "dist")) for m in terms), terms
