"""Kafka client adapters. The loop's delivery contract lives in :mod:`worker.loop`; what is
specific to one client library (construction, bounded transactional calls, the admin API)
lives here, one module per library."""
