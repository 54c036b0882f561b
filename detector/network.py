"""A dense autoencoder's forward pass in plain numpy.

The worker scores with this instead of Keras: it needs no TensorFlow import (2-3 s and
~500 MB saved at start-up) and avoids Keras ``predict``'s per-call input pipeline, which
caps a streaming scorer at ~13k readings/s (GUIDE §6). ``tests/unit/test_detector_network.py``
checks it against the Keras model to 1e-5.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detector.errors import ArtifactError

F32 = npt.NDArray[np.float32]


def _relu(x: F32) -> F32:
    return np.maximum(x, 0.0, out=x)


def _sigmoid(x: F32) -> F32:
    # Numerically stable: exp of a non-positive number only, e = exp(-|x|):
    # 1 / (1 + e) for x >= 0, e / (1 + e) below. Whole-array operations; boolean-mask
    # indexing was 8x slower for a batch of 1024 readings.
    e = np.exp(-np.abs(x))
    d = 1.0 + e
    return np.where(x >= 0, 1.0 / d, e / d)


def _elu(x: F32) -> F32:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))).astype(np.float32)


def _linear(x: F32) -> F32:
    return x


ACTIVATIONS: Mapping[str, Callable[[F32], F32]] = {
    "relu": _relu,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "elu": _elu,
    "linear": _linear,
}


def _forward(h: F32, layers: tuple[DenseLayer, ...], block: int) -> F32:
    """Layer by layer; each product in row blocks of at most ``block`` rows."""
    n = len(h) if h.ndim == 2 else 0
    for layer in layers:
        if layer.steps != 1:
            # Per-step layer: the same kernel on each of the row's `steps` blocks.
            s = layer.steps
            flat = _forward(h.reshape(n * s, -1), (layer.unstepped,), block)
            h = flat.reshape(n, -1)
            continue
        if n > block:
            out = np.empty((n, layer.kernel.shape[1]), dtype=np.float32)
            for i in range(0, n, block):
                np.matmul(h[i : i + block], layer.kernel, out=out[i : i + block])
        else:
            out = h @ layer.kernel  # a new array: the in-place steps never touch the input
        out += layer.bias
        h = ACTIVATIONS[layer.activation](out)
    return h


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """``activation(x @ kernel + bias)``; kernel is (inputs, units) float32.

    With ``steps > 1`` (windowed models) a row holds ``steps`` blocks of ``inputs`` values
    (one per reading of the window, oldest first) and the same kernel maps each block to
    ``units`` values: Keras' ``Dense`` on a (steps, inputs) input, flattened row-major.
    """

    kernel: F32
    bias: F32
    activation: str
    steps: int = 1

    @property
    def n_in(self) -> int:
        return int(self.kernel.shape[0]) * self.steps

    @property
    def n_out(self) -> int:
        return int(self.kernel.shape[1]) * self.steps

    @property
    def unstepped(self) -> DenseLayer:
        return DenseLayer(self.kernel, self.bias, self.activation)

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ArtifactError(f"dense layer steps must be >= 1, got {self.steps!r}; re-train")
        if self.activation not in ACTIVATIONS:
            raise ArtifactError(
                f"activation {self.activation!r} is not supported by the numpy scorer; "
                f"use one of {sorted(ACTIVATIONS)}"
            )
        if self.kernel.ndim != 2 or self.bias.shape != (self.kernel.shape[1],):
            raise ArtifactError("dense layer kernel/bias shapes do not match; re-train")


# OpenBLAS computes a matrix product on the calling thread while m·n·k stays at or below
# 65,536 × GEMM_MULTITHREAD_THRESHOLD (4); above, it hands the product to its thread pool.
# For layers this small that costs more than it saves, and the pool's threads busy-wait
# between batches, taking a core from the Kafka client and the broker (measured: 1024 rows
# × 38 → 32 took 94 µs threaded vs 30 µs on one thread, and the worker used 55 µs of CPU
# per reading instead of 20). So :meth:`DenseNetwork.forward` feeds BLAS row blocks small
# enough to stay single-threaded; rows are independent, so the result equals one product
# per layer up to float32 rounding (at most 1 ulp here).
_SINGLE_THREAD_GEMM_WORK = 65_536 * 4


@dataclass(frozen=True, eq=False)
class DenseNetwork:
    """A stack of dense layers; the code (bottleneck) layer index is recorded for projections."""

    layers: tuple[DenseLayer, ...]
    code_layer: int

    def __post_init__(self) -> None:
        widest = max((lay.kernel.shape[0] * lay.kernel.shape[1] for lay in self.layers), default=1)
        # (Per-step layers multiply their rows by `steps`; their kernels are small anyway.)
        object.__setattr__(self, "_block_rows", max(16, _SINGLE_THREAD_GEMM_WORK // max(1, widest)))

    @property
    def n_inputs(self) -> int:
        return self.layers[0].n_in

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].n_out

    def forward(self, x: F32, upto: int | None = None) -> F32:
        """Run rows ``x`` (n, n_inputs) float32 through layers ``[0, upto)``; all by default."""
        h = np.asarray(x, dtype=np.float32)
        layers = self.layers[: len(self.layers) if upto is None else upto]
        return _forward(h, layers, self._block_rows)  # type: ignore[attr-defined]

    def encode(self, x: F32) -> F32:
        """The bottleneck code of each row (for latent-space plots)."""
        return self.forward(x, upto=self.code_layer + 1)

    def to_arrays(self) -> tuple[dict[str, F32], dict[str, Any]]:
        """Arrays for ``np.savez`` and a JSON-able description of the architecture."""
        arrays: dict[str, F32] = {}
        for i, layer in enumerate(self.layers):
            arrays[f"kernel_{i}"] = layer.kernel
            arrays[f"bias_{i}"] = layer.bias
        meta: dict[str, Any] = {
            "activations": [layer.activation for layer in self.layers],
            "code_layer": self.code_layer,
        }
        if any(layer.steps != 1 for layer in self.layers):
            meta["steps"] = [layer.steps for layer in self.layers]
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> DenseNetwork:
        try:
            acts = list(meta["activations"])
            steps = [int(v) for v in meta.get("steps", [1] * len(acts))]
            if len(steps) != len(acts):
                raise ArtifactError("network steps and activations disagree; re-train")
            layers = tuple(
                DenseLayer(
                    kernel=np.asarray(arrays[f"kernel_{i}"], dtype=np.float32),
                    bias=np.asarray(arrays[f"bias_{i}"], dtype=np.float32),
                    activation=str(a),
                    steps=steps[i],
                )
                for i, a in enumerate(acts)
            )
            net = cls(layers=layers, code_layer=int(meta["code_layer"]))
        except KeyError as e:
            raise ArtifactError(f"network weights lack {e.args[0]!r}; re-train") from None
        for a, b in itertools.pairwise(layers):
            if a.n_out != b.n_in:
                raise ArtifactError("network layer sizes do not chain; re-train")
        return net

    @classmethod
    def from_keras(cls, model: Any) -> DenseNetwork:
        """Extract the Dense layers of a Keras model (Dropout/Input/Reshape/Flatten skipped).

        A Dense layer applied to a (steps, features) input becomes a per-step layer;
        Reshape/Flatten between them are row-major no-ops on the flattened rows. The code
        layer is the Dense layer with the narrowest total output.
        """
        layers: list[DenseLayer] = []
        for layer in model.layers:
            if type(layer).__name__ != "Dense":
                continue
            kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
            act = layer.get_config()["activation"]
            if not isinstance(act, str):
                raise ArtifactError(f"layer {layer.name} uses a non-builtin activation")
            shape = tuple(layer.input.shape)
            steps = int(shape[1]) if len(shape) == 3 else 1
            layers.append(DenseLayer(kernel=kernel, bias=bias, activation=act, steps=steps))
        if not layers:
            raise ArtifactError("the Keras model has no Dense layers")
        widths = [lay.n_out for lay in layers[:-1]] or [layers[0].n_out]
        return cls(layers=tuple(layers), code_layer=int(np.argmin(widths)))
