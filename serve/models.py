"""The served models: loaded at start, hot reloaded from the registry like the worker's.

Each model name has one :class:`worker.model_source.ModelSource` (the worker's loader: the
registry's ``CURRENT`` version, checksums verified, a broken new version logged and skipped
while the old one keeps serving). :meth:`ModelStore.poll` runs in a thread (it reads and
verifies files); the event loop then swaps whole :class:`ModelSlot` objects, so a request
sees one model version from start to end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from detector import ArtifactError, Detector
from detector.halves import code_width, decoder
from detector.network import DenseNetwork
from serve.config import ServeConfig
from worker.config import ModelSettings, ReadingSettings
from worker.decode import ReadingDecoder
from worker.model_source import ModelSource

log = logging.getLogger("serve.models")


@dataclass(frozen=True, eq=False)
class ModelSlot:
    """One loaded model version with what requests need, built once per version.

    Attributes:
        name: the name clients use in URLs.
        detector: the fitted detector.
        decoder_net: the network's decoder half (None when it has none).
        loaded_at: Unix seconds when this version was loaded.
    """

    name: str
    detector: Detector
    decoder_net: DenseNetwork | None
    loaded_at: float
    _decoders: dict[ReadingSettings, ReadingDecoder] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> str:
        return self.detector.info.version

    @property
    def code_width(self) -> int:
        return code_width(self.detector.network)

    def reading_decoder(self, cfg: ServeConfig) -> ReadingDecoder:
        """The worker's decoder for this model's features and ``cfg.reading`` (built once;
        the event loop runs one request at a time, so it is never used concurrently)."""
        d = self._decoders.get(cfg.reading)
        if d is None:
            d = self._decoders[cfg.reading] = ReadingDecoder(
                self.detector.feature_names, cfg.reading
            )
        return d

    def describe(self) -> dict[str, Any]:
        """``GET /v1/models/{name}``: identity, features, threshold, training summary."""
        det = self.detector
        t = det.threshold
        return {
            "name": self.name,
            "version": det.info.version,
            "trained_at": det.info.trained_at,
            "training_fingerprint": det.info.training_fingerprint,
            "features": list(det.feature_names),
            "n_features": det.n_features,
            "code_width": self.code_width,
            "window": det.window,
            "threshold": {
                "value": t.value,
                "method": t.method,
                "param": t.param,
                "holdout_error_mean": t.error_mean,
                "holdout_error_std": t.error_std,
                "holdout_n": t.n,
            },
            "scaler": det.preprocessor.kind,
            "training": det.extra,
            "loaded_at": self.loaded_at,
        }


def make_slot(name: str, det: Detector) -> ModelSlot:
    """A slot for ``det`` served as ``name``."""
    try:
        tail: DenseNetwork | None = decoder(det.network)
    except ArtifactError:
        tail = None
    return ModelSlot(name=name, detector=det, decoder_net=tail, loaded_at=time.time())


class ModelStore:
    """Name → current :class:`ModelSlot`, plus the sources to reload from."""

    def __init__(self, cfg: ServeConfig) -> None:
        s = cfg.serve
        self.cfg = cfg
        self.slots: dict[str, ModelSlot] = {}
        self._sources: dict[str, ModelSource] = {}
        if s.model_path:
            self._fixed: ModelSource | None = ModelSource(
                ModelSettings(path=s.model_path, reload_interval_s=s.reload_interval_s)
            )
        else:
            self._fixed = None
            for name in s.models:
                self._sources[name] = ModelSource(
                    ModelSettings(
                        registry=s.registry, name=name, reload_interval_s=s.reload_interval_s
                    )
                )

    def load_initial(self) -> None:
        """Load every model; raises ArtifactError (with a fix hint) for the first that fails."""
        if self._fixed is not None:
            det = self._fixed.load_initial()
            self.slots[det.info.name] = make_slot(det.info.name, det)
            return
        for name, src in self._sources.items():
            self.slots[name] = make_slot(name, src.load_initial())

    def poll(self) -> dict[str, ModelSlot]:
        """New slots for models whose CURRENT version changed and verifies (run in a thread).

        A version that fails to load is logged once and skipped; the old one keeps serving.
        """
        fresh: dict[str, ModelSlot] = {}
        for name, src in self._sources.items():
            try:
                det = src.poll()
            except ArtifactError as e:
                log.error(
                    "model %s: new version refused, still serving %s: %s",
                    name,
                    src.current_version,
                    e,
                )
                continue
            except OSError as e:  # registry briefly unreadable (a volume remount): retry later
                log.warning("model %s: cannot read the registry: %s", name, e)
                continue
            if det is not None:
                log.info("model %s: loaded version %s", name, det.info.version)
                fresh[name] = make_slot(name, det)
        return fresh

    @property
    def reloads(self) -> bool:
        """Whether :meth:`poll` can ever find anything (False for a fixed artifact)."""
        return bool(self._sources)
