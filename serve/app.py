"""The ASGI application: routes, auth, limits, errors and metrics around :mod:`serve.scoring`.

Starlette provides routing and the request/response objects; every endpoint goes through
:func:`_endpoint`, which checks the bearer token, times the request, maps an
:class:`~serve.scoring.ApiError` to its 4xx JSON body and any other exception to a 500 whose
body carries an id (the traceback goes to the log, never to the client).

Scoring runs on the event loop thread: a request's CPU work is bounded by
``serve.max_readings`` (about 10-20 µs per reading, see docs/serve.md); for the common small
request that is less than a hand-off to a thread would cost, and it keeps every
:class:`~serve.models.ModelSlot` single-threaded. While one large request is scored, other
requests wait: lower ``serve.max_readings`` where latency matters more than batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve import scoring, version
from serve.config import ServeConfig
from serve.metrics import ServeMetrics
from serve.models import ModelSlot, ModelStore
from serve.openapi import document
from serve.scoring import ApiError

log = logging.getLogger("serve")
JSON = "application/json"
_encode = msgspec.json.encode

Handler = Callable[[Request, "ServerState"], Awaitable[Response]]


@dataclass
class ServerState:
    """What the endpoints share. Mutated only on the event loop thread."""

    cfg: ServeConfig
    store: ModelStore
    metrics: ServeMetrics
    registry: CollectorRegistry
    token: bytes = b""
    stopping: bool = False
    started_at: float = field(default_factory=time.time)
    openapi: bytes = b""

    def slot(self, name: str) -> ModelSlot:
        s = self.store.slots.get(name)
        if s is None:
            raise ApiError(
                404,
                f"no model named {name!r} is served here",
                field="name",
                fix=f"use one of {sorted(self.store.slots)} (GET /v1/models)",
            )
        return s

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        models = {n: s.version for n, s in self.store.slots.items()}
        ok = bool(models) and not self.stopping
        return ok, {"ok": ok, "stopping": self.stopping, "models": models}


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = doc if isinstance(doc, bytes) else _encode(doc)
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def _authorized(request: Request, token: bytes) -> bool:
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    # compare_digest: the time taken must not reveal how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)


def _check_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type")
    # No header at all is taken as JSON (some OIP clients send none); a different one is not.
    if ctype is None:
        return
    media = ctype.split(";", 1)[0].strip().lower()
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(
            415,
            f"content type {media!r} is not JSON",
            field="Content-Type",
            fix="send the body as JSON with 'Content-Type: application/json'",
        )


async def read_body(request: Request, cfg: ServeConfig) -> bytes:
    """The request body, at most ``serve.max_body_bytes``, within ``serve.request_timeout_s``."""
    _check_content_type(request)
    limit = cfg.serve.max_body_bytes
    too_large = ApiError(
        413,
        f"request body larger than {limit} bytes",
        field="body",
        fix=f"send at most {limit} bytes per request (serve.max_body_bytes); split the readings",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large

    async def collect() -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), cfg.serve.request_timeout_s)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {cfg.serve.request_timeout_s}s",
            field="body",
            fix="send the whole body promptly (serve.request_timeout_s)",
        ) from None


def _endpoint(state: ServerState, route: str, handler: Handler, public: bool = False) -> Any:
    """Wrap ``handler`` with auth, error mapping and metrics for route template ``route``."""
    m = state.metrics
    requests = m.requests
    duration = m.request_duration.labels(route=route)

    async def endpoint(request: Request) -> Response:
        t0 = time.perf_counter()
        m.in_flight.inc()
        try:
            if state.token and not public and not _authorized(request, state.token):
                resp = json_response(
                    {
                        "error": "missing or wrong bearer token",
                        "field": "Authorization",
                        "fix": "send 'Authorization: Bearer <token>'",
                    },
                    401,
                    {"WWW-Authenticate": 'Bearer realm="anomaly-serve"'},
                )
            else:
                resp = await handler(request, state)
        except ApiError as e:
            resp = json_response(e.body(), e.status)
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s %s", incident, request.method, route)
            resp = json_response(
                {"error": f"internal error {incident}; the server log has the details"}, 500
            )
        finally:
            m.in_flight.dec()
        requests.labels(route=route, method=request.method, code=str(resp.status_code)).inc()
        duration.observe(time.perf_counter() - t0)
        return resp

    return endpoint


# -- handlers -------------------------------------------------------------------------------


async def healthz(request: Request, state: ServerState) -> Response:
    return json_response({"ok": True, "uptime_s": round(time.time() - state.started_at, 3)})


async def readyz(request: Request, state: ServerState) -> Response:
    ok, facts = state.readiness()
    return json_response(facts, 200 if ok else 503)


async def metrics(request: Request, state: ServerState) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request, state: ServerState) -> Response:
    return json_response(state.openapi)


async def list_models(request: Request, state: ServerState) -> Response:
    models = [
        {
            "name": s.name,
            "version": s.version,
            "n_features": s.detector.n_features,
            "threshold": s.detector.threshold.value,
            "trained_at": s.detector.info.trained_at,
        }
        for s in state.store.slots.values()
    ]
    return json_response({"models": models})


async def get_model(request: Request, state: ServerState) -> Response:
    return json_response(state.slot(request.path_params["name"]).describe())


async def score(request: Request, state: ServerState) -> Response:
    slot = state.slot(request.path_params["name"])
    body = await read_body(request, state.cfg)
    out, scored, anomalies, errors = scoring.score(body, slot, state.cfg)
    m = state.metrics
    m.readings.labels(model=slot.name, endpoint="score").inc(scored)
    if anomalies:
        m.anomalies.labels(model=slot.name).inc(anomalies)
    if errors:
        m.reading_errors.labels(model=slot.name).inc(errors)
    return json_response(out)


def _simple(
    endpoint: str, fn: Callable[[bytes, ModelSlot, ServeConfig], tuple[bytes, int]]
) -> Handler:
    async def handler(request: Request, state: ServerState) -> Response:
        slot = state.slot(request.path_params["name"])
        body = await read_body(request, state.cfg)
        out, n = fn(body, slot, state.cfg)
        state.metrics.readings.labels(model=slot.name, endpoint=endpoint).inc(n)
        return json_response(out)

    return handler


async def v2_server(request: Request, state: ServerState) -> Response:
    return json_response({"name": "anomaly-serve", "version": version(), "extensions": []})


async def v2_live(request: Request, state: ServerState) -> Response:
    return json_response({"live": True})


async def v2_ready(request: Request, state: ServerState) -> Response:
    ok, _ = state.readiness()
    return json_response({"ready": ok}, 200 if ok else 503)


def _v2_slot(request: Request, state: ServerState) -> ModelSlot:
    slot = state.slot(request.path_params["name"])
    wanted = request.path_params.get("version")
    if wanted is not None and wanted != slot.version:
        raise ApiError(
            404,
            f"model {slot.name!r} is served at version {slot.version}, not {wanted!r}",
            field="version",
            fix=f"use /v2/models/{slot.name}/versions/{slot.version} or omit the version",
        )
    return slot


async def v2_model(request: Request, state: ServerState) -> Response:
    return json_response(scoring.oip_metadata(_v2_slot(request, state)))


async def v2_model_ready(request: Request, state: ServerState) -> Response:
    _v2_slot(request, state)
    ok, _ = state.readiness()
    return json_response({"ready": ok}, 200 if ok else 503)


async def v2_infer(request: Request, state: ServerState) -> Response:
    slot = _v2_slot(request, state)
    body = await read_body(request, state.cfg)
    out, n, anomalies = scoring.oip_infer(body, slot, state.cfg)
    state.metrics.readings.labels(model=slot.name, endpoint="infer").inc(n)
    if anomalies:
        state.metrics.anomalies.labels(model=slot.name).inc(anomalies)
    return json_response(out)


# -- application ----------------------------------------------------------------------------

# (path, methods, handler, public): public routes answer without the bearer token, so
# orchestrator probes and Prometheus need no secret.
ROUTES: list[tuple[str, list[str], Handler, bool]] = [
    ("/healthz", ["GET"], healthz, True),
    ("/readyz", ["GET"], readyz, True),
    ("/metrics", ["GET"], metrics, True),
    ("/openapi.json", ["GET"], openapi, True),
    ("/v1/models", ["GET"], list_models, False),
    ("/v1/models/{name}", ["GET"], get_model, False),
    ("/v1/models/{name}/score", ["POST"], score, False),
    ("/v1/models/{name}/reconstruct", ["POST"], _simple("reconstruct", scoring.reconstruct), False),
    ("/v1/models/{name}/encode", ["POST"], _simple("encode", scoring.encode_readings), False),
    ("/v1/models/{name}/decode", ["POST"], _simple("decode", scoring.decode_codes), False),
    ("/v2", ["GET"], v2_server, False),
    ("/v2/health/live", ["GET"], v2_live, True),
    ("/v2/health/ready", ["GET"], v2_ready, True),
    ("/v2/models/{name}", ["GET"], v2_model, False),
    ("/v2/models/{name}/ready", ["GET"], v2_model_ready, False),
    ("/v2/models/{name}/infer", ["POST"], v2_infer, False),
    ("/v2/models/{name}/versions/{version}", ["GET"], v2_model, False),
    ("/v2/models/{name}/versions/{version}/infer", ["POST"], v2_infer, False),
]


async def _reload_loop(state: ServerState) -> None:
    """Every ``serve.reload_interval_s``: load new CURRENT versions (off the event loop)."""
    while True:
        await asyncio.sleep(state.cfg.serve.reload_interval_s)
        try:
            fresh = await asyncio.to_thread(state.store.poll)
        except Exception:  # a bug in reloading must not stop serving the loaded models
            log.exception("model reload failed; serving the loaded versions")
            continue
        for name, slot in fresh.items():
            state.store.slots[name] = slot  # one assignment: a request sees old or new
            state.metrics.on_model(slot, reloaded=True)


def create_app(
    cfg: ServeConfig,
    store: ModelStore,
    registry: CollectorRegistry | None = None,
    token: str = "",
) -> tuple[Starlette, ServerState]:
    """The application for already-loaded ``store``; ``token`` "" = no authentication."""
    registry = registry or CollectorRegistry()
    state = ServerState(
        cfg=cfg,
        store=store,
        metrics=ServeMetrics.create(registry),
        registry=registry,
        token=token.encode(),
        openapi=_encode(document()),
    )
    for slot in store.slots.values():
        state.metrics.on_model(slot, reloaded=False)
    routes = [
        Route(path, _endpoint(state, path, handler, public), methods=methods)
        for path, methods, handler, public in ROUTES
    ]
    unmatched = state.metrics.requests

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        unmatched.labels(route="unmatched", method=request.method, code=str(code)).inc()
        if code == 405:
            msg, fix = f"{request.method} is not allowed on {request.url.path}", "see /openapi.json"
        else:
            msg, fix = f"no route {request.url.path}", "see /openapi.json for the routes"
        return json_response({"error": msg, "field": "path", "fix": fix}, code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_reload_loop(state)) if store.reloads else None
        state.metrics.ready.set(1)
        try:
            yield
        finally:
            state.stopping = True
            state.metrics.ready.set(0)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    return app, state
