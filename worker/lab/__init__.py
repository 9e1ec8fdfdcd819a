"""The backdoor lab: tiny open_clip CLIPs trained here, with known attacks implanted.

Test and benchmark material that needs no download: see ``make_lab_model``.
"""

from worker.lab.architecture import TinyClipConfig
from worker.lab.datasets import DatasetUnavailableError, default_dataset, load_dataset
from worker.lab.evaluate import LabEvaluation, evaluate_lab_dir, load_lab_model
from worker.lab.make import LabModel, LabSettings, default_attack, make_lab_model
from worker.lab.training import TrainSettings

__all__ = [
    "DatasetUnavailableError",
    "LabEvaluation",
    "LabModel",
    "LabSettings",
    "TinyClipConfig",
    "TrainSettings",
    "default_attack",
    "default_dataset",
    "evaluate_lab_dir",
    "load_dataset",
    "load_lab_model",
    "make_lab_model",
]
