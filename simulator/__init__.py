"""Synthetic sensor fleet with injected anomalies and ground truth (see ``simulator.fleet``)."""

from simulator.fleet import (
    ANOMALY_KINDS,
    FleetSpec,
    Reading,
    SensorProfile,
    device_ids,
    feature_names,
    load_truth,
    normal_matrix,
    sensor_profiles,
    stream,
    unexplained_deviation,
    write_normal_csv,
    write_truth,
)

__all__ = [
    "ANOMALY_KINDS",
    "FleetSpec",
    "Reading",
    "SensorProfile",
    "device_ids",
    "feature_names",
    "load_truth",
    "normal_matrix",
    "sensor_profiles",
    "stream",
    "unexplained_deviation",
    "write_normal_csv",
    "write_truth",
]
