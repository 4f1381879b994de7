"""PatchEncoder: patch images -> feature vectors, for the frozen (f_FFE) and trainable (f_TFE) extractors.

``PatchEncoder(name)`` maps ``[B, 3, H, W]`` float images in [0, 1] to ``[B, out_features]``;
normalisation happens inside. Backbones:

========================  ===========================================================  ====
name                      model                                                        D
========================  ===========================================================  ====
``tiny_cnn``              4 strided conv blocks + linear (~60k params; tests, CPU)     64*
``resnet18``              torchvision resnet18, global average pool                     512
``resnet50``              torchvision resnet50, global average pool                     2048
``resnet50_trunc``        torchvision resnet50 up to layer3 + average pool (as CLAM)    1024
``vit_small``             timm ``vit_small_patch16_224`` (class token)                  384
``vit_b_32``              timm ``vit_base_patch32_224`` (class token)                   768
========================  ===========================================================  ====

(*) configurable with ``out_features``. The ViTs are built with ``dynamic_img_size=True`` so
256 px patches work. ``weights``: ``None`` (random init), a local file (a state_dict saved from
the backbone, e.g. ``torch.save(encoder.backbone.state_dict(), path)``, or from the encoder
itself; loaded strictly with ``torch.load(weights_only=True)`` or safetensors), or a pretrained
tag: ``"imagenet"`` or a torchvision weight name (``"IMAGENET1K_V2"``) / timm tag
(``"augreg_in21k_ft_in1k"``). Downloading needs the network; offline, a ``RuntimeError`` says to
pass a local file. Keys of parts the encoder drops (``fc``, ``layer4`` for the truncated resnet,
the timm classifier ``head``) are ignored, so full torchvision/timm checkpoints load too.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["PatchEncoder", "TinyCNN", "copy_frozen", "copy_trainable", "encoder_features", "same_weights",
           "ENCODER_NAMES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESNETS = {"resnet18": ("resnet18", 512, 4), "resnet50": ("resnet50", 2048, 4), "resnet50_trunc": ("resnet50", 1024, 3)}
_TIMM = {"vit_small": "vit_small_patch16_224", "vit_b_32": "vit_base_patch32_224"}
_TIMM_FEATURES = {"vit_small": 384, "vit_b_32": 768}
ENCODER_NAMES = ("tiny_cnn", *_RESNETS, *_TIMM)
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_DROPPED_PREFIXES = ("fc.", "layer4.", "head.")  # only dropped when the model has no such keys


class TinyCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU blocks (16, 32, 64, 64 channels), average pool, linear: ``[B, 3, H, W] -> [B, D]``."""

    stages = ("block1", "block2", "block3", "block4")

    def __init__(self, out_features: int = 64) -> None:
        super().__init__()
        widths = (3, 16, 32, 64, 64)
        for i, name in enumerate(self.stages):
            block = nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(widths[i + 1]),
                nn.ReLU(inplace=True),
            )
            setattr(self, name, block)
        self.fc = nn.Linear(widths[-1], out_features)
        for m in self.modules():  # He init keeps activations O(1) through the 4 blocks when randomly initialised
            if isinstance(m, nn.Conv2d):  # (PyTorch's default shrinks them ~6x per block: near-constant features)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _offline_error(name: str, tag: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"PatchEncoder({name!r}): could not load pretrained weights {tag!r} ({type(err).__name__}: {err}). "
        f"No network? Download the weights on a connected machine and pass the local file: "
        f"PatchEncoder({name!r}, weights='/path/to/{name}.pth')"
    )


def _build_resnet(name: str, tag: str | None) -> nn.Module:
    import torchvision

    arch, _, num_layers = _RESNETS[name]
    weights = None
    if tag is not None:
        enum = torchvision.models.get_model_weights(arch)
        key = "IMAGENET1K_V1" if tag == "imagenet" else tag
        if key not in enum.__members__:
            raise ValueError(f"PatchEncoder({name!r}): unknown weights tag {tag!r}; valid: 'imagenet', {list(enum.__members__)}")
        weights = enum[key]
    try:
        model = getattr(torchvision.models, arch)(weights=weights)
    except Exception as err:  # URLError, OSError, ... when offline
        raise _offline_error(name, tag or "", err) from err
    model.fc = nn.Identity()
    if num_layers == 3:
        model.layer4 = nn.Identity()
    return model


def _build_timm(name: str, tag: str | None) -> nn.Module:
    import timm

    arch = _TIMM[name] if tag in (None, "imagenet") else f"{_TIMM[name]}.{tag}"
    try:
        return timm.create_model(arch, pretrained=tag is not None, num_classes=0, dynamic_img_size=True)
    except Exception as err:  # hub / connection errors when offline, unknown tags
        raise _offline_error(name, tag or "", err) from err


def encoder_features(name: str) -> int:
    """Feature size D of ``PatchEncoder(name)`` (default ``out_features``), without building the network."""
    if name == "tiny_cnn":
        return 64
    if name in _RESNETS:
        return _RESNETS[name][1]
    if name in _TIMM_FEATURES:
        return _TIMM_FEATURES[name]
    raise ValueError(f"PatchEncoder: unknown backbone {name!r}; valid: {list(ENCODER_NAMES)}")


def _is_weights_file(weights: str | os.PathLike) -> bool:
    text = os.fspath(weights)
    return os.path.exists(text) or os.sep in text or text.endswith(_WEIGHT_SUFFIXES)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"PatchEncoder: weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"PatchEncoder: cannot read weights file {path}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"PatchEncoder: weights file {path} holds a {type(state).__name__}, not a state_dict")
    return state


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "backbone."):
        if not (state.keys() & model_keys) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


class PatchEncoder(nn.Module):
    """Patch feature extractor; see the module docstring for names and ``weights``.

    Args:
        name: backbone name (``ENCODER_NAMES``).
        weights: ``None``, a local state_dict file, or a pretrained tag.
        out_features: output size of ``tiny_cnn`` (default 64); must be None or match for others.
        grad_checkpointing: recompute activations stage by stage in backward (saves memory in f_TFE).
        normalize: apply the backbone's mean/std inside ``forward`` (default True).

    ``forward(x [B, 3, H, W] float in [0, 1]) -> [B, out_features]``. Works with
    ``channels_last`` inputs/modules and under ``torch.autocast``.
    """

    def __init__(
        self,
        name: str = "resnet50_trunc",
        weights: str | os.PathLike | None = None,
        out_features: int | None = None,
        grad_checkpointing: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if name not in ENCODER_NAMES:
            raise ValueError(f"PatchEncoder: unknown backbone {name!r}; valid: {list(ENCODER_NAMES)}")
        self.name, self.grad_checkpointing, self.normalize, self.frozen = name, grad_checkpointing, normalize, False
        weights_file = Path(os.fspath(weights)) if weights is not None and _is_weights_file(weights) else None
        tag = None if weights is None or weights_file is not None else str(weights)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if name == "tiny_cnn":
            if tag is not None:
                raise ValueError(f"PatchEncoder('tiny_cnn'): no pretrained weights exist for {tag!r}; use None or a local file")
            self.backbone, dim, self._stages = TinyCNN(out_features or 64), out_features or 64, TinyCNN.stages
        elif name in _RESNETS:
            self.backbone, dim = _build_resnet(name, tag), _RESNETS[name][1]
            self._stages = ("layer1", "layer2", "layer3") + (("layer4",) if _RESNETS[name][2] == 4 else ())
        else:
            self.backbone, self._stages = _build_timm(name, tag), None
            dim = self.backbone.num_features
            mean = tuple(self.backbone.pretrained_cfg.get("mean", mean))
            std = tuple(self.backbone.pretrained_cfg.get("std", std))
            self.backbone.set_grad_checkpointing(grad_checkpointing)
        if out_features is not None and out_features != dim:
            raise ValueError(f"PatchEncoder({name!r}): out_features={out_features} but this backbone gives {dim}")
        self.out_features = dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if weights_file is not None:
            self.load_weights(weights_file)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a local state_dict into the backbone, strictly; a mismatch raises naming the file and the keys."""
        path = Path(path)
        model_state = self.backbone.state_dict()
        state = _strip_prefixes(_read_state_dict(path), set(model_state))
        state = {k: v for k, v in state.items() if k in model_state or not k.startswith(_DROPPED_PREFIXES)}
        missing = sorted(model_state.keys() - state.keys())
        unexpected = sorted(state.keys() - model_state.keys())
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in model_state.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise RuntimeError(
                f"PatchEncoder({self.name!r}): weights file {path} does not match the model: "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
                f"{len(shapes)} shape mismatches {shapes[:3]}"
            )
        self.backbone.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> PatchEncoder:
        """As ``nn.Module.train``, except that a frozen encoder (:func:`copy_frozen`) stays in eval mode."""
        return super().train(mode and not self.frozen)

    def _checkpointed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"PatchEncoder({self.name!r}): expected images [B, 3, H, W], got {list(x.shape)}")
        if not x.is_floating_point():  # (x - mean) / std in uint8 divides by zero: all-NaN features
            raise TypeError(f"PatchEncoder({self.name!r}): expected float images in [0, 1], got {x.dtype}: "
                            "use x.float() / 255")
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self._stages is None:
            return self.backbone(x)
        net = self.backbone
        if isinstance(net, TinyCNN):
            stages = [getattr(net, s) for s in self._stages]
        else:  # torchvision ResNet: stem, then the residual stages
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            stages = [getattr(net, s) for s in self._stages]
        for stage in stages:
            x = self._checkpointed(stage, x)
        return net.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same tensors under the same names (compared on the CPU)."""
    return set(a) == set(b) and all(torch.equal(v.cpu(), b[k].cpu()) for k, v in a.items())


def copy_frozen(encoder: PatchEncoder) -> PatchEncoder:
    """Deep copy in eval mode with ``requires_grad=False`` everywhere; ``.train()`` leaves it in eval (f_FFE)."""
    frozen = copy.deepcopy(encoder)
    frozen.requires_grad_(False)
    frozen.frozen = True
    return frozen.eval()


def copy_trainable(encoder: PatchEncoder) -> PatchEncoder:
    """Deep copy with every parameter trainable, in train mode (f_TFE)."""
    trainable = copy.deepcopy(encoder)
    trainable.frozen = False
    trainable.requires_grad_(True)
    return trainable.train()
