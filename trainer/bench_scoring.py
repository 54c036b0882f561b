"""CPU cost per reading of the detector's scoring modes (pure path, no Kafka, no JSON).

    python -m trainer.bench_scoring [--features 38] [--modes 1:0,10:auto,60:conv] [--batch 1024]

For each window ``w`` a detector with the trainer's auto architecture for ``w × features``
inputs (random weights: cost does not depend on their values) scores batches of readings
from 64 devices, the way the worker would: ``gather_windows`` (per-device history) +
``score_windows`` (or ``score`` for ``w = 1``); optional EWMA smoothing and the out-of-range
check are timed on their own. ``w:conv`` is the ``model.architecture: conv1d`` default
(SKAB's Conv-AE: Conv1D 32 → 16, kernel 7, stride 2, mirrored by Conv1DTranspose).
CPU seconds (``time.process_time``) per reading, best of ``--repeat`` rounds, in one
process, so the ratios are comparable.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the worker: single-threaded BLAS

import itertools

import numpy as np

from detector import DenseLayer, DenseNetwork, Detector, ModelInfo, Preprocessor
from detector.network import Conv1DLayer, Layer
from detector.smoothing import ewma_batch
from detector.threshold import fit_threshold
from detector.windows import gather_windows


def conv_layers(
    d: int, w: int, rng: np.random.Generator, filters: tuple[int, ...] = (32, 16), k: int = 7
) -> tuple[Conv1DLayer, ...]:
    """The conv1d default's layers for windows of ``w`` readings of ``d`` features."""
    out: list[Conv1DLayer] = []
    length, c = w, d
    plan = [(f, 2, False, "relu") for f in filters]
    plan += [(f, 2, True, "relu") for f in reversed(filters)] + [(d, 1, True, "linear")]
    for f, stride, transpose, act in plan:
        lay = Conv1DLayer(
            rng.normal(0, 0.3, (k, c, f)).astype(np.float32),
            rng.normal(0, 0.1, f).astype(np.float32),
            act,
            length=length,
            stride=stride,
            padding="same",
            transpose=transpose,
        )
        out.append(lay)
        length, c = lay.out_length, f
    return tuple(out)


def build(d: int, w: int, units: int = 0, seed: int = 0, conv: bool = False) -> Detector:
    """A detector of the trainer's default shape for windows of ``w`` readings of ``d``
    features (``units`` > 0: per-reading layers of that width first and last; ``conv``: the
    conv1d default); random weights.
    """
    from trainer.pipeline import auto_shape  # light: no TensorFlow import

    rng = np.random.default_rng(seed)
    if conv:
        return _detector(d, w, conv_layers(d, w, rng), 1, rng)
    per_step = w > 1 and units > 0
    hidden, code = auto_shape(w * (units if per_step else d))
    inner = [*hidden, code, *reversed(hidden)]
    if per_step:
        steps = [w] + [1] * (len(inner) + 1) + [w]
        # per-step layer kernels map one reading: d -> units, and units -> d at the end
        shapes = [(d, units), (w * units, inner[0])]
        shapes += [(a, b) for a, b in itertools.pairwise(inner)]
        shapes += [(inner[-1], w * units), (units, d)]
    else:
        widths = [w * d, *inner, w * d]
        steps = [1] * (len(widths) - 1)
        shapes = list(itertools.pairwise(widths))
    acts = ["relu"] * (len(shapes) - 1) + ["sigmoid"]
    layers: tuple[Layer, ...] = tuple(
        DenseLayer(
            rng.normal(0, 0.3, shape).astype(np.float32),
            rng.normal(0, 0.1, shape[1]).astype(np.float32),
            act,
            steps=st,
        )
        for shape, act, st in zip(shapes, acts, steps, strict=True)
    )
    return _detector(d, w, layers, len(hidden) + (1 if per_step else 0), rng)


def _detector(
    d: int, w: int, layers: tuple[Layer, ...], code: int, rng: np.random.Generator
) -> Detector:
    pre = Preprocessor("minmax", np.zeros(d), np.zeros(d), np.ones(d))
    return Detector(
        feature_names=tuple(f"s{i}" for i in range(d)),
        preprocessor=pre,
        network=DenseNetwork(layers, code_layer=code),
        threshold=fit_threshold(rng.gamma(2, 0.01, 100)),
        feature_error_mean=np.zeros(d),
        feature_error_std=np.ones(d),
        info=ModelInfo("bench"),
        window=w,
        train_min=np.zeros(d),
        train_max=np.ones(d),
    )


def _arch(layers: tuple[Layer, ...], n_out: int) -> str:
    parts = []
    for lay in layers:
        if isinstance(lay, Conv1DLayer):
            parts.append(f"{lay.length}×{lay.kernel.shape[1]}")
        elif lay.steps > 1:
            parts.append(f"{lay.steps}×{lay.kernel.shape[0]}")
        else:
            parts.append(str(lay.kernel.shape[0]))
    last = layers[-1]
    if isinstance(last, Conv1DLayer):
        parts.append(f"{last.out_length}×{last.kernel.shape[2]}")
    else:
        parts.append(str(n_out))
    return " → ".join(parts)


def cpu_per_reading(fn: Callable[[], object], readings: int, repeat: int, rounds: int) -> float:
    """Best-of-``repeat`` CPU seconds per reading of ``rounds`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(rounds):
            fn()
        best = min(best, (time.process_time() - t0) / (rounds * readings))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=38)
    p.add_argument(
        "--modes",
        default="1:0,5:0,10:0,5:auto,10:auto,20:auto,12:conv,60:conv",
        help="window:step_units pairs (0 = flattened dense, auto = the trainer's default, "
        "conv = the conv1d default)",
    )
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    d, n = a.features, a.batch
    rng = np.random.default_rng(1)
    x = rng.random((n, d)).astype(np.float32)
    devices = [f"dev-{i % a.devices}" for i in range(n)]
    base = None
    print(f"{d} features, batch {n}, {a.devices} devices; CPU µs per reading (best of {a.repeat})")
    print("| window | step units | architecture | score µs | + windows µs | total µs | × point |")
    print("|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        w_txt, u_txt = mode.split(":")
        w = int(w_txt)
        conv = u_txt == "conv"
        auto = max(2, min(8, round(d / 2)))
        units = 0 if conv or w == 1 else auto if u_txt == "auto" else int(u_txt)
        det = build(d, w, units, conv=conv)
        arch = _arch(det.network.layers, det.network.n_outputs)
        hist: dict[str, np.ndarray] = {}
        for _ in range(-(-w * a.devices // n)):  # enough batches for every device's window
            hist = gather_windows(hist, devices, x, w).history
        wb = gather_windows(hist, devices, x, w)
        assert len(wb.rows) == n, "every reading of the timed batch has a full window"
        if w == 1:
            score = cpu_per_reading(functools.partial(det.score, x), n, a.repeat, a.rounds)
            gather = 0.0
        else:
            run = functools.partial(det.score_windows, wb.windows)
            score = cpu_per_reading(run, n, a.repeat, a.rounds)
            fill = functools.partial(gather_windows, hist, devices, x, w)
            gather = cpu_per_reading(fill, n, a.repeat, a.rounds)
        total = score + gather
        base = base or total
        print(
            f"| {w} | {'conv' if conv else units} | {arch} "
            f"| {score * 1e6:.2f} | {gather * 1e6:.2f} | "
            f"{total * 1e6:.2f} | {total / base:.2f} |"
        )
    det = build(d, 1)
    s = det.score(x).score
    ew = cpu_per_reading(lambda: ewma_batch({}, devices, s, 0.1), n, a.repeat, a.rounds)
    oor = cpu_per_reading(lambda: det.out_of_range(x), n, a.repeat, a.rounds)
    print(f"\nEWMA smoothing (ewma_batch): {ew * 1e6:.2f} µs per reading")
    print(f"out-of-range check (out_of_range): {oor * 1e6:.2f} µs per reading")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
