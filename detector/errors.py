"""Exceptions shared by the trainer and the worker.

Every message says what is wrong *and* how to fix it, because these messages are the
whole user interface of a failed start-up.
"""

from __future__ import annotations


class DetectorError(Exception):
    """Base class for errors about a detector or its artifact."""


class ArtifactError(DetectorError):
    """An artifact is missing, tampered with, incomplete or incompatible."""


class ThresholdError(DetectorError):
    """Threshold parameters are out of range or the errors they are fitted on are unusable."""
