"""``anomaly-worker``: run the Kafka worker, or score files offline with the same path.

Exit codes: 0 clean stop, 2 bad configuration or model, 3 broker outage past the limit,
1 anything unexpected (a bug: the traceback is logged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry

from detector import ArtifactError
from worker import __version__
from worker.config import ConfigError, WorkerConfig, load_config
from worker.health import HealthServer
from worker.identity import resolve_instance_id
from worker.logs import setup_logging
from worker.loop import GiveUp, StartupError, Worker
from worker.metrics import WorkerMetrics
from worker.model_source import ModelSource
from worker.pipeline import Scorer
from worker.records import SimpleRecord
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
            return score_file(cfg, args.input, args.output, args.dead_letters, args.batch)
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
        extra={"instance_id": instance_id},
    )
    registry = CollectorRegistry()
    metrics = WorkerMetrics.create(registry)
    health = WorkerStatus(rejoin_stuck_s=cfg.kafka.rejoin_stuck_s)
    models = ModelSource(cfg.model)
    # Fail fast on a missing/broken model before binding ports or joining the group.
    first = models.load_initial()
    server = None
    if cfg.http.enabled:
        server = _start_server(cfg, registry, health)
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", *server.address)
    worker = Worker(cfg, metrics, health, models, instance_id=instance_id)
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


def score_file(cfg: WorkerConfig, inp: str, out: str, dead: str, batch: int) -> int:
    """Backfill/offline check: the same Scorer the Kafka loop uses, on JSON Lines."""
    det = ModelSource(cfg.model).load_initial()
    scorer = Scorer(det, cfg.reading, cfg.events)
    try:
        src = sys.stdin.buffer if inp == "-" else open(inp, "rb")  # noqa: SIM115
    except OSError as e:
        print(f"error: cannot read --input {inp}: {e.strerror}; check the path", file=sys.stderr)
        return 2
    try:
        dst = sys.stdout.buffer if out == "-" else open(out, "wb")  # noqa: SIM115
        dlq = open(dead, "wb") if dead else None  # noqa: SIM115
    except OSError as e:
        print(f"error: cannot write {e.filename}: {e.strerror}; check the path", file=sys.stderr)
        return 2
    name = "stdin" if inp == "-" else Path(inp).name
    n = n_events = n_dead = 0
    t0 = time.perf_counter()
    try:
        buf: list[SimpleRecord] = []
        for line in _lines(src):
            buf.append(SimpleRecord(name, 0, n, None, line, []))
            n += 1
            if len(buf) >= batch:
                n_events, n_dead = _flush_file_batch(scorer, buf, dst, dlq, n_events, n_dead)
                buf = []
        if buf:
            n_events, n_dead = _flush_file_batch(scorer, buf, dst, dlq, n_events, n_dead)
    finally:
        for f in (src, dst, dlq):
            if f is not None and f not in (sys.stdin.buffer, sys.stdout.buffer):
                f.close()
    dt = time.perf_counter() - t0
    print(
        f"scored {n} readings in {dt:.2f}s: {n_events} anomalies, {n_dead} unscorable "
        f"(model {det.info.name} {det.info.version})",
        file=sys.stderr,
    )
    return 0


def _flush_file_batch(
    scorer: Scorer,
    buf: list[SimpleRecord],
    dst: IO[bytes],
    dlq: IO[bytes] | None,
    n_events: int,
    n_dead: int,
) -> tuple[int, int]:
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
    return n_events + len(res.events), n_dead + len(res.dead_letters)


if __name__ == "__main__":
    sys.exit(main())
