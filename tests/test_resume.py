"""handlers/resume.py: ResumeTraining and check_resume (restored best metric, refused checkpoints of another run)."""

from __future__ import annotations

import pytest
import torch
from conftest import RUN_SETTINGS, datalist_rows
from ignite.engine import Engine

from monai_fbta.handlers import ResumeTraining, TrainingCheckpoint, check_output_dir, check_resume, claim_output_dir, run_identity
from monai_fbta.handlers.checkpoint import RunMismatchError, check_identity, save_checkpoint
from monai_fbta.handlers.resume import OUTPUT_IDENTITY_FILE
from monai_fbta.networks import ABMIL

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

    # selected by another key metric: its best value is not comparable (acc 0.667 beat the saved AUC 0.5), refused
    save_inference_model(tmp_path / "model.pt", head, None, {"best_metric": 0.8, "epoch": 3, "key_metric": "val_auc"})
    evaluator.state.key_metric_name = "val_acc"
    with pytest.raises(RunMismatchError, match="model.pt was selected by val_auc and this run selects by val_acc"):
        ResumeTraining(tmp_path / "last.pt", objects={"head": head}, evaluator=evaluator,
                       best_model=tmp_path / "model.pt")(trainer)
    evaluator.state.key_metric_name = "val_auc"
    ResumeTraining(tmp_path / "last.pt", objects={"head": head}, evaluator=evaluator, best_model=tmp_path / "model.pt")(trainer)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """A folder where the demo trained, reused for other data: its last.pt is refused, saying what differs."""
    demo = run_identity(datalist_rows(), ["tumour", "normal"], 2, RUN_SETTINGS)
    assert run_identity(list(reversed(datalist_rows())), ("tumour", "normal"), 2, dict(RUN_SETTINGS)) == demo  # order, tuples
    head = ABMIL(8, 2, hidden=8)
    trainer = Engine(lambda e, b: None)
    trainer.state.max_epochs = 3
    TrainingCheckpoint(tmp_path / "last.pt", objects={"head": head}, identity=demo)(trainer)
    assert check_resume(tmp_path / "last.pt", demo) is True

    relabelled = [dict(r, label=1 - r["label"]) for r in datalist_rows()]
    new = run_identity(relabelled, ["a", "b"], 2, dict(RUN_SETTINGS, mil_name="transmil"))
    with pytest.raises(RunMismatchError) as err:
        check_resume(tmp_path / "last.pt", new)
    msg = str(err.value)
    for part in ("last.pt is the checkpoint of another run", "class_names differs (saved: ['tumour', 'normal']; now: ['a', 'b'])",
                 "the datalist differs (saved: 12 slides", "mil_name differs", "--ckpt_dir", "--resume False"):
        assert part in msg, msg
    assert check_resume(tmp_path / "last.pt", new, enabled=False) is False  # --resume False starts over

    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(RunMismatchError, match="another run"):
        ResumeTraining(tmp_path / "last.pt", objects={"head": head}, identity=new)(trainer)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # nothing was loaded

    save_checkpoint(tmp_path / "old.pt", {"head": head})  # written before run identities existed
    with pytest.raises(RunMismatchError, match="holds no run identity"):
        check_resume(tmp_path / "old.pt", demo)


def test_an_encoder_weights_file_counts_by_its_content_not_its_path_spelling(tmp_path, monkeypatch):
    """The same weights named from another working directory (relative, absolute) are the same run; other weights
    at the same path are not. The identity used to hold the path as typed, which refused a valid resume."""
    weights = tmp_path / "weights" / "w.pt"
    weights.parent.mkdir()
    torch.save({"w": torch.ones(2)}, weights)
    monkeypatch.chdir(tmp_path)
    relative = run_identity(datalist_rows(), ["a", "b"], 2, dict(RUN_SETTINGS, encoder_weights="weights/w.pt"))
    monkeypatch.chdir(weights.parent)
    assert run_identity(datalist_rows(), ["a", "b"], 2, dict(RUN_SETTINGS, encoder_weights=str(weights))) == relative
    assert run_identity(datalist_rows(), ["a", "b"], 2, dict(RUN_SETTINGS, encoder_weights="w.pt")) == relative
    assert relative["encoder_weights"].startswith("sha256:")
    torch.save({"w": torch.zeros(2)}, weights)
    assert run_identity(datalist_rows(), ["a", "b"], 2, dict(RUN_SETTINGS, encoder_weights="w.pt")) != relative
    tag = run_identity(datalist_rows(), ["a", "b"], 2, dict(RUN_SETTINGS, encoder_weights="imagenet"))
    assert tag["encoder_weights"] == "imagenet"  # a pretrained tag is not a file: kept as it is


def test_an_output_folder_belongs_to_one_run(tmp_path):
    identity = {"datalist_sha256": "abc", "num_slides": 3, "fold": 0, "training": {"seed": 0, "lr_mil": 1e-4}}
    other = {**identity, "fold": 1, "training": {"seed": 0, "lr_mil": 1e-3}}
    out = tmp_path / "eval"
    assert check_output_dir(out, identity) and check_output_dir(out, other)  # nobody's yet: a refused run claims nothing
    assert claim_output_dir(out, identity) and (out / OUTPUT_IDENTITY_FILE).is_file()
    assert check_output_dir(out, dict(identity))  # the same run again: resumes
    with pytest.raises(RunMismatchError, match="holds the outputs of another run: fold differs .*lr_mil differs"):
        check_output_dir(out, other)
    assert check_output_dir(out, other, enabled=False) and claim_output_dir(out, other)  # --resume False: starts over
    assert check_output_dir(out, other)
    # a checkpoint from before the training settings were recorded is compared on the rest only
    old = {k: v for k, v in identity.items() if k != "training"}
    assert check_identity(old, identity, "x", "y") is None
