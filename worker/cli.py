"""``anomaly-worker``: run the Kafka worker, or score files offline with the same path.

Exit codes: 0 clean stop, 2 bad configuration or model, 3 broker outage past the limit,
1 anything unexpected (a bug: the traceback is logged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import IO, Any

from prometheus_client import (
    CollectorRegistry,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from detector import ArtifactError
from worker import __version__
from worker.alertmanager import AlertmanagerClient, AlertmanagerHooks
from worker.config import ConfigError, WorkerConfig, load_config
from worker.health import HealthServer
from worker.identity import resolve_instance_id
from worker.incidents import IncidentTracker, ThresholdMultipliers, encode_incident_event
from worker.logs import setup_logging
from worker.loop import GiveUp, StartupError, Worker
from worker.memory import DeviceMemory
from worker.metrics import WorkerMetrics
from worker.model_source import ModelSource
from worker.pipeline import BatchResult, Scorer
from worker.records import SimpleRecord
from worker.stateful import StatefulStage
from worker.status import WorkerStatus

log = logging.getLogger("worker")
STOP_GRACE_S = 30.0


class HealthServerError(RuntimeError):
    """The metrics/health port cannot be bound (exit 2)."""


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the subcommand (`anomaly-worker run --config x.yaml`).
    default = None if top else argparse.SUPPRESS
    p.add_argument("--config", type=Path, default=default, help="YAML config file")
    p.add_argument(
        "--model",
        type=Path,
        default=default,
        help="score with this artifact directory (sets model.path; no registry reloads)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-worker",
        description="Score sensor readings from Kafka with a trained autoencoder and publish "
        "anomaly events. Settings come from --config and SENSOR_ANOMALY_<SECTION>__<KEY> "
        "environment variables (see README: Configuration). Exit codes: 0 clean stop, "
        "2 bad configuration, model, input or start-up condition, 3 broker unreachable past "
        "kafka.outage_give_up_s, 1 a bug.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(p, top=True)
    sub = p.add_subparsers(dest="command")
    _common(sub.add_parser("run", help="consume, score, publish (the default)"), top=False)
    _common(
        sub.add_parser("check-config", help="validate the config and model, print them, exit"),
        top=False,
    )
    sf = sub.add_parser(
        "score-file",
        help="score JSON Lines readings from a file or stdin, write events as JSON Lines",
    )
    _common(sf, top=False)
    sf.add_argument(
        "--input", default="-", help="readings file, one JSON reading a line (- = stdin)"
    )
    sf.add_argument("--output", default="-", help="events file (- = stdout)")
    sf.add_argument("--dead-letters", default="", help="write unscorable lines here as JSON Lines")
    sf.add_argument("--batch", type=int, default=1024, help="readings per batch (default 1024)")
    sf.add_argument(
        "--scores",
        default="",
        help="write one JSON line per scored reading here (device, timestamp, score, ratio, "
        "anomalous, out-of-range features)",
    )
    sf.add_argument(
        "--incidents",
        default="",
        help="also run the incident rules (config section incidents) and write the incident "
        "events here as JSON Lines",
    )
    sf.add_argument(
        "--max-past",
        type=float,
        default=None,
        metavar="SECONDS",
        help="refuse readings older than this (default reading.max_past_s, 30 days)",
    )
    sf.add_argument(
        "--no-time-checks",
        action="store_true",
        help="accept readings of any age or future time (backfills of history)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.model is not None:
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, path=str(args.model))
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    command = args.command or "run"
    try:
        if command == "check-config":
            det = ModelSource(cfg.model).load_initial()
            print(json.dumps({"config": cfg.masked(), "model": det.info.__dict__}, indent=2))
            return 0
        if command == "score-file":
            return score_file(
                cfg,
                args.input,
                args.output,
                args.dead_letters,
                args.batch,
                scores=args.scores,
                max_past_s=args.max_past,
                time_checks=not args.no_time_checks,
                incidents=args.incidents,
            )
        return run_worker(cfg)
    except (ArtifactError, StartupError, HealthServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_worker(cfg: WorkerConfig) -> int:
    """Run until SIGTERM/SIGINT; see :mod:`worker.loop` for the delivery contract."""
    # Until the loop runs there is nothing to finish or commit: a stop request exits at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(0))
    try:
        instance_id = resolve_instance_id(
            cfg.kafka.instance_id, cfg.kafka.group_id, cfg.kafka.instance_lock_dir
        )
    except OSError as e:
        raise StartupError(
            f"cannot pick an instance id ({e}); set kafka.instance_id or "
            "kafka.instance_lock_dir to a writable directory"
        ) from None
    log.info(
        "starting %s (instance %s) with config %s",
        __version__,
        instance_id,
        json.dumps(cfg.masked(), sort_keys=True),
        extra={"instance_id": instance_id, "config": cfg.masked()},
    )
    registry = worker_registry()
    metrics = WorkerMetrics.create(registry)
    health = WorkerStatus(rejoin_stuck_s=cfg.kafka.rejoin_stuck_s)
    models = ModelSource(cfg.model)
    # Fail fast on a missing/broken model before binding ports or joining the group.
    first = models.load_initial()
    server = None
    if cfg.http.enabled:
        server = _start_server(cfg, registry, health)
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", *server.address)
    stage = build_stage(cfg, metrics, first)
    worker = Worker(cfg, metrics, health, models, instance_id=instance_id, stage=stage)
    worker.set_detector(first)

    def on_signal(signum: int, _frame: Any) -> None:
        if worker._stop:  # second signal: the operator insists
            log.error("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: finishing the current batch", signal.Signals(signum).name)
        worker.stop()
        # Bound the shutdown even if the broker is gone.
        t = threading.Timer(STOP_GRACE_S, lambda: _force_exit(STOP_GRACE_S))
        t.daemon = True
        t.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run()
    except GiveUp as e:
        log.error("giving up: %s", e)
        print(
            f"error: {e}; check the broker at {cfg.kafka.bootstrap_servers} "
            "(and kafka.bootstrap_servers, TLS/SASL settings)",
            file=sys.stderr,
        )
        return 3
    finally:
        if server is not None:
            server.stop()
    log.info(
        "stopped cleanly after %d batches, %d readings", worker.batches_done, worker.readings_done
    )
    return 0


def worker_registry() -> CollectorRegistry:
    """The worker's registry: our metrics plus process/platform collectors and build info.

    ``_created`` series are off: one extra series per counter that no dashboard reads.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("sensor_anomaly_build", "Version of the running worker.", registry=registry).info(
        {"version": __version__, "python": platform.python_version()}
    )
    return registry


def build_stage(cfg: WorkerConfig, metrics: WorkerMetrics, det: Any) -> StatefulStage | None:
    """The durable per-device state, when incidents or a windowed/smoothed model need it."""
    windowed = det.window > 1 or det.ewma_alpha is not None
    if not (cfg.incidents.enabled or windowed):
        return None
    tracker = IncidentTracker(cfg.incidents) if cfg.incidents.enabled else None
    alerts = None
    if cfg.alertmanager.enabled:
        alerts = AlertmanagerClient(
            cfg.alertmanager, AlertmanagerHooks(**metrics.alertmanager_hooks())
        )
    return StatefulStage(
        cfg,
        tracker,
        DeviceMemory(),
        alerts,
        on_incidents=metrics.on_incidents,
        on_restore=metrics.on_state_restored,
    )


def _start_server(cfg: WorkerConfig, registry: CollectorRegistry, health: WorkerStatus) -> Any:
    try:
        return HealthServer(cfg.http.host, cfg.http.port, registry, health).start()
    except OSError as e:
        raise HealthServerError(
            f"cannot listen on {cfg.http.host}:{cfg.http.port} ({e.strerror}); set http.port "
            "(SENSOR_ANOMALY_HTTP__PORT) to a free port or stop what uses it"
        ) from None


def _force_exit(grace: float) -> None:
    log.error("shutdown took longer than %.0fs; exiting without a final commit", grace)
    logging.shutdown()
    os._exit(1)


def _lines(f: IO[bytes]) -> Iterator[bytes]:
    for line in f:
        line = line.rstrip(b"\r\n")
        if line:
            yield line


# Readings of an offline file without a timestamp get row order as time: row i at
# 2000-01-01T00:00:00Z + i seconds (deterministic, so a re-run gives the same incidents).
UNTIMED_START_MS = 946_684_800_000
UNTIMED_STEP_MS = 1000


@dataclasses.dataclass
class _FileTotals:
    readings: int = 0
    events: int = 0
    dead: int = 0
    scored: int = 0
    warming_up: int = 0
    out_of_range: int = 0
    above: int = 0
    dead_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    incidents: dict[str, int] = dataclasses.field(default_factory=dict)


def score_file(
    cfg: WorkerConfig,
    inp: str,
    out: str,
    dead: str,
    batch: int,
    scores: str = "",
    max_past_s: float | None = None,
    time_checks: bool = True,
    incidents: str = "",
) -> int:
    """Backfill/offline check: the same Scorer the Kafka loop uses, on JSON Lines.

    Prints a summary on stderr: counts, dead letters by reason, and the drift summary (share
    of readings with a feature outside the training range; share above the threshold vs the
    holdout's). A file whose first reading has no timestamp field is *untimed*: readings
    without one get row order as time (see ``UNTIMED_START_MS``) and the age checks are off.
    With ``incidents`` the incident rules of the ``incidents`` config section run on the
    scored readings (event time, so a backfill gives the incidents the live worker would);
    incidents still open at the end of the file stay open (counted in the summary).
    """
    if batch < 1 or (max_past_s is not None and not max_past_s > 0):
        print("error: --batch and --max-past must be positive numbers", file=sys.stderr)
        return 2
    det = ModelSource(cfg.model).load_initial()
    try:
        src = sys.stdin.buffer if inp == "-" else open(inp, "rb")  # noqa: SIM115
    except OSError as e:
        print(f"error: cannot read --input {inp}: {e.strerror}; check the path", file=sys.stderr)
        return 2
    try:
        dst = sys.stdout.buffer if out == "-" else open(out, "wb")  # noqa: SIM115
        dlq = open(dead, "wb") if dead else None  # noqa: SIM115
        sco = open(scores, "wb") if scores else None  # noqa: SIM115
        inc = open(incidents, "wb") if incidents else None  # noqa: SIM115
    except OSError as e:
        print(f"error: cannot write {e.filename}: {e.strerror}; check the path", file=sys.stderr)
        return 2
    lines = _lines(src)
    first = next(lines, None)
    ts_key = b'"' + cfg.reading.timestamp_field.encode() + b'"'
    untimed = first is not None and ts_key not in first
    reading = _file_reading(cfg, max_past_s, time_checks and not untimed)
    scorer = Scorer(
        det,
        reading,
        cfg.events,
        multipliers=_multipliers(cfg),
        keep_readings=sco is not None,
        scored_batch=inc is not None,
    )
    tracker = IncidentTracker(cfg.incidents) if inc is not None else None
    name = "stdin" if inp == "-" else Path(inp).name
    tot = _FileTotals()
    t0 = time.perf_counter()
    try:
        buf: list[SimpleRecord] = []
        for line in chain([first] if first is not None else [], lines):
            if untimed and ts_key not in line:
                line = _with_row_time(line, cfg.reading.timestamp_field, tot.readings)
            buf.append(SimpleRecord(name, 0, tot.readings, None, line, []))
            tot.readings += 1
            if len(buf) >= batch:
                res = _flush_file_batch(scorer, buf, dst, dlq, tot, sco)
                _file_incidents(tracker, res, inc, tot)
                buf = []
        if buf:
            res = _flush_file_batch(scorer, buf, dst, dlq, tot, sco)
            _file_incidents(tracker, res, inc, tot)
        if tracker is not None:
            tot.incidents["open at the end"] = len(tracker.open_incidents())
    finally:
        for f in (src, dst, dlq, sco, inc):
            if f is not None and f not in (sys.stdin.buffer, sys.stdout.buffer):
                f.close()
    _print_summary(det, tot, time.perf_counter() - t0, untimed)
    return 0


def _file_reading(cfg: WorkerConfig, max_past_s: float | None, time_checks: bool) -> Any:
    """The reading settings of an offline run: ``--max-past``, or no age checks at all."""
    reading = cfg.reading
    if max_past_s is not None:
        reading = dataclasses.replace(reading, max_past_s=max_past_s)
    if not time_checks:
        # Far beyond any epoch-ms value: only the "looks like seconds" check remains.
        reading = dataclasses.replace(reading, max_past_s=1e13, max_future_s=1e13)
    return reading


def _file_incidents(
    tracker: IncidentTracker | None, res: BatchResult, inc: IO[bytes] | None, tot: _FileTotals
) -> None:
    """Feed one batch's scored readings to the incident tracker; write its events."""
    if tracker is None or inc is None or res.scored_batch is None:
        return
    for ev in tracker.process(res.scored_batch).events:
        inc.write((encode_incident_event(ev).value or b"") + b"\n")
        tot.incidents[ev.state] = tot.incidents.get(ev.state, 0) + 1


def _multipliers(cfg: WorkerConfig) -> ThresholdMultipliers | None:
    """The config's per-device-group threshold multipliers, as the Kafka loop applies them."""
    specs = cfg.incidents.threshold_multipliers
    return ThresholdMultipliers.parse(specs) if specs else None


def _with_row_time(line: bytes, field: str, row: int) -> bytes:
    """``line`` with ``field`` set to the row's time; unparsable lines are left as they are
    (the decoder dead-letters them with the right reason)."""
    try:
        doc = json.loads(line)
    except ValueError:
        return line
    if not isinstance(doc, dict):
        return line
    doc[field] = UNTIMED_START_MS + row * UNTIMED_STEP_MS
    return json.dumps(doc).encode()


def _print_summary(det: Any, tot: _FileTotals, seconds: float, untimed: bool) -> None:
    print(
        f"scored {tot.readings} readings in {seconds:.2f}s: {tot.events} anomalies, "
        f"{tot.dead} unscorable (model {det.info.name} {det.info.version})",
        file=sys.stderr,
    )
    if tot.dead_by_reason:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(tot.dead_by_reason.items()))
        print(f"dead letters by reason: {reasons}", file=sys.stderr)
    if tot.warming_up:
        print(
            f"not scored: {tot.warming_up} readings while device windows filled "
            f"(window {det.window})",
            file=sys.stderr,
        )
    if tot.incidents:
        counts = ", ".join(f"{k} {n}" for k, n in tot.incidents.items())
        print(f"incidents: {counts}", file=sys.stderr)
    if untimed:
        print("no timestamps in the file: row order used as time (1 s per row)", file=sys.stderr)
    if tot.scored:
        expected = det.threshold.exceed_rate
        exp = f"{expected:.2%}" if expected == expected else "unknown"
        oor = (
            f"{tot.out_of_range / tot.scored:.1%} of readings have a feature outside the "
            "training range"
            if det.train_min is not None
            else "training range not stored in this model"
        )
        print(
            f"drift: {oor}; {tot.above / tot.scored:.2%} above the threshold (holdout: {exp})",
            file=sys.stderr,
        )


def _flush_file_batch(
    scorer: Scorer,
    buf: list[SimpleRecord],
    dst: IO[bytes],
    dlq: IO[bytes] | None,
    tot: _FileTotals,
    sco: IO[bytes] | None = None,
) -> BatchResult:
    res = scorer.process(buf)
    for m in res.events:
        dst.write((m.value or b"") + b"\n")
    if dlq is not None:
        for m in res.dead_letters:
            hdr = {k: v.decode(errors="replace") for k, v in m.headers}
            dlq.write(
                json.dumps(
                    {"value": (m.value or b"").decode(errors="replace"), "headers": hdr}
                ).encode()
                + b"\n"
            )
    tot.events += len(res.events)
    tot.dead += len(res.dead_letters)
    tot.scored += res.scored
    tot.warming_up += res.warming_up
    tot.out_of_range += sum(res.out_of_range_by_group.values())
    tot.above += sum(res.above_threshold_by_group.values())
    for reason, n in res.dead_by_reason.items():
        tot.dead_by_reason[reason.value] = tot.dead_by_reason.get(reason.value, 0) + n
    if sco is not None and res.readings is not None:
        sco.write(_score_lines(buf, res.readings))
    return res


def _score_lines(buf: list[SimpleRecord], r: Any) -> bytes:
    """JSON Lines of ``--scores``: one object per scored reading, input order."""
    rows = []
    for j, (i, dev) in enumerate(zip(r.record, r.device_ids, strict=True)):
        s, ratio = float(r.score[j]), float(r.ratio[j])
        rows.append(
            json.dumps(
                {
                    "line": buf[i].offset + 1,
                    "device_id": dev,
                    "timestamp_ms": int(r.ts_ms[j]),
                    "score": s if math.isfinite(s) else None,
                    "compared_score": float(r.compared[j]) if math.isfinite(s) else None,
                    "ratio": ratio if math.isfinite(ratio) else None,
                    "anomalous": bool(r.anomalous[j]),
                    "out_of_range": [
                        {"sensor": f, "excess": round(e, 6)} for f, e in r.out_of_range.get(j, [])
                    ],
                }
            )
        )
    return ("\n".join(rows) + "\n").encode() if rows else b""


if __name__ == "__main__":
    sys.exit(main())
