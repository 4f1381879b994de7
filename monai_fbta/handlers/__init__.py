"""monai_fbta.handlers: EMA teachers, curriculum weight, loss logging."""

from monai_fbta.handlers.curriculum import CurriculumWeight
from monai_fbta.handlers.ema import ModelEMA
from monai_fbta.handlers.events import OPTIMIZER_STEP_ATTR, FBTAEvents
from monai_fbta.handlers.stats import LOSS_TERMS, LossProgressBar, loss_terms, training_log_handlers

__all__ = [
    "CurriculumWeight",
    "ModelEMA",
    "FBTAEvents",
    "OPTIMIZER_STEP_ATTR",
    "LOSS_TERMS",
    "LossProgressBar",
    "loss_terms",
    "training_log_handlers",
]
