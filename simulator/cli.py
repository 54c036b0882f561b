"""``anomaly-simulate``: write the simulated fleet's training CSV or readings, or produce to Kafka.

Exit status: 0 success; 1 runtime failure (unwritable file, broker unreachable, missing topic,
undelivered readings); 2 bad arguments (one line on stderr: what is wrong and how to fix it);
128 + signal number when SIGINT/SIGTERM cuts a bounded ``produce`` short. An unbounded
``produce`` (neither --per-device nor --duration) is meant to be stopped that way: it flushes
and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, NoReturn

from simulator.fleet import (
    ANOMALY_KINDS,
    MAX_ANOMALY_FRACTION,
    FleetSpec,
    Reading,
    stream,
    write_normal_csv,
)

PROG: Final = "anomaly-simulate"
_PROGRESS_EVERY_S: Final = 2.0
# Pacing granularity: a batch is sent, then we sleep until the schedule catches up. 20 ms
# keeps sleeps well above timer resolution while the burstiness stays invisible at 1 s scale.
_TICK_S: Final = 0.02
_UNPACED_BATCH: Final = 1000
_FLUSH_TIMEOUT_S: Final = 60.0
_CONNECT_TIMEOUT_MS: Final = 15_000
_SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class _UsageError(Exception):
    """Bad arguments found after parsing; reported like argparse errors, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line naming the problem reads better in
        # CI logs and the fix hint is in the message or in --help.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- arg types


def _int_at_least(low: int, hint: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {hint}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}; {hint}")
        return value

    return parse


def _float_in(low: float, high: float, hint: str, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {hint}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {hint}")
        return value

    return parse


def _start_ms(text: str) -> int:
    if text == "now":
        return time.time_ns() // 1_000_000
    return _int_at_least(0, "use epoch milliseconds or 'now'")(text)


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ANOMALY_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {','.join(unknown) or text!r}; use a comma-separated subset of "
            f"{','.join(ANOMALY_KINDS)}"
        )
    return kinds


def _bootstrap(text: str) -> str:
    for server in text.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise argparse.ArgumentTypeError(
                f"{server!r} is not HOST:PORT; e.g. --bootstrap 127.0.0.1:39092 "
                "(comma-separate several)"
            )
    return text


# ---------------------------------------------------------------------------- the parser


def _fleet_options() -> _Parser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("fleet")
    g.add_argument(
        "--devices",
        type=_int_at_least(1, "use 1..1000"),
        default=FleetSpec.devices,
        metavar="N",
        help="pumps, ids pump-000… (default: %(default)s)",
    )
    g.add_argument(
        "--sensors",
        type=_int_at_least(12, "use 12..100"),
        default=FleetSpec.sensors,
        metavar="N",
        help="sensors per pump, sensor_00… (12..100, default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=_int_at_least(0, "use a seed >= 0"),
        default=FleetSpec.seed,
        metavar="N",
        help="fleet seed: same seed, same bytes (default: %(default)s)",
    )
    g.add_argument(
        "--period-ms",
        type=_int_at_least(1, "use the milliseconds between a device's readings, e.g. 1000"),
        default=None,
        metavar="MS",
        help=f"event-time ms between a device's readings (default: {FleetSpec.period_ms}; for "
        "`produce` with --rate: devices × 1000 / rate, so event time keeps pace with wall "
        "time and a live consumer's time checks pass)",
    )
    g.add_argument(
        "--start-ms",
        type=_start_ms,
        default=FleetSpec.start_ms,
        metavar="MS|now",
        help="event time of the first streamed reading, epoch ms, or 'now' for a live feed "
        "(consumers that reject stale readings need it) (default: %(default)s)",
    )
    return p


def _anomaly_options() -> _Parser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("anomalies")
    g.add_argument(
        "--anomaly-fraction",
        type=_float_in(0.0, MAX_ANOMALY_FRACTION, f"use 0..{MAX_ANOMALY_FRACTION}, e.g. 0.02"),
        default=0.0,
        metavar="F",
        help="share of readings inside injected anomaly segments (default: %(default)s)",
    )
    g.add_argument(
        "--kinds",
        type=_kinds,
        default=ANOMALY_KINDS,
        metavar="K1,K2",
        help=f"comma-separated kinds to inject (default: {','.join(ANOMALY_KINDS)})",
    )
    g.add_argument(
        "--magnitude",
        type=_float_in(0.0, 1e6, "use a number > 0; 1.0 = clearly detectable", low_open=True),
        default=1.0,
        metavar="M",
        help="scales every anomaly; at 1.0 each injected reading is clearly detectable "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--segment-length",
        type=_int_at_least(1, "use a number of readings >= 1"),
        default=5,
        metavar="N",
        help="readings per anomaly segment; spikes are always 1 (default: %(default)s)",
    )
    g.add_argument(
        "--truth",
        type=Path,
        metavar="FILE",
        help='write ground truth as JSONL {"device_id","timestamp_ms","kind"}, one line per '
        "anomalous reading",
    )
    return p


def _kafka_options() -> _Parser:
    p = _Parser(add_help=False)
    g = p.add_argument_group(
        "kafka security",
        "SASL credentials come from the environment: KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD.",
    )
    g.add_argument(
        "--security-protocol",
        choices=_SECURITY_PROTOCOLS,
        default="PLAINTEXT",
        help="(default: %(default)s)",
    )
    g.add_argument(
        "--sasl-mechanism", choices=_SASL_MECHANISMS, help="required with SASL_* protocols"
    )
    g.add_argument("--ssl-cafile", type=Path, metavar="PEM", help="CA bundle for SSL/SASL_SSL")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``anomaly-simulate`` argument parser (exposed for docs and tests)."""
    parser = _Parser(
        prog=PROG,
        description="Simulate a pump fleet's sensors with injected anomalies and ground truth.",
        epilog="Run '%(prog)s COMMAND --help' for a command's options. Same --seed, same bytes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fleet, anomalies, kafka = _fleet_options(), _anomaly_options(), _kafka_options()

    p = sub.add_parser(
        "normal-csv",
        parents=[fleet],
        help="write normal training data as CSV",
        description="Write normal readings from the 30 days before --start-ms, sampled across "
        "the fleet, as CSV: timestamp,device_id,sensor_00,… (timestamp in epoch ms).",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="CSV file to write")
    p.add_argument(
        "--rows",
        type=_int_at_least(1, "e.g. --rows 20000"),
        required=True,
        metavar="N",
        help="rows to write, pooled across devices",
    )
    p.add_argument(
        "--sample-seed",
        type=_int_at_least(0, "use a seed >= 0"),
        metavar="N",
        help="draw a different sample of the same fleet (default: derived from --seed)",
    )

    p = sub.add_parser(
        "jsonl",
        parents=[fleet, anomalies],
        help="write readings as JSON lines",
        description="Write readings, one Kafka-contract JSON object per line "
        '({"device_id","timestamp","values"}), ordered by time then device.',
    )
    p.add_argument("out", metavar="OUT|-", help="file to write, or - for stdout")
    p.add_argument(
        "--per-device",
        type=_int_at_least(1, "e.g. --per-device 600"),
        required=True,
        metavar="N",
        help="readings per device",
    )

    p = sub.add_parser(
        "produce",
        parents=[fleet, anomalies, kafka],
        help="produce readings to Kafka",
        description="Produce readings to a Kafka topic (key = device id, value = contract "
        "JSON), paced at --rate. Stops after --per-device readings per device, after "
        "--duration seconds, or (neither given) on SIGINT/SIGTERM. Progress goes to stderr "
        "every ~2 s.",
    )
    default_bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
    p.add_argument(
        "--bootstrap",
        type=_bootstrap,
        default=default_bootstrap,
        required=default_bootstrap is None,
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP)",
    )
    p.add_argument("--topic", required=True, help="topic to produce to")
    p.add_argument(
        "--rate",
        type=_float_in(0.0, 1e9, "use readings per second >= 0 (0 = as fast as possible)"),
        default=0.0,
        metavar="R",
        help="readings per second across the fleet; 0 = as fast as possible (default: 0)",
    )
    stop = p.add_mutually_exclusive_group()
    stop.add_argument(
        "--per-device",
        type=_int_at_least(1, "e.g. --per-device 600"),
        metavar="N",
        help="stop after this many readings per device",
    )
    stop.add_argument(
        "--duration",
        type=_float_in(0.0, 1e9, "use seconds > 0, e.g. --duration 60", low_open=True),
        metavar="S",
        help="stop after S seconds of wall-clock time",
    )
    p.add_argument(
        "--partitions",
        type=_int_at_least(1, "use a partition count >= 1"),
        metavar="P",
        help="create the topic with P partitions if it does not exist (broker-default "
        "replication); without it the topic must exist",
    )
    return parser


# ------------------------------------------------------------------------------- commands


def _spec(args: argparse.Namespace) -> FleetSpec:
    period = args.period_ms
    if period is None:
        rate = getattr(args, "rate", 0) or 0
        period = max(1, round(args.devices * 1000 / rate)) if rate > 0 else FleetSpec.period_ms
    try:
        return FleetSpec(
            devices=args.devices,
            sensors=args.sensors,
            seed=args.seed,
            period_ms=period,
            start_ms=args.start_ms,
        )
    except ValueError as exc:  # the message already says how to fix it
        raise _UsageError(str(exc)) from None


def _readings(
    args: argparse.Namespace, spec: FleetSpec, per_device: int | None
) -> Iterator[Reading]:
    """The stream, validated now (not at the first reading) so bad arguments exit 2."""
    try:
        return stream(
            spec,
            per_device,
            anomaly_fraction=args.anomaly_fraction,
            kinds=args.kinds,
            magnitude=args.magnitude,
            segment_length=args.segment_length,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _normal_csv(args: argparse.Namespace) -> int:
    spec = _spec(args)
    write_normal_csv(args.out, spec, args.rows, seed=args.sample_seed)
    _log(f"wrote {args.rows} normal rows x {spec.sensors} sensors to {args.out}")
    return 0


def _jsonl(args: argparse.Namespace) -> int:
    spec = _spec(args)
    readings = _readings(args, spec, args.per_device)
    anomalous = 0
    with contextlib.ExitStack() as stack:
        truth = stack.enter_context(args.truth.open("wb")) if args.truth is not None else None
        out = sys.stdout.buffer if args.out == "-" else stack.enter_context(open(args.out, "wb"))
        try:
            for reading in readings:
                out.write(reading.to_json() + b"\n")
                if reading.anomaly is not None:
                    anomalous += 1
                    if truth is not None:
                        truth.write(reading.truth_json() + b"\n")
            out.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): silence the interpreter's flush at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    where = "stdout" if args.out == "-" else args.out
    _log(f"wrote {spec.devices * args.per_device} readings ({anomalous} anomalous) to {where}")
    return 0


def _kafka_config(args: argparse.Namespace) -> dict[str, Any]:
    """Connection settings shared by the admin client and the producer."""
    config: dict[str, Any] = {
        "bootstrap_servers": args.bootstrap.split(","),
        "client_id": PROG,
        "security_protocol": args.security_protocol,
        "bootstrap_timeout_ms": _CONNECT_TIMEOUT_MS,
    }
    if args.security_protocol.startswith("SASL_"):
        user = os.environ.get("KAFKA_SASL_USERNAME")
        password = os.environ.get("KAFKA_SASL_PASSWORD")
        if args.sasl_mechanism is None or not user or password is None:
            raise _UsageError(
                f"--security-protocol {args.security_protocol} needs --sasl-mechanism and the "
                "environment variables KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        config |= {
            "sasl_mechanism": args.sasl_mechanism,
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }
    elif args.sasl_mechanism is not None:
        raise _UsageError("--sasl-mechanism needs --security-protocol SASL_PLAINTEXT or SASL_SSL")
    if args.ssl_cafile is not None:
        if not args.security_protocol.endswith("SSL"):
            raise _UsageError("--ssl-cafile needs --security-protocol SSL or SASL_SSL")
        if not args.ssl_cafile.is_file():
            raise _UsageError(f"--ssl-cafile {args.ssl_cafile} is not a readable file")
        config["ssl_cafile"] = str(args.ssl_cafile)
    return config


def _ensure_topic(config: dict[str, Any], topic: str, partitions: int | None) -> str | None:
    """Create ``topic`` if asked to, else check it exists; an error message or None."""
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**config)
    try:
        if partitions is not None:
            try:
                admin.create_topics(
                    {topic: {"num_partitions": partitions, "replication_factor": -1}},
                    wait_for_metadata=True,
                )
                _log(f"created topic {topic!r} with {partitions} partition(s)")
            except TopicAlreadyExistsError:
                pass
            return None
        (info,) = admin.describe_topics([topic])
        if info["error_code"] != 0:
            return (
                f"topic {topic!r} is not available (error code {info['error_code']}); "
                "create it, or pass --partitions P to have it created"
            )
        return None
    finally:
        admin.close()


@dataclass
class _Run:
    """Counters of one ``produce`` run.

    ``acked``/``failed`` are updated from kafka-python's I/O thread, hence the lock.
    """

    sent: int = 0
    anomalous: int = 0
    acked: int = 0
    failed: int = 0
    first_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_ack(self, _metadata: object) -> None:
        with self.lock:
            self.acked += 1

    def on_error(self, exc: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if self.first_error is None:
                self.first_error = _describe(exc)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into ``stop`` (yielding the signals received).

    A flag checked between batches, not an exception: raising inside ``producer.send`` could
    leave kafka-python's accumulator half-updated right before the final flush.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class _Pacer:
    """Batches on an absolute schedule: the ``n``-th reading goes out at ``t0 + n / rate``.

    Absolute, not sleep-per-batch: a stall (GC, broker backpressure) is caught up instead of
    silently lowering the offered load, which is what a load generator must do.
    """

    rate: float  # readings/s, 0 = unpaced
    deadline: float  # monotonic seconds; inf = none
    stop: threading.Event
    t0: float = field(default_factory=time.monotonic)
    _report_t: float = field(default_factory=time.monotonic)
    _report_sent: int = 0

    @property
    def batch(self) -> int:
        return max(1, math.ceil(self.rate * _TICK_S)) if self.rate > 0 else _UNPACED_BATCH

    def go_on(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def wait(self, run: _Run) -> None:
        """After a batch: sleep until it is due (or a stop), report progress every ~2 s."""
        now = time.monotonic()
        if self.rate > 0:
            due = min(self.t0 + run.sent / self.rate, self.deadline)
            if due > now:
                self.stop.wait(due - now)
        if now - self._report_t >= _PROGRESS_EVERY_S:
            rate = (run.sent - self._report_sent) / (now - self._report_t)
            _log(f"sent={run.sent} acked={run.acked} rate={rate:.0f}/s")
            self._report_t, self._report_sent = now, run.sent


def _send_all(
    producer: Any,
    topic: str,
    source: Iterator[Reading],
    pacer: _Pacer,
    run: _Run,
    truth: IO[bytes] | None,
) -> None:
    """Produce until ``source`` ends, the deadline passes or a stop signal arrives."""
    while pacer.go_on():
        chunk = list(itertools.islice(source, pacer.batch))
        if not chunk:
            return
        for reading in chunk:
            future = producer.send(topic, value=reading.to_json(), key=reading.key())
            future.add_callback(run.on_ack)
            future.add_errback(run.on_error)
            run.sent += 1
            if reading.anomaly is not None:
                run.anomalous += 1
                if truth is not None:
                    truth.write(reading.truth_json() + b"\n")
        pacer.wait(run)


def _connect(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """A ready producer, or None after logging why not (missing topic, no broker)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        problem = _ensure_topic(config, args.topic, args.partitions)
        if problem is not None:
            _log(f"error: {problem}")
            return None
        # Topics are managed explicitly (--partitions); auto-creation would hide a typo'd name.
        return KafkaProducer(
            **config,
            acks="all",
            linger_ms=5,
            allow_auto_create_topics=False,
            max_block_ms=_CONNECT_TIMEOUT_MS,
        )
    except KafkaError as exc:
        _log(f"error: cannot use Kafka at {args.bootstrap}: {_describe(exc)}")
        return None


def _produce(args: argparse.Namespace) -> int:
    spec = _spec(args)
    config = _kafka_config(args)
    per_device: int | None = args.per_device
    limit: int | None = None
    if args.duration is not None and args.rate > 0:
        # Known total: plan the anomaly budget over exactly the readings we will send.
        limit = max(1, round(args.rate * args.duration))
        per_device = math.ceil(limit / spec.devices)
    source = itertools.islice(_readings(args, spec, per_device), limit)

    from kafka.errors import KafkaError

    producer = _connect(args, config)
    if producer is None:
        return 1
    stop = threading.Event()
    deadline = math.inf if args.duration is None else time.monotonic() + args.duration
    pacer = _Pacer(rate=args.rate, deadline=deadline, stop=stop)
    run = _Run()
    status = 0
    try:
        with (
            args.truth.open("wb") if args.truth is not None else contextlib.nullcontext() as truth,
            _stop_on_signals(stop) as received,
        ):
            _send_all(producer, args.topic, source, pacer, run, truth)
        if received:
            bounded = args.per_device is not None or args.duration is not None
            # Stopping an unbounded run is how it is meant to end; a bounded one was cut short.
            status = 128 + received[0] if bounded else 0
            _log(f"stopped by {signal.Signals(received[0]).name}")
    except KafkaError as exc:
        _log(f"error: producing to {args.topic!r} failed: {_describe(exc)}")
        status = 1
    finally:
        try:
            producer.flush(timeout=_FLUSH_TIMEOUT_S)
        except KafkaError as exc:
            _log(f"error: flush did not complete: {_describe(exc)}")
        producer.close(timeout=10)

    elapsed = time.monotonic() - pacer.t0
    _log(
        f"done: {run.sent} readings ({run.anomalous} anomalous) to topic {args.topic!r} in "
        f"{elapsed:.1f}s ({run.sent / elapsed:.0f}/s incl. flush), acked={run.acked} "
        f"failed={run.failed}"
    )
    if run.acked != run.sent:
        _log(
            f"error: {run.sent - run.acked} readings not acknowledged; "
            f"first error: {run.first_error or 'flush timed out'}"
        )
        return 1
    return status


def _describe(exc: BaseException) -> str:
    text = str(exc)
    # kafka-python's errors already start with their class name.
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


def _log(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "normal-csv": _normal_csv,
    "jsonl": _jsonl,
    "produce": _produce,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (see module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported on one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _COMMANDS[args.command](args)
    except _UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
