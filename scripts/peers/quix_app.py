"""An idiomatic quixstreams app doing the worker's scoring, one message at a time: the peer
of issue 14's "≥ 10 × the quixstreams app" goal.

``Application`` + ``StreamingDataFrame``: the input topic with quixstreams' JSON
deserializer, ``sdf.apply`` scoring each reading with the project's numpy ``Detector`` (a
1-row matrix per message), ``sdf.filter`` keeping anomalies, ``sdf.to_topic`` producing the
events with quixstreams' JSON serializer; commits every 5 s (the default checkpoint), the
processing guarantee as asked. Runs in its own venv (``scripts/bench_peers.py`` builds it:
quixstreams, numpy, msgspec; the repository on ``sys.path`` for ``detector``).

Stops after ``--expect`` readings and prints one JSON line: records, events, readings/s and
CPU seconds per reading over the 10 %-90 % window (process CPU, librdkafka's threads
included)::

    bench-out/peers-venv/bin/python scripts/peers/quix_app.py --bootstrap 127.0.0.1:39092 \
        --topic T --out EVENTS --group G --registry R --expect 200000 [--guarantee exactly-once]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from quixstreams import Application, message_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.scoring import MIN_SHARE, TOP, event, load_detector


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ("--bootstrap", "--topic", "--out", "--group", "--registry", "--state-dir"):
        p.add_argument(a, required=True)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--guarantee", default="at-least-once")
    args = p.parse_args()
    det = load_detector(args.registry)
    names = det.feature_names
    thr = det.threshold.value
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee=args.guarantee,
        state_dir=args.state_dir,
        loglevel="WARNING",
    )
    readings = app.topic(args.topic, value_deserializer="json")
    events = app.topic(args.out, key_serializer="string", value_serializer="json")
    lo, hi = int(args.expect * 0.1), int(args.expect * 0.9)
    mark: dict[str, tuple[float, float, int]] = {}
    seen = {"n": 0, "events": 0}

    def score(value: dict[str, Any]) -> dict[str, Any] | None:
        seen["n"] = n = seen["n"] + 1
        if n in (lo, hi):
            mark["lo" if n == lo else "hi"] = (time.perf_counter(), time.process_time(), n)
        if n >= args.expect:
            app.stop()
        x = np.array([[value["values"][k] for k in names]], dtype=np.float64)
        s = det.score(x)
        sc = float(s.score[0])
        if not sc > thr:  # NaN is not an anomaly either
            return None
        ctx = message_context()
        seen["events"] += 1
        contribs = det.contributions(x[0], s, 0, top=TOP, min_share=MIN_SHARE)
        return event(det, ctx.topic, ctx.partition, ctx.offset, value["device_id"],
                     value["timestamp"], sc, contribs)  # fmt: skip

    sdf = app.dataframe(readings)
    sdf = sdf.apply(score).filter(lambda e: e is not None)
    sdf.to_topic(events, key=lambda e: e["device_id"])
    app.run()
    if "hi" not in mark:
        print(json.dumps({"error": f"read only {seen['n']} of {args.expect} records"}))
        return 1
    (t0, c0, n0), (t1, c1, n1) = mark["lo"], mark["hi"]
    print(
        json.dumps(
            {
                "records": seen["n"],
                "events_sent": seen["events"],
                "rate": (n1 - n0) / (t1 - t0),
                "cpu_s_per_reading": (c1 - c0) / (n1 - n0),
                "cpu_total_s": time.process_time(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
