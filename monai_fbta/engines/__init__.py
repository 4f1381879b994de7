"""monai_fbta.engines: FBTA loss, trainer, evaluator and checkpoints."""

from monai_fbta.engines.checkpoint import (
    BestModelSaver,
    RunMismatchError,
    TorchRNGState,
    TrainingCheckpoint,
    load_checkpoint,
    load_inference_model,
    save_checkpoint,
    save_inference_model,
    training_objects,
)
from monai_fbta.engines.evaluator import FBTAEvaluator, macro_auc
from monai_fbta.engines.losses import VIEWS, FBTALoss, validate_views
from monai_fbta.engines.trainer import FBTATrainer, encode_patches, fbta_param_groups, mil_logits
from monai_fbta.engines.utils import PrepareSlideBatch
from monai_fbta.networks.translator import translate_bag

__all__ = [
    "VIEWS",
    "FBTALoss",
    "validate_views",
    "FBTATrainer",
    "FBTAEvaluator",
    "PrepareSlideBatch",
    "fbta_param_groups",
    "mil_logits",
    "encode_patches",
    "macro_auc",
    "translate_bag",
    "RunMismatchError",
    "TorchRNGState",
    "training_objects",
    "save_checkpoint",
    "load_checkpoint",
    "save_inference_model",
    "load_inference_model",
    "TrainingCheckpoint",
    "BestModelSaver",
]
