"""handlers/resume.py: ResumeTraining and check_resume (restored best metric, refused checkpoints of another run)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


def test_resume_restores_the_best_validation_metric(tmp_path):
    """After a resume, model.pt is only replaced by a model better than the one saved before the kill."""
    from ignite.engine import Engine

    from monai_fbta.handlers.checkpoint import save_checkpoint, save_inference_model
    from monai_fbta.networks import ABMIL
    from monai_fbta.handlers import ResumeTraining

    head = ABMIL(8, 2, hidden=8)
    save_checkpoint(tmp_path / "last.pt", {"head": head})
    save_inference_model(tmp_path / "model.pt", head, None, {"best_metric": 0.8, "epoch": 3})
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    trainer.state.max_epochs, evaluator.state.best_metric = 5, -1
    ResumeTraining(tmp_path / "last.pt", objects={"head": head}, evaluator=evaluator, best_model=tmp_path / "model.pt")(trainer)
    assert evaluator.state.best_metric == 0.8 and evaluator.state.best_metric_epoch == 3
