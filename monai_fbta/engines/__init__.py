"""monai_fbta.engines: FBTA loss, trainer, evaluators (metrics; inference) and their batch preparation."""

from monai_fbta.engines.evaluator import FBTAEvaluator, SlideEvaluator, macro_auc
from monai_fbta.engines.inference import FBTAInferenceEvaluator
from monai_fbta.engines.losses import VIEWS, FBTALoss, validate_views
from monai_fbta.engines.trainer import FBTATrainer, fbta_param_groups, mil_logits
from monai_fbta.engines.utils import PrepareSlideBatch
from monai_fbta.networks.translator import translate_bag

__all__ = [
    "VIEWS",
    "FBTALoss",
    "validate_views",
    "FBTATrainer",
    "SlideEvaluator",
    "FBTAEvaluator",
    "FBTAInferenceEvaluator",
    "PrepareSlideBatch",
    "fbta_param_groups",
    "mil_logits",
    "macro_auc",
    "translate_bag",
]
