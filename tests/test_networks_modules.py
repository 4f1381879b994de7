"""FeatureTranslator, PatchEncoder and the registry."""

from __future__ import annotations

import pytest
import torch

from monai_fbta.networks import (
    FeatureTranslator,
    PatchEncoder,
    build_encoder,
    build_mil_head,
    build_translator,
    copy_frozen,
    copy_trainable,
    list_encoders,
    list_mil_heads,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- translator
def test_translator_heads_and_shapes():
    torch.manual_seed(0)
    translator = FeatureTranslator(24, num_heads=10, hidden=16)
    x = torch.randn(2, 7, 24)
    mean, heads = translator(x, return_heads=True)
    assert mean.shape == (2, 7, 24) and heads.shape == (10, 2, 7, 24)
    assert torch.allclose(mean, heads.mean(0), atol=1e-6)
    assert torch.allclose(translator(x), mean)
    assert not torch.allclose(heads[0], heads[1])  # independent heads
    # head k is x + MLP_k(x), computed here with plain Linear algebra
    k = 3
    manual = x + torch.nn.functional.gelu(x @ translator.w1[k] + translator.b1[k]) @ translator.w2[k] + translator.b2[k]
    assert torch.allclose(heads[k], manual, atol=1e-5)


def test_translator_near_identity_at_init_and_trainable():
    torch.manual_seed(0)
    x = torch.randn(100, 64)
    translator = FeatureTranslator(64)
    out = translator(x)
    relative = (out - x).norm() / x.norm()
    assert 0 < relative < 0.05
    assert torch.allclose(FeatureTranslator(64, init_scale=0.0)(x), x, rtol=0, atol=1e-6)  # mean of K copies
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in translator.parameters())
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        translator(torch.randn(3, 65))



def _per_head_mean(t: FeatureTranslator, x: torch.Tensor) -> torch.Tensor:
    """The translator's mean as it was computed before the two-matmul path: every head with einsum, then the mean."""
    flat = x.reshape(-1, t.in_features)
    h = torch.nn.functional.gelu(torch.einsum("md,kdh->kmh", flat, t.w1) + t.b1)
    return (flat + torch.einsum("kmh,khd->kmd", h, t.w2) + t.b2).mean(0).reshape(x.shape)


def test_translator_mean_as_two_matmuls_equals_the_mean_of_the_heads():
    """forward() without heads is two GEMMs over the K heads side by side: the same values and gradients."""
    torch.manual_seed(0)
    t = FeatureTranslator(32, num_heads=10, hidden=24, init_scale=1.0)  # full-scale MLP: far from the identity
    x = torch.randn(3, 50, 32)
    fast, reference = t(x), _per_head_mean(t, x)
    assert (fast - x).abs().max() > 0.1  # the MLP part matters
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(f(t, x).pow(2).sum(), list(t.parameters())) for f in (FeatureTranslator.forward, _per_head_mean)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_translated_mil_bf16_translator_stays_close_to_fp32():
    """translator_dtype='bfloat16' runs f_T under autocast; probabilities move by < 1e-2 on a full-scale translator."""
    from monai_fbta.networks import TranslatedMIL, build_mil_head
    from monai_fbta.networks.inference import autocast_dtype

    torch.manual_seed(0)
    head, t = build_mil_head("abmil", in_features=64, num_classes=3).eval(), FeatureTranslator(64, init_scale=1.0).eval()
    bag = torch.randn(1, 3000, 64).half()  # cached features are fp16
    exact, fast = TranslatedMIL(head, t), TranslatedMIL(head, t, translator_dtype="bfloat16", chunk_size=1000)
    with torch.no_grad():
        p32, a32 = exact(bag, return_attention=True)
        p16, a16 = fast(bag, return_attention=True)
        assert torch.equal(p32, torch.softmax(head(t(bag.float())), -1))  # default: plain float32
    assert p16.dtype == a16.dtype == torch.float32
    assert (p16 - p32).abs().max() < 1e-2 and (a16 - a32).abs().max() < 1e-2 * a32.max()
    assert not torch.equal(p16, p32)  # bf16 really ran
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("float32") is None
    with pytest.raises(ValueError, match="translator_dtype"):
        TranslatedMIL(head, t, translator_dtype="int8")

# ---------------------------------------------------------------- encoder
def test_tiny_cnn_shapes_and_size():
    encoder = PatchEncoder("tiny_cnn", out_features=48)
    assert encoder.out_features == 48
    assert 20_000 < sum(p.numel() for p in encoder.parameters()) < 100_000
    assert encoder(torch.rand(3, 3, 64, 64)).shape == (3, 48)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encoder(torch.rand(3, 64, 64))


def test_tiny_cnn_random_init_features_are_not_degenerate():
    """Random-init features (demo/CPU profile) must vary between images: PyTorch's default conv init shrank
    them ~6x per block, so every patch got nearly the same vector (std across images ~0.005) and MIL could not learn."""
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 1, 8).view(8, 1, 1, 1)
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            feats = copy_frozen(PatchEncoder("tiny_cnn"))(x)
        assert feats.std(0).mean() > 0.05


@pytest.mark.parametrize("name,dim", [("resnet50_trunc", 1024), ("resnet18", 512), ("vit_small", 384)])
def test_backbone_dims(name, dim):
    encoder = build_encoder(name).eval()
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 64, 64)).shape == (1, dim)
    assert encoder.out_features == dim


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    source = PatchEncoder("tiny_cnn").eval()
    x = torch.rand(2, 3, 32, 32)
    for i, state in enumerate((source.backbone.state_dict(), source.state_dict())):  # plain and "backbone." keys
        path = tmp_path / f"w{i}.pth"
        torch.save(state, path)
        torch.manual_seed(1)
        loaded = PatchEncoder("tiny_cnn", weights=str(path)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), source(x))


def test_full_resnet50_checkpoint_loads_into_truncated(tmp_path):
    import torchvision

    torch.manual_seed(0)
    full = torchvision.models.resnet50()
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")
    encoder = PatchEncoder("resnet50_trunc", weights=tmp_path / "resnet50.pth")
    assert torch.equal(encoder.backbone.layer3[0].conv1.weight, full.layer3[0].conv1.weight)


def test_weights_errors_name_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(PatchEncoder("tiny_cnn", out_features=32).backbone.state_dict(), path)
    with pytest.raises(RuntimeError, match=r"other\.pth.*does not match.*shape mismatches"):
        PatchEncoder("tiny_cnn", out_features=64, weights=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PatchEncoder("tiny_cnn", weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        PatchEncoder("tiny_cnn", weights=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="no pretrained weights"):
        PatchEncoder("tiny_cnn", weights="imagenet")


def test_pretrained_download_offline_gives_clear_error():
    try:
        PatchEncoder("resnet18", weights="imagenet")
    except RuntimeError as err:
        message = str(err)
        assert "resnet18" in message and "local file" in message and "weights=" in message
    else:
        pytest.skip("pretrained weights were available (network or cache): nothing to check")


def test_copy_frozen_and_trainable():
    encoder = PatchEncoder("tiny_cnn")
    frozen, trainable = copy_frozen(encoder), copy_trainable(encoder)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    torch.nn.Sequential(frozen).train()  # a parent switching to train mode must not unfreeze BN statistics
    assert not frozen.training
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert trainable.backbone.fc.weight.data_ptr() != encoder.backbone.fc.weight.data_ptr()
    x = torch.rand(4, 3, 32, 32)
    before = frozen.backbone.block1[1].running_mean.clone()
    frozen(x)
    assert torch.equal(frozen.backbone.block1[1].running_mean, before)


def test_grad_checkpointing_same_gradients():
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = PatchEncoder("tiny_cnn", grad_checkpointing=checkpointing)
        encoder(x).sum().backward()
        grads.append(encoder.backbone.block1[0].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_channels_last_and_autocast():
    encoder = PatchEncoder("tiny_cnn").eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = encoder(x)
    assert y.shape == (2, 64) and torch.isfinite(y.float()).all()


# ---------------------------------------------------------------- registry
def test_registry_builds_and_rejects_unknown_names():
    assert list_mil_heads() == ["abmil", "mambamil", "transmil"]
    assert {"tiny_cnn", "resnet50_trunc", "vit_b_32"} <= set(list_encoders())
    head = build_mil_head("ABMIL", in_features=8, num_classes=2, hidden=16)
    assert head(torch.randn(1, 5, 8)).shape == (1, 2)
    assert build_translator(in_features=8, num_heads=3).num_heads == 3
    with pytest.raises(ValueError, match="abmil.*mambamil.*transmil"):
        build_mil_head("clam", in_features=8, num_classes=2)
    with pytest.raises(ValueError, match="tiny_cnn"):
        build_encoder("resnet1000")


def test_target_dotted_paths():
    from monai.bundle import ConfigParser

    config = {
        "head": {"_target_": "monai_fbta.networks.TransMIL", "in_features": 8, "num_classes": 2, "hidden": 16, "heads": 2},
        "translator": {"_target_": "monai_fbta.networks.FeatureTranslator", "in_features": 8},
        "encoder": {"_target_": "monai_fbta.networks.PatchEncoder", "name": "tiny_cnn"},
    }
    parser = ConfigParser(config)
    assert parser.get_parsed_content("head")(torch.randn(1, 4, 8)).shape == (1, 2)
    assert parser.get_parsed_content("translator").num_heads == 10
    assert parser.get_parsed_content("encoder").out_features == 64


def test_translate_bag_in_checkpointed_chunks_is_exact_and_keeps_only_the_output():
    """With gradients on, a long bag is translated chunk by chunk under checkpointing: the same values
    and gradients, and autograd keeps about the [N, D] output instead of [K, N, hidden] activations."""
    from monai_fbta.networks.translator import translate_bag

    torch.manual_seed(0)
    translator = FeatureTranslator(16, num_heads=4, hidden=32).double()
    bag = torch.randn(1, 900, 16, dtype=torch.double)
    outs = []
    for chunk in (None, 100):
        translator.zero_grad()
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = translate_bag(translator, bag, chunk)
        (out * out).sum().backward()
        for t in (bag, *translator.parameters()):
            storages.pop(t.untyped_storage().data_ptr(), None)
        outs.append((out.detach(), [p.grad.clone() for p in translator.parameters()], sum(storages.values())))
    (whole, whole_grads, whole_saved), (chunked, chunked_grads, chunked_saved) = outs
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b)
    assert chunked_saved < whole_saved / 4, (chunked_saved, whole_saved)
