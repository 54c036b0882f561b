"""Artifacts: save → load is exact, tampering is refused, failed saves leave nothing behind.

These tests build detectors from numpy weights (no TensorFlow), so they are fast; the
trainer's tests cover artifacts that carry a Keras model.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import MinMaxScaler

from detector import (
    ArtifactError,
    DenseLayer,
    DenseNetwork,
    Detector,
    ModelInfo,
    Preprocessor,
    Registry,
    fit_threshold,
    load,
    resolve,
    verify,
)
from detector.artifact import FORMAT_VERSION, MANIFEST

N_FEATURES = 6


def _detector(seed: int = 0, name: str = "pump") -> Detector:
    rng = np.random.default_rng(seed)
    x = rng.normal(10, 2, size=(400, N_FEATURES))
    x[rng.random(x.shape) < 0.02] = np.nan
    imp = SimpleImputer().fit(x)
    pre = Preprocessor.from_sklearn(imp, MinMaxScaler().fit(imp.transform(x)))

    def layer(i: int, o: int, act: str) -> DenseLayer:
        return DenseLayer(
            rng.normal(0, 0.5, (i, o)).astype(np.float32),
            rng.normal(0, 0.1, o).astype(np.float32),
            act,
        )

    net = DenseNetwork(
        (
            layer(N_FEATURES, 4, "relu"),
            layer(4, 2, "tanh"),
            layer(2, 4, "elu"),
            layer(4, N_FEATURES, "sigmoid"),
        ),
        code_layer=1,
    )
    return Detector(
        feature_names=tuple(f"s{i}" for i in range(N_FEATURES)),
        preprocessor=pre,
        network=net,
        threshold=fit_threshold(rng.gamma(2, 0.01, 300), "mean_k_std", 2.0),
        feature_error_mean=rng.random(N_FEATURES),
        feature_error_std=rng.random(N_FEATURES),
        info=ModelInfo(
            name=name, trained_at="2026-01-01T00:00:00+00:00", training_fingerprint="ab" * 32
        ),
        extra={"note": "test"},
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return Registry(tmp_path).save(_detector(), extra_files={"report/metrics.json": b"{}"})


def test_save_then_load_gives_identical_scores(saved: Path) -> None:
    det = _detector()
    back = load(saved)
    x = np.random.default_rng(5).normal(10, 3, size=(500, N_FEATURES))
    x[::7, 2] = np.nan  # imputation must survive the round trip too
    a, b = det.score(x), back.score(x)
    assert np.array_equal(a.score, b.score)
    assert np.array_equal(a.feature_error, b.feature_error)
    assert back.threshold == det.threshold
    assert back.feature_names == det.feature_names
    assert np.array_equal(back.feature_error_mean, det.feature_error_mean)
    assert back.info.version == "v0001" and back.extra == {"note": "test"}


def test_versions_and_current_pointer(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.save(_detector(0))
    v2 = reg.save(_detector(1))
    assert (v1.name, v2.name) == ("v0001", "v0002")
    assert reg.versions("pump") == ["v0001", "v0002"]
    assert reg.current_version("pump") == "v0002"
    assert resolve(tmp_path, "pump") == v2
    reg.set_current("pump", "v0001")  # roll back
    assert load(resolve(tmp_path, "pump")).info.version == "v0001"
    with pytest.raises(ArtifactError, match="does not exist"):
        reg.set_current("pump", "v0009")


def test_published_version_is_readable_by_other_users(saved: Path) -> None:
    # A worker often runs as another user than the trainer.
    assert stat.S_IMODE(saved.stat().st_mode) & 0o005 == 0o005
    current = saved.parent / "CURRENT"
    assert stat.S_IMODE(current.stat().st_mode) & 0o004


def test_changed_byte_is_refused(saved: Path) -> None:
    p = saved / "weights.npz"
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    p.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for weights\.npz"):
        load(saved)


def test_changed_report_file_is_refused(saved: Path) -> None:
    (saved / "report" / "metrics.json").write_bytes(b'{"f1": 1.0}')
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        verify(saved)


def test_extra_file_is_refused(saved: Path) -> None:
    (saved / "evil.py").write_text("import os")
    with pytest.raises(ArtifactError, match="not in its manifest"):
        load(saved)


def test_missing_file_is_refused(saved: Path) -> None:
    (saved / "detector.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load(saved)


def test_missing_manifest_is_refused(saved: Path) -> None:
    (saved / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        load(saved)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("format_version", FORMAT_VERSION + 1, "format version"),
        ("format", "something-else", "is not a"),
    ],
)
def test_wrong_format_is_refused(saved: Path, field: str, value: object, match: str) -> None:
    m = json.loads((saved / MANIFEST).read_text())
    m[field] = value
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        load(saved)


def test_failed_save_leaves_registry_untouched(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.save(_detector(0))
    before = _snapshot(tmp_path)

    class Exploding:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        reg.save(_detector(1), keras_model=Exploding())
    assert _snapshot(tmp_path) == before
    assert set(os.listdir(v1.parent)) == {"CURRENT", "v0001"}  # no temporary leftovers


def test_extra_file_cannot_escape_the_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="escapes"):
        Registry(tmp_path).save(_detector(), extra_files={"../outside.txt": b"x"})
    assert not (tmp_path / "pump" / "outside.txt").exists()
    assert Registry(tmp_path).versions("pump") == []


def test_bad_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not allowed"):
        Registry(tmp_path).save(_detector(name="../evil"))
