"""A minimal hand-written confluent-kafka batch worker: the peer the worker's confluent
client is measured against (issue 14: worker ≥ 0.8 × its readings per CPU-second).

``consume(1000)``, msgspec decode, numpy scoring through the project's ``Detector``, one
event per anomalous reading produced to the output topic, ``flush`` then a synchronous
commit per batch (at-least-once). No dead-letter queue, no metrics, no validation beyond
what msgspec's types refuse (a refused record is skipped), no rebalance handling.

Reads ``--expect`` records of the group's assignment and prints one JSON line: records,
events, readings/s and CPU seconds per reading over the 10 %-90 % window of the records
read (process CPU: librdkafka's threads included)::

    python scripts/peers/ck_batch.py --bootstrap 127.0.0.1:39092 --topic T --out EVENTS \
        --group G --registry bench-out/run-*/registry --expect 200000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import chain
from operator import itemgetter
from pathlib import Path

import confluent_kafka as ck
import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.scoring import MIN_SHARE, TOP, Reading, event, hot_rows, load_detector


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ("--bootstrap", "--topic", "--out", "--group", "--registry"):
        p.add_argument(a, required=True)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    det = load_detector(args.registry)
    names = det.feature_names
    d = len(names)
    row = itemgetter(*names)
    dec = msgspec.json.Decoder(Reading)
    enc = msgspec.json.Encoder().encode
    c = ck.Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    prod = ck.Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 2})
    c.subscribe([args.topic])
    lo, hi = int(args.expect * 0.1), int(args.expect * 0.9)
    n = events = skipped = 0
    mark: dict[str, tuple[float, float, int]] = {}
    deadline = time.monotonic() + args.timeout
    try:
        while n < args.expect and time.monotonic() < deadline:
            msgs = [m for m in c.consume(1000, 0.2) if m.error() is None]
            if not msgs:
                continue
            n += len(msgs)
            good, readings = [], []
            for m in msgs:
                try:
                    readings.append(dec.decode(m.value()))
                    good.append(m)
                except msgspec.ValidationError:
                    skipped += 1
            if readings:
                x = np.fromiter(
                    chain.from_iterable(row(r.values) for r in readings),
                    np.float64,
                    count=len(readings) * d,
                ).reshape(len(readings), d)
                scores = det.score(x)
                hot = hot_rows(det, scores).tolist()
                for j, contribs in zip(
                    hot, det.contributions_many(x, scores, hot, TOP, MIN_SHARE), strict=True
                ):
                    m, r = good[j], readings[j]
                    doc = event(det, m.topic(), m.partition(), m.offset(), r.device_id,
                                r.timestamp, float(scores.score[j]), contribs)  # fmt: skip
                    prod.produce(args.out, enc(doc), r.device_id.encode())
                    events += 1
                prod.poll(0)
            prod.flush(30)
            c.commit(asynchronous=False)
            for key, at in (("lo", lo), ("hi", hi)):
                if key not in mark and n >= at:
                    mark[key] = (time.perf_counter(), time.process_time(), n)
    finally:
        prod.flush(30)
        c.close()
    if "hi" not in mark:
        print(json.dumps({"error": f"read only {n} of {args.expect} records"}))
        return 1
    (t0, c0, n0), (t1, c1, n1) = mark["lo"], mark["hi"]
    print(
        json.dumps(
            {
                "records": n,
                "events_sent": events,
                "skipped": skipped,
                "rate": (n1 - n0) / (t1 - t0),
                "cpu_s_per_reading": (c1 - c0) / (n1 - n0),
                "cpu_total_s": time.process_time(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
