#!/usr/bin/env bash
# Deployment-check tools, cached under .cache/ (make install runs `scripts/tools.sh install`).
#
#   scripts/tools.sh install       build helm from the Go module proxy into .cache/bin (once)
#   scripts/tools.sh versions      print the tools' versions
#   scripts/tools.sh constraints   regenerate constraints.txt from .venv (pip freeze)
#
# helm is built with `go install` (a Go toolchain is on every machine of this project);
# kubernetes-validate, check-jsonschema and hadolint come from PyPI with the [dev] extra.
# Failing here is loud on purpose: the chart tests need helm and do not skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
BIN_DIR="$PWD/.cache/bin"
HELM="$BIN_DIR/helm"
# Built tools shared by the clones of this project on this machine (outside the clone).
SHARED_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/sensor-anomaly/bin"

# The module version go install built (helm's own `version` says only "v3.22" for such a
# build: its full version is set by ldflags in helm's release Makefile).
helm_version() {
  [ -x "$HELM" ] || return 0
  go version -m "$HELM" 2>/dev/null | awk '$1 == "mod" && $2 == "helm.sh/helm/v3" {print $3}'
}

install_helm() {
  if [ -x "$HELM" ] && [ "$(helm_version)" = "$HELM_VERSION" ]; then
    return 0
  fi
  mkdir -p "$BIN_DIR"
  # A helm of this version built by another clone on this machine: copy it (go install asks
  # the module proxy about the package path on every run, even with the modules cached).
  local shared="$SHARED_BIN/helm-$HELM_VERSION"
  if [ -x "$shared" ]; then
    cp "$shared" "$HELM"
    if [ "$(helm_version)" = "$HELM_VERSION" ]; then
      echo "[tools] helm $HELM_VERSION copied from $shared" >&2
      return 0
    fi
  fi
  command -v go >/dev/null || { echo "error: go not found; it builds helm $HELM_VERSION" >&2; exit 1; }
  echo "[tools] building helm $HELM_VERSION into .cache/bin (go install, a few minutes once)" >&2
  local attempt
  for attempt in 1 2 3; do
    if GOBIN="$BIN_DIR" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"; then
      break
    fi
    if [ "$attempt" = 3 ]; then
      echo "error: go install of helm $HELM_VERSION failed 3 times; check that the Go module" \
        "proxy ($(go env GOPROXY)) is reachable, then run make test again" >&2
      exit 1
    fi
    echo "[tools] go install failed (attempt $attempt of 3; the module proxy may be slow); retrying in $((attempt * 15)) s" >&2
    sleep $((attempt * 15))
  done
  [ "$(helm_version)" = "$HELM_VERSION" ] || { echo "error: .cache/bin/helm is not $HELM_VERSION" >&2; exit 1; }
  mkdir -p "$SHARED_BIN" && cp "$HELM" "$shared.tmp" && mv "$shared.tmp" "$shared" || true
}

versions() {
  echo "[tools] helm $(helm_version), $(.venv/bin/kubernetes-validate --version 2>&1 | tail -1)," \
    "check-jsonschema $(.venv/bin/check-jsonschema --version 2>&1 | awk '{print $NF}')," \
    "$(.venv/bin/hadolint --version 2>&1 | head -1)" >&2
}

constraints() {
  local py
  py="$(.venv/bin/python -c 'import platform; print(platform.python_version())')"
  {
    echo "# Exact versions every image and CI install is built from (pip constraints: only the"
    echo "# packages an install actually needs are taken from here). Regenerate with"
    echo "# \`make constraints\` (pip freeze of .venv, Python $py, linux x86_64) after changing"
    echo "# pyproject.toml's dependencies, and commit it with that change."
    # Only what sensor-anomaly[dev] (which includes train and confluent) pulls in, at the
    # versions the tests ran with: other tools installed into .venv by hand stay out.
    .venv/bin/python - <<'PY'
import importlib.metadata as md
import re

from packaging.requirements import Requirement


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
pins: dict[str, str] = {}
visited: set[tuple[str, frozenset[str]]] = set()
todo = [("sensor-anomaly", frozenset({"dev"}))]
while todo:
    name, extras = todo.pop()
    if (norm(name), extras) in visited or norm(name) not in installed:
        continue
    visited.add((norm(name), extras))
    for req in map(Requirement, installed[norm(name)].requires or []):
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in (extras or {""})
        ):
            continue
        child = norm(req.name)
        # pip, setuptools and wheel: pinned below, for the build backend.
        if child in installed and child not in {"sensor-anomaly", "pip", "setuptools", "wheel"}:
            dist = installed[child]
            pins[child] = f"{dist.metadata['Name']}=={dist.version}"
        todo.append((req.name, frozenset(req.extras)))
print("\n".join(sorted(pins.values(), key=str.lower)))
PY
    echo "# The build backend pyproject.toml's [build-system] resolves to (pip applies"
    echo "# PIP_CONSTRAINT inside its isolated build environment too)."
    echo "setuptools==${SETUPTOOLS_VERSION:-84.2.1}"
    echo "wheel==${WHEEL_VERSION:-0.48.0}"
  } > constraints.txt
  echo "[tools] wrote constraints.txt ($(grep -c '==' constraints.txt) pins)" >&2
}

case "${1:-install}" in
  install) install_helm; versions ;;
  versions) versions ;;
  constraints) constraints ;;
  *) echo "usage: $0 install|versions|constraints" >&2; exit 2 ;;
esac
