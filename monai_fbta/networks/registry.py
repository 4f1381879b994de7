"""Name -> class factories for the networks (bundle configs can also use ``_target_`` dotted paths,
e.g. ``"_target_": "monai_fbta.networks.ABMIL"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai_fbta.networks.abmil import ABMIL
from monai_fbta.networks.encoder import ENCODER_NAMES, PatchEncoder
from monai_fbta.networks.mambamil import MambaMIL
from monai_fbta.networks.mil_base import MILHead
from monai_fbta.networks.transmil import TransMIL
from monai_fbta.networks.translator import FeatureTranslator

__all__ = ["MIL_HEADS", "build_mil_head", "build_encoder", "build_translator", "list_mil_heads", "list_encoders"]

MIL_HEADS: dict[str, type[MILHead]] = {"abmil": ABMIL, "transmil": TransMIL, "mambamil": MambaMIL}


def list_mil_heads() -> list[str]:
    """Names accepted by :func:`build_mil_head`."""
    return sorted(MIL_HEADS)


def list_encoders() -> list[str]:
    """Names accepted by :func:`build_encoder`."""
    return list(ENCODER_NAMES)


def build_mil_head(name: str, options: Mapping[str, Any] | None = None, **kwargs: Any) -> MILHead:
    """``build_mil_head("abmil", in_features=1024, num_classes=2)``; names are case-insensitive. ``options``: more
    constructor arguments as one mapping (a bundle's ``mil_kwargs``, e.g. ``{"num_layers": 1}`` for MambaMIL)."""
    key = name.lower()
    if key not in MIL_HEADS:
        raise ValueError(f"unknown MIL head {name!r}; valid: {list_mil_heads()}")
    clash = set(options or {}) & set(kwargs)
    if clash:
        raise ValueError(f"build_mil_head({name!r}): {sorted(clash)} given both in options and as arguments")
    return MIL_HEADS[key](**kwargs, **(options or {}))


def build_encoder(name: str, **kwargs: Any) -> PatchEncoder:
    """``build_encoder("resnet50_trunc", weights="/path/to/resnet50.pth")``."""
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown encoder {name!r}; valid: {list_encoders()}")
    return PatchEncoder(name, **kwargs)


def build_translator(**kwargs: Any) -> FeatureTranslator:
    """``build_translator(in_features=1024, num_heads=10)``."""
    return FeatureTranslator(**kwargs)
