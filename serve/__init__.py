"""``anomaly-serve``: the HTTP scoring API over the same detector and scoring core as the worker.

Modules: :mod:`serve.config` (one frozen config object), :mod:`serve.models` (loading and hot
reload), :mod:`serve.scoring` (pure request → response work, no HTTP), :mod:`serve.app` (the
ASGI routes), :mod:`serve.metrics`, :mod:`serve.openapi` and :mod:`serve.cli`. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed ``sensor-anomaly`` distribution's version ("unknown" when not installed)."""
    try:
        return metadata.version("sensor-anomaly")
    except metadata.PackageNotFoundError:
        return "unknown"
