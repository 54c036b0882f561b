"""Checks of an artifact beyond its checksums: where its files live, what ``CURRENT`` may
be, how plausible its threshold is, and an optional signature of its manifest.

Checksums catch a changed byte, not an attacker who changes a file and recomputes the
manifest ("reseals" the artifact). Signing closes that gap: with
``SENSOR_ANOMALY_MODEL_HMAC_KEY`` set (at least 32 characters, e.g. ``openssl rand -hex
32``) the trainer writes ``manifest.sig``, an HMAC-SHA256 of the manifest's exact bytes,
and a worker with the same key refuses any artifact whose signature is missing or does
not match. Without the key nothing is signed or checked (a signature present is ignored).
The key comes from the environment only, never from a file in the registry.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from detector.errors import ArtifactError
from detector.threshold import Threshold

ENV_HMAC_KEY = "SENSOR_ANOMALY_MODEL_HMAC_KEY"
SIGNATURE = "manifest.sig"
_ALGORITHM = "hmac-sha256"
_MIN_KEY_CHARS = 32
_POINTER_MAX = 64


# -- signatures ------------------------------------------------------------------------------


def hmac_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The signing key from the environment, or None when signing is off."""
    raw = (os.environ if env is None else env).get(ENV_HMAC_KEY, "")
    if not raw:
        return None
    if len(raw) < _MIN_KEY_CHARS:
        raise ArtifactError(
            f"{ENV_HMAC_KEY} is {len(raw)} characters long; use at least {_MIN_KEY_CHARS} "
            "(e.g. the output of `openssl rand -hex 32`)"
        )
    return raw.encode()


def _key_id(key: bytes) -> str:
    # Names the key in errors without revealing it (a hash of a >= 32-character secret).
    return hashlib.sha256(b"sensor-anomaly-key-id|" + key).hexdigest()[:16]


def sign(directory: Path, manifest_name: str) -> None:
    """Write ``manifest.sig`` beside the manifest when a key is set; no-op otherwise."""
    key = hmac_key()
    if key is None:
        return
    mac = hmac.new(key, (directory / manifest_name).read_bytes(), hashlib.sha256).hexdigest()
    doc = {"algorithm": _ALGORITHM, "key_id": _key_id(key), "mac": mac}
    with (directory / SIGNATURE).open("w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def check_signature(directory: Path, manifest_bytes: bytes) -> None:
    """Refuse an unsigned or wrongly signed artifact when a key is set.

    ``manifest_bytes`` are the bytes the caller parsed, so what is checked is what is used.
    """
    key = hmac_key()
    if key is None:
        return
    path = directory / SIGNATURE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(
            f"{directory} is not signed but {ENV_HMAC_KEY} is set: refusing an unsigned "
            f"artifact; re-train with the key set, or unset {ENV_HMAC_KEY} to accept "
            "unsigned artifacts"
        ) from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path} ({type(e).__name__}); re-train") from None
    if not isinstance(doc, dict) or doc.get("algorithm") != _ALGORITHM:
        alg = doc.get("algorithm") if isinstance(doc, dict) else None
        raise ArtifactError(
            f"{path}: signature algorithm {alg!r} is not supported (this build checks "
            f"{_ALGORITHM}); re-train with this version"
        )
    ours = _key_id(key)
    if doc.get("key_id") != ours:
        raise ArtifactError(
            f"{directory} was signed with another key (key id {str(doc.get('key_id'))[:16]!r}, "
            f"this worker's {ours!r}); set {ENV_HMAC_KEY} to the trainer's key"
        )
    expected = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(doc.get("mac", "")), expected):
        raise ArtifactError(
            f"signature of {directory}/manifest.json does not match: the manifest changed "
            "after it was signed (a resealed artifact); refusing it; restore the version or "
            "re-train"
        )


# -- where files may live ----------------------------------------------------------------


def _outside(path: Path, root: Path) -> Path | None:
    """The resolved target of ``path`` if it lies outside resolved ``root``, else None."""
    target = path.resolve()
    r = root.resolve()
    return None if target == r or r in target.parents else target


def check_inside_registry(version_dir: Path, model_dir: Path) -> None:
    """Refuse a version folder that is a symlink resolving outside its model's folder."""
    target = _outside(version_dir, model_dir)
    if target is not None:
        raise ArtifactError(
            f"{version_dir} is a symlink to {target}, outside the registry folder "
            f"{model_dir}; refusing it (copy the version into the registry instead)"
        )


def check_tree(directory: Path) -> None:
    """Refuse any symlink inside an artifact that resolves outside it.

    Symlinks that stay inside are allowed (a Kubernetes ConfigMap or Secret volume is
    made of them); the checksums cover what they point to.
    """
    for base, dirs, files in os.walk(directory, followlinks=False):
        for name in (*dirs, *files):
            q = Path(base) / name
            if q.is_symlink():
                target = _outside(q, directory)
                if target is not None:
                    raise ArtifactError(
                        f"{q} is a symlink to {target}, outside the artifact {directory}; "
                        "refusing it (an artifact's files must live inside it)"
                    )


def read_pointer(path: Path, pattern: str) -> str | None:
    """The version named by a ``CURRENT`` file, None if it does not exist.

    The file is opened without following a symlink and read only up to 64 bytes, so an
    error can never echo the content of some other file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(
                f"{path} is a symlink; it must be a plain file naming a version (the "
                "trainer writes it; Registry.set_current rolls back)"
            ) from None
        raise ArtifactError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ArtifactError(f"{path} is not a regular file; it must name a version")
        data = f.read(_POINTER_MAX + 1)
    text = data.decode("ascii", errors="replace").strip()

    if len(data) > _POINTER_MAX or not re.match(pattern, text):
        shown = repr(text) if len(text) <= 16 and text.isprintable() else f"{len(data)} bytes"
        raise ArtifactError(f"{path} holds {shown}, not a version like v0001; fix or delete it")
    return text


# -- the threshold ---------------------------------------------------------------------------


def check_threshold(t: Threshold) -> None:
    """Refuse a threshold that no fit on its own error statistics can produce.

    A ``mean_k_std`` threshold must equal ``mean + k·std`` (k in [0, 100]) of its stored
    statistics. Every fitted threshold is at most ``mean + c·std`` of the held-out errors it was
    fitted on, with ``c = max(100, sqrt(n - 1))``: 100 is the largest ``k`` that
    ``mean_k_std`` accepts, and no value of a sample of ``n`` exceeds its mean by more than
    ``sqrt(n - 1)`` (population) standard deviations (Samuelson's inequality), which
    bounds any percentile. A larger threshold (say 1e300) would silently suppress every
    event.
    """
    v, m, s, n = t.value, t.error_mean, t.error_std, t.n
    if not (math.isfinite(v) and v > 0):
        raise ArtifactError(f"threshold {v} is not a positive finite number; re-train")
    if not (math.isfinite(m) and math.isfinite(s) and m >= 0 and s >= 0 and n >= 2):
        raise ArtifactError(
            f"threshold statistics are unusable (error_mean {m}, error_std {s}, n {n}); re-train"
        )
    if t.method == "mean_k_std":
        k = t.param
        fitted = m + k * s
        if not (math.isfinite(k) and 0 <= k <= 100 and math.isclose(v, fitted, rel_tol=1e-9)):
            raise ArtifactError(
                f"threshold {v:.6g} is not mean + k·std of its errors ({m:.6g} + {k:.6g} · "
                f"{s:.6g} = {fitted:.6g}); the artifact was edited; re-train"
            )
    bound = m + max(100.0, math.sqrt(n - 1)) * s
    if v > bound * (1 + 1e-9) + 1e-300:
        raise ArtifactError(
            f"threshold {v:.6g} is implausible for the errors it was fitted on (mean "
            f"{m:.6g}, std {s:.6g}, n {n}: at most {bound:.6g}); it would hide every "
            "anomaly; re-train"
        )
