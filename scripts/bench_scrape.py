"""Does scraping starve the worker? One worker scoring from the real broker, with and without
200 concurrent clients hammering ``/metrics``, ``/healthz`` and ``/readyz``.

    python scripts/bench_scrape.py [--rounds 3] [--clients 200] [--per-device 300]
    python scripts/bench_scrape.py --server-cost [--clients 200] [--seconds 10]

Each round runs two saturation runs on the same pre-filled 4-partition topic (fresh
consumer group each, order alternating between rounds so machine load drifts cancel):
``quiet`` (no clients) and ``scraped`` (``--clients`` concurrent clients, each sending
requests back to back, a new connection each, for the whole run; 2 of 4 to ``/metrics``,
asking for gzip as Prometheus does).
The clients run in a process of their own on asyncio, so their CPU is not the worker's.
Worker readings/s come from the group's committed offsets over 10-90 % of the topic
(``scripts/bench.py``'s method), worker CPU from ``/proc``. Every request must be answered
with 200 (``/readyz``: 200 or its documented 503 while the worker joins the group); the
script prints a Markdown table (for docs/benchmarks.md) and writes ``bench-out/scrape.json``.
The model is the linear autoencoder of the worker tests (a real artifact written through the
Registry), so no TensorFlow is needed.

``--server-cost`` needs no broker: it runs the endpoint with its default limits in this
process (the worker's metrics registry, a ready state), floods it with the clients for
``--seconds`` and prints the CPU time of the server's own thread as a share of a core: what
the endpoint can take from the scoring loop, whatever the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import bench  # noqa: E402  (the benchmark's Kafka, process and sampling helpers)

PATHS = ["/metrics", "/healthz", "/metrics", "/readyz"]


# --------------------------------------------------------------------------- the clients


async def _client(
    port: int, k: int, stop: asyncio.Event, stats: dict[str, Any], timeout: float
) -> None:
    i = k
    while not stop.is_set():
        path = PATHS[i % len(PATHS)]
        i += 1
        t0 = time.monotonic()
        data = b""
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            # /metrics as Prometheus asks for it (gzip), the probes as curl would.
            enc = "Accept-Encoding: gzip\r\n" if path == "/metrics" else ""
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{enc}Connection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(r.read(), timeout)
            w.close()
            status = data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "garbled"
        except (OSError, TimeoutError) as e:
            status = type(e).__name__
        stats["latency"].append(time.monotonic() - t0)
        key = f"{path} {status}"
        stats["codes"][key] = stats["codes"].get(key, 0) + 1
        if status != "200" and key not in stats["examples"]:
            stats["examples"][key] = data.decode(errors="replace")[-600:] if data else ""
        # /readyz answers 503 by design while the worker is not (yet) a stable group member
        # (the first seconds of a run); that is an answer, not a failure.
        answered = status == "200" or (path == "/readyz" and status == "503")
        stats["ok" if answered else "failed"] += 1


async def _clients(port: int, n: int, seconds: float, timeout: float) -> dict[str, Any]:
    """``n`` clients until SIGTERM (or ``seconds``); each finishes its request in flight."""
    stats: dict[str, Any] = {"ok": 0, "failed": 0, "latency": [], "codes": {}, "examples": {}}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(seconds, stop.set)
    await asyncio.gather(*(_client(port, k, stop, stats, timeout) for k in range(n)))
    return stats


def clients_main(port: int, n: int, seconds: float, out: Path) -> None:
    c0, w0 = time.process_time(), time.monotonic()
    s = asyncio.run(_clients(port, n, seconds, timeout=30.0))
    lat = sorted(s["latency"])
    wall = time.monotonic() - w0
    out.write_text(
        json.dumps(
            {
                "requests": s["ok"] + s["failed"],
                "ok": s["ok"],
                "failed": s["failed"],
                "by_path_and_status": s["codes"],
                "first_non_200": s["examples"],
                "per_s": (s["ok"] + s["failed"]) / wall,
                "p50_s": lat[len(lat) // 2] if lat else None,
                "p99_s": lat[int(len(lat) * 0.99)] if lat else None,
                "max_s": lat[-1] if lat else None,
                "client_cpu_s": time.process_time() - c0,
                "wall_s": wall,
            }
        )
    )


# --------------------------------------------------------------------------- the runs


class Stalled(RuntimeError):
    """The worker committed nothing for a minute after it was ready (not a scraping effect:
    seen with and without clients, a consumer-group rejoin that never completes)."""


def one_run(ctx: bench.Ctx, label: str, clients: int) -> dict[str, Any]:
    """bench.saturation_run's measurement, with ``clients`` scraping the worker meanwhile."""
    group = ctx.kafka.group(label)
    w = bench.start_worker(ctx, label, ctx.topic, group, "at_least_once")
    committed = bench.Committed(ctx.kafka.bootstrap, group, ctx.topic, bench.PARTITIONS)
    samples: list[dict[str, Any]] = []
    scraper: subprocess.Popen[Any] | None = None
    scrape_out = ctx.run_dir / f"{label}-clients.json"
    try:
        deadline = time.monotonic() + 300
        done = last = 0
        last_progress = time.monotonic()
        while done < ctx.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: committed {done} of {ctx.total} after 300 s")
            if done != last:
                last, last_progress = done, time.monotonic()
            elif time.monotonic() - last_progress > 60:
                raise Stalled(f"{label}: no commit for 60 s at {done} of {ctx.total}, log {w.log}")
            w.alive_or_raise()
            ready = w.check_ready()
            if ready and clients and scraper is None:
                scraper = bench.start(
                    [
                        sys.executable,
                        __file__,
                        "--clients-only",
                        str(w.port),
                        "--clients",
                        str(clients),
                        "--seconds",
                        "600",
                        "--out",
                        str(scrape_out),
                    ],
                    ctx.run_dir / f"{label}-clients.log",
                )
                time.sleep(1.0)  # let all clients connect before the window opens
            done = committed.total()
            samples.append(
                {
                    "t": time.monotonic(),
                    "committed": done,
                    "ready": ready and (scraper is not None or not clients),
                    "cpu": bench.cpu_seconds(w.proc.pid),
                    "rss": [bench.rss_mb(w.proc.pid)],
                    "broker_cpu": bench.cpu_seconds(ctx.broker) if ctx.broker else 0.0,
                    "self_cpu": bench.cpu_seconds(os.getpid()),
                    "jiffies": bench.machine_jiffies(),
                }
            )
            time.sleep(bench.SAMPLE_S)
    finally:
        committed.close()
        if scraper is not None:
            bench.stop(scraper, grace=60)  # SIGTERM: the clients write their figures
        rc = bench.stop(w.proc)
    if rc:
        raise RuntimeError(f"{label}: worker exit code {rc}, log {w.log}")
    res = bench._window_stats(ctx, samples, [w])
    if clients:
        res["clients"] = json.loads(scrape_out.read_text())
    return res


def server_cost(clients: int, seconds: float) -> int:
    import threading

    from prometheus_client import CollectorRegistry

    from worker.health import HealthServer, HealthState
    from worker.metrics import WorkerMetrics

    reg = CollectorRegistry()
    WorkerMetrics.create(reg)
    state = HealthState()
    state.update(model_version="v0001", assigned_partitions=4, broker_ok=True)
    srv = HealthServer("127.0.0.1", 0, reg, state)
    cpu: dict[str, float] = {}
    serve = srv._serve

    def timed_serve() -> None:
        t0 = time.thread_time()
        serve()
        cpu["s"] = time.thread_time() - t0

    srv._thread = threading.Thread(target=timed_serve, daemon=True)
    srv.start()
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--clients-only", str(srv.address[1])]
    cmd += ["--clients", str(clients), "--seconds", str(seconds), "--out", str(out)]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = time.monotonic() - t0
    srv.stop()
    c = json.loads(out.read_text())
    out.unlink()
    print(
        f"{clients} clients for {seconds:.0f} s: {srv.requests_served} responses "
        f"({c['ok']} 200, {c['failed']} other), p50 {c['p50_s']:.2f} s, p99 {c['p99_s']:.2f} s; "
        f"server thread CPU {cpu['s']:.3f} s = {cpu['s'] / seconds:.2%} of a core during the "
        f"flood ({cpu['s'] / wall:.2%} over the {wall:.1f} s with client start and stop)"
    )
    return 0 if c["failed"] == 0 else 1


def _table(rows: list[dict[str, Any]], clients: int) -> str:
    quiet = [r for r in rows if "clients" not in r]
    scraped = [r for r in rows if "clients" in r]
    q_rate = statistics.median(r["rate"] for r in quiet)
    q_cpu = statistics.median(r["cpu_s_per_reading"] for r in quiet)
    lines = [
        "| run | worker readings/s (median of rounds) | vs quiet | worker CPU µs/reading | "
        "requests answered / sent | responses/s | scrape p50 / p99 / max s |",
        "|---|--:|--:|--:|--:|--:|--:|",
        f"| quiet | {q_rate:,.0f} | 1.00 | {q_cpu * 1e6:.1f} | – | – | – |",
    ]
    s_rate = statistics.median(r["rate"] for r in scraped)
    s_cpu = statistics.median(r["cpu_s_per_reading"] for r in scraped)
    ok = sum(r["clients"]["ok"] for r in scraped)
    sent = sum(r["clients"]["requests"] for r in scraped)
    per_s = statistics.median(r["clients"]["per_s"] for r in scraped)
    p50 = statistics.median(r["clients"]["p50_s"] for r in scraped)
    p99 = statistics.median(r["clients"]["p99_s"] for r in scraped)
    mx = max(r["clients"]["max_s"] for r in scraped)
    lines.append(
        f"| {clients} concurrent clients | {s_rate:,.0f} | {s_rate / q_rate:.2f} | "
        f"{s_cpu * 1e6:.1f} | {ok:,} / {sent:,} | {per_s:,.0f} | "
        f"{p50:.3f} / {p99:.3f} / {mx:.3f} |"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--per-device", type=int, default=300, help="readings per device (200)")
    p.add_argument("--clients-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--server-cost", action="store_true", help="endpoint CPU alone, no broker")
    p.add_argument("--seconds", type=float, default=0, help="--server-cost flood duration")
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.clients_only:
        clients_main(a.clients_only, a.clients, a.seconds or 600, a.out)
        return 0
    if a.server_cost:
        return server_cost(a.clients, a.seconds or 10)
    return run(a)


def run(a: argparse.Namespace) -> int:
    from simulator.fleet import FleetSpec, feature_names, normal_matrix
    from tests.support.detectors import save_linear_detector

    run_id = uuid.uuid4().hex[:8]
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-scrape-{run_id}-"))
    ctx = bench.Ctx(
        bench.Kafka(bench.BOOTSTRAP, f"scrape-{run_id}"),
        run_dir / "registry",
        run_dir,
        broker=bench.broker_pid(),
    )
    rows: list[dict[str, Any]] = []
    stalls: list[str] = []
    try:
        spec = FleetSpec(devices=bench.DEVICES, sensors=bench.SENSORS, seed=bench.SEED)
        save_linear_detector(ctx.registry, normal_matrix(spec, 20_000), feature_names(spec), code=8)
        ctx.out_topic = ctx.kafka.topic("events", 4)
        ctx.dlq_topic = ctx.kafka.topic("dlq", 1)
        ctx.topic = ctx.kafka.topic("in", bench.PARTITIONS)
        ctx.total = bench.prefill(ctx.kafka, ctx.topic, a.per_device)
        print(f"pre-filled {ctx.total:,} readings; logs in {run_dir}", file=sys.stderr)
        for rnd in range(a.rounds):
            order = [("quiet", 0), ("scraped", a.clients)]
            for label, n in order if rnd % 2 == 0 else order[::-1]:
                for attempt in range(3):
                    try:
                        r = one_run(ctx, f"{label}{rnd}-{attempt}", n)
                        break
                    except Stalled as e:
                        stalls.append(str(e))
                        print(f"stalled, retrying: {e}", file=sys.stderr)
                else:
                    raise RuntimeError(f"{label}{rnd}: stalled 3 times")
                rows.append(r)
                extra = ""
                if n:
                    c = r["clients"]
                    extra = f", {c['ok']}/{c['requests']} answered, p99 {c['p99_s']:.3f} s"
                print(
                    f"round {rnd + 1} {label}: {r['rate']:,.0f} readings/s, "
                    f"{r['cpu_s_per_reading'] * 1e6:.1f} µs CPU/reading, "
                    f"machine busy {r['machine_busy_cores']:.2f} cores{extra}",
                    file=sys.stderr,
                )
    finally:
        bench.stop_all()
        ctx.kafka.cleanup()
    table = _table(rows, a.clients)
    print(table)
    bench.OUT.mkdir(exist_ok=True)
    print(f"stalled runs retried: {len(stalls)}")
    (bench.OUT / "scrape.json").write_text(
        json.dumps({"runs": rows, "table": table, "stalls": stalls}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
