"""The checkpoint handlers and files: TrainingCheckpoint + load_checkpoint (exact resume), BestModelSaver + model.pt."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from ignite.engine import Events
from test_trainer import C, D, _sample, _trainer
from torch.utils.data import DataLoader

from monai_fbta.engines import FBTAEvaluator
from monai_fbta.handlers import BestModelSaver, TrainingCheckpoint
from monai_fbta.handlers.checkpoint import (
    RunMismatchError,
    build_inference_network,
    load_checkpoint,
    load_inference_model,
    training_objects,
)
from monai_fbta.networks.abmil import ABMIL
from monai_fbta.networks.translator import FeatureTranslator

torch.set_num_threads(1)


def test_resume_equals_uninterrupted_run(tmp_path):
    data = [_sample(i) for i in range(3)]
    kw = {"ema_momentum": 0.2, "ema_momentum_warmup": 0.6, "ema_warmup_steps": 4, "accumulation_steps": 2}

    torch.manual_seed(1)
    full = _trainer(data, max_epochs=4, **kw)
    full.run()

    torch.manual_seed(1)
    first = _trainer(data, max_epochs=4, **kw)
    TrainingCheckpoint(tmp_path / "last.pt").attach(first)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    first.run()
    assert first.state.epoch == 2 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    torch.manual_seed(12345)  # a fresh process: other weights, other RNG state
    second = _trainer(data, max_epochs=4, seed=7, **kw)
    load_checkpoint(tmp_path / "last.pt", training_objects(second))
    assert second.state.epoch == 2 and second.state.curriculum == first.state.curriculum
    second.run()

    assert second.state.epoch == 4 and second.state.optimizer_step == full.state.optimizer_step == 8
    assert second.state.curriculum == full.state.curriculum == 1.0
    for name in ("mil_head", "translator", "trainable_encoder", "ema_mil_head", "ema_encoder"):
        a, b = training_objects(full)[name], training_objects(second)[name]
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name}.{k}")


def test_validation_best_model_and_inference_checkpoint(tmp_path):
    from monai_fbta._quiet import quiet_import

    ValidationHandler = quiet_import("monai.handlers").ValidationHandler
    data = [_sample(i) for i in range(4)]
    trainer = _trainer(data, max_epochs=3)
    head, translator = trainer.inference_head, trainer.translator
    ev = FBTAEvaluator("cpu", DataLoader(data, batch_size=1), head, translator, key_metric="acc")
    meta = {"class_names": ["a", "b"], "views": trainer.views, "feature_dim": D, "encoder": "tiny_cnn"}
    BestModelSaver(tmp_path / "model.pt", head, translator, meta).attach(ev)
    ValidationHandler(interval=1, validator=ev, epoch_level=True).attach(trainer)
    trainer.run()
    assert ev.state.best_metric_epoch >= 1
    fresh_head, fresh_tr = ABMIL(D, C, hidden=16, attention_dim=8), FeatureTranslator(D, num_heads=3, hidden=16)
    blob = load_inference_model(tmp_path / "model.pt", fresh_head, fresh_tr)
    assert blob["metadata"]["class_names"] == ["a", "b"] and blob["metadata"]["epoch"] == ev.state.best_metric_epoch
    assert blob["metadata"]["key_metric"] == "val_acc"
    if ev.state.best_metric_epoch == 3:  # the saved weights are the final teacher's
        for a, b in zip(fresh_head.state_dict().values(), copy.deepcopy(head).state_dict().values()):
            torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_inference_model(tmp_path / "nope.pt")


def test_model_pt_names_its_frozen_encoder_relative_to_itself_and_travels(tmp_path):
    """model.pt used to store the encoder file's absolute path: a moved bundle lost its encoder."""
    from monai_fbta.handlers.checkpoint import load_inference_model

    model_pt = tiny_model(tmp_path / "a", {"patch_size": 64})
    assert torch.load(model_pt, weights_only=True)["metadata"]["encoder_weights"] == "frozen_encoder_tiny_cnn.pt"
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    assert load_inference_model(moved / "models" / "model.pt")["metadata"]["encoder_weights"] == str(
        moved / "models" / "frozen_encoder_tiny_cnn.pt")

    blob = torch.load(moved / "models" / "model.pt", weights_only=True)  # monai-fbta 0.1: nested, absolute path
    old = {"network": {k: v for k, v in blob.items() if k.startswith(("mil_head.", "translator."))}, "has_translator": True,
           "metadata": dict(blob["metadata"], encoder_weights=str(tmp_path / "a" / "models" / "frozen_encoder_tiny_cnn.pt"))}
    torch.save(old, moved / "models" / "old.pt")
    loaded = load_inference_model(moved / "models" / "old.pt")
    assert loaded["metadata"]["encoder_weights"] == str(moved / "models" / "frozen_encoder_tiny_cnn.pt")
    assert loaded["translator"] is not None and loaded["mil_head"].keys() == {k[9:] for k in old["network"] if k.startswith("mil_head.")}


def test_model_pt_rebuilds_a_head_with_non_default_arguments(tmp_path):
    """model.pt kept only the head's name and hidden size: a 1-layer MambaMIL came back with 2 layers and failed to
    load (the bundle's evaluation crashed after training). Its other arguments (``mil_kwargs``) travel with it now."""
    from monai_fbta.handlers.checkpoint import (
        check_identity, load_inference_networks, model_metadata, save_inference_model,
    )
    from monai_fbta.networks import build_mil_head

    head = build_mil_head("mambamil", {"num_layers": 1}, in_features=D, num_classes=C, hidden=16)  # the bundle's form
    with pytest.raises(ValueError, match="given both"):
        build_mil_head("mambamil", {"hidden": 8}, in_features=D, num_classes=C, hidden=16)
    meta = model_metadata("mambamil", D, C, None, ["frozen"], "tiny_cnn", None, {}, 16, 2, mil_kwargs={"num_layers": 1})
    save_inference_model(tmp_path / "model.pt", head, None, meta)
    rebuilt, _, loaded = load_inference_networks(tmp_path / "model.pt")
    assert loaded["mil_kwargs"] == {"num_layers": 1} and len(rebuilt.blocks) == 1
    x = torch.randn(1, 7, D)
    torch.testing.assert_close(rebuilt(x), head.eval()(x))
    # a run saved before mil_kwargs existed had the head's defaults: it still resumes as a default-head run
    check_identity({"mil_name": "abmil"}, {"mil_name": "abmil", "mil_kwargs": {}}, "last.pt", "rerun")
    with pytest.raises(RunMismatchError, match="mil_kwargs differs"):
        check_identity({"mil_name": "mambamil"}, {"mil_name": "mambamil", "mil_kwargs": {"num_layers": 1}}, "last.pt", "x")


def test_model_pt_rebuilds_a_translator_of_another_width(tmp_path):
    """model.pt's metadata names K but not f_T's hidden width: a translator built with ``hidden`` != D came back at
    width D and failed to load (the bundle's test report crashed after training). It is now rebuilt from the saved
    weights' shape."""
    from monai_fbta.handlers.checkpoint import load_inference_networks, model_metadata, save_inference_model
    from monai_fbta.networks import build_mil_head

    head = build_mil_head("abmil", in_features=D, num_classes=C, hidden=16)
    translator = FeatureTranslator(D, num_heads=3, hidden=2 * D, init_scale=1.0)
    meta = model_metadata("abmil", D, C, None, ["frozen", "e2e", "translated"], "tiny_cnn", None, {}, 16, 3)
    save_inference_model(tmp_path / "model.pt", head, translator, meta)
    _, rebuilt, _ = load_inference_networks(tmp_path / "model.pt")
    assert (rebuilt.num_heads, rebuilt.in_features, rebuilt.hidden) == (3, D, 2 * D)
    x = torch.randn(5, D)
    torch.testing.assert_close(rebuilt(x), translator.eval()(x))


def test_a_checkpoint_saved_through_a_ddp_wrapper_loads_into_the_plain_module(tmp_path):
    """last.pt written under torchrun before save_checkpoint unwrapped DDP held ``module.``-prefixed state dicts;
    they load into the module as they are (ignite loads into ``ddp.module`` on resume)."""
    from monai_fbta.handlers.checkpoint import save_checkpoint

    translator = FeatureTranslator(D, num_heads=2)
    old = {"translator": {f"module.{k}": v for k, v in translator.state_dict().items()}}
    torch.save(old, tmp_path / "old.pt")
    fresh = FeatureTranslator(D, num_heads=2)
    load_checkpoint(tmp_path / "old.pt", {"translator": fresh})
    assert all(torch.equal(v, translator.state_dict()[k]) for k, v in fresh.state_dict().items())
    wrapped = torch.nn.DataParallel(translator)  # the same unwrapping as DistributedDataParallel
    save_checkpoint(tmp_path / "new.pt", {"translator": wrapped})
    assert set(torch.load(tmp_path / "new.pt", weights_only=True)["translator"]) == set(translator.state_dict())


def _run_with_validation(data, tmp_path, checkpoint_first: bool, stop_at: int | None = None, resume: bool = False):
    """A 4-epoch run with a shuffled training loader and a ValidationHandler, as the bundle has them; ``stop_at``
    ends it after that epoch, ``resume`` first loads ``tmp_path / "last.pt"`` (a fresh process: other seeds)."""
    from monai_fbta._quiet import quiet_import

    ValidationHandler = quiet_import("monai.handlers").ValidationHandler
    torch.manual_seed(12345 if resume else 1)
    trainer = _trainer(data, max_epochs=4, seed=7 if resume else 0)
    trainer.data_loader = DataLoader(data, batch_size=1, shuffle=True)  # its order comes from torch's global RNG
    ev = FBTAEvaluator("cpu", DataLoader(data, batch_size=1), trainer.inference_head, trainer.translator)
    saver = TrainingCheckpoint(tmp_path / "last.pt")
    validation = ValidationHandler(interval=1, validator=ev, epoch_level=True)
    for handler in (saver, validation) if checkpoint_first else (validation, saver):
        handler.attach(trainer)
    if stop_at is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_at), lambda e: e.terminate())
    if resume:
        load_checkpoint(tmp_path / "last.pt", training_objects(trainer))
    trainer.run()
    return trainer.mil_head.state_dict()


@pytest.mark.parametrize("checkpoint_first", [False, True])
def test_a_checkpoint_saved_after_validation_resumes_exactly(tmp_path, checkpoint_first):
    """Validation draws from torch's global RNG (its DataLoader's base seed), after the epoch's training. Saved
    after it (the bundle's order), the checkpoint's RNG state is the one the next epoch starts from, and a resumed
    run equals the uninterrupted one. Saved before it, the resumed run shuffles and drops out differently."""
    data = [_sample(i) for i in range(4)]
    full = _run_with_validation(data, tmp_path / "full", checkpoint_first)
    _run_with_validation(data, tmp_path / "cut", checkpoint_first, stop_at=2)
    resumed = _run_with_validation(data, tmp_path / "cut", checkpoint_first, resume=True)
    same = all(torch.equal(a, b) for a, b in zip(full.values(), resumed.values()))
    assert same != checkpoint_first


def test_the_bundle_saves_its_training_checkpoint_after_validation_and_the_metrics_row():
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parents[1] / "bundles/fbta_stad/configs/train.json").read_text())
    order = [h["_target_"].rsplit(".", 1)[-1] for h in config["train"]["handlers"] if isinstance(h, dict)]
    assert order.index("TrainingCheckpoint") > max(order.index("ValidationHandler"), order.index("EpochMetricsCSV"))


def test_a_damaged_checkpoint_names_itself_last(tmp_path):
    """torch's own message ended with advice to load with weights_only=False (unsafe) and did not name the file."""
    from monai_fbta.handlers.checkpoint import _load

    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with pytest.raises(RuntimeError) as err:
        _load(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "damaged, cut short or not a monai-fbta checkpoint" in lines[0]


def test_the_export_network_refuses_a_metadata_json_that_describes_another_model(tmp_path):
    """``ckpt_export`` embeds the bundle's metadata.json in model.ts: a model of other classes or another D used to
    be exported under the shipped class names (exit 0)."""
    model_pt = tiny_model(tmp_path, {"patch_size": 64})  # classes ['a', 'b'], D = tiny_cnn's 64
    shipped = json.loads((Path(__file__).resolve().parents[1] / "bundles" / "fbta_stad" / "configs" / "metadata.json")
                         .read_text())["network_data_format"]
    with pytest.raises(RunMismatchError) as err:
        build_inference_network(model_pt, channels_first=True, network_data_format=shipped)
    assert "channel_def names ['inflammation', 'pleomorphic', 'glandular'], the model predicts ['a', 'b']" in str(err.value)
    assert "num_channels is 3, the model has 2 classes" in str(err.value) and "Set network_data_format" in str(err.value)
    fitting = json.loads(json.dumps(shipped))
    fitting["outputs"]["pred"].update(num_channels=2, channel_def={"0": "a", "1": "b"})
    assert build_inference_network(model_pt, channels_first=True, network_data_format=fitting).metadata["class_names"] == ["a", "b"]
    assert build_inference_network(model_pt, network_data_format={}) is not None  # no metadata read: nothing to check
