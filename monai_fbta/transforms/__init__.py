"""monai_fbta.transforms: MONAI array + dictionary transform pairs.

Tissue tiling, patch reading, KMeans clustering, pseudo-bag sampling and pathology
augmentations. Importing prints nothing (MONAI's native codec noise is silenced).
"""

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai_fbta.transforms.augment import (  # noqa: E402
    PerPatchd,
    RandContrastNoise,
    RandContrastNoised,
    RandFlipRotate90,
    RandFlipRotate90d,
    RandHEDJitter,
    RandHEDJitterd,
    RandStackd,
    RandStackTransform,
    hed_to_rgb,
    make_e2e_augmentation,
    rgb_to_hed,
)
from monai_fbta.transforms.clustering import ClusterFeatures, ClusterFeaturesd  # noqa: E402
from monai_fbta.transforms.patches import ReadPatches, ReadPatchesd, tiling_meta  # noqa: E402
from monai_fbta.transforms.pseudobag import PseudoBagSample, PseudoBagSampled, sample_pseudo_bag  # noqa: E402
from monai_fbta.transforms.store import LoadStored  # noqa: E402
from monai_fbta.transforms.tiling import TissueTile, TissueTiled  # noqa: E402

__all__ = [
    "ClusterFeatures",
    "ClusterFeaturesd",
    "LoadStored",
    "PerPatchd",
    "PseudoBagSample",
    "PseudoBagSampled",
    "RandContrastNoise",
    "RandContrastNoised",
    "RandFlipRotate90",
    "RandFlipRotate90d",
    "RandHEDJitter",
    "RandHEDJitterd",
    "RandStackTransform",
    "RandStackd",
    "ReadPatches",
    "ReadPatchesd",
    "TissueTile",
    "TissueTiled",
    "hed_to_rgb",
    "make_e2e_augmentation",
    "rgb_to_hed",
    "sample_pseudo_bag",
    "tiling_meta",
]
