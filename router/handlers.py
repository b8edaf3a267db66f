"""HTTP handlers, and the one place exceptions become HTTP statuses (``error_middleware``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /generate`` (validated,
admitted, dispatched by the policy, forwarded by ``proxy``); ``GET /v1/models``, ``GET /health``,
``GET /workers``, ``POST /workers`` and ``DELETE /workers`` (``{"url": ...}``), ``GET /metrics``.
With an API key configured, everything but ``/health`` and ``/metrics`` needs
``Authorization: Bearer <key>`` (``auth_middleware``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from router import keys
from router.config import normalize_url
from router.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NoHealthyWorker,
    NotFound,
    Overloaded,
    RouterError,
    Unauthorized,
)
from router.policy import RequestFeatures
from router.proxy import Chooser
from router.validation import VALIDATORS, ParsedRequest
from router.workers import WorkerView

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UPSTREAM_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions",
                   "generate": "/generate"}


def _error_response(exc: RouterError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name or "other"
    metrics = request.app[keys.METRICS]
    started = time.monotonic()
    try:
        response = await handler(request)
    except RouterError as exc:
        if isinstance(exc, Overloaded | Unauthorized):
            metrics.rejected.labels(type(exc).__name__.lower()).inc()
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc)
        response = _error_response(exc)
    except web.HTTPNotFound:
        response = _error_response(NotFound(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        response = _error_response(MethodNotAllowed(
            f"method {request.method} is not allowed on {request.path}",
            code="method_not_allowed"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error_response(InvalidRequest(exc.reason or "request rejected",
                                                  status=exc.status))
    except (ConnectionResetError, ConnectionError):
        raise  # the client went away; there is nobody to answer
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        response = _error_response(RouterError("internal router error; see the router log"))
    metrics.requests.labels(route, str(response.status)).inc()
    metrics.duration.labels(route).observe(time.monotonic() - started)
    return response


_OPEN_PATHS = frozenset({"/health", "/metrics"})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[keys.CONFIG].api_key
    if key is not None and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise Unauthorized()
    return await handler(request)


def _chooser(request: web.Request, parsed: ParsedRequest) -> Chooser:
    pool = request.app[keys.POOL]
    policy = request.app[keys.POLICY]
    features = RequestFeatures(route=parsed.route, max_tokens=parsed.max_tokens,
                               prompt_text=parsed.prompt_text,
                               prompt_tokens=parsed.prompt_tokens)

    metrics = request.app[keys.METRICS]

    def choose(exclude: set[str]) -> WorkerView:
        candidates = [w for w in pool.healthy() if w.url not in exclude]
        if not candidates:
            raise NoHealthyWorker()
        chosen = policy.pick(candidates, features)
        metrics.decisions.labels(policy.name, chosen.url).inc()
        return chosen

    return choose


def _dispatch(route: str) -> Handler:
    validator = VALIDATORS[route]
    path = _UPSTREAM_PATHS[route]

    async def handle(request: web.Request) -> web.StreamResponse:
        pool = request.app[keys.POOL]
        info = pool.model_info()
        if info is None or not pool.healthy():
            raise NoHealthyWorker()
        raw = await request.read()
        parsed = validator(raw, info)
        cfg = request.app[keys.CONFIG]
        deadline = asyncio.get_running_loop().time() + cfg.request_timeout_s
        async with request.app[keys.ADMISSION].slot():
            return await request.app[keys.PROXY].forward(request, path, parsed,
                                                         _chooser(request, parsed), deadline)

    return handle


async def models(request: web.Request) -> web.Response:
    info = request.app[keys.POOL].model_info()
    if info is None:
        raise NoHealthyWorker("no worker has answered yet, so the served model is unknown")
    created = int(request.app[keys.STARTED_AT])
    data = [{"id": name, "object": "model", "created": created, "owned_by": "banaserve",
             "max_model_len": info.context_length} for name in sorted(info.served_names)]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    healthy = request.app[keys.POOL].healthy()
    if not healthy:
        raise NoHealthyWorker()
    return web.json_response({"status": "ok", "healthy_workers": len(healthy)})


async def workers(request: web.Request) -> web.Response:
    now = time.monotonic()
    views = request.app[keys.POOL].snapshot()
    return web.json_response({"policy": request.app[keys.POLICY].name,
                              "workers": [v.as_dict(now) for v in views]})


async def _worker_url(request: web.Request) -> str:
    try:
        body = await request.json()
        return normalize_url(body["url"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(f"expected a JSON body {{\"url\": \"http://host:port\"}} ({exc})",
                             param="url") from None


async def add_worker(request: web.Request) -> web.Response:
    url = await _worker_url(request)
    added = request.app[keys.POOL].add(url)
    return web.json_response({"url": url, "added": added}, status=201 if added else 200)


async def remove_worker(request: web.Request) -> web.Response:
    url = await _worker_url(request)
    if not request.app[keys.POOL].remove(url):
        raise NotFound(f"worker {url} is not in the pool", param="url")
    return web.json_response({"url": url, "removed": True,
                              "note": "in-flight requests finish before it leaves"})


async def metrics(request: web.Request) -> web.Response:
    from router.metrics import CONTENT_TYPE

    body = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", _dispatch("chat"), name="chat")
    app.router.add_post("/v1/completions", _dispatch("completion"), name="completion")
    app.router.add_post("/generate", _dispatch("generate"), name="generate")
    app.router.add_get("/v1/models", models, name="models")
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/workers", workers, name="workers")
    app.router.add_post("/workers", add_worker, name="add_worker")
    app.router.add_delete("/workers", remove_worker, name="remove_worker")
    app.router.add_get("/metrics", metrics, name="metrics")
