"""The autoencoder's two halves: encoder (input → bottleneck code) and decoder (code → output).

A :class:`~detector.network.DenseNetwork` records its bottleneck as ``code_layer`` (the
index of the Dense layer whose output is the code). The encoder is layers ``[0, code_layer]``
and the decoder the layers after it, so ``decode(net, encode(net, z)) == net.forward(z)``
(the same float32 operations in the same order). Both work in *scaled* units; callers map
raw readings through the detector's preprocessor first and decoded rows back through its
``inverse_transform``. ``tests/unit/test_serve_halves.py`` checks both halves against the
Keras encoder and decoder to 1e-5.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detector.errors import ArtifactError
from detector.network import DenseNetwork

F32 = npt.NDArray[np.float32]


def code_width(net: DenseNetwork) -> int:
    """Width of the bottleneck code (units of the code layer)."""
    return int(net.layers[net.code_layer].kernel.shape[1])


def decoder(net: DenseNetwork) -> DenseNetwork:
    """The layers after the code layer as a network of their own (code → output).

    Raises:
        ArtifactError: the code layer is the last layer, so there is no decoder half.
    """
    tail = net.layers[net.code_layer + 1 :]
    if not tail:
        raise ArtifactError(
            "the network's code layer is its last layer, so it has no decoder half; re-train"
        )
    # code_layer is irrelevant for the tail (nobody encodes with it); 0 keeps it valid.
    return DenseNetwork(layers=tail, code_layer=0)


def encode(net: DenseNetwork, z: npt.ArrayLike) -> F32:
    """Bottleneck codes (n, code_width) of scaled rows ``z`` (n, n_inputs)."""
    return net.encode(np.asarray(z, dtype=np.float32))


def decode(net: DenseNetwork, code: npt.ArrayLike, tail: DenseNetwork | None = None) -> F32:
    """Scaled outputs (n, n_outputs) of codes ``code`` (n, code_width).

    ``tail``: a cached ``decoder(net)``, to skip rebuilding it per call.

    Raises:
        ValueError: ``code`` is not a 2-D array of ``code_width(net)`` columns.
    """
    c = np.asarray(code, dtype=np.float32)
    width = code_width(net)
    if c.ndim != 2 or c.shape[1] != width:
        raise ValueError(f"expected codes of shape (n, {width}), got {c.shape}")
    return (tail or decoder(net)).forward(c)
