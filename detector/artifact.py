"""Versioned, checksummed, pickle-free detector artifacts and the registry that holds them.

Layout of a registry::

    <root>/<model name>/CURRENT          text file: the current version, e.g. "v0003"
    <root>/<model name>/v0003/manifest.json
                             detector.json  feature order, threshold, error stats, preprocessor
                             weights.npz    dense weights for the numpy scorer (allow_pickle=False)
                             model.keras    the Keras model (optional; for retraining/inspection)
                             report/...     the training report (optional)

Contract of :func:`save`:
    1. every file is written into a hidden temporary directory beside the versions;
    2. the manifest (SHA-256 of every file) is written last and fsynced;
    3. the directory is renamed into place (atomic on one filesystem); a crash or error
       before this leaves the registry exactly as it was;
    4. only then is ``CURRENT`` replaced atomically (write temp file, ``os.replace``).

:func:`load` verifies the manifest's format version and every checksum before it parses a
byte, and never unpickles. It also refuses symlinks leaving the artifact or the registry, a
``CURRENT`` that is a symlink, an implausible threshold, and, when
``SENSOR_ANOMALY_MODEL_HMAC_KEY`` is set, an unsigned or wrongly signed manifest
(:mod:`detector.integrity`; :meth:`Registry.save` signs when the key is set).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from detector.core import Detector, ModelInfo, WatchedConstant
from detector.errors import ArtifactError, DetectorError, ThresholdError
from detector.integrity import (
    SIGNATURE,
    check_inside_registry,
    check_signature,
    check_threshold,
    check_tree,
    read_pointer,
    sign,
)
from detector.network import DenseNetwork
from detector.preprocess import Preprocessor
from detector.threshold import Threshold

FORMAT = "sensor-anomaly-detector"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LIBS = ("numpy", "scikit-learn", "tensorflow", "keras", "sensor-anomaly")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lib_versions() -> dict[str, str]:
    out = {}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def fingerprint(x: np.ndarray[Any, Any]) -> str:
    """SHA-256 of a training matrix's shape, dtype and bytes: identifies the data a model saw."""
    a = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ArtifactError(
            f"model name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-'"
        )
    return name


def _detector_doc(det: Detector) -> dict[str, Any]:
    _, net_meta = det.network.to_arrays()
    return {
        "feature_names": list(det.feature_names),
        "preprocessor": det.preprocessor.to_dict(),
        "threshold": det.threshold.to_dict(),
        "feature_error_mean": det.feature_error_mean.tolist(),
        "feature_error_std": det.feature_error_std.tolist(),
        "network": net_meta,
        "info": {
            "name": det.info.name,
            "version": det.info.version,
            "trained_at": det.info.trained_at,
            "training_fingerprint": det.info.training_fingerprint,
        },
        "extra": det.extra,
        # Issue 11 fields; absent in older artifacts (load() then uses today's behaviour).
        "window": det.window,
        "ewma_alpha": det.ewma_alpha,
        "train_min": None if det.train_min is None else det.train_min.tolist(),
        "train_max": None if det.train_max is None else det.train_max.tolist(),
        "constants": [c.to_dict() for c in det.constants],
    }


def _write_version_dir(
    tmp: Path, det: Detector, keras_model: Any | None, extra_files: Mapping[str, bytes]
) -> None:
    (tmp / "detector.json").write_text(json.dumps(_detector_doc(det), indent=2, sort_keys=True))
    arrays, _ = det.network.to_arrays()
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    (tmp / "weights.npz").write_bytes(buf.getvalue())
    if keras_model is not None:
        keras_model.save(tmp / "model.keras")
    for rel, data in extra_files.items():
        target = (tmp / rel).resolve()
        if tmp.resolve() not in target.parents:
            raise ArtifactError(f"extra file path {rel!r} escapes the artifact directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    files = {
        p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": det.info.name,
        "version": det.info.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "trained_at": det.info.trained_at,
        "training_fingerprint": det.info.training_fingerprint,
        "n_features": det.n_features,
        "libraries": _lib_versions(),
        "files": files,
    }
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    sign(tmp, MANIFEST)  # manifest.sig, when SENSOR_ANOMALY_MODEL_HMAC_KEY is set


class Registry:
    """A folder of model versions with a ``CURRENT`` pointer per model name."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def versions(self, name: str) -> list[str]:
        """Saved versions of ``name``, oldest first."""
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def current_version(self, name: str) -> str | None:
        return read_pointer(self.model_dir(name) / CURRENT, _VERSION_RE.pattern)

    def current_path(self, name: str) -> Path:
        v = self.current_version(name)
        if v is None:
            raise ArtifactError(
                f"no current version of model {name!r} in {self.root}; train one first "
                "(anomaly-train --config ...)"
            )
        path = self.model_dir(name) / v
        check_inside_registry(path, self.model_dir(name))
        return path

    def set_current(self, name: str, version: str) -> None:
        """Point ``CURRENT`` at an existing version (also how to roll back)."""
        d = self.model_dir(name)
        if not (d / version / MANIFEST).is_file():
            raise ArtifactError(f"version {version} of {name} does not exist in {self.root}")
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".CURRENT.")
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide CURRENT from a worker's user
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / CURRENT)

    def save(
        self,
        det: Detector,
        keras_model: Any | None = None,
        extra_files: Mapping[str, bytes] | None = None,
        make_current: bool = True,
    ) -> Path:
        """Write ``det`` as the next version; see the module docstring for the contract.

        Returns the new version's directory. The saved detector's ``info.version`` is the
        assigned version.
        """
        d = self.model_dir(det.info.name)
        d.mkdir(parents=True, exist_ok=True)
        for _attempt in range(100):
            existing = self.versions(det.info.name)
            n = int(existing[-1][1:]) + 1 if existing else 1
            version = f"v{n:04d}"
            versioned = replace(det, info=replace(det.info, version=version))
            tmp = Path(tempfile.mkdtemp(dir=d, prefix=f".tmp-{version}-"))
            # mkdtemp makes the directory 0700 and the rename keeps that mode: a worker
            # running as another user could not read the published version.
            os.chmod(tmp, 0o755)
            try:
                _write_version_dir(tmp, versioned, keras_model, extra_files or {})
                try:
                    os.rename(tmp, d / version)
                except OSError:
                    # Another trainer took this version number first; try the next one.
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if make_current:
                self.set_current(det.info.name, version)
            return d / version
        raise ArtifactError(f"could not allocate a new version under {d}")


def verify(path: Path | str) -> dict[str, Any]:
    """Check an artifact directory's manifest and checksums; return the manifest.

    Raises:
        ArtifactError: missing or unreadable manifest, wrong format or version, a file
            missing, added or changed since it was written.
    """
    p = Path(path)
    if _VERSION_RE.match(p.name) and (p.parent / CURRENT).exists():
        check_inside_registry(p, p.parent)  # a version folder of a registry
    check_tree(p)
    try:
        raw = (p / MANIFEST).read_bytes()
        manifest: dict[str, Any] = json.loads(raw)
    except FileNotFoundError:
        raise ArtifactError(
            f"{p} has no {MANIFEST}: not an artifact, or an incomplete one"
        ) from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {p / MANIFEST}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{p} is not a {FORMAT} artifact (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p} has artifact format version {manifest.get('format_version')}, this build reads "
            f"{FORMAT_VERSION}; re-train with this version or upgrade sensor-anomaly"
        )
    files: dict[str, str] = manifest.get("files", {})
    check_signature(p, raw)
    present = {q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file()}
    present -= {MANIFEST, SIGNATURE}
    if missing := sorted(set(files) - present):
        raise ArtifactError(f"{p} is incomplete: missing {missing}; re-train or restore it")
    if added := sorted(present - set(files)):
        raise ArtifactError(
            f"{p} has files not in its manifest: {added}; refusing a tampered artifact"
        )
    for rel, digest in files.items():
        if _sha256(p / rel) != digest:
            raise ArtifactError(
                f"checksum mismatch for {rel} in {p}: the artifact was modified after it was "
                "written; restore it from the registry's source or re-train"
            )
    return manifest


def _opt_array(v: Any) -> np.ndarray[Any, Any] | None:
    return None if v is None else np.asarray(v, dtype=np.float64)


def load(path: Path | str) -> Detector:
    """Load and verify an artifact directory into a :class:`Detector` (no TensorFlow needed)."""
    p = Path(path)
    manifest = verify(p)
    arrays = _load_weights(p / "weights.npz")
    try:
        doc = json.loads((p / "detector.json").read_text())
        info = doc["info"]
        det = Detector(
            feature_names=tuple(doc["feature_names"]),
            preprocessor=Preprocessor.from_dict(doc["preprocessor"]),
            network=DenseNetwork.from_arrays(arrays, doc["network"]),
            threshold=Threshold.from_dict(doc["threshold"]),
            feature_error_mean=np.asarray(doc["feature_error_mean"], dtype=np.float64),
            feature_error_std=np.asarray(doc["feature_error_std"], dtype=np.float64),
            info=ModelInfo(
                name=info["name"],
                version=info["version"],
                trained_at=info["trained_at"],
                training_fingerprint=info.get("training_fingerprint", ""),
            ),
            extra=doc.get("extra", {}),
            window=int(doc.get("window", 1)),
            ewma_alpha=None if doc.get("ewma_alpha") is None else float(doc["ewma_alpha"]),
            train_min=_opt_array(doc.get("train_min")),
            train_max=_opt_array(doc.get("train_max")),
            constants=tuple(WatchedConstant.from_dict(c) for c in doc.get("constants", [])),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(
            f"{p}/detector.json is malformed ({type(e).__name__}: {e}); re-train"
        ) from None
    except ThresholdError as e:
        raise ArtifactError(f"{p}/detector.json: {e}; re-train") from None
    except DetectorError as e:
        raise ArtifactError(f"{p}: {e}") from None
    if det.info.version != manifest.get("version"):
        raise ArtifactError(f"{p}: detector.json and manifest disagree on the version")
    try:
        check_threshold(det.threshold)
    except ArtifactError as e:
        raise ArtifactError(f"{p}/detector.json: {e}") from None
    return det


def _load_weights(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The dense weights, plain numeric arrays only; never unpickles."""
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for k in npz.files:
                try:
                    arrays[k] = npz[k]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise ArtifactError(
                        f"{path} holds {k!r} as a pickled object array; refusing it (weights "
                        "are plain numeric arrays, loaded without unpickling); re-train"
                    ) from None
    except ArtifactError:
        raise
    except Exception as e:  # zipfile.BadZipFile, a truncated member, a bad header
        raise ArtifactError(
            f"{path} is not a readable .npz of weights ({type(e).__name__}: {e}); re-train"
        ) from None
    for k, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise ArtifactError(
                f"{path}: array {k!r} has dtype {a.dtype}, not a number type; re-train"
            )
    return arrays


def load_keras(path: Path | str) -> Any:
    """Load the verified artifact's Keras model (imports TensorFlow; trainer/tests only)."""
    p = Path(path)
    verify(p)
    if not (p / "model.keras").is_file():
        raise ArtifactError(f"{p} was saved without its Keras model")
    # Heavy import kept off the worker's path.
    import keras

    return keras.saving.load_model(p / "model.keras", compile=False, safe_mode=True)


def resolve(path_or_registry: Path | str, name: str | None = None) -> Path:
    """An artifact directory from either a version directory or ``(registry root, name)``."""
    p = Path(path_or_registry)
    if (p / MANIFEST).is_file():
        return p
    if name is None:
        raise ArtifactError(f"{p} is not an artifact directory; give the model name too")
    return Registry(p).current_path(name)
