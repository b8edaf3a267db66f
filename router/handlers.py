"""HTTP handlers, and the one place exceptions become HTTP statuses (``error_middleware``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /generate`` (validated,
admitted, dispatched by the policy, forwarded by ``proxy``); ``GET /v1/models``, ``GET /health``,
``GET /workers``, ``POST /workers`` and ``DELETE /workers`` (``{"url": ...}``), ``GET /metrics``,
``POST /kv_index/match`` (``{"input_ids": [...]}``: which worker holds how much of a prefix).
With an API key configured, everything but ``/health`` and ``/metrics`` needs
``Authorization: Bearer <key>`` (``auth_middleware``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from profiler_ft.text import request_text
from router import keys
from router.batcher import length_hint, request_slo_ms
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
from router.model_info import ModelInfo
from router.policy import RequestFeatures
from router.policy.kv_index import HOST, KvIndex
from router.policy.views import WorkerView
from router.proxy import Chooser
from router.validation import VALIDATORS, ParsedRequest, with_custom_params
from router.workers import WorkerPool

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


def _base_features(parsed: ParsedRequest) -> RequestFeatures:
    return RequestFeatures(route=parsed.route, max_tokens=parsed.max_tokens,
                           prompt_text=parsed.prompt_text, prompt_tokens=parsed.prompt_tokens,
                           predicted_length=parsed.prediction.length
                           if parsed.prediction else None,
                           predicted_bucket=parsed.prediction.bucket
                           if parsed.prediction else None)


async def _routing_features(request: web.Request, parsed: ParsedRequest) -> RequestFeatures:
    """What the (non-PD) policy may know: with a prefix-aware policy and the KV index, the
    prompt's ids and each worker's cached prefix; with ``--kvstore`` too, the prefix the shared
    store holds (one lookup, at most its timeout)."""
    features = _base_features(parsed)
    if getattr(request.app[keys.POLICY], "wants_prefix_index", False) \
            and keys.KV_EVENTS in request.app:
        features = _with_prefix(features, parsed, request.app[keys.POOL],
                                request.app[keys.KV_EVENTS].index)
        if features.prompt_ids and keys.STORE_INDEX in request.app:
            held = await request.app[keys.STORE_INDEX].leading_tokens(features.prompt_ids,
                                                                      parsed.body)
            features = dataclasses.replace(features, store_tokens=held)
    return features


def _chooser(request: web.Request, parsed: ParsedRequest, prefill: bool = False,
             prefer: str | None = None, features: RequestFeatures | None = None) -> Chooser:
    """The worker picker for one request; ``prefer`` (the batcher's choice) wins while it is
    healthy and not yet tried, and the policy picks retries. ``features``: what the policy
    knows (``_routing_features``; default: the request alone, as in prefill/decode mode)."""
    pool = request.app[keys.PREFILL_POOL] if prefill else request.app[keys.POOL]
    policy = request.app[keys.PREFILL_POLICY] if prefill else request.app[keys.POLICY]
    if features is None:
        features = _base_features(parsed)
    metrics = request.app[keys.METRICS]
    role = "prefill" if prefill else ("decode" if keys.PREFILL_POOL in request.app else "")

    def choose(exclude: set[str]) -> WorkerView:
        candidates = [w for w in pool.healthy() if w.url not in exclude]
        if not candidates:
            raise NoHealthyWorker(f"no healthy {role} worker" if role else
                                  "no healthy worker is available to serve the request")
        preferred = [w for w in candidates if w.url == prefer]
        chosen = preferred[0] if preferred else policy.pick(candidates, features)
        metrics.decisions.labels(policy.name, chosen.url).inc()
        cached = features.cached_tokens.get(chosen.url, 0) if features.cached_tokens else 0
        if logger.isEnabledFor(logging.DEBUG):
            head = features.prompt_ids[:256] if features.prompt_ids else ()
            logger.debug("dispatch %s -> %s: %d prompt tokens (head %08x), cached %s, store %d, "
                         "in flight %s", policy.name, chosen.url, features.prompt_tokens,
                         hash(tuple(head)) & 0xFFFFFFFF, features.cached_tokens,
                         features.store_tokens, {w.url: w.in_flight for w in candidates})
        pool.note_dispatch(chosen.url, features.prompt_tokens - cached)
        return chosen

    return choose


def _prompt_ids(parsed: ParsedRequest, info: ModelInfo | None) -> list[int] | None:
    """The token ids the worker will cache for this prompt, where the router can make them: a
    single id list as given, a single text or plain chat through the model's tokenizer."""
    body = parsed.body
    ids: Any = body.get("input_ids") if parsed.route == "generate" else None
    if ids is None and parsed.route == "completion":
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) \
            else None
    if isinstance(ids, list):
        return ids if ids and isinstance(ids[0], int) else None
    counter = info.counter if info is not None else None
    if counter is None:
        return None
    try:
        if parsed.route == "chat":
            if body.get("tools") or body.get("chat_template_kwargs"):
                return None  # the worker's template output would differ from ours
            return counter.chat_ids(body["messages"])
        text = body.get("text") if parsed.route == "generate" else body.get("prompt")
        return counter.text_ids(text) if isinstance(text, str) else None
    except Exception as exc:  # a template that rejects these messages: dispatch on load
        logger.debug("no token ids for prefix matching: %s", exc)
        return None


def _with_prefix(features: RequestFeatures, parsed: ParsedRequest, pool: WorkerPool,
                 index: KvIndex) -> RequestFeatures:
    """``features`` with the prompt's ids and each worker's cached prefix (device, host)."""
    ids = _prompt_ids(parsed, pool.model_info())
    if not ids:
        return features
    device: dict[str, int] = {}
    host: dict[str, int] = {}
    for (url, medium), n in index.match(ids).items():
        (host if medium == HOST else device)[url] = n
    return dataclasses.replace(features, prompt_ids=tuple(ids), prompt_tokens=len(ids),
                               cached_tokens=device, host_tokens=host)


def _dispatch(route: str) -> Handler:
    validator = VALIDATORS[route]
    path = _UPSTREAM_PATHS[route]

    async def handle(request: web.Request) -> web.StreamResponse:
        pool = request.app[keys.POOL]
        info = pool.model_info()
        if info is None or not pool.has_healthy():
            raise NoHealthyWorker()
        raw = await request.read()
        parsed = validator(raw, info)
        if keys.LENGTH in request.app:
            estimate = await request.app[keys.LENGTH].annotate(
                request_text(parsed.route, parsed.body))
            parsed = dataclasses.replace(parsed, prediction=estimate)
        cfg = request.app[keys.CONFIG]
        deadline = asyncio.get_running_loop().time() + cfg.request_timeout_s
        if keys.BATCHER in request.app:
            return await _forward_batched(request, path, parsed, deadline)
        async with request.app[keys.ADMISSION].slot():
            if keys.PD_PROXY in request.app:
                return await request.app[keys.PD_PROXY].forward(
                    request, path, parsed, _chooser(request, parsed, prefill=True),
                    _chooser(request, parsed), deadline)
            features = await _routing_features(request, parsed)
            return await request.app[keys.PROXY].forward(
                request, path, parsed, _chooser(request, parsed, features=features), deadline)

    return handle


async def _forward_batched(request: web.Request, path: str, parsed: ParsedRequest,
                           deadline: float) -> web.StreamResponse:
    """``--batching``: hold the request in the batcher until its batch is dispatched, tell the
    worker its SLO and predicted length (``custom_params``, for the worker's SLO-ODBS queue
    policy), forward it, and count whether it met its SLO."""
    batcher = request.app[keys.BATCHER]
    metrics = request.app[keys.METRICS]
    slo_ms = request_slo_ms(request.headers, parsed.body, batcher.cfg.default_slo_ms)
    hint = length_hint(request.headers)
    if hint is None and parsed.prediction is not None:
        hint = parsed.prediction.length
    predicted = hint if hint is not None else (parsed.max_tokens
                                               or batcher.cfg.batching.len_ref)
    parsed = with_custom_params(parsed, {"banaserve_slo_ms": slo_ms,
                                         "banaserve_predicted_len": predicted}, drop=("slo_ms",))
    job = batcher.new_job(slo_ms, predicted, parsed.prompt_tokens)
    loop = asyncio.get_running_loop()
    async with request.app[keys.ADMISSION].slot(), batcher.hold(job) as url:
        metrics.batch_wait.observe(loop.time() - job.arrival_s)
        features = await _routing_features(request, parsed)
        response = await request.app[keys.PROXY].forward(
            request, path, parsed, _chooser(request, parsed, prefer=url, features=features),
            deadline)
        met = (loop.time() - job.arrival_s) * 1000.0 <= slo_ms
        metrics.slo.labels("met" if met else "missed").inc()
        return response


async def models(request: web.Request) -> web.Response:
    info = request.app[keys.POOL].model_info()
    if info is None:
        raise NoHealthyWorker("no worker has answered yet, so the served model is unknown")
    created = int(request.app[keys.STARTED_AT])
    data = [{"id": name, "object": "model", "created": created, "owned_by": "banaserve",
             "max_model_len": info.context_length} for name in sorted(info.served_names)]
    return web.json_response({"object": "list", "data": data})


def _pools(app: web.Application) -> dict[str, WorkerPool]:
    if keys.PREFILL_POOL in app:
        return {"prefill": app[keys.PREFILL_POOL], "decode": app[keys.POOL]}
    return {"regular": app[keys.POOL]}


async def health(request: web.Request) -> web.Response:
    counts = {role: len(pool.healthy()) for role, pool in _pools(request.app).items()}
    missing = [role for role, count in counts.items() if count == 0]
    if missing:
        raise NoHealthyWorker(f"no healthy {' or '.join(missing)} worker")
    return web.json_response({"status": "ok", "healthy_workers": sum(counts.values()),
                              "by_role": counts})


async def workers(request: web.Request) -> web.Response:
    now = time.monotonic()
    kv = request.app[keys.KV_EVENTS].stats() if keys.KV_EVENTS in request.app else {}
    report = (request.app[keys.CACHE_REPORT].stats() if keys.CACHE_REPORT in request.app
              else {})
    listed = [{**v.as_dict(now), "role": role,
               **({"kv_index": kv[v.url]} if v.url in kv else {}),
               **({"cache_report": report[v.url]} if v.url in report else {})}
              for role, pool in _pools(request.app).items() for v in pool.snapshot()]
    body: dict[str, object] = {"policy": request.app[keys.POLICY].name, "workers": listed}
    if keys.PREFILL_POLICY in request.app:
        body["prefill_policy"] = request.app[keys.PREFILL_POLICY].name
    return web.json_response(body)


async def _membership(request: web.Request) -> tuple[str, str, WorkerPool, int | None]:
    """Parse ``{"url": ..., "role": ..., "bootstrap_port": ...}`` for POST/DELETE /workers."""
    try:
        body = await request.json()
        url = normalize_url(body["url"])
        pools = _pools(request.app)
        role = body.get("role") or next(r for r in ("regular", "decode") if r in pools)
        port = body.get("bootstrap_port")
        if port is not None and not isinstance(port, int):
            raise TypeError("bootstrap_port must be an integer")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest('expected a JSON body {"url": "http://host:port"} plus, in '
                             f'prefill/decode mode, "role" and "bootstrap_port" ({exc})',
                             param="url") from None
    if role not in pools:
        raise InvalidRequest(f"role {role!r} is not one of {sorted(pools)}", param="role")
    return url, role, pools[role], port


async def add_worker(request: web.Request) -> web.Response:
    url, role, pool, port = await _membership(request)
    added = pool.add(url)
    if role == "prefill":
        request.app[keys.PD_PROXY].set_bootstrap_port(url, port)
    return web.json_response({"url": url, "role": role, "added": added},
                             status=201 if added else 200)


async def remove_worker(request: web.Request) -> web.Response:
    url, _, pool, _ = await _membership(request)
    if not pool.remove(url):
        raise NotFound(f"worker {url} is not in the pool", param="url")
    return web.json_response({"url": url, "removed": True,
                              "note": "in-flight requests finish before it leaves"})


async def kv_index_match(request: web.Request) -> web.Response:
    """``POST /kv_index/match`` ``{"input_ids": [...]}``: the leading tokens each worker holds,
    per medium, by the router's KV index (where does this prefix live?)."""
    if keys.KV_EVENTS not in request.app:
        raise NotFound("the KV index is off (--no-kv-index, or prefill/decode mode)")
    try:
        ids = (await request.json())["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise TypeError("input_ids must be a list of integers")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(f'expected a JSON body {{"input_ids": [int, ...]}} ({exc})',
                             param="input_ids") from None
    held: dict[str, dict[str, int]] = {}
    for (url, medium), n in request.app[keys.KV_EVENTS].index.match(ids).items():
        held.setdefault(url, {})[medium] = n
    return web.json_response({"input_tokens": len(ids), "workers": held})


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
    app.router.add_post("/kv_index/match", kv_index_match, name="kv_index_match")
