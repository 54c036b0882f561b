"""The API server's Prometheus metrics, built on an injected registry.

Names follow the worker's conventions (:mod:`worker.metrics`): namespace ``sensor_anomaly``,
subsystem ``serve``, ``_total`` counters, seconds. Labels are bounded: ``route`` is the route
template (``/v1/models/{name}/score``, or ``unmatched``), never a raw path; ``model`` is one of
the configured model names.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from serve.models import ModelSlot
from worker.metrics import NAMESPACE

SUBSYSTEM = "serve"
# Most requests take well under a millisecond of server time: the low buckets matter.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip


@dataclass(frozen=True)
class ServeMetrics:
    requests: Counter
    request_duration: Histogram
    readings: Counter
    anomalies: Counter
    reading_errors: Counter
    in_flight: Gauge
    model_info: Info
    model_reloads: Counter
    ready: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ServeMetrics:
        ns, sub, r = NAMESPACE, SUBSYSTEM, registry
        return cls(
            requests=Counter(
                "requests_total",
                "HTTP requests answered, by route template, method and status code",
                ["route", "method", "code"],
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            request_duration=Histogram(
                "request_duration_seconds",
                "Time from the request's arrival to the end of the response, by route",
                ["route"],
                namespace=ns,
                subsystem=sub,
                registry=r,
                buckets=LATENCY_BUCKETS,
            ),
            readings=Counter(
                "readings_total",
                "Readings (or tensor rows, or codes) processed, by model and endpoint",
                ["model", "endpoint"],
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            anomalies=Counter(
                "anomalies_total",
                "Readings scored above the threshold",
                ["model"],
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            reading_errors=Counter(
                "reading_errors_total",
                "Readings of accepted requests that could not be used (see the per-reading error)",
                ["model"],
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            in_flight=Gauge(
                "requests_in_flight",
                "Requests being handled",
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            model_info=Info(
                "model",
                "Served model versions",
                ["model"],
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            model_reloads=Counter(
                "model_reloads_total",
                "Model versions loaded after start",
                ["model"],
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
            ready=Gauge(
                "ready",
                "1 while the server accepts scoring requests",
                namespace=ns,
                subsystem=sub,
                registry=r,
            ),
        )

    def on_model(self, slot: ModelSlot, reloaded: bool) -> None:
        det = slot.detector
        self.model_info.labels(model=slot.name).info(
            {
                "version": det.info.version,
                "trained_at": det.info.trained_at,
                "threshold": repr(det.threshold.value),
                "features": str(det.n_features),
            }
        )
        if reloaded:
            self.model_reloads.labels(model=slot.name).inc()
