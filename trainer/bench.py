"""Training-time benchmark: the whole ``anomaly-train`` pipeline against a plain Keras ``fit``.

    python -m trainer.bench [--rows 100000] [--features 38] [--epochs 10]

Both train the same architecture on the same rows with the same batch size, train/validation
sizes and epoch count (early stopping cannot trigger: patience > epochs). Runs, in one
process, in this order (op determinism cannot be switched off once on, so it comes last):

1. plain Keras: numpy min-max scaling + ``model.fit`` on in-memory arrays;
2. the pipeline with ``model.deterministic: false``;
3. the pipeline as configured by default (``deterministic: true``);
4. plain Keras again, now with op determinism on (the fair baseline for run 3).

Each pipeline run is compared with the plain fit of the same determinism setting, so the
ratio measures our overhead, not TensorFlow's deterministic kernels or machine noise.

The pipeline numbers include reading the CSV, the holdout threshold, evaluation, the report
(plots) and the atomic save. Prints a markdown table; docs/trainer.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _plain_keras(x: np.ndarray, epochs: int, batch: int, seed: int, det: bool) -> float:
    from trainer.config import ModelConfig
    from trainer.model import build_autoencoder, seed_everything

    n = len(x)
    n_val = round(n * 0.15)
    n_train = n - 2 * n_val
    lo, hi = x[:n_train].min(axis=0), x[:n_train].max(axis=0)
    z = ((x - lo) / (hi - lo)).astype(np.float32)
    hp = ModelConfig(hidden=(32, 16), code_size=8, epochs=epochs, batch_size=batch, seed=seed)
    seed_everything(seed, deterministic=det)
    model = build_autoencoder(x.shape[1], hp, "sigmoid")
    t0 = time.perf_counter()
    model.fit(
        z[:n_train],
        z[:n_train],
        validation_data=(z[n_train : n_train + n_val], z[n_train : n_train + n_val]),
        epochs=epochs,
        batch_size=batch,
        shuffle=True,
        verbose=0,
    )
    return time.perf_counter() - t0


def _pipeline(
    csv: Path, registry: Path, epochs: int, batch: int, deterministic: bool
) -> dict[str, Any]:
    from trainer.config import from_mapping
    from trainer.pipeline import train

    cfg = from_mapping(
        {
            "name": "bench",
            "registry": str(registry),
            "data": {"path": str(csv)},
            "model": {
                "epochs": epochs,
                "batch_size": batch,
                "patience": epochs + 1,
                "deterministic": deterministic,
            },
        }
    )
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    return {"wall": wall, "fit": res.history.seconds, "timings": res.metrics["timings_s"]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table (seconds)."""
    p = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--features", type=int, default=38)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)

    from simulator.fleet import FleetSpec, normal_matrix, write_normal_csv

    spec = FleetSpec(devices=8, sensors=args.features, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "normal.csv"
        t0 = time.perf_counter()
        write_normal_csv(csv, spec, args.rows)
        x = normal_matrix(spec, args.rows)
        gen = time.perf_counter() - t0
        print(
            f"data: {args.rows} x {args.features} "
            f"({csv.stat().st_size / 1e6:.1f} MB CSV, {gen:.1f} s)",
            file=sys.stderr,
        )
        plain = _plain_keras(x, args.epochs, args.batch_size, seed=42, det=False)
        print(f"plain keras fit: {plain:.2f} s", file=sys.stderr)
        fast = _pipeline(csv, Path(tmp) / "reg", args.epochs, args.batch_size, deterministic=False)
        print(f"pipeline (non-deterministic): {fast['wall']:.2f} s", file=sys.stderr)
        det = _pipeline(csv, Path(tmp) / "reg", args.epochs, args.batch_size, deterministic=True)
        print(f"pipeline (deterministic): {det['wall']:.2f} s", file=sys.stderr)
        plain_det = _plain_keras(x, args.epochs, args.batch_size, seed=42, det=True)
        print(f"plain keras fit (deterministic): {plain_det:.2f} s", file=sys.stderr)

    rows = [
        ("plain Keras `model.fit`, arrays in memory", plain, plain, plain),
        ("`anomaly-train` pipeline, deterministic: false", fast["wall"], fast["fit"], plain),
        ("plain Keras `model.fit`, op determinism on", plain_det, plain_det, plain_det),
        (
            "`anomaly-train` pipeline, deterministic: true (default)",
            det["wall"],
            det["fit"],
            plain_det,
        ),
    ]
    print(
        f"\n{args.rows} rows x {args.features} features, {args.epochs} epochs, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs\n"
    )
    print("| run | total s | of which Keras fit s | total / plain fit |")
    print("|---|---|---|---|")
    for name, wall, fit, base in rows:
        print(f"| {name} | {wall:.2f} | {fit:.2f} | {wall / base:.2f} |")
    print("\nPipeline stages (deterministic run), seconds:\n")
    t = det["timings"]
    print("| " + " | ".join(t) + " |")
    print("|" + "---|" * len(t))
    print("| " + " | ".join(f"{v:.2f}" for v in t.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
