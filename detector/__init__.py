"""The fitted anomaly detector shared by the trainer and the worker.

``Detector`` (scaler parameters + autoencoder weights + threshold + feature order) is
written by the trainer through :class:`detector.artifact.Registry` and only loaded by the
worker; its scoring is pure numpy.
"""

from detector.artifact import Registry, load, load_keras, resolve, verify
from detector.core import (
    Contribution,
    Detector,
    ModelInfo,
    OutOfRange,
    Scores,
    WatchedConstant,
)
from detector.errors import ArtifactError, DetectorError, ThresholdError
from detector.network import DenseLayer, DenseNetwork
from detector.preprocess import Preprocessor
from detector.threshold import Threshold, fit_threshold

__all__ = [
    "ArtifactError",
    "Contribution",
    "DenseLayer",
    "DenseNetwork",
    "Detector",
    "DetectorError",
    "ModelInfo",
    "OutOfRange",
    "Preprocessor",
    "Registry",
    "Scores",
    "Threshold",
    "ThresholdError",
    "WatchedConstant",
    "fit_threshold",
    "load",
    "load_keras",
    "resolve",
    "verify",
]
