"""monai_fbta.handlers: EMA teachers, curriculum weight, checkpoints and resume, loss logging, training log file,
metrics CSV, curves, extractor drift warning, translator refit; inference writers (predictions CSV, heatmaps, attention CSV + GeoJSON)."""

from monai_fbta.handlers.attention import AttentionWriter
from monai_fbta.handlers.best_model_saver import BestModelSaver
from monai_fbta.handlers.checkpoint import run_identity
from monai_fbta.handlers.checkpoint_saver import TrainingCheckpoint
from monai_fbta.handlers.curriculum import CurriculumWeight
from monai_fbta.handlers.curves import TrainingCurves, plot_training_curves
from monai_fbta.handlers.drift import ExtractorDriftWarning
from monai_fbta.handlers.ema import ModelEMA
from monai_fbta.handlers.events import OPTIMIZER_STEP_ATTR, FBTAEvents
from monai_fbta.handlers.heatmap import HeatmapWriter
from monai_fbta.handlers.log_file import LogFile
from monai_fbta.handlers.metrics_csv import EpochMetricsCSV
from monai_fbta.handlers.predictions import PredictionsCSV, write_predictions_csv
from monai_fbta.handlers.progress import LossProgressBar
from monai_fbta.handlers.refit import TranslatorRefit, fit_translator, r_squared
from monai_fbta.handlers.resume import ResumeTraining, check_output_dir, check_resume, claim_output_dir, hold_run_lock
from monai_fbta.handlers.stats import LOSS_TERMS, loss_terms, training_log_handlers
from monai_fbta.handlers.tensorboard import OptionalTensorBoard, tensorboard_available

__all__ = [
    "BestModelSaver",
    "TrainingCheckpoint",
    "ResumeTraining",
    "check_output_dir",
    "check_resume",
    "claim_output_dir",
    "hold_run_lock",
    "run_identity",
    "CurriculumWeight",
    "ModelEMA",
    "ExtractorDriftWarning",
    "TranslatorRefit",
    "fit_translator",
    "r_squared",
    "FBTAEvents",
    "OPTIMIZER_STEP_ATTR",
    "LOSS_TERMS",
    "LossProgressBar",
    "loss_terms",
    "training_log_handlers",
    "LogFile",
    "EpochMetricsCSV",
    "TrainingCurves",
    "plot_training_curves",
    "OptionalTensorBoard",
    "tensorboard_available",
    "PredictionsCSV",
    "write_predictions_csv",
    "HeatmapWriter",
    "AttentionWriter",
]
