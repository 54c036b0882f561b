"""Peer implementations for ``scripts/bench_peers.py``: the same scoring, other frameworks.

* :mod:`peers.scoring`: the model (the ``Detector`` the bench trained) and one event per
  anomalous reading, shared by both peers so their events match the worker's;
* :mod:`peers.quix_app`: an idiomatic quixstreams app, run in its own venv;
* :mod:`peers.ck_batch`: a minimal hand-written confluent-kafka batch worker.
"""
