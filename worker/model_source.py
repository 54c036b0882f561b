"""Where the worker's detector comes from, and picking up new versions without a restart."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from detector import ArtifactError, Detector, Registry, load
from worker.config import ModelSettings

log = logging.getLogger(__name__)


def trained_timestamp(det: Detector) -> float:
    """The detector's training time as Unix seconds (0 if unknown)."""
    try:
        return datetime.fromisoformat(det.info.trained_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class ModelSource:
    """Loads the current detector from a registry (or a fixed artifact directory).

    ``poll()`` is cheap (reads one small pointer file) and returns a new detector only when
    the registry's CURRENT version changed *and* the new artifact verifies; a broken new
    version is logged and skipped, and the old one keeps serving.
    """

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._registry = None if settings.path else Registry(settings.registry)
        self.current_version: str | None = None
        self._rejected: str | None = None

    def describe(self) -> str:
        s = self.settings
        return s.path or f"{Path(s.registry).resolve()}/{s.name} (CURRENT)"

    def load_initial(self) -> Detector:
        """Load the detector to start with; raises ArtifactError with a fix hint."""
        if self.settings.path:
            det = load(self.settings.path)
        else:
            assert self._registry is not None
            det = load(self._registry.current_path(self.settings.name))
        self.current_version = det.info.version
        return det

    def poll(self) -> Detector | None:
        """A newer verified detector, or None. Raises ArtifactError if the new one is bad."""
        if self._registry is None:
            return None
        version = self._registry.current_version(self.settings.name)
        if version is None or version == self.current_version or version == self._rejected:
            return None
        try:
            det = load(self._registry.model_dir(self.settings.name) / version)
        except ArtifactError:
            self._rejected = version  # do not re-verify a bad artifact every few seconds
            raise
        self.current_version = det.info.version
        return det
