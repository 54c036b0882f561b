"""All of the worker's Prometheus metrics, built on an injected registry.

The Kafka loop calls the ``on_*`` hooks; nothing else imports prometheus_client. Tests
build ``WorkerMetrics.create(CollectorRegistry())`` and assert exact sample values.
Names follow Prometheus conventions: ``_total`` counters, base units (seconds).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from detector import ModelInfo
from worker.reasons import Reason

if TYPE_CHECKING:
    from worker.incidents import IncidentEvent
    from worker.pipeline import BatchResult

NAMESPACE = "sensor_anomaly"
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SCORING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096)
INCIDENT_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
# PSI of the score ratio: the last PSI_WINDOW scored readings of a (model, device group)
# against a reference of PSI_BINS equal-mass bins; no value before PSI_MIN_READINGS.
PSI_BINS = 10
PSI_WINDOW = 5000
PSI_REFERENCE = 2000
PSI_MIN_READINGS = 1000


@dataclass(frozen=True)
class WorkerMetrics:
    readings_consumed: Counter
    readings_scored: Counter
    anomalies: Counter
    dead_letters: Counter
    batches: Counter
    batch_size: Histogram
    scoring_duration: Histogram
    end_to_end_latency: Histogram
    score_ratio: Histogram
    threshold: Gauge
    model_info: Info
    model_trained: Gauge
    consumer_lag: Gauge
    last_batch: Gauge
    kafka_errors: Counter
    rebalances: Counter
    model_reloads: Counter
    ready: Gauge
    outputs_published: Counter
    state_restore_seconds: Histogram
    state_keys: Gauge
    drift_readings: Counter
    drift_out_of_range: Counter
    drift_above_threshold: Counter
    drift_expected_rate: Gauge
    drift_psi: Gauge
    warming_up: Counter
    replayed: Counter
    incidents_open: Gauge
    incidents_opened: Counter
    incidents_resolved: Counter
    incident_duration: Histogram
    alertmanager_posts: Counter
    alertmanager_dropped: Counter
    alertmanager_queue_depth: Gauge
    alertmanager_active: Gauge
    psi: ScoreRatioPsi = field(default_factory=lambda: ScoreRatioPsi())
    _open_labels: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def create(cls, registry: CollectorRegistry, psi: ScoreRatioPsi | None = None) -> WorkerMetrics:
        """All metrics on ``registry``; ``psi`` overrides the PSI window sizes (tests)."""
        ns, r = NAMESPACE, registry
        m = cls(
            readings_consumed=Counter(
                "readings_consumed_total",
                "Records polled from input topics",
                ["topic"],
                namespace=ns,
                registry=r,
            ),
            readings_scored=Counter(
                "readings_scored_total",
                "Readings that got a finite score",
                ["device_group"],
                namespace=ns,
                registry=r,
            ),
            anomalies=Counter(
                "anomalies_total",
                "Readings scored above the threshold",
                ["device_group"],
                namespace=ns,
                registry=r,
            ),
            dead_letters=Counter(
                "dead_letters_total",
                "Records sent to the dead-letter topic",
                ["reason"],
                namespace=ns,
                registry=r,
            ),
            batches=Counter(
                "batches_total", "Batches processed and committed", namespace=ns, registry=r
            ),
            batch_size=Histogram(
                "batch_size_readings",
                "Records per batch",
                buckets=BATCH_BUCKETS,
                namespace=ns,
                registry=r,
            ),
            scoring_duration=Histogram(
                "scoring_duration_seconds",
                "Decode + score + encode time per batch",
                buckets=SCORING_BUCKETS,
                namespace=ns,
                registry=r,
            ),
            end_to_end_latency=Histogram(
                "end_to_end_latency_seconds",
                "Reading timestamp to its anomaly event acknowledged",
                buckets=LATENCY_BUCKETS,
                namespace=ns,
                registry=r,
            ),
            score_ratio=Histogram(
                "score_ratio",
                "Anomaly score divided by the threshold",
                buckets=SCORE_RATIO_BUCKETS,
                namespace=ns,
                registry=r,
            ),
            threshold=Gauge(
                "threshold",
                "Current anomaly threshold (reconstruction MSE)",
                namespace=ns,
                registry=r,
            ),
            model_info=Info("model", "The model being served", namespace=ns, registry=r),
            model_trained=Gauge(
                "model_trained_timestamp_seconds",
                "When the served model was trained (Unix time)",
                namespace=ns,
                registry=r,
            ),
            consumer_lag=Gauge(
                "consumer_lag_messages",
                "Records behind the log end",
                ["topic", "partition"],
                namespace=ns,
                registry=r,
            ),
            last_batch=Gauge(
                "last_batch_timestamp_seconds",
                "Unix time of the last committed batch",
                namespace=ns,
                registry=r,
            ),
            kafka_errors=Counter(
                "kafka_errors_total",
                "Kafka client errors by kind",
                ["kind"],
                namespace=ns,
                registry=r,
            ),
            rebalances=Counter(
                "rebalances_total", "Partition assignment changes", namespace=ns, registry=r
            ),
            model_reloads=Counter(
                "model_reloads_total", "Model reload attempts", ["result"], namespace=ns, registry=r
            ),
            ready=Gauge(
                "ready",
                "1 when the worker is ready (model, partitions, broker)",
                namespace=ns,
                registry=r,
            ),
            outputs_published=Counter(
                "outputs_published_total",
                "Outputs acknowledged by the broker and committed with their offsets "
                "(kind: event, dead_letter, incident); compare with the scored counters",
                ["kind"],
                namespace=ns,
                registry=r,
            ),
            state_restore_seconds=Histogram(
                "state_restore_seconds",
                "Time to restore one partition's per-device state from the changelog",
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                namespace=ns,
                registry=r,
            ),
            state_keys=Gauge(
                "state_keys",
                "Per-device state keys held for a partition after its restore",
                ["partition"],
                namespace=ns,
                registry=r,
            ),
            **_drift_metrics(ns, r),
            **_incident_metrics(ns, r),
            psi=psi or ScoreRatioPsi(),
        )
        # Pre-create label sets so dashboards show zeros instead of "no data".
        for reason in Reason:
            m.dead_letters.labels(reason=reason.value)
        for result in ("success", "failure"):
            m.model_reloads.labels(result=result)
        for outcome in ("ok", "error"):
            m.alertmanager_posts.labels(outcome=outcome)
        for kind in ("event", "dead_letter", "incident"):
            m.outputs_published.labels(kind=kind)
        return m

    def on_published(self, events: int, dead_letters: int, incidents: int) -> None:
        """Outputs of committed batches (acknowledged and committed with their offsets)."""
        self.outputs_published.labels(kind="event").inc(events)
        self.outputs_published.labels(kind="dead_letter").inc(dead_letters)
        self.outputs_published.labels(kind="incident").inc(incidents)

    def on_state_restored(self, partition: int, keys: int, _bytes: int, seconds: float) -> None:
        self.state_restore_seconds.observe(seconds)
        self.state_keys.labels(partition=str(partition)).set(keys)

    def on_model(self, info: ModelInfo, threshold: float, trained_ts: float) -> None:
        self.model_info.info(
            {"name": info.name, "version": info.version, "trained_at": info.trained_at}
        )
        self.threshold.set(threshold)
        self.model_trained.set(trained_ts)

    def on_consumed(self, topic: str, n: int) -> None:
        self.readings_consumed.labels(topic=topic).inc(n)

    def on_batch(
        self,
        size: int,
        scoring_seconds: float,
        scored_by_group: dict[str, int],
        anomalies_by_group: dict[str, int],
        dead_by_reason: dict[Reason, int],
        score_ratio: npt.NDArray[np.float64],
    ) -> None:
        self.batches.inc()
        self.batch_size.observe(size)
        self.scoring_duration.observe(scoring_seconds)
        for g, n in scored_by_group.items():
            self.readings_scored.labels(device_group=g).inc(n)
        for g, n in anomalies_by_group.items():
            self.anomalies.labels(device_group=g).inc(n)
        for reason, n in dead_by_reason.items():
            self.dead_letters.labels(reason=reason.value).inc(n)
        observe_many(self.score_ratio, score_ratio)

    def on_committed(self, now_s: float, latencies_s: npt.NDArray[np.float64]) -> None:
        self.last_batch.set(now_s)
        observe_many(self.end_to_end_latency, latencies_s)

    def on_drift(self, result: BatchResult) -> None:
        """Drift signals of one scored batch (per model name and device group).

        Counters: scored readings, readings with a feature outside the training range,
        readings whose compared score is above the model threshold (no group multiplier) —
        PromQL divides their rates; the holdout's expected share is a gauge beside them.
        The PSI gauge comes from :class:`ScoreRatioPsi`.
        """
        model = result.model_name
        for g, n in result.scored_by_group.items():
            self.drift_readings.labels(model=model, device_group=g).inc(n)
            # Touch the label sets so a share of 0 reads 0, not "no data".
            self.drift_out_of_range.labels(model=model, device_group=g)
            self.drift_above_threshold.labels(model=model, device_group=g)
        for g, n in result.out_of_range_by_group.items():
            self.drift_out_of_range.labels(model=model, device_group=g).inc(n)
        for g, n in result.above_threshold_by_group.items():
            self.drift_above_threshold.labels(model=model, device_group=g).inc(n)
        for g, n in result.warming_up_by_group.items():
            self.warming_up.labels(model=model, device_group=g).inc(n)
        if result.replayed:
            self.replayed.labels(model=model).inc(result.replayed)
        if math.isfinite(result.expected_rate):
            self.drift_expected_rate.labels(model=model).set(result.expected_rate)
        if result.scored:
            for g, value in self.psi.update(model, result.model_version, result).items():
                self.drift_psi.labels(model=model, device_group=g).set(value)

    def on_incidents(
        self, events: Iterable[IncidentEvent], open_counts: Mapping[tuple[str, str], int]
    ) -> None:
        """Incident events of one batch, and the tracker's open incidents after it
        (``IncidentTracker.open_counts()``: (device group, severity) -> n)."""
        for ev in events:
            if ev.state == "opened":
                self.incidents_opened.labels(
                    device_group=ev.device_group, severity=ev.incident.severity
                ).inc()
            elif ev.state == "resolved":
                self.incidents_resolved.labels(
                    device_group=ev.device_group, reason=ev.resolve_reason or "unknown"
                ).inc()
                self.incident_duration.observe(ev.duration_s)
        # Label pairs that had open incidents and have none now go to 0, not stale.
        for key in self._open_labels - set(open_counts):
            self.incidents_open.labels(device_group=key[0], severity=key[1]).set(0)
        for (g, sev), n in open_counts.items():
            self.incidents_open.labels(device_group=g, severity=sev).set(n)
            self._open_labels.add((g, sev))

    def alertmanager_hooks(self) -> dict[str, Any]:
        """Keyword arguments of ``worker.alertmanager.AlertmanagerHooks``."""
        return {
            "on_post": lambda ok, _n: self.alertmanager_posts.labels(
                outcome="ok" if ok else "error"
            ).inc(),
            "on_dropped": lambda n: self.alertmanager_dropped.inc(n),
            "on_queue_depth": lambda n: self.alertmanager_queue_depth.set(n),
            "on_active": lambda n: self.alertmanager_active.set(n),
        }


def _drift_metrics(ns: str, r: CollectorRegistry) -> dict[str, Any]:
    mg = ["model", "device_group"]
    return {
        "drift_readings": Counter(
            "drift_readings_total",
            "Readings scored, per model and device group (denominator of the drift shares)",
            mg,
            namespace=ns,
            registry=r,
        ),
        "drift_out_of_range": Counter(
            "drift_out_of_range_readings_total",
            "Scored readings with a feature outside the model's training [min, max]",
            mg,
            namespace=ns,
            registry=r,
        ),
        "drift_above_threshold": Counter(
            "drift_above_threshold_readings_total",
            "Scored readings whose compared score is above the model threshold "
            "(before group multipliers); compare with drift_expected_above_threshold_ratio",
            mg,
            namespace=ns,
            registry=r,
        ),
        "drift_expected_rate": Gauge(
            "drift_expected_above_threshold_ratio",
            "Share of the training holdout above the threshold: the rate to expect without drift",
            ["model"],
            namespace=ns,
            registry=r,
        ),
        "drift_psi": Gauge(
            "drift_score_ratio_psi",
            "Population stability index of the score ratio over the last "
            f"{PSI_WINDOW} readings against a reference (see docs/detection.md)",
            mg,
            namespace=ns,
            registry=r,
        ),
        "warming_up": Counter(
            "readings_warming_up_total",
            "Readings not scored because their device's window is not full yet",
            mg,
            namespace=ns,
            registry=r,
        ),
        "replayed": Counter(
            "readings_replayed_total",
            "Re-delivered readings skipped because the restored device memory holds them",
            ["model"],
            namespace=ns,
            registry=r,
        ),
    }


def _incident_metrics(ns: str, r: CollectorRegistry) -> dict[str, Any]:
    return {
        "incidents_open": Gauge(
            "incidents_open",
            "Open incidents",
            ["device_group", "severity"],
            namespace=ns,
            registry=r,
        ),
        "incidents_opened": Counter(
            "incidents_opened_total",
            "Incidents opened",
            ["device_group", "severity"],
            namespace=ns,
            registry=r,
        ),
        "incidents_resolved": Counter(
            "incidents_resolved_total",
            "Incidents resolved",
            ["device_group", "reason"],
            namespace=ns,
            registry=r,
        ),
        "incident_duration": Histogram(
            "incident_duration_seconds",
            "Duration of resolved incidents, first anomalous reading to resolve (event time)",
            buckets=INCIDENT_DURATION_BUCKETS,
            namespace=ns,
            registry=r,
        ),
        "alertmanager_posts": Counter(
            "alertmanager_posts_total",
            "POSTs to Alertmanager by outcome",
            ["outcome"],
            namespace=ns,
            registry=r,
        ),
        "alertmanager_dropped": Counter(
            "alertmanager_dropped_total",
            "Incident events dropped by the full Alertmanager queue",
            namespace=ns,
            registry=r,
        ),
        "alertmanager_queue_depth": Gauge(
            "alertmanager_queue_depth",
            "Incident events waiting for delivery to Alertmanager",
            namespace=ns,
            registry=r,
        ),
        "alertmanager_active": Gauge(
            "alertmanager_active_alerts",
            "Alerts kept active (re-sent) in Alertmanager",
            namespace=ns,
            registry=r,
        ),
    }


@dataclass
class _PsiState:
    version: str
    edges: npt.NDArray[np.float64] | None = None  # inner bin edges (PSI_BINS - 1)
    expected: npt.NDArray[np.float64] | None = None  # reference share per bin
    reference: list[npt.NDArray[np.float64]] = field(default_factory=list)
    reference_n: int = 0
    window: deque[npt.NDArray[np.int64]] = field(default_factory=deque)
    counts: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(PSI_BINS, np.int64))


class ScoreRatioPsi:
    """Population stability index of the score ratio, per (model, device group).

    ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`` over ``PSI_BINS`` bins, ``a`` the shares of
    the last ``PSI_WINDOW`` readings (whole batches: the window may exceed it by one batch),
    ``e`` the reference shares (shares floored at 1e-4 so an empty bin stays finite).

    Reference: the model artifact carries no holdout score distribution (only its threshold
    statistics), so the reference is *frozen from the first* ``PSI_REFERENCE`` *scored
    readings* of each (model version, device group) after the worker starts or loads the
    version: bins are their deciles. The PSI therefore measures drift since the worker
    started on that model, not since training; the above-threshold rate vs the holdout's
    expected rate is the signal against training. A new model version starts a new reference.
    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 large shift.
    """

    def __init__(
        self,
        bins: int = PSI_BINS,
        window: int = PSI_WINDOW,
        reference: int = PSI_REFERENCE,
        min_readings: int = PSI_MIN_READINGS,
    ) -> None:
        self.bins, self.window, self.reference, self.min_readings = (
            bins,
            window,
            reference,
            min_readings,
        )
        self._state: dict[tuple[str, str], _PsiState] = {}

    def update(self, model: str, version: str, result: BatchResult) -> dict[str, float]:
        """Fold one batch in; returns the PSI of every group with a full enough window."""
        out: dict[str, float] = {}
        for g, ratios in result.ratio_by_group().items():
            psi = self.observe(model, version, g, ratios)
            if psi is not None:
                out[g] = psi
        return out

    def observe(
        self, model: str, version: str, group: str, ratios: npt.NDArray[np.float64]
    ) -> float | None:
        """Fold one group's ratios in; the current PSI, or None while it has too little data."""
        st = self._state.get((model, group))
        if st is None or st.version != version:
            st = self._state[(model, group)] = _PsiState(version)
            st.counts = np.zeros(self.bins, np.int64)
        if st.edges is None:
            st.reference.append(ratios)
            st.reference_n += len(ratios)
            if st.reference_n < self.reference:
                return None
            ref = np.concatenate(st.reference)
            st.edges = np.quantile(ref, np.linspace(0, 1, self.bins + 1)[1:-1])
            st.expected = self._shares(self._bin(st.edges, ref))
            st.reference = []
            return None
        c = self._bin(st.edges, ratios)
        st.window.append(c)
        st.counts += c
        while len(st.window) > 1 and int(st.counts.sum() - st.window[0].sum()) >= self.window:
            st.counts -= st.window.popleft()
        if int(st.counts.sum()) < self.min_readings or st.expected is None:
            return None
        a, e = self._shares(st.counts), st.expected
        return float(np.sum((a - e) * np.log(a / e)))

    def _bin(
        self, edges: npt.NDArray[np.float64], x: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.int64]:
        return np.bincount(np.searchsorted(edges, x, side="right"), minlength=self.bins).astype(
            np.int64
        )

    @staticmethod
    def _shares(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        s = np.maximum(counts / max(int(counts.sum()), 1), 1e-4)
        return np.asarray(s / s.sum(), dtype=np.float64)


def observe_many(h: Histogram, values: npt.NDArray[np.float64]) -> None:
    """Observe a whole array at once: one ``np.histogram`` instead of a call per value.

    prometheus_client has no bulk observe; a per-value loop costs ~1 µs each, a third of our
    per-reading budget. This updates the same child objects its ``observe`` would.
    """
    if values.size == 0:
        return
    bounds = np.asarray(h._upper_bounds, dtype=np.float64)  # includes +Inf
    idx = np.searchsorted(bounds, values, side="left")
    counts = np.bincount(idx, minlength=len(bounds))
    for i, c in enumerate(counts):
        if c:
            h._buckets[i].inc(float(c))
    h._sum.inc(float(values.sum()))
