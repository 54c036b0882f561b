"""Delivery of open incidents to a Prometheus Alertmanager (API v2), off the Kafka loop's thread.

The loop calls :meth:`AlertmanagerClient.submit` with each incident event; it never blocks
(a bounded queue that drops its oldest entry, counted, when full) and never raises for a
delivery problem. A background thread turns events into alerts and ``POST``s them to
``<url>/api/v2/alerts``:

* an open incident is an alert with labels ``alertname``, ``device``, ``device_group``,
  ``model``, ``severity`` (labels identify an alert in Alertmanager), annotations
  ``summary`` (top sensors), ``incident_id``, ``link`` (from ``link_template``), ``startsAt``
  = the incident's start, and ``endsAt`` = now + 3 × ``resend_interval_s``: if this worker
  dies, Alertmanager resolves the alert by itself after that;
* active alerts are re-sent every ``resend_interval_s`` (Alertmanager expects clients to repeat
  firing alerts; Prometheus does every minute or so);
* a resolved incident is sent once with ``endsAt`` = its resolve time (clamped to now); when a
  severity change alters the labels, the alert under the old labels is resolved the same way;
* a failed POST is retried with exponential back-off capped at ``max_backoff_s``; alerts
  waiting to be delivered are kept (resolves included) until a POST succeeds.

Metrics go through :class:`AlertmanagerHooks` (plain callables): this module does not import
prometheus_client.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.incidents import IncidentEvent, incident_event_doc

log = logging.getLogger(__name__)


class AlertmanagerConfigError(ValueError):
    """An ``alertmanager`` setting is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class AlertmanagerSettings:
    """The ``alertmanager:`` config section (durations in seconds)."""

    enabled: bool = False
    url: str = "http://127.0.0.1:9093"
    alertname: str = "SensorAnomalyIncident"
    resend_interval_s: float = 60.0
    timeout_s: float = 5.0
    queue_size: int = 10_000
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    # str.format template over the incident event's fields, e.g.
    # "https://grafana.example/d/sensor-anomaly?var-device={device_id}&from={started_at_ms}"
    link_template: str = ""
    top_sensors: int = 3

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise AlertmanagerConfigError(
                f"alertmanager.url: {self.url!r} is not an http(s) URL, e.g. http://127.0.0.1:9093"
            )
        for name in ("resend_interval_s", "timeout_s", "initial_backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise AlertmanagerConfigError(f"alertmanager.{name}: must be > 0 seconds")
        if self.queue_size < 1:
            raise AlertmanagerConfigError("alertmanager.queue_size: must be >= 1")
        try:
            self.link_template.format_map(_SAMPLE_DOC)
        except (KeyError, IndexError, ValueError) as e:
            raise AlertmanagerConfigError(
                f"alertmanager.link_template: {e!s} is not a field of an incident event; use "
                "fields like {device_id}, {incident_id}, {started_at_ms}"
            ) from None


def _noop(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class AlertmanagerHooks:
    """Metric callbacks (the loop wires them to Prometheus counters/gauges).

    ``on_post(ok, alerts)`` per POST; ``on_dropped(n)`` when the queue discards events;
    ``on_queue_depth(n)`` and ``on_active(n)`` after each delivery round.
    """

    on_post: Callable[[bool, int], None] = _noop
    on_dropped: Callable[[int], None] = _noop
    on_queue_depth: Callable[[int], None] = _noop
    on_active: Callable[[int], None] = _noop


def _iso(ms: float) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _summary(doc: dict[str, Any], top: int) -> str:
    sensors = ", ".join(
        f"{s['sensor']} ({100 * s['max_share']:.0f} %, "
        + (f"{s['value']:.4g}" if s["value"] is not None else "imputed")
        + f" vs expected {s['expected']:.4g})"
        for s in doc["top_sensors"][:top]
    )
    return (
        f"{doc['device_id']}: {doc['severity']} anomaly, peak score {doc['peak_score_ratio']:.1f}x "
        f"threshold, {doc['anomalous_readings']}/{doc['readings']} readings anomalous"
        + (f"; top sensors: {sensors}" if sensors else "")
    )


class AlertmanagerClient:
    """Background delivery of incidents to Alertmanager. ``start`` once, ``stop`` at shutdown."""

    def __init__(
        self,
        settings: AlertmanagerSettings,
        hooks: AlertmanagerHooks | None = None,
        wall_ms: Callable[[], float] | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.hooks = hooks or AlertmanagerHooks()
        self._wall_ms = wall_ms or (lambda: time.time() * 1000)
        self._queue: deque[IncidentEvent] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # incident id -> (labels, alert document without endsAt)
        self._active: OrderedDict[str, tuple[dict[str, str], dict[str, Any]]] = OrderedDict()
        self._unsent: OrderedDict[tuple[str, ...], dict[str, Any]] = OrderedDict()
        self.posts_ok = 0
        self.posts_failed = 0
        self.dropped = 0

    # ---- caller side (the Kafka loop's thread)

    def submit(self, event: IncidentEvent) -> None:
        """Queue an incident event for delivery. Never blocks, never raises."""
        with self._lock:
            dropped = 0
            while len(self._queue) >= self.settings.queue_size:
                self._queue.popleft()
                dropped += 1
            self._queue.append(event)
            self.dropped += dropped
        if dropped:
            self.hooks.on_dropped(dropped)
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alertmanager", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (one attempt) and stop the thread within ``timeout_s``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def active_count(self) -> int:
        with self._lock:
            return len(self._active)

    # ---- delivery thread

    def _run(self) -> None:
        s = self.settings
        backoff = s.initial_backoff_s
        next_attempt = 0.0  # monotonic time before which a failed POST is not retried
        next_resend = time.monotonic() + s.resend_interval_s
        while True:
            self._drain()
            now = time.monotonic()
            if now >= next_resend:
                self._queue_active()
                next_resend = now + s.resend_interval_s
            stopping = self._stop.is_set()
            if self._unsent and (now >= next_attempt or stopping):
                if self._post_unsent():
                    backoff, next_attempt = s.initial_backoff_s, 0.0
                else:
                    next_attempt = time.monotonic() + backoff
                    backoff = min(backoff * 2, s.max_backoff_s)
            with self._lock:
                depth, active = len(self._queue), len(self._active)
            self.hooks.on_queue_depth(depth)
            self.hooks.on_active(active)
            if stopping:
                return
            now = time.monotonic()
            wait = next_resend - now
            if self._unsent:
                wait = min(wait, next_attempt - now)
            # A new event wakes us early; during a back-off its alert waits in the pending
            # POST (retries stay spaced by the back-off, whatever the event rate).
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                ev = self._queue.popleft()
            try:
                self._apply(ev)
            except Exception:  # a bug here must not kill delivery of the other alerts
                log.exception("alertmanager: cannot build an alert from incident event")

    def _apply(self, ev: IncidentEvent) -> None:
        doc = incident_event_doc(ev, top_sensors=max(self.settings.top_sensors, 1))
        labels = {
            "alertname": self.settings.alertname,
            "device": ev.device_id,
            "device_group": ev.device_group,
            "model": ev.model_name,
            "severity": ev.incident.severity,
        }
        now = self._wall_ms()
        starts = min(float(ev.incident.started_ms), now)
        annotations = {
            "summary": _summary(doc, self.settings.top_sensors),
            "incident_id": ev.incident.id,
        }
        link = self.settings.link_template.format_map(doc) if self.settings.link_template else ""
        if link:
            annotations["link"] = link
        alert: dict[str, Any] = {
            "labels": labels,
            "annotations": annotations,
            "startsAt": _iso(starts),
            "generatorURL": link or "",
        }
        inc_id = ev.incident.id
        with self._lock:
            old = self._active.pop(inc_id, None)
            if ev.state == "resolved":
                ends = min(float(ev.resolved_ms or now), now)
                self._queue_alert(alert | {"endsAt": _iso(max(ends, starts))})
                if old is not None and old[0] != labels:
                    self._queue_alert(old[1] | {"endsAt": _iso(max(ends, starts))})
                return
            if old is not None and old[0] != labels:
                # Labels identify an alert: the old severity's alert ends now.
                self._queue_alert(old[1] | {"endsAt": _iso(now)})
            self._active[inc_id] = (labels, alert)
        self._queue_alert(self._firing(alert))

    def _firing(self, alert: dict[str, Any]) -> dict[str, Any]:
        ends = self._wall_ms() + 3000 * self.settings.resend_interval_s
        return alert | {"endsAt": _iso(ends)}

    def _queue_alert(self, alert: dict[str, Any]) -> None:
        key = tuple(sorted(alert["labels"].items()))
        self._unsent.pop(key, None)
        self._unsent[key] = alert  # latest wins, in order of change
        while len(self._unsent) > self.settings.queue_size:
            self._unsent.popitem(last=False)
            self.dropped += 1
            self.hooks.on_dropped(1)

    def _queue_active(self) -> None:
        with self._lock:
            alerts = [a for _, a in self._active.values()]
        for a in alerts:
            self._queue_alert(self._firing(a))

    def _post_unsent(self) -> bool:
        alerts = list(self._unsent.values())
        body = json.dumps(alerts).encode()
        req = urllib.request.Request(
            self.settings.url.rstrip("/") + "/api/v2/alerts",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.settings.timeout_s) as resp:
                ok = bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError, ValueError) as e:
            log.warning("alertmanager: POST of %d alert(s) failed: %s", len(alerts), e)
            ok = False
        self.hooks.on_post(ok, len(alerts))
        if ok:
            self.posts_ok += 1
            for a in alerts:
                key = tuple(sorted(a["labels"].items()))
                if self._unsent.get(key) is a:
                    del self._unsent[key]
        else:
            self.posts_failed += 1
        return ok


_SAMPLE_DOC: dict[str, Any] = {
    "schema": "",
    "incident_id": "0" * 32,
    "sequence": 1,
    "state": "opened",
    "device_id": "pump-000",
    "device_group": "pump",
    "model": {"name": "sensors", "version": "v0001"},
    "severity": "warning",
    "started_at": "",
    "started_at_ms": 0,
    "opened_at": "",
    "opened_at_ms": 0,
    "last_anomalous_at": "",
    "last_anomalous_at_ms": 0,
    "resolved_at": None,
    "resolved_at_ms": None,
    "resolve_reason": None,
    "event_time_ms": 0,
    "duration_s": 0.0,
    "readings": 1,
    "anomalous_readings": 1,
    "peak_score_ratio": 1.0,
    "latest_score_ratio": 1.0,
    "threshold": 1.0,
    "threshold_multiplier": 1.0,
    "top_sensors": [],
    "source": {"topic": "", "partition": 0, "first_offset": 0, "last_offset": 0},
}
