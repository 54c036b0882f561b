"""An autoencoder's forward pass in plain numpy: dense and 1-D convolutional layers.

The worker scores with this instead of Keras: it needs no TensorFlow import (2-3 s and
~500 MB saved at start-up) and avoids Keras ``predict``'s per-call input pipeline, which
caps a streaming scorer at ~13k readings/s (GUIDE §6). ``tests/unit/test_detector_network.py``
checks it against the Keras model to 1e-5 (``tests/unit/test_detector_conv.py`` the
``Conv1D`` / ``Conv1DTranspose`` layers of ``model.architecture: conv1d``).

Every layer maps flattened rows to flattened rows: a convolutional layer reads a row as
``(length, channels)`` row-major (a window of readings, oldest first), as Keras'
``Reshape``/``Flatten`` around the convolutions do, so the network chains dense and
convolutional layers over the same ``(n, values)`` arrays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

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


def _forward(h: F32, layers: tuple[Layer, ...], block: int) -> F32:
    """Layer by layer; each product in row blocks of at most ``block`` rows."""
    n = len(h) if h.ndim == 2 else 0
    for layer in layers:
        if isinstance(layer, Conv1DLayer):
            h = layer.apply(h)
            continue
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
# float32 values of scratch per chunk of windows in a convolution (256 KiB).
_CHUNK_VALUES = 65_536


Padding = Literal["same", "valid"]


def conv_output_length(length: int, kernel: int, stride: int, padding: str, transpose: bool) -> int:
    """Time steps out of a Keras ``Conv1D`` (or ``Conv1DTranspose``, no output padding)."""
    if transpose:
        return length * stride + (max(kernel - stride, 0) if padding == "valid" else 0)
    if padding == "valid":
        return (length - kernel) // stride + 1
    return -(-length // stride)


@dataclass(frozen=True, eq=False)
class Conv1DLayer:
    """A Keras ``Conv1D`` or ``Conv1DTranspose`` (channels last, dilation 1, one group).

    Rows are flattened ``(length, c_in)`` inputs; the output rows flattened
    ``(out_length, c_out)``. ``kernel`` is (k, c_in, c_out) for both kinds (Keras stores a
    transposed convolution's kernel as (k, c_out, c_in); :meth:`DenseNetwork.from_keras`
    swaps it). Padding and cropping follow TensorFlow's: ``same`` pads (or, transposed,
    crops) ``total // 2`` steps on the left and the rest on the right.

    Cost: one matrix product per layer and chunk of windows (im2col: each output step's
    receptive field gathered into one row; transposed: one product then an overlap-add of
    the ``k`` taps), fed to BLAS in row blocks under the single-threaded OpenBLAS size (see
    ``_SINGLE_THREAD_GEMM_WORK``).
    """

    kernel: F32
    bias: F32
    activation: str
    length: int
    stride: int = 1
    padding: Padding = "same"
    transpose: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ArtifactError(
                f"activation {self.activation!r} is not supported by the numpy scorer; "
                f"use one of {sorted(ACTIVATIONS)}"
            )
        if self.kernel.ndim != 3 or self.bias.shape != (self.kernel.shape[2],):
            raise ArtifactError("convolution kernel/bias shapes do not match; re-train")
        if self.padding not in ("same", "valid"):
            raise ArtifactError(f"convolution padding {self.padding!r} is not same/valid")
        if not (isinstance(self.length, int) and self.length >= 1 and self.stride >= 1):
            raise ArtifactError("convolution length and stride must be >= 1; re-train")
        k, c_in, c_out = (int(v) for v in self.kernel.shape)
        lo = conv_output_length(self.length, k, self.stride, self.padding, self.transpose)
        if lo < 1:
            raise ArtifactError(f"convolution of {self.length} steps by kernel {k}: no output")
        s = self.stride
        if self.transpose:
            full = (self.length - 1) * s + k
            pad = max(full - lo, 0) if self.padding == "same" else 0
            # (c_in, k * c_out): one product gives every tap of every input step.
            mat = np.ascontiguousarray(self.kernel.transpose(1, 0, 2).reshape(c_in, k * c_out))
            idx = None
            gemm = c_in * k * c_out
            scratch = (self.length + 1) * k * c_out  # taps and overlap-add buffer
        else:
            full = self.length
            pad = max((lo - 1) * s + k - self.length, 0) if self.padding == "same" else 0
            mat = np.ascontiguousarray(self.kernel.reshape(k * c_in, c_out))
            # idx[o, j]: the padded input step tap j of output step o reads.
            idx = np.arange(lo)[:, None] * s + np.arange(k)[None, :]
            gemm = k * c_in * c_out
            scratch = lo * k * c_in  # the im2col rows
        object.__setattr__(self, "_out_len", lo)
        object.__setattr__(self, "_full", full)
        object.__setattr__(self, "_pad", pad)
        object.__setattr__(self, "_mat", mat)
        object.__setattr__(self, "_idx", idx)
        # Windows per chunk: the gathered/tap arrays of a chunk stay ~256 KiB (cache-sized);
        # inside a chunk, the product goes to BLAS in row blocks that stay on OpenBLAS's
        # single-threaded path (rows × K × N <= _SINGLE_THREAD_GEMM_WORK, at least 16 rows).
        # Measured (8 features, w 60): 2-window chunks with one product each cost 97 µs
        # per window, numpy's per-call overhead dominating; these 54 µs.
        object.__setattr__(self, "_block", max(1, _CHUNK_VALUES // max(1, scratch)))
        object.__setattr__(self, "_gemm_rows", max(16, _SINGLE_THREAD_GEMM_WORK // gemm))

    @property
    def out_length(self) -> int:
        return int(self._out_len)  # type: ignore[attr-defined]

    @property
    def n_in(self) -> int:
        return self.length * int(self.kernel.shape[1])

    @property
    def n_out(self) -> int:
        return self.out_length * int(self.kernel.shape[2])

    def apply(self, h: F32) -> F32:
        """``activation(conv(rows) + bias)`` for rows ``h`` (n, n_in) float32."""
        n = len(h)
        step: int = self._block  # type: ignore[attr-defined]
        if n <= step:
            return ACTIVATIONS[self.activation](self._block_apply(h))
        out = np.empty((n, self.n_out), dtype=np.float32)
        for i in range(0, n, step):
            out[i : i + step] = self._block_apply(h[i : i + step])
        return ACTIVATIONS[self.activation](out)

    def _matmul(self, a: F32, b: F32) -> F32:
        rows: int = self._gemm_rows  # type: ignore[attr-defined]
        m = len(a)
        if m <= rows:
            return a @ b
        out = np.empty((m, b.shape[1]), dtype=np.float32)
        for i in range(0, m, rows):
            np.matmul(a[i : i + rows], b, out=out[i : i + rows])
        return out

    def _block_apply(self, h: F32) -> F32:
        n = len(h)
        k, c_in, c_out = (int(v) for v in self.kernel.shape)
        lo: int = self._out_len  # type: ignore[attr-defined]
        pad: int = self._pad  # type: ignore[attr-defined]
        mat: F32 = self._mat  # type: ignore[attr-defined]
        x = h.reshape(n, self.length, c_in)
        if self.transpose:
            s, steps = self.stride, self.length
            full_len: int = self._full  # type: ignore[attr-defined]
            taps = self._matmul(x.reshape(n * steps, c_in), mat).reshape(n, steps, k, c_out)
            full = np.zeros((n, max(full_len, pad // 2 + lo), c_out), dtype=np.float32)
            span = (steps - 1) * s + 1
            for j in range(k):  # overlap-add (col2im): input step i, tap j -> i * s + j
                full[:, j : j + span : s] += taps[:, :, j]
            left = pad // 2
            y = full[:, left : left + lo]
            y += self.bias
            return y.reshape(n, lo * c_out)
        if pad:
            left = pad // 2
            xp = np.zeros((n, self.length + pad, c_in), dtype=np.float32)
            xp[:, left : left + self.length] = x
        else:
            xp = x
        idx: npt.NDArray[np.intp] = self._idx  # type: ignore[attr-defined]
        cols = xp[:, idx]  # (n, lo, k, c_in)
        y = self._matmul(cols.reshape(n * lo, k * c_in), mat)
        y += self.bias
        return y.reshape(n, lo * c_out)

    def describe(self) -> dict[str, Any]:
        """The layer's geometry for the artifact (its weights go to ``weights.npz``)."""
        return {
            "kind": "conv1d_transpose" if self.transpose else "conv1d",
            "length": self.length,
            "stride": self.stride,
            "padding": self.padding,
        }


Layer = DenseLayer | Conv1DLayer


@dataclass(frozen=True, eq=False)
class DenseNetwork:
    """A stack of dense (and 1-D convolutional) layers; the code (bottleneck) layer index is
    recorded for projections."""

    layers: tuple[Layer, ...]
    code_layer: int

    def __post_init__(self) -> None:
        widest = max(
            (
                lay.kernel.shape[0] * lay.kernel.shape[1]
                for lay in self.layers
                if isinstance(lay, DenseLayer)
            ),
            default=1,
        )
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
        steps = [layer.steps if isinstance(layer, DenseLayer) else 1 for layer in self.layers]
        if any(v != 1 for v in steps):
            meta["steps"] = steps
        if any(isinstance(layer, Conv1DLayer) for layer in self.layers):
            # Added for model.architecture conv1d; absent = every layer dense (older
            # artifacts). A reader without it refuses the 3-D kernels as malformed.
            meta["conv"] = [
                layer.describe() if isinstance(layer, Conv1DLayer) else None
                for layer in self.layers
            ]
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> DenseNetwork:
        try:
            acts = list(meta["activations"])
            steps = [int(v) for v in meta.get("steps", [1] * len(acts))]
            conv = list(meta.get("conv") or [None] * len(acts))
            if len(steps) != len(acts) or len(conv) != len(acts):
                raise ArtifactError("network steps and activations disagree; re-train")
            layers = tuple(
                _layer_from(
                    np.asarray(arrays[f"kernel_{i}"], dtype=np.float32),
                    np.asarray(arrays[f"bias_{i}"], dtype=np.float32),
                    str(a),
                    steps[i],
                    conv[i],
                )
                for i, a in enumerate(acts)
            )
            net = cls(layers=layers, code_layer=int(meta["code_layer"]))
        except KeyError as e:
            raise ArtifactError(f"network weights lack {e.args[0]!r}; re-train") from None
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"network description is malformed ({e}); re-train") from None
        for a, b in itertools.pairwise(layers):
            if a.n_out != b.n_in:
                raise ArtifactError("network layer sizes do not chain; re-train")
        return net

    @classmethod
    def from_keras(cls, model: Any) -> DenseNetwork:
        """Extract the Dense / Conv1D / Conv1DTranspose layers of a Keras model
        (Dropout/Input/Reshape/Flatten skipped).

        A Dense layer applied to a (steps, features) input becomes a per-step layer;
        Reshape/Flatten between them are row-major no-ops on the flattened rows. The code
        layer is the layer with the narrowest total output (the last layer excluded).
        """
        layers: list[Layer] = []
        for layer in model.layers:
            kind = type(layer).__name__
            if kind not in ("Dense", "Conv1D", "Conv1DTranspose"):
                continue
            weights = [np.asarray(w, dtype=np.float32) for w in layer.get_weights()]
            cfg = layer.get_config()
            act = cfg["activation"]
            if not isinstance(act, str):
                raise ArtifactError(f"layer {layer.name} uses a non-builtin activation")
            kernel = weights[0]
            bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[-1], np.float32)
            shape = tuple(layer.input.shape)
            if kind == "Dense":
                steps = int(shape[1]) if len(shape) == 3 else 1
                layers.append(DenseLayer(kernel=kernel, bias=bias, activation=act, steps=steps))
                continue
            if (
                cfg.get("data_format", "channels_last") != "channels_last"
                or tuple(cfg.get("dilation_rate", (1,))) != (1,)
                or int(cfg.get("groups", 1)) != 1
                or cfg.get("output_padding") is not None
                or str(cfg["padding"]) not in ("same", "valid")
            ):
                raise ArtifactError(
                    f"layer {layer.name}: only channels-last, undilated, ungrouped same/valid "
                    "convolutions without output padding are supported by the numpy scorer"
                )
            transpose = kind == "Conv1DTranspose"
            if transpose:  # Keras: (k, filters, inputs) -> (k, inputs, filters)
                kernel = np.ascontiguousarray(kernel.transpose(0, 2, 1))
                bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[2], np.float32)
            layers.append(
                Conv1DLayer(
                    kernel=kernel,
                    bias=bias,
                    activation=act,
                    length=int(shape[1]),
                    stride=int(cfg["strides"][0]),
                    padding=cfg["padding"],
                    transpose=transpose,
                )
            )
        if not layers:
            raise ArtifactError("the Keras model has no Dense or Conv1D layers")
        widths = [lay.n_out for lay in layers[:-1]] or [layers[0].n_out]
        return cls(layers=tuple(layers), code_layer=int(np.argmin(widths)))


def _layer_from(kernel: F32, bias: F32, activation: str, steps: int, conv: Any) -> Layer:
    """One layer from its arrays and its ``meta`` description (``conv`` None = dense)."""
    if conv is None:
        return DenseLayer(kernel=kernel, bias=bias, activation=activation, steps=steps)
    kind = conv["kind"]
    if kind not in ("conv1d", "conv1d_transpose"):
        raise ArtifactError(f"unknown layer kind {kind!r}; upgrade sensor-anomaly or re-train")
    padding = conv["padding"]
    if padding not in ("same", "valid"):
        raise ArtifactError(f"convolution padding {padding!r} is not same/valid; re-train")
    return Conv1DLayer(
        kernel=kernel,
        bias=bias,
        activation=activation,
        length=int(conv["length"]),
        stride=int(conv["stride"]),
        padding=padding,
        transpose=kind == "conv1d_transpose",
    )
