"""``anomaly-train``: fits the dense-autoencoder detector that the worker loads.

Entry points: :func:`trainer.pipeline.train` (Python) and :func:`trainer.cli.main` (CLI).
See ``docs/trainer.md``.
"""
