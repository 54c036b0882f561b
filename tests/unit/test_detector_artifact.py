"""Artifacts: save → load is exact, tampering is refused, failed saves leave nothing behind.

These tests build detectors from numpy weights (no TensorFlow), so they are fast; the
trainer's tests cover artifacts that carry a Keras model.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import replace
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
from detector.artifact import FORMAT_VERSION, MANIFEST, _sha256
from detector.integrity import ENV_HMAC_KEY, SIGNATURE

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


# -- integrity beyond checksums (issue 9.12) ------------------------------------------------


def _reseal(version_dir: Path) -> None:
    """What an attacker with write access does: change files, then recompute the manifest."""
    m = json.loads((version_dir / MANIFEST).read_text())
    m["files"] = {rel: _sha256(version_dir / rel) for rel in m["files"]}
    (version_dir / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))


def _edit_threshold(version_dir: Path, **changes: object) -> None:
    doc = json.loads((version_dir / "detector.json").read_text())
    doc["threshold"].update(changes)
    (version_dir / "detector.json").write_text(json.dumps(doc))
    _reseal(version_dir)


def test_version_folder_symlink_leaving_the_registry_is_refused(tmp_path: Path) -> None:
    elsewhere = Registry(tmp_path / "elsewhere").save(_detector())
    reg = Registry(tmp_path / "reg")
    reg.save(_detector())  # v0001, a real folder
    (reg.model_dir("pump") / "v0002").symlink_to(elsewhere, target_is_directory=True)
    reg.set_current("pump", "v0002")
    with pytest.raises(ArtifactError, match=r"v0002 is a symlink to .*, outside the registry"):
        reg.current_path("pump")
    with pytest.raises(ArtifactError, match="outside the registry"):
        load(reg.model_dir("pump") / "v0002")  # as the worker's reload does
    assert load(reg.model_dir("pump") / "v0001").info.version == "v0001"


def test_file_symlink_leaving_the_artifact_is_refused(saved: Path, tmp_path: Path) -> None:
    # Same bytes, so the checksum matches: only the location gives it away.
    outside = tmp_path / "outside-metrics.json"
    outside.write_bytes((saved / "report" / "metrics.json").read_bytes())
    (saved / "report" / "metrics.json").unlink()
    (saved / "report" / "metrics.json").symlink_to(outside)
    with pytest.raises(
        ArtifactError, match=r"metrics\.json is a symlink to .*outside the artifact"
    ):
        load(saved)


def test_symlink_inside_the_artifact_is_allowed(saved: Path) -> None:
    # Kubernetes ConfigMap/Secret volumes are symlinks that stay inside the mount.
    real = saved / "report" / ".data-metrics.json"
    (saved / "report" / "metrics.json").rename(real)
    (saved / "report" / "metrics.json").symlink_to(real.name)
    m = json.loads((saved / MANIFEST).read_text())
    m["files"][real.relative_to(saved).as_posix()] = _sha256(real)
    (saved / MANIFEST).write_text(json.dumps(m))
    assert load(saved).info.version == "v0001"


def test_current_symlink_is_refused_without_echoing_its_target(saved: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-password\n")
    current = saved.parent / "CURRENT"
    current.unlink()
    current.symlink_to(secret)
    with pytest.raises(ArtifactError, match="CURRENT is a symlink") as err:
        Registry(saved.parent.parent).current_path("pump")
    assert "hunter2" not in str(err.value)


def test_current_with_garbage_is_refused_without_echoing_it(saved: Path) -> None:
    (saved.parent / "CURRENT").write_text("a long line that is surely not a version at all\n")
    with pytest.raises(ArtifactError, match=r"holds 48 bytes, not a version like v0001") as e:
        Registry(saved.parent.parent).current_version("pump")
    assert "surely" not in str(e.value)
    (saved.parent / "CURRENT").write_text("v1\n")
    with pytest.raises(ArtifactError, match=r"holds 'v1', not a version like v0001"):
        Registry(saved.parent.parent).current_version("pump")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"value": 1e300}, "is not mean \\+ k·std"),
        ({"value": 1e300, "method": "percentile", "param": 99.0}, "implausible"),
        ({"value": 0.0}, "not a positive finite number"),
        ({"value": -1.0}, "not a positive finite number"),
        ({"value": float("nan")}, "not a positive finite number"),
        ({"value": float("inf")}, "not a positive finite number"),
        ({"error_std": float("nan")}, "statistics are unusable"),
        ({"param": 1e6}, "is not mean \\+ k·std"),
    ],
)
def test_absurd_threshold_is_refused(saved: Path, changes: dict[str, object], match: str) -> None:
    _edit_threshold(saved, **changes)
    with pytest.raises(ArtifactError, match=rf"detector\.json.*{match}"):
        load(saved)


def test_fitted_percentile_threshold_is_plausible(tmp_path: Path) -> None:
    errors = np.random.default_rng(1).gamma(2, 0.01, 500)
    det = replace(_detector(), threshold=fit_threshold(errors, "percentile", 99.9))
    assert load(Registry(tmp_path).save(det)).threshold == det.threshold


def _rewrite_weights(version_dir: Path, **extra: np.ndarray) -> None:
    with np.load(version_dir / "weights.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    buf = io.BytesIO()
    np.savez(buf, **arrays, **extra)  # object arrays are pickled by savez
    (version_dir / "weights.npz").write_bytes(buf.getvalue())
    _reseal(version_dir)


def test_pickled_array_in_weights_is_a_weights_problem(saved: Path) -> None:
    _rewrite_weights(saved, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ArtifactError, match=r"weights\.npz holds 'evil' as a pickled object"):
        load(saved)


def test_non_numeric_or_broken_weights_are_weights_problems(saved: Path) -> None:
    _rewrite_weights(saved, names=np.array(["a", "b"]))
    with pytest.raises(ArtifactError, match=r"weights\.npz: array 'names' has dtype <U1"):
        load(saved)
    (saved / "weights.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _reseal(saved)
    with pytest.raises(ArtifactError, match=r"weights\.npz is not a readable \.npz"):
        load(saved)


KEY = "k" * 40


def test_signed_artifact_loads_and_a_resealed_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_HMAC_KEY, KEY)
    v1 = Registry(tmp_path).save(_detector())  # the trainer's save signs: no other change
    assert (v1 / SIGNATURE).is_file()
    assert load(v1).info.version == "v0001"
    doc = json.loads((v1 / "detector.json").read_text())
    doc["extra"] = {"note": "swapped"}
    (v1 / "detector.json").write_text(json.dumps(doc))
    _reseal(v1)
    with pytest.raises(ArtifactError, match="a resealed artifact"):
        load(v1)


def test_signing_key_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unsigned = Registry(tmp_path / "a").save(_detector())
    assert not (unsigned / SIGNATURE).exists()  # signing is opt-in
    monkeypatch.setenv(ENV_HMAC_KEY, KEY)
    with pytest.raises(ArtifactError, match="is not signed but SENSOR_ANOMALY_MODEL_HMAC_KEY"):
        load(unsigned)
    signed = Registry(tmp_path / "b").save(_detector())
    monkeypatch.setenv(ENV_HMAC_KEY, "z" * 40)
    with pytest.raises(ArtifactError, match="signed with another key"):
        load(signed)
    monkeypatch.setenv(ENV_HMAC_KEY, "short")
    with pytest.raises(ArtifactError, match="is 5 characters long; use at least 32"):
        load(signed)
    monkeypatch.delenv(ENV_HMAC_KEY)
    assert load(signed).info.version == "v0001"  # without a key nothing is checked


def test_removing_the_signature_does_not_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_HMAC_KEY, KEY)
    v1 = Registry(tmp_path).save(_detector())
    (v1 / SIGNATURE).unlink()
    with pytest.raises(ArtifactError, match="is not signed"):
        load(v1)
