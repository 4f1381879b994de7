"""FBTATrainer with the real networks, tiny sizes, CPU (and the evaluator on its validation, end to end)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events
from torch.utils.data import DataLoader

from monai.engines.utils import IterationEvents

from monai_fbta.engines import FBTAEvaluator, FBTALoss, FBTATrainer, fbta_param_groups
from monai_fbta.networks.abmil import ABMIL
from monai_fbta.networks.encoder import PatchEncoder, copy_frozen, copy_trainable
from monai_fbta.networks.translator import FeatureTranslator

torch.set_num_threads(1)
D, C, S, P = 16, 2, 6, 32


def _encoder() -> nn.Module:
    """f_TFE: a trainable copy of the frozen extractor f_FFE (same architecture, same initial weights)."""
    return copy_trainable(copy_frozen(PatchEncoder("tiny_cnn", out_features=D)))


def _sample(i: int, n: int = 40, s: int = S, gen: torch.Generator | None = None) -> dict:
    g = gen or torch.Generator().manual_seed(100 + i)
    feats = torch.randn(n, D, generator=g)
    index = torch.sort(torch.randperm(n, generator=g)[:s]).values
    clean = torch.rand(s, 3, P, P, generator=g)
    return {
        "slide_id": f"slide{i}",
        "label": torch.tensor(i % C),
        "features": feats,
        "coords": torch.zeros(n, 2, dtype=torch.int64),
        "pb_index": index,
        "pb_features": feats[index],
        "pb_image": clean.flip(-1),
        "pb_image_clean": clean,
    }


def _models(seed: int = 0):
    torch.manual_seed(seed)
    head = ABMIL(D, C, hidden=16, attention_dim=8, dropout=0.1)
    translator = FeatureTranslator(D, num_heads=3, hidden=16)
    encoder = _encoder()
    return head, translator, encoder


def _trainer(data, max_epochs=2, views=("frozen", "e2e", "translated"), seed=0, **kw):
    head, translator, encoder = _models(seed)
    loss = FBTALoss(views=views, lambda_dist=1.0)
    uses_tr = "translated" in views or loss.uses_distillation
    uses_enc = "e2e" in views or loss.uses_distillation
    translator, encoder = (translator if uses_tr else None), (encoder if uses_enc else None)
    opt = torch.optim.AdamW(fbta_param_groups(head, translator, encoder, 1e-2, 1e-2, 1e-2))
    loader = DataLoader(data, batch_size=1, shuffle=False)
    return FBTATrainer("cpu", max_epochs, loader, head, opt, loss, translator=translator, trainable_encoder=encoder, **kw)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_one_iteration_touches_every_term_and_updates_every_group():
    trainer = _trainer([_sample(0)], max_epochs=1, ema_momentum=0.3)
    before = {n: _params(m) for n, m in (("head", trainer.mil_head), ("tr", trainer.translator), ("enc", trainer.trainable_encoder))}
    ema_before = _params(trainer.teacher_head.ema_model)
    trainer.run()
    out = trainer.state.output
    assert set(out["logits"]) == {"frozen", "e2e", "translated"}
    for term in ("loss", "cls", "cons", "dist"):
        assert isinstance(out[term], float) and torch.isfinite(torch.tensor(out[term])) and out[term] > 0
    for name, module in (("head", trainer.mil_head), ("tr", trainer.translator), ("enc", trainer.trainable_encoder)):
        changed = [not torch.equal(a, b) for a, b in zip(before[name], module.parameters())]
        assert all(changed), f"{name}: {changed.count(False)} parameter tensors did not move"
    # EMA teacher after the single optimiser step: (1 - m) * old + m * student
    for old, new, student in zip(ema_before, trainer.teacher_head.ema_model.parameters(), trainer.mil_head.parameters()):
        torch.testing.assert_close(new, 0.7 * old + 0.3 * student.detach())
    assert trainer.state.optimizer_step == 1


def test_accumulation_steps_optimizer_and_ema_every_k_slides():
    data = [_sample(i) for i in range(5)]
    trainer = _trainer(data, max_epochs=1, accumulation_steps=2)
    snaps = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: snaps.append((_params(e.mil_head)[0], _params(e.teacher_head.ema_model)[0])),
    )
    first = _params(trainer.mil_head)[0]
    trainer.run()
    student_moved = [not torch.equal(a[0], b[0]) for a, b in zip([(first, None)] + snaps, snaps)]
    teacher_moved = [not torch.equal(a[1], b[1]) for a, b in zip(snaps, snaps[1:])]
    assert student_moved == [False, True, False, True, True]  # steps after slides 2, 4 and the epoch-end flush
    assert teacher_moved == [True, False, True, True]
    assert trainer.state.optimizer_step == 3


@pytest.mark.parametrize("frozen_bag", ["full", "pseudo"])
def test_vanilla_view_reproduces_plain_abmil_training(frozen_bag):
    data = [_sample(i) for i in range(4)]
    trainer = _trainer(data, max_epochs=2, views=["frozen"], frozen_bag=frozen_bag)
    assert trainer.translator is None and trainer.trainable_encoder is None
    assert trainer.inference_head is trainer.teacher_head.ema_model, "vanilla MIL is evaluated with an EMA teacher too"
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run()

    head, _, _ = _models(0)
    opt = torch.optim.AdamW(fbta_param_groups(head, lr_mil=1e-2))
    key = "features" if frozen_bag == "full" else "pb_features"
    plain = []
    for _ in range(2):
        for batch in DataLoader(data, batch_size=1):  # a plain PyTorch loop (the loader draws a seed per epoch)
            head.train()
            opt.zero_grad()
            loss = F.cross_entropy(head(batch[key]), batch["label"])
            loss.backward()
            opt.step()
            plain.append(loss.item())
    assert losses == pytest.approx(plain, abs=0, rel=0)
    for a, b in zip(trainer.mil_head.parameters(), head.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _saved_bytes(trainer: FBTATrainer, sample: dict) -> int:
    """Bytes of the tensors autograd keeps for backward during one training forward (deterministic)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    batch = trainer.prepare_batch(DataLoader([sample], batch_size=1).__iter__().__next__(), "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._forward_loss(batch)
    return total


def test_training_memory_in_bag_size_is_the_mil_head_on_the_frozen_bag_only():
    """Full frozen bag: the only N-dependent memory is the MIL head over F^FB; the e2e part depends on S only."""
    small_n, large_n = _sample(0, n=1_000), _sample(0, n=20_000)
    fbta = _trainer([_sample(0)], max_epochs=1)
    vanilla = _trainer([_sample(0)], max_epochs=1, views=["frozen"])
    growth = _saved_bytes(fbta, large_n) - _saved_bytes(fbta, small_n)
    head_growth = _saved_bytes(vanilla, large_n) - _saved_bytes(vanilla, small_n)
    assert growth == head_growth > 0
    per_instance = head_growth / 19_000
    e2e_per_patch = (_saved_bytes(fbta, _sample(0, n=1_000, s=2 * S)) - _saved_bytes(fbta, small_n)) / S
    assert per_instance < e2e_per_patch / 10, (per_instance, e2e_per_patch)  # a frozen instance is cheap
    pseudo = _trainer([_sample(0)], max_epochs=1, frozen_bag="pseudo")
    assert _saved_bytes(pseudo, small_n) == _saved_bytes(pseudo, large_n)  # the deviation: nothing touches N


def test_grad_checkpointing_saves_less_and_gives_same_gradients():
    sample = _sample(0, s=8)
    plain = _trainer([sample], max_epochs=1, encoder_chunk_size=2)
    ckpt = _trainer([sample], max_epochs=1, encoder_chunk_size=2, grad_checkpointing=True)
    assert _saved_bytes(ckpt, sample) < _saved_bytes(plain, sample)
    for tr in (plain, ckpt):
        torch.manual_seed(0)
        tr.run()
    for a, b in zip(plain.trainable_encoder.parameters(), ckpt.trainable_encoder.parameters()):
        torch.testing.assert_close(a, b)


def test_configuration_and_batch_errors():
    head, translator, encoder = _models()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="translator"):
        FBTATrainer("cpu", 1, [], head, opt, FBTALoss(), trainable_encoder=encoder)
    with pytest.raises(ValueError, match="differ"):
        FBTATrainer("cpu", 1, [], head, opt, FBTALoss(views=["frozen"]), views=["e2e"])
    bad = _sample(0)
    del bad["pb_image"]
    trainer = _trainer([bad], max_epochs=1)
    with pytest.raises(KeyError, match="slide0.*pb_image"):
        trainer.run()


def test_end_to_end_on_synthetic_slides_with_fbta_dataset(tmp_path):
    """Real pipeline: pyramidal TIFFs -> frozen tiny_cnn features -> FBTADataset -> trainer + evaluator."""
    import numpy as np
    from slide_factory import tissue_rect_image, write_slide

    from monai_fbta.transforms.chain import FBTADataset
    from monai_fbta.data.extraction import extract_features

    rows = []
    for i in range(2):
        img = tissue_rect_image(512, 512, (32, 32, 480, 480), seed=i)
        img[::5] = (img[::5] * (0.5 + 0.3 * i)).astype(np.uint8)
        rows.append({"image": write_slide(tmp_path / f"s{i}.tif", img, levels=1, tile=64, mpp=0.5), "label": i})
    torch.manual_seed(0)
    frozen = copy_frozen(PatchEncoder("tiny_cnn", out_features=D))
    extract_features(rows, tmp_path / "feats", frozen, {"patch_size": 32, "target_mpp": 0.5}, progress=False)

    train_ds = FBTADataset(rows, tmp_path / "feats", num_per_cluster=1, num_clusters=4, seed=0)
    val_ds = FBTADataset(rows, tmp_path / "feats", num_clusters=4, load_patches=False)
    head = ABMIL(D, C, hidden=16, attention_dim=8)
    translator = FeatureTranslator(D, num_heads=3, hidden=16)
    encoder = copy_trainable(frozen)
    opt = torch.optim.AdamW(fbta_param_groups(head, translator, encoder))
    trainer = FBTATrainer(
        "cpu", 2, DataLoader(train_ds, batch_size=None), head, opt, FBTALoss(),
        translator=translator, trainable_encoder=encoder,
    )
    pb_per_epoch = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: pb_per_epoch.append(e.state.batch["pb_index"]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: pb_per_epoch.append(e.state.batch["pb_index"]))
    trainer.run()
    assert trainer.state.optimizer_step == 4 and all(np.isfinite(trainer.state.output[k]) for k in ("cls", "cons", "dist"))
    assert train_ds.epoch == 1, f"dataset epoch {train_ds.epoch} after {trainer.state.epoch} epochs"
    assert not torch.equal(*pb_per_epoch), "a new pseudo-bag each epoch"
    ev = FBTAEvaluator("cpu", DataLoader(val_ds, batch_size=None), trainer.inference_head, translator)
    ev.run()
    assert [p["slide_id"] for p in ev.state.predictions] == ["s0", "s1"]
    assert {"val_auc", "val_auc_vanilla", "val_acc", "val_f1_vanilla"} <= set(ev.state.metrics)


@pytest.mark.parametrize("freeze", [True, False])
def test_encoder_batchnorm_frozen_keeps_e2e_view_in_the_frozen_feature_space(freeze):
    """At step 0 f_TFE(x) must equal f_FFE(x): one slide's batch statistics would move the e2e view elsewhere."""
    trainer = _trainer([_sample(0)], max_epochs=1, freeze_encoder_bn=freeze)
    frozen = copy_frozen(trainer.trainable_encoder)
    stats = [b.clone() for b in trainer.trainable_encoder.buffers()]
    seen = {}

    def grab(engine):  # f_TFE in the mode the trainer put it in, before the first optimiser step
        x = _sample(0)["pb_image"]
        with torch.no_grad():
            seen["e2e"], seen["frozen"] = engine.trainable_encoder(x), frozen(x)
    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, grab)
    trainer.run()
    same = torch.allclose(seen["e2e"], seen["frozen"], atol=1e-6)
    unchanged = all(torch.equal(a, b) for a, b in zip(stats, trainer.trainable_encoder.buffers()))
    assert same == freeze and unchanged == freeze
    assert trainer.trainable_encoder.training  # the rest of f_TFE (dropout, ...) is in train mode


def test_translated_bag_option_feeds_the_whole_translated_bag():
    """translated_bag="full" trains the head on f_T(F^FB), the bag inference sees; "pseudo" on f_T(F^FB[S])."""
    sample = _sample(0, n=50)
    batch = None
    for bag in ("pseudo", "full"):
        trainer = _trainer([sample], max_epochs=1, translated_bag=bag)
        batch = trainer.prepare_batch(next(iter(DataLoader([sample], batch_size=1))), "cpu")
        feats, heads = trainer.compute_views(batch)
        source = batch["features"] if bag == "full" else batch["pb_features"]
        torch.testing.assert_close(feats["translated"], trainer.translator(source))
        assert heads.shape[2] == S, "L_dist stays on the pseudo-bag"
    with pytest.raises(ValueError, match="translated_bag"):
        _trainer([sample], translated_bag="all")


def test_trainer_stops_on_a_non_finite_loss_naming_the_slide(tmp_path):
    from monai_fbta.engines import FBTALoss, FBTATrainer
    from monai_fbta.networks import build_mil_head

    head = build_mil_head("abmil", in_features=8, num_classes=2, hidden=16)
    before = [p.detach().clone() for p in head.parameters()]
    bag = torch.randn(1, 5, 8)
    bag[0, 2, 0] = float("nan")
    data = [{"slide_id": "slide_nan", "label": torch.tensor([1]), "pb_features": bag, "features": bag}]
    trainer = FBTATrainer("cpu", 1, data, head, torch.optim.SGD(head.parameters(), lr=0.1), FBTALoss(views=["frozen"]))
    with pytest.raises(FloatingPointError, match=r"slide slide_nan: non-finite loss .* no step was taken"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))


def test_encoder_warmup_epochs_keep_f_tfe_fixed_then_fine_tune_it():
    data = [_sample(i) for i in range(3)]
    trainer = _trainer(data, max_epochs=3, encoder_warmup_epochs=2)
    start_enc, start_head = _params(trainer.trainable_encoder), _params(trainer.mil_head)
    snaps: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], float]] = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: snaps.setdefault(
        e.state.epoch, (_params(e.trainable_encoder), _params(e.mil_head), e.state.output["cls_e2e"])))
    trainer.run()
    for epoch in (1, 2):  # warm-up: f_TFE (and its EMA target) unchanged, the head trains, the e2e view is in the loss
        assert all(torch.equal(a, b) for a, b in zip(start_enc, snaps[epoch][0])), f"f_TFE moved in epoch {epoch}"
        assert any(not torch.equal(a, b) for a, b in zip(start_head, snaps[epoch][1]))
        assert snaps[epoch][2] > 0
    assert all(not torch.equal(a, b) for a, b in zip(start_enc, snaps[3][0])), "f_TFE did not train after warm-up"
    for a, b in zip(start_enc, trainer.teacher_encoder.ema_model.parameters()):
        assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="encoder_warmup_epochs"):
        _trainer(data, encoder_warmup_epochs=-1)


def test_e2e_scale_is_one_at_step_zero_and_the_drift_warning_fires_once_when_the_extractor_runs_away(caplog):
    """output["e2e_scale"] = mean square of f_TFE(patches) / that of F^FB[S]: exactly 1 before the first step with
    frozen BatchNorm; an extractor whose output is 100x too large gives ~1e4, and ExtractorDriftWarning warns once
    over two epochs and records each epoch's mean; vanilla MIL (no e2e view) has no e2e_scale and no warning."""
    from monai_fbta.handlers import ExtractorDriftWarning

    sample = _sample(0)  # unaugmented, with F^FB[S] = f_FFE(patches): the extractor _trainer(seed=0) starts from
    sample["pb_image"] = sample["pb_image_clean"]
    with torch.no_grad():
        sample["pb_features"] = copy_frozen(_models(0)[2])(sample["pb_image_clean"])
    trainer = _trainer([sample], max_epochs=1)
    first = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: first.append(e.state.output["e2e_scale"]))
    trainer.run()
    assert first[0] == pytest.approx(1.0, abs=1e-5)

    runaway = _trainer([sample, sample], max_epochs=2, freeze_encoder_bn=True)
    last = [m for m in runaway.trainable_encoder.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(100.0)
        last.bias.mul_(100.0)
    ExtractorDriftWarning(max_scale=10).attach(runaway)
    with caplog.at_level("WARNING", logger="fbta.train"):
        runaway.run()
    assert set(runaway.state.e2e_scale) == {1, 2} and min(runaway.state.e2e_scale.values()) > 10
    warnings = [r for r in caplog.records if "run away" in r.getMessage()]
    assert len(warnings) == 1 and "epoch 1" in warnings[0].getMessage()

    caplog.clear()
    vanilla = _trainer([sample], max_epochs=1, views=("frozen",))
    ExtractorDriftWarning().attach(vanilla)
    vanilla.run()
    assert "e2e_scale" not in vanilla.state.output and not hasattr(vanilla.state, "e2e_scale")
    with pytest.raises(ValueError, match="max_scale"):
        ExtractorDriftWarning(max_scale=1)


@pytest.mark.parametrize("bag", ["pseudo", "full"])
def test_translator_cls_grad_false_trains_f_t_from_l_dist_only(bag):
    """translator_cls_grad=False: with L_dist off, the translated view's cross-entropy no longer moves f_T (it does
    by default) while the head still learns from that view; with L_dist on, f_T still learns."""
    def translator_moved(cls_grad: bool, lambda_dist: float) -> bool:
        head, translator, encoder = _models(0)
        loss = FBTALoss(views=("frozen", "e2e", "translated"), lambda_dist=lambda_dist)
        opt = torch.optim.SGD(fbta_param_groups(head, translator, encoder, 1e-1, 1e-1, 1e-1))
        trainer = FBTATrainer("cpu", 1, DataLoader([_sample(0)], batch_size=1), head, opt, loss, translator=translator,
                              trainable_encoder=encoder, translated_bag=bag, translator_cls_grad=cls_grad)
        before = _params(translator)
        trainer.run()
        assert trainer.state.output["cls_translated"] > 0
        return any(not torch.equal(a, b) for a, b in zip(before, translator.parameters()))

    assert translator_moved(True, 0.0) and not translator_moved(False, 0.0)
    assert translator_moved(False, 1.0)
