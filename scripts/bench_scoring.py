"""Benchmark 3 of ``make bench``: build the benchmark model, then time the scoring path alone.

Run by ``scripts/bench.py`` twice, each time in a process of its own::

    python scripts/bench_scoring.py build  --registry DIR --out FILE.json [--repeats 5]
    python scripts/bench_scoring.py worker --registry DIR --out FILE.json [--repeats 5]
    python scripts/bench_scoring.py decode --out FILE.json [--baseline GITREF ...] [--instructions]

``build`` fits a real Keras dense autoencoder, 38 → 32 → 16 → 8 → 16 → 32 → 38 (relu, sigmoid
output, MinMaxScaler), briefly on the simulator's normal data, freezes it with
``DenseNetwork.from_keras`` + ``Preprocessor.from_sklearn`` into a ``Detector``, checks the
numpy forward pass against Keras ``predict``, saves it (with the Keras model) to the registry
the worker runs load, and times the tutorial path: ``json.loads`` + scikit-learn
``MinMaxScaler.transform`` + Keras ``model.predict`` + ``json.dumps`` of each event.

``worker`` loads that artifact as the worker does, in a process without TensorFlow (as the
worker's: a process holding TensorFlow's many Python objects pays for them in every garbage
collection and measured up to 40 % slower), and times bytes in → event bytes out through
``worker.pipeline.Scorer.process`` (msgspec decode + validation, numpy preprocessing and
forward pass, events), and msgspec decoding alone for reference.

``decode`` times ``ReadingDecoder.decode`` alone (bytes → validated feature matrix, batch
1024, the 38-sensor readings) as CPU µs per reading, interleaved, in one process, beside the
``worker/decode.py`` of each ``--baseline`` git revision (loaded from ``git show``), so a
before/after comparison shares one machine state. It needs no model (``--registry`` unused).
``--instructions`` also counts instructions per reading of each variant under valgrind
(``decode-loop`` is the loop it counts): a figure the machine's load does not move.

Both at batch 64 and 1024, on one thread (numpy/BLAS and TensorFlow pinned to 1 thread, so
"per core" means per core), as readings per CPU-second (median, min, max of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

SENSORS = 38
DEVICES = 200
ANOMALY_FRACTION = 0.01
SEED = 11


def say(msg: str) -> None:
    print(f"    {msg}", file=sys.stderr, flush=True)


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def build_model(registry: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Fit and save the benchmark detector; returns (detector, keras model, scaler, info)."""
    import keras
    import tensorflow as tf
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import MinMaxScaler

    from detector import DenseNetwork, Detector, ModelInfo, Preprocessor, Registry, fit_threshold
    from detector.artifact import fingerprint
    from simulator.fleet import FleetSpec, feature_names, normal_matrix

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(SEED)
    spec = FleetSpec(devices=DEVICES, sensors=SENSORS, seed=SEED)
    names = feature_names(spec)
    x = normal_matrix(spec, 80_000)
    x_fit, x_hold = x[:60_000], x[60_000:]
    imp = SimpleImputer(strategy="mean").fit(x_fit)
    scaler = MinMaxScaler().fit(imp.transform(x_fit))
    pre = Preprocessor.from_sklearn(imp, scaler)
    z = pre.transform(x_fit)
    model = keras.Sequential(
        [
            keras.Input((SENSORS,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(SENSORS, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    t0 = time.perf_counter()
    hist = model.fit(z, z, epochs=6, batch_size=256, verbose=0, validation_split=0.1)
    fit_s = time.perf_counter() - t0
    net = DenseNetwork.from_keras(model)
    provisional = Detector(
        feature_names=tuple(names),
        preprocessor=pre,
        network=net,
        threshold=fit_threshold([1.0, 2.0]),
        feature_error_mean=np.zeros(SENSORS),
        feature_error_std=np.ones(SENSORS),
        info=ModelInfo(name="sensors"),
    )
    hold = provisional.score(x_hold)
    fe = hold.feature_error.astype(np.float64)
    det = Detector(
        feature_names=tuple(names),
        preprocessor=pre,
        network=net,
        threshold=fit_threshold(hold.score, "mean_k_std", 3.0),
        feature_error_mean=fe.mean(axis=0),
        feature_error_std=fe.std(axis=0),
        info=ModelInfo(
            name="sensors",
            trained_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            training_fingerprint=fingerprint(x_fit),
        ),
    )
    # The numpy forward pass must match Keras (the worker never imports TensorFlow).
    probe = pre.transform(x_hold[:2048])
    keras_out = model.predict(probe, verbose=0, batch_size=2048)
    diff = float(np.max(np.abs(keras_out - net.forward(probe))))
    if diff > 1e-5:
        raise SystemExit(f"numpy forward pass differs from Keras by {diff}")
    path = Registry(registry).save(det, keras_model=model)
    info = {
        "architecture": "38 → 32 → 16 → 8 → 16 → 32 → 38 (relu, sigmoid output), MinMaxScaler",
        "training_rows": len(x_fit),
        "epochs": 6,
        "fit_seconds": round(fit_s, 2),
        "val_loss": float(hist.history["val_loss"][-1]),
        "threshold": det.threshold.value,
        "holdout_exceed_rate": float(np.mean(hold.score > det.threshold.value)),
        "keras_vs_numpy_max_abs_diff": diff,
        "artifact": str(path),
    }
    return det, model, scaler, info


def stream_start_ms(n_per_device: int) -> int:
    """A recent start time on a 7-hour grid: every periodic part of the simulated signal
    (periods 150, 420, 900, 3600 s) starts at the same phase, so every run scores the same
    readings (the same events) while the worker still accepts their timestamps."""
    grid = 7 * 3_600_000
    return (int(time.time() * 1000) - (n_per_device + 600) * 1000) // grid * grid


def readings(n_per_device: int) -> tuple[list[bytes], list[bytes]]:
    """Keys and JSON values of a simulated stream (1 % injected anomalies)."""
    from simulator.fleet import FleetSpec, stream

    start = stream_start_ms(n_per_device)
    spec = FleetSpec(devices=DEVICES, sensors=SENSORS, seed=SEED, start_ms=start)
    rs = list(stream(spec, n_per_device, anomaly_fraction=ANOMALY_FRACTION))
    return [r.key() for r in rs], [r.to_json() for r in rs]


def timed(
    step: Callable[[list[Any]], int], batches: list[list[Any]], min_seconds: float
) -> tuple[float, float, int, int]:
    """Run ``step`` over ``batches`` (cycling) for at least ``min_seconds`` of CPU time.

    Returns (readings per CPU-second, readings per wall-second, readings, outputs).
    """
    n = out = 0
    c0, w0 = time.process_time(), time.perf_counter()
    i = 0
    while True:
        b = batches[i % len(batches)]
        out += step(b)
        n += len(b)
        i += 1
        cpu = time.process_time() - c0
        if cpu >= min_seconds and i >= 3:
            break
    wall = time.perf_counter() - w0
    return n / cpu, n / wall, n, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["build", "worker", "decode", "decode-loop"])
    p.add_argument("--registry", type=Path)
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="GITREF",
        help="decode mode: also time worker/decode.py as of this git revision",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="decode mode: also count instructions per reading under valgrind (load-independent)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per repeat")
    args = p.parse_args()
    t0 = time.perf_counter()
    with threadpool_limits(1):
        if args.mode == "decode-loop":  # the loop --instructions counts (internal)
            decode_loop(args.baseline[0] if args.baseline else None, args.repeats)
            return 0
        if args.mode == "decode":
            result = decode_paths(args.baseline, max(args.repeats, 3), args.seconds)
            if args.instructions:
                result["instructions_per_reading"] = decode_instructions(args.baseline)
        elif args.mode == "build":
            det, model, scaler, model_info = build_model(args.registry)
            say(
                f"model fitted in {model_info['fit_seconds']:.1f} s, saved "
                f"{model_info['artifact']} (Keras vs numpy max |diff| "
                f"{model_info['keras_vs_numpy_max_abs_diff']:.1e})"
            )
            result: dict[str, Any] = {"model": model_info}
            if args.repeats > 0:
                result |= tutorial_paths(det, model, scaler, args.repeats, args.seconds)
        else:
            from detector import Registry, load

            if args.registry is None:
                p.error("--registry is required for build and worker")
            reg = Registry(args.registry)
            det = load(reg.current_path("sensors"))
            result = worker_paths(det, args.repeats, args.seconds)
            result["blas"] = [
                {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for i in threadpool_info()
            ]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


def _records() -> tuple[list[Any], list[bytes]]:
    from worker.records import SimpleRecord

    keys, values = readings(320)  # 64,000 distinct readings, ~48 MB of JSON
    records = [
        SimpleRecord("sensor-readings", 0, i, k, v, [])
        for i, (k, v) in enumerate(zip(keys, values, strict=True))
    ]
    return records, values


def worker_paths(det: Any, repeats: int, seconds: float) -> dict[str, Any]:
    import msgspec

    from worker.config import EventSettings, ReadingSettings
    from worker.decode import ReadingDecoder
    from worker.pipeline import Scorer

    records, values = _records()
    out: dict[str, Any] = {
        "readings": len(records),
        "mean_reading_bytes": round(float(np.mean([len(v) for v in values])), 1),
    }

    def fast_path(batch_size: int) -> dict[str, Any]:
        scorer = Scorer(det, ReadingSettings(), EventSettings())
        batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
        dead = [0]

        def step(b: list[Any]) -> int:
            r = scorer.process(b)
            dead[0] += len(r.dead_letters)
            return len(r.events)

        step(batches[0])  # warm caches
        cpu, wall, outs = [], [], []
        for _ in range(repeats):
            c, w, n, o = timed(step, batches, seconds)
            cpu.append(c)
            wall.append(w)
            outs.append(o / n)
        return {
            "per_cpu_second": summary(cpu),
            "per_wall_second": summary(wall),
            "event_fraction": statistics.median(outs),
            "dead_letters": dead[0],
        }

    def decode_only() -> dict[str, Any]:
        dec = ReadingDecoder(list(det.feature_names), ReadingSettings())._decoder.decode
        plain = msgspec.json.Decoder().decode
        batches = [values[i : i + 1024] for i in range(0, len(values), 1024)]
        typed = [timed(lambda b: len([dec(v) for v in b]), batches, seconds)[0] for _ in range(3)]
        untyped = [
            timed(lambda b: len([plain(v) for v in b]), batches, seconds)[0] for _ in range(3)
        ]
        return {"msgspec_typed": summary(typed), "msgspec_untyped": summary(untyped)}

    for b in (64, 1024):
        say(f"worker scoring path, batch {b} ...")
        out[f"worker_batch_{b}"] = r = fast_path(b)
        say(f"  {r['per_cpu_second']['median']:,.0f} readings/s per core")
    say("msgspec decode alone (reference) ...")
    out["decode_only_batch_1024"] = decode_only()
    return out


def _decoder_at(ref: str) -> Any:
    """``ReadingDecoder`` from ``worker/decode.py`` as of git revision ``ref``."""
    import subprocess
    import types

    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{ref}:worker/decode.py"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    mod = types.ModuleType(f"decode_at_{ref}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"{ref}:worker/decode.py", "exec"), mod.__dict__)
    return mod.ReadingDecoder


def decode_paths(baselines: list[str], repeats: int, seconds: float) -> dict[str, Any]:
    """CPU µs per reading of ReadingDecoder.decode, current tree vs each baseline revision.

    Interleaved: every repeat times each variant once, in turn, so drifting machine load
    hits all of them alike. Each variant must decode every reading (no failures).
    """
    import msgspec

    from worker.config import ReadingSettings
    from worker.decode import ReadingDecoder

    _, values = _records()
    batches = [values[i : i + 1024] for i in range(0, len(values), 1024)]
    from simulator.fleet import FleetSpec, feature_names

    names = feature_names(FleetSpec(devices=DEVICES, sensors=SENSORS, seed=SEED))
    variants: dict[str, Any] = {"current": ReadingDecoder(names, ReadingSettings())}
    for ref in baselines:
        variants[ref] = _decoder_at(ref)(names, ReadingSettings())
    typed = variants["current"]._fast_decoder.decode
    # The same reading type with the features object skipped (msgspec.Raw): what parsing
    # costs without one Python float per value, a floor for any path still built on msgspec.
    skipped = msgspec.json.Decoder(
        msgspec.defstruct(
            "Skipped",
            [("device", str), ("ts", int | str), ("values", msgspec.Raw)],
            rename={"device": "device_id", "ts": "timestamp"},
            gc=False,
        )
    ).decode
    for name, dec in variants.items():
        got = dec.decode(batches[0])
        if got.failures or len(got.index) != len(batches[0]):
            raise SystemExit(f"decoder {name} refused readings: {got.failures[:1]}")

    def one(fn: Callable[[list[bytes]], Any]) -> float:
        def step(b: list[bytes]) -> int:
            fn(b)
            return 0

        return 1e6 / timed(step, batches, seconds)[0]

    parse, skip = "msgspec typed parse only", "msgspec, features skipped"
    cols: dict[str, list[float]] = {k: [] for k in [*variants, parse, skip]}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for name, dec in variants.items():
            cols[name].append(one(dec.decode))
        cols[parse].append(one(lambda b: list(map(typed, b))))
        cols[skip].append(one(lambda b: list(map(skipped, b))))
    load_after = os.getloadavg()
    # Paired: each repeat's ratio to the current tree, so load drifts between repeats cancel.
    paired = {k: [b / a for a, b in zip(cols["current"], v, strict=True)] for k, v in cols.items()}
    say(
        f"decode, CPU µs per reading, {repeats} interleaved repeats (median, min-max; paired "
        f"ratio to current: median, min-max); load {load_before[0]:.1f} -> {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs:"
    )
    for k, v in cols.items():
        r = paired[k]
        say(
            f"  {k:28s} {statistics.median(v):.2f}  ({min(v):.2f}-{max(v):.2f})  "
            f"x{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"
        )
    return {
        "decode_us_per_reading": {k: summary(v) for k, v in cols.items()},
        "paired_ratio_to_current": {k: summary(v) for k, v in paired.items()},
        "loadavg_1min": {"before": load_before[0], "after": load_after[0]},
        "cpus": os.cpu_count(),
        "readings": len(values),
        "batch": 1024,
        "msgspec": msgspec.__version__,
    }


def decode_loop(ref: str | None, passes: int) -> None:
    """Decode 8,000 readings ``passes`` times with ``worker/decode.py`` of ``ref`` (None =
    the tree): the workload ``decode_instructions`` counts."""
    from simulator.fleet import FleetSpec, feature_names
    from worker.config import ReadingSettings
    from worker.decode import ReadingDecoder

    names = feature_names(FleetSpec(devices=DEVICES, sensors=SENSORS, seed=SEED))
    dec = (ReadingDecoder if ref is None else _decoder_at(ref))(names, ReadingSettings())
    _, values = readings(40)
    batches = [values[i : i + 1024] for i in range(0, len(values), 1024)]
    if dec.decode(batches[0]).failures:
        raise SystemExit("the decoder refused readings")
    for _ in range(passes):
        for b in batches:
            dec.decode(b)


def decode_instructions(baselines: list[str]) -> dict[str, float]:
    """Instructions per reading of ``ReadingDecoder.decode``, current tree and baselines.

    Counted by valgrind (cachegrind without cache simulation) over the same 8,000 readings:
    the count of a 4-pass run minus a 1-pass run, over 3 x 8,000, so start-up, imports and
    corpus generation cancel. Unlike CPU time it does not move with the machine's load
    (cache misses are not counted: a proxy for CPU work, not a time).
    """
    import re
    import shutil
    import subprocess

    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    out: dict[str, float] = {}
    for ref in [None, *baselines]:
        counts = []
        for passes in (1, 4):
            cmd = [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                "--cachegrind-out-file=/dev/null",
                sys.executable,
                str(Path(__file__).resolve()),
                "decode-loop",
                "--out",
                "/dev/null",
                "--repeats",
                str(passes),
                *(["--baseline", ref] if ref else []),
            ]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            m = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
            if m is None:
                raise SystemExit(f"no instruction count in valgrind's output: {run.stderr[-500:]}")
            counts.append(int(m.group(1).replace(",", "")))
        name = ref or "current"
        out[name] = (counts[1] - counts[0]) / (3 * 8000)
        say(f"  {name:28s} {out[name]:,.0f} instructions per reading (valgrind)")
    return out


def tutorial_paths(
    det: Any, model: Any, scaler: Any, repeats: int, seconds: float
) -> dict[str, Any]:
    _, values = _records()
    names = list(det.feature_names)
    thr = det.threshold.value
    out: dict[str, Any] = {}

    def tutorial_path(batch_size: int) -> dict[str, Any]:
        batches = [values[i : i + batch_size] for i in range(0, len(values), batch_size)]

        def step(b: list[bytes]) -> int:
            docs = [json.loads(v) for v in b]
            x = np.array([[d["values"][f] for f in names] for d in docs], dtype=np.float32)
            z = scaler.transform(x)
            recon = model.predict(z, verbose=0)
            err = np.mean((z - recon) ** 2, axis=1)
            events = [
                json.dumps(
                    {"device_id": d["device_id"], "timestamp": d["timestamp"], "score": float(e)}
                ).encode()
                for d, e in zip(docs, err, strict=True)
                if e > thr
            ]
            return len(events)

        step(batches[0])  # builds Keras' predict function once
        cpu, wall, outs = [], [], []
        for _ in range(max(2, repeats // 2)):
            c, w, n, o = timed(step, batches, seconds)
            cpu.append(c)
            wall.append(w)
            outs.append(o / n)
        return {
            "per_cpu_second": summary(cpu),
            "per_wall_second": summary(wall),
            "event_fraction": statistics.median(outs),
        }

    for b in (64, 1024):
        say(f"tutorial path (json + sklearn + Keras predict), batch {b} ...")
        out[f"tutorial_batch_{b}"] = r = tutorial_path(b)
        say(f"  {r['per_cpu_second']['median']:,.0f} readings/s per core")
    return out


if __name__ == "__main__":
    sys.exit(main())
