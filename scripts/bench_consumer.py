"""Benchmark 1 of ``make bench``: the client limit, a raw kafka-python consumer.

Builds its consumer with the worker's own ``worker.loop.build_consumer`` from the same YAML
config a worker run uses (same fetch sizes, ``fetch_max_wait_ms``, ``max_poll_records`` =
``batch.max_size``, ``read_committed``), polls with ``max_records = batch.max_size`` as the
worker's loop does, touches every record's value, and does nothing else: no decoding, no
scoring, no producing, no commits. Run by ``scripts/bench.py`` in its own process::

    python scripts/bench_consumer.py --config worker.yaml --expect N

Prints one JSON object: readings/s over the steady part of the run (from 10 % to 90 % of
``--expect`` records, the same window the worker runs use), CPU seconds per reading of this
process over that window, and the whole-run numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from worker.clients.kafka_python import build_consumer
from worker.config import load_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--expect", type=int, required=True, help="records in the topic")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    cfg = load_config(args.config)
    consumer = build_consumer(cfg)
    consumer.subscribe(list(cfg.kafka.input_topics))
    max_records = cfg.batch.max_size
    lo, hi = int(args.expect * 0.1), int(args.expect * 0.9)
    n = 0
    nbytes = 0
    t_first = t_lo = t_hi = c_lo = c_hi = None
    n_lo = n_hi = 0
    deadline = time.monotonic() + args.timeout
    try:
        while n < args.expect and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=200, max_records=max_records)
            for recs in polled.values():
                n += len(recs)
                for r in recs:
                    v = r.value
                    nbytes += len(v) if v is not None else 0
            if n and t_first is None:
                t_first = time.perf_counter()
            if t_lo is None and n >= lo:
                t_lo, c_lo, n_lo = time.perf_counter(), time.process_time(), n
            if t_hi is None and n >= hi:
                t_hi, c_hi, n_hi = time.perf_counter(), time.process_time(), n
        t_end = time.perf_counter()
    finally:
        consumer.close(autocommit=False)
    if t_lo is None or t_hi is None or c_lo is None or c_hi is None or t_first is None:
        print(json.dumps({"error": f"read only {n} of {args.expect} records"}))
        return 1
    print(
        json.dumps(
            {
                "records": n,
                "bytes": nbytes,
                "rate": (n_hi - n_lo) / (t_hi - t_lo),
                "cpu_s_per_reading": (c_hi - c_lo) / (n_hi - n_lo),
                "whole_run_rate": n / (t_end - t_first),
                "cpu_total_s": time.process_time(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
