"""MIL heads (ABMIL, TransMIL, MambaMIL), the feature translator, the patch encoder and their registry."""

from monai_fbta.networks.abmil import ABMIL
from monai_fbta.networks.encoder import PatchEncoder, TinyCNN, copy_frozen, copy_trainable
from monai_fbta.networks.inference import TranslatedMIL
from monai_fbta.networks.mambamil import MambaMIL, SRMamba
from monai_fbta.networks.mil_base import GatedAttentionPool, MILHead, masked_softmax
from monai_fbta.networks.registry import (
    MIL_HEADS,
    build_encoder,
    build_mil_head,
    build_translator,
    list_encoders,
    list_mil_heads,
)
from monai_fbta.networks.selective_scan import selective_scan, selective_scan_naive
from monai_fbta.networks.translator import FeatureTranslator
from monai_fbta.networks.transmil import NystromAttention, TransMIL

__all__ = [
    "ABMIL", "TransMIL", "MambaMIL", "MILHead", "GatedAttentionPool", "masked_softmax", "NystromAttention", "SRMamba",
    "FeatureTranslator", "PatchEncoder", "TinyCNN", "copy_frozen", "copy_trainable", "selective_scan",
    "selective_scan_naive", "MIL_HEADS", "build_mil_head", "build_encoder", "build_translator", "list_mil_heads",
    "list_encoders", "TranslatedMIL",
]
