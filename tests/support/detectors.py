"""Small detectors for worker tests, built without TensorFlow.

``linear_detector`` fits a PCA on normal data and writes it as a *linear dense autoencoder*
(encoder = components, decoder = components transposed) through the same Registry the
trainer uses, so worker tests exercise real artifacts in seconds. The trainer's own tests
cover Keras models; a numpy forward pass cannot tell the two apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import StandardScaler

from detector import (
    DenseLayer,
    DenseNetwork,
    Detector,
    ModelInfo,
    Preprocessor,
    Registry,
    fit_threshold,
)
from detector.artifact import fingerprint


def linear_detector(
    x_normal: np.ndarray,
    feature_names: list[str],
    code: int = 4,
    k: float = 2.0,
    name: str = "sensors",
    ranges: bool = False,
) -> Detector:
    """A PCA "autoencoder" fitted in milliseconds; ``ranges`` stores the training range."""
    n = len(x_normal)
    fit_rows, hold = x_normal[: n * 3 // 4], x_normal[n * 3 // 4 :]
    imp = SimpleImputer(strategy="mean").fit(fit_rows)
    sc = StandardScaler().fit(imp.transform(fit_rows))
    pre = Preprocessor.from_sklearn(imp, sc)
    z = pre.transform(fit_rows)
    pca = PCA(n_components=code, random_state=0).fit(z)
    comp = pca.components_.astype(np.float32)  # (code, f)
    mean = pca.mean_.astype(np.float32)
    net = DenseNetwork(
        layers=(
            DenseLayer(comp.T.copy(), (-mean @ comp.T).astype(np.float32), "linear"),
            DenseLayer(comp.copy(), mean.copy(), "linear"),
        ),
        code_layer=0,
    )
    # Score the holdout with a provisional detector to fit the threshold on it.
    provisional = Detector(
        feature_names=tuple(feature_names),
        preprocessor=pre,
        network=net,
        threshold=fit_threshold([1.0, 2.0]),
        feature_error_mean=np.zeros(len(feature_names)),
        feature_error_std=np.ones(len(feature_names)),
        info=ModelInfo(name=name),
    )
    s = provisional.score(hold)
    fe = s.feature_error.astype(np.float64)
    return Detector(
        feature_names=tuple(feature_names),
        preprocessor=pre,
        network=net,
        threshold=fit_threshold(s.score, "mean_k_std", k),
        feature_error_mean=fe.mean(axis=0),
        feature_error_std=fe.std(axis=0),
        info=ModelInfo(
            name=name,
            trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
            training_fingerprint=fingerprint(x_normal),
        ),
        train_min=np.nanmin(fit_rows, axis=0).astype(np.float64) if ranges else None,
        train_max=np.nanmax(fit_rows, axis=0).astype(np.float64) if ranges else None,
    )


def save_linear_detector(
    registry: Path, x_normal: np.ndarray, feature_names: list[str], **kw: object
) -> Path:
    det = linear_detector(x_normal, feature_names, **kw)  # type: ignore[arg-type]
    return Registry(registry).save(det)


def false_alarm_bound(expected: float) -> float:
    """Most false alarms to accept where the held-out exceedance rate predicts ``expected``.

    The threshold's exceedance rate is measured on held-out readings drawn across the whole
    training period, while a test streams a short window in which some device may sit in a
    region the model reconstructs less well, so false alarms cluster. Measured over repeated
    runs, the window's count reached 1.8x the prediction; 2.5x + 10 leaves room for that and
    still fails a model that flags normal readings wholesale.
    """
    return 2.5 * expected + 10
