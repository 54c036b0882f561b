"""``anomaly-serve``: the HTTP scoring API.

Usage::

    anomaly-serve [--config serve.yaml] [--model ARTIFACT_DIR] [run]
    anomaly-serve [--config serve.yaml] check-config      # validate config and models, print
    anomaly-serve openapi [--output schemas/openapi.json]   # the OpenAPI document
    anomaly-serve --version

Exit codes: 0 clean stop (SIGTERM/SIGINT: in-flight requests finish within
``serve.shutdown_grace_s``), 2 bad configuration or model (a one-line error), 1 anything
unexpected (a bug: the traceback is logged).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import msgspec
import uvicorn

from detector import ArtifactError
from serve import version
from serve.app import ServerState, create_app
from serve.config import ConfigError, ServeConfig, bearer_token, load_config
from serve.models import ModelStore
from serve.openapi import document

log = logging.getLogger("serve")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-serve",
        description="Serve trained detectors over HTTP: score, reconstruct, encode and decode "
        "readings (v1) and the Open Inference Protocol v2 subset. Settings come from --config "
        "and SENSOR_ANOMALY_SERVE__<KEY> environment variables (docs/serve.md).",
    )
    p.add_argument("--config", type=Path, help="YAML config file (sections serve, reading, events)")
    p.add_argument(
        "--model",
        metavar="PATH",
        help="serve this artifact directory (a registry version dir) instead of the registry",
    )
    p.add_argument("--version", action="version", version=f"anomaly-serve {version()}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="serve (the default)")
    sub.add_parser("check-config", help="validate the config and load the models, print, exit")
    oa = sub.add_parser("openapi", help="print the OpenAPI 3.1 document")
    oa.add_argument("--output", default="-", help="file to write (- = stdout)")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def openapi_text() -> str:
    """The OpenAPI document as committed in ``schemas/openapi.json`` (sorted, indented)."""
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "openapi":
        text = openapi_text()
        if args.output == "-":
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text)
        return 0
    try:
        cfg = load_config(args.config, model_path=args.model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    store = ModelStore(cfg)
    try:
        store.load_initial()
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        models = {n: s.describe() for n, s in store.slots.items()}
        print(json.dumps({"config": cfg.masked(), "models": models}, indent=2, default=str))
        return 0
    return serve(cfg, store)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a stop signal arrives (readiness goes 503
    while in-flight requests finish)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self._state.stopping:
            log.info("signal %d: draining in-flight requests, then stopping", sig)
        self._state.stopping = True
        self._state.metrics.ready.set(0)
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has stopped, which would end the process
        # as "killed by SIGTERM"; a drained, requested stop is a clean exit (code 0) here.
        self._captured_signals.clear()


def serve(cfg: ServeConfig, store: ModelStore) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit code."""
    s = cfg.serve
    app, state = create_app(cfg, store, token=bearer_token(cfg))
    log.info(
        "starting anomaly-serve %s with config %s",
        version(),
        msgspec.json.encode(cfg.masked()).decode(),
    )
    log.info(
        "serving %s on http://%s:%d (auth %s)",
        {n: sl.version for n, sl in store.slots.items()},
        s.host,
        s.port,
        "on" if state.token else "off",
    )
    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        http="httptools",
        # The 'auto' loop is uvloop when installed, asyncio otherwise.
        loop="auto",
        lifespan="on",
        access_log=s.access_log,
        log_config=None,  # keep our logging set-up
        timeout_keep_alive=max(1, round(s.keep_alive_s)),
        timeout_graceful_shutdown=max(1, round(s.shutdown_grace_s)),
        # uvicorn's own limit on the request line + headers stays at its default; the body
        # limit is ours (serve.max_body_bytes) and answers 413 with a JSON body.
        server_header=False,
    )
    server = _Server(config, state)
    try:
        server.run()
    except OSError as e:  # address in use, permission denied: a configuration problem
        print(f"error: cannot listen on {s.host}:{s.port}: {e.strerror}", file=sys.stderr)
        return 2
    except SystemExit:
        # uvicorn logs a bind failure and exits 1; the address is the configuration's fault.
        if server.started:
            raise
    if not server.started:
        # uvicorn logs bind failures and returns; the address is the configuration's fault.
        print(f"error: could not start listening on {s.host}:{s.port}", file=sys.stderr)
        return 2
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
