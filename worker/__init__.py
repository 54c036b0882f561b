"""The Kafka scoring worker (``anomaly-worker``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sensor-anomaly")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"
