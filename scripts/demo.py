"""The demo behind ``make demo``: simulate a fleet, train, stream through the worker, report.

Assumes the local broker answers at $KAFKA_BOOTSTRAP (scripts/demo.sh starts it). Every
process this script starts is stopped by PID before it returns, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO / "demo-out"


def step(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def run(cmd: list[str], **kw: Any) -> None:
    subprocess.run(cmd, check=True, cwd=REPO, **kw)


def create_topics(bootstrap: str, names: dict[str, int]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(n, p, 1) for n, p in names.items()])
    finally:
        admin.close()


def committed_all(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        ends = c.end_offsets(tps)
        done = sum(c.committed(tp) or 0 for tp in tps)
        return done, sum(ends.values())
    finally:
        c.close(autocommit=False)


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        consumer_timeout_ms=3000,
    )
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out = list(c)
    c.close(autocommit=False)
    return out


def metric(text: str, name: str) -> float:
    """Sum of every sample called ``name`` in a Prometheus exposition."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of streaming")
    ap.add_argument("--rate", type=float, default=2000.0, help="readings per second")
    ap.add_argument("--devices", type=int, default=12)
    ap.add_argument("--sensors", type=int, default=16)
    args = ap.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:39092")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    fleet = ["--devices", str(args.devices), "--sensors", str(args.sensors), "--seed", "42"]

    step(f"Simulating normal operation of {args.devices} pumps × {args.sensors} sensors")
    run(
        [
            str(BIN / "anomaly-simulate"),
            "normal-csv",
            str(OUT / "train.csv"),
            "--rows",
            "60000",
            *fleet,
        ]
    )

    run(
        [
            str(BIN / "anomaly-simulate"),
            "jsonl",
            str(OUT / "eval.jsonl"),
            "--per-device",
            "500",
            "--anomaly-fraction",
            "0.05",
            "--truth",
            str(OUT / "eval-truth.jsonl"),
            *fleet,
        ]
    )

    step("Training the autoencoder (threshold = mean + 2·std of held-out normal error)")
    t0 = time.monotonic()
    run(
        [
            str(BIN / "anomaly-train"),
            "--config",
            "examples/trainer-synthetic.yaml",
            "--set",
            f"data.path={OUT / 'train.csv'}",
            "--registry",
            str(OUT / "registry"),
            "--set",
            f"report.dir={OUT / 'report'}",
            "--set",
            "name=sensors",
            "--set",
            f"evaluate.path={OUT / 'eval.jsonl'}",
            "--set",
            f"evaluate.truth={OUT / 'eval-truth.jsonl'}",
        ]
    )
    print(f"trained in {time.monotonic() - t0:.1f}s; report: {OUT / 'report'}")

    stamp = time.strftime("%Y%m%d%H%M%S")
    topics = {
        "in": f"demo-readings-{stamp}",
        "out": f"demo-anomalies-{stamp}",
        "dlq": f"demo-dlq-{stamp}",
        "inc": f"demo-incidents-{stamp}",
    }
    create_topics(bootstrap, {topics["in"]: 4, topics["out"]: 1, topics["dlq"]: 1})
    group = f"demo-worker-{stamp}"
    port = free_port(9108)
    cfg = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "input_topics": [topics["in"]],
            "output_topic": topics["out"],
            "dead_letter_topic": topics["dlq"],
            "group_id": group,
            "instance_id": "demo-1",
        },
        "model": {"registry": str(OUT / "registry"), "name": "sensors"},
        # Incidents with the shipped rules (docs/incidents.md); the worker creates the topic.
        "incidents": {"enabled": True, "topic": topics["inc"]},
        "http": {"host": "127.0.0.1", "port": port},
    }
    (OUT / "worker.yaml").write_text(yaml.safe_dump(cfg))

    procs: list[subprocess.Popen[bytes]] = []
    try:
        step(f"Starting the worker (metrics on http://127.0.0.1:{port}/metrics)")
        log = (OUT / "worker.log").open("wb")
        t_start = time.monotonic()
        worker_cmd = [str(BIN / "anomaly-worker"), "--config", str(OUT / "worker.yaml")]
        worker = subprocess.Popen(
            worker_cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(worker)
        ready = False
        while time.monotonic() - t_start < 60 and worker.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    ready = True
                    break
            except OSError:
                time.sleep(0.2)
        if not ready:
            print((OUT / "worker.log").read_text()[-3000:])
            raise SystemExit("worker did not become ready")
        print(f"ready after {time.monotonic() - t_start:.1f}s")

        per_device = int(args.rate * args.duration / args.devices) + 1
        step(
            f"Streaming {args.duration:.0f}s of readings at {args.rate:.0f}/s ({per_device} s of "
            "event time per device) with injected "
            "anomalies (spike, drift, stuck, noise burst, correlated fault)"
        )
        sim = subprocess.Popen(
            [
                str(BIN / "anomaly-simulate"),
                "produce",
                "--bootstrap",
                bootstrap,
                "--topic",
                topics["in"],
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                "--anomaly-fraction",
                "0.02",
                "--truth",
                str(OUT / "truth.jsonl"),
                # Each device reads once a second of event time (the incident rules count
                # seconds of event time), so the run covers per_device seconds that end
                # about now: the fleet's last hour, replayed at the given rate.
                "--start-ms",
                str(int(time.time() * 1000) - per_device * 1000),
                "--period-ms",
                "1000",
                *fleet,
            ],
            cwd=REPO,
        )
        procs.append(sim)
        # A few malformed readings too, to show the dead-letter topic at work.
        p = KafkaProducer(bootstrap_servers=bootstrap)
        for bad in (
            b"not json",
            b'{"device_id": "pump-001"}',
            b'{"device_id": "pump-002", "timestamp": 1, "values": {}}',
            b"[1, 2, 3]",
        ):
            p.send(topics["in"], key=b"pump-bad", value=bad)
        p.flush()
        p.close()
        if sim.wait() != 0:
            raise SystemExit("simulator failed")

        step("Waiting for the worker to commit everything")
        deadline = time.monotonic() + 120
        while True:
            done, end = committed_all(bootstrap, group, topics["in"])
            if done >= end or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics_text = r.read().decode()
        worker.send_signal(signal.SIGTERM)
        rc = worker.wait(timeout=40)
        print(f"worker stopped with exit code {rc}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    summarize(bootstrap, topics, metrics_text, port, done, end)
    return 0 if rc == 0 and done >= end else 1


def summarize(
    bootstrap: str, topics: dict[str, str], metrics_text: str, port: int, done: int, end: int
) -> None:
    """Print what a user wants to see after the run."""
    step("Summary")
    events = [json.loads(m.value) for m in read_topic(bootstrap, topics["out"])]
    dead = read_topic(bootstrap, topics["dlq"])
    truth = {}
    for line in (OUT / "truth.jsonl").read_text().splitlines():
        t = json.loads(line)
        truth[(t["device_id"], t["timestamp_ms"])] = t["kind"]
    flagged = {(e["device_id"], e["reading_timestamp_ms"]) for e in events}
    tp = len(flagged & set(truth))
    consumed = metric(metrics_text, "sensor_anomaly_readings_consumed_total")
    print(f"readings processed : {int(consumed)} (committed {done}/{end})")
    print(f"anomaly events     : {len(events)}  → {(OUT / 'events.jsonl')}")
    print(
        f"injected anomalies : {len(truth)}, detected {tp} "
        f"(recall {tp / max(1, len(truth)):.1%}, precision {tp / max(1, len(flagged)):.1%})"
    )
    by_kind = Counter(truth.values())
    hit_kind = Counter(truth[k] for k in flagged & set(truth))
    print(
        "by kind            : "
        + ", ".join(f"{k} {hit_kind[k]}/{n}" for k, n in sorted(by_kind.items()))
    )
    reasons = Counter(
        dict(m.headers).get("sensor_anomaly.error.reason", b"?").decode() for m in dead
    )
    print(f"dead letters       : {len(dead)} {dict(reasons)}")
    print_devices(events)
    (OUT / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    incidents = [json.loads(m.value) for m in read_topic(bootstrap, topics["inc"])]
    (OUT / "incidents.jsonl").write_text("".join(json.dumps(e) + "\n" for e in incidents))
    summarize_incidents(incidents, truth)
    print(
        f"metrics were served at http://127.0.0.1:{port}/metrics "
        f"(health: /healthz, /readyz); snapshot: {OUT / 'metrics.txt'}"
    )
    (OUT / "metrics.txt").write_text(metrics_text)
    print(f"training report: {OUT / 'report'}; worker log: {OUT / 'worker.log'}")


def _segments(
    truth: dict[tuple[str, int], str], gap_ms: int = 1500
) -> list[tuple[str, int, int, str]]:
    """Injected anomaly runs: (device, first ms, last ms, kind), readings ≤ gap_ms apart."""
    per: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for (dev, ts), kind in truth.items():
        per[dev].append((ts, kind))
    runs: list[tuple[str, int, int, str]] = []
    for dev, pts in per.items():
        pts.sort()
        start, last, kind = pts[0][0], pts[0][0], pts[0][1]
        for ts, k in pts[1:]:
            if ts - last > gap_ms:
                runs.append((dev, start, last, kind))
                start, kind = ts, k
            last = ts
        runs.append((dev, start, last, kind))
    return runs


def summarize_incidents(incidents: list[dict[str, Any]], truth: dict[tuple[str, int], str]) -> None:
    """Incidents per device, and injected runs → incidents (detected, missed, false)."""
    latest: dict[str, dict[str, Any]] = {}
    for doc in incidents:  # per id, the latest state wins (events of a device are in order)
        latest[doc["incident_id"]] = doc
    runs = _segments(truth)
    opened_per_run: Counter[int] = Counter()
    delays: list[float] = []
    false = 0
    for inc in latest.values():
        lo, hi = inc["started_at_ms"], inc["last_anomalous_at_ms"]
        hits = [
            i
            for i, (dev, a, b, _) in enumerate(runs)
            if dev == inc["device_id"] and lo <= b and a <= hi
        ]
        if not hits:
            false += 1
        for i in hits:
            if opened_per_run[i] == 0:
                delays.append(max(0.0, (inc["opened_at_ms"] - runs[i][1]) / 1000))
            opened_per_run[i] += 1
    detected = sum(1 for i in range(len(runs)) if opened_per_run[i])
    by_kind = Counter(r[3] for r in runs)
    hit_kind = Counter(runs[i][3] for i in range(len(runs)) if opened_per_run[i])
    n_states = Counter(d["state"] for d in incidents)
    print(
        f"\nincidents          : {len(latest)} ({n_states['opened']} opened, "
        f"{n_states['updated']} updates, {n_states['resolved']} resolved) "
        f"→ {OUT / 'incidents.jsonl'}"
    )
    delays.sort()
    p50 = delays[len(delays) // 2] if delays else float("nan")
    p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))] if delays else float("nan")
    print(
        f"injected runs      : {len(runs)}, with an incident {detected}, "
        f"missed {len(runs) - detected}; "
        f"false incidents {false}; time to open p50 {p50:.0f} s, p95 {p95:.0f} s (event time)"
    )
    print(
        "runs by kind       : "
        + ", ".join(f"{k} {hit_kind[k]}/{n}" for k, n in sorted(by_kind.items()))
    )
    print("\nper device: incidents (severity, duration, top sensors: max share, value vs expected)")
    per_dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for inc in latest.values():
        per_dev[inc["device_id"]].append(inc)
    for dev in sorted(per_dev):
        incs = sorted(per_dev[dev], key=lambda d: d["opened_at_ms"])
        print(f"  {dev}: {len(incs)} incident(s)")
        for inc in incs[:4]:
            top = ", ".join(
                f"{t['sensor']} {t['max_share']:.0%} ({t['value']:.3g} vs {t['expected']:.3g})"
                for t in inc["top_sensors"][:3]
            )
            state = "open" if inc["state"] != "resolved" else "resolved"
            print(
                f"    {inc['opened_at']} {inc['severity']:8s} {state:8s} "
                f"{inc['duration_s']:5.0f} s, "
                f"peak {inc['peak_score_ratio']:.1f}×: {top}"
            )
        if len(incs) > 4:
            print(f"    … {len(incs) - 4} more")


def print_devices(events: list[dict[str, Any]]) -> None:
    per_dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        per_dev[e["device_id"]].append(e)
    print("\nper device: anomalies, strongest sensors (share of error, value vs expected)")
    for dev in sorted(per_dev):
        evs = per_dev[dev]
        sensors: Counter[str] = Counter()
        for e in evs:
            for c in e["contributors"][:1]:
                sensors[c["sensor"]] += 1
        worst = max(evs, key=lambda e: e["score_ratio"])
        c0 = worst["contributors"][0]
        often = ", ".join(s for s, _ in sensors.most_common(3))
        print(
            f"  {dev}: {len(evs):4d} events; most often {often};"
            f" worst {worst['score_ratio']:.1f}× threshold at {worst['reading_timestamp']}"
            f" ({c0['sensor']} {c0['share']:.0%}: {c0['value']:.3g} vs {c0['expected']:.3g})"
        )


if __name__ == "__main__":
    sys.exit(main())
