"""Chaos suite for the Kafka worker (issue 9): faults on a private broker, checked by an oracle.

Pieces, one module each:

- :mod:`tests.chaos.inputs`   seeded input: simulator readings (ground truth of injected extreme
  anomalies) plus a seeded set of bad records, each assigned a partition up front;
- :mod:`tests.chaos.oracle`   the expected outputs, computed offline from the records actually in
  the input topic with the worker's own :class:`worker.pipeline.Scorer`;
- :mod:`tests.chaos.broker`   a private single-node Kafka broker (own ports, own data dir) that the
  suite may SIGTERM, SIGKILL, SIGSTOP and restart;
- :mod:`tests.chaos.procs`    worker subprocesses under a small supervisor (restart after an
  unexpected exit, as an orchestrator would), signalled only by their own PIDs;
- :mod:`tests.chaos.verify`   an independent reader (confluent-kafka, ``read_committed``) that
  counts lost / duplicated / unexpected events and dead letters, committed offsets vs log end and
  hanging transactions;
- :mod:`tests.chaos.scenarios` the fault schedules and the driver that runs one scenario.

Every process the suite signals is one it started (its ``Popen`` object), never by name.
"""
