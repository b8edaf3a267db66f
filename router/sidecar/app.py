"""The sidecar's HTTP API: JSON in, JSON out, every bad field a 400 naming it.

Routes (``add_sidecar_routes`` mounts them on any aiohttp app: the standalone sidecar built by
``create_sidecar_app``, or the router with ``--sidecar``):
  ``POST /v1/plan/placement``  HELR (``placement.plan_from_json``); 422 when nothing fits
  ``POST /v1/plan/batches``    SLO-ODBS or a baseline on a submitted request list
  ``POST /v1/predict/length``  profiler_ft on prompts or chat messages (needs a predictor)
  ``GET /health``              standalone only (the router has its own)
Errors are raised where they arise as ``router.errors`` types; ``sidecar_errors`` (standalone)
or the router's ``error_middleware`` turns them into OpenAI-style bodies.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import fields, replace
from typing import Any

from aiohttp import web

from profiler_ft.text import messages_text
from router.batching.slo_odbs import POLICIES, BatchingConfig, Job, ServiceModel, form_batches
from router.errors import InvalidRequest, NotFound, RouterError
from router.placement.helr import InfeasibleError
from router.placement.placement import PlacementError, plan_from_json

log = logging.getLogger(__name__)

PREDICTOR = web.AppKey("sidecar_predictor", object)  # a profiler_ft LengthPredictor, optional
MAX_REQUESTS = 10_000
_TUNABLE = {f.name for f in fields(BatchingConfig)} - {"policy", "service"}


class Unprocessable(RouterError):
    """A valid request that has no answer (nothing fits the cluster): 422."""

    status = 422
    error_type = "invalid_request_error"


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidRequest(f"could not parse the JSON body: {exc}", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


async def plan_placement(request: web.Request) -> web.Response:
    body = await _json_body(request)
    try:
        plan = await asyncio.to_thread(plan_from_json, body)
    except PlacementError as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(":", 1)[0].split(" ", 1)[0]) \
            from None
    except InfeasibleError as exc:
        raise Unprocessable(str(exc), code=exc.constraint) from None
    return web.json_response({"feasible": True, **plan})


def _number(item: dict[str, Any], name: str, where: str, default: float | None = None,
            minimum: float = 0.0, integer: bool = False) -> float:
    value = item.get(name, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"{where}.{name} must be {kind} >= {minimum:g}, got {value!r}",
                             param=f"{where}.{name}")
    return float(value)


def _batching_config(body: dict[str, Any]) -> BatchingConfig:
    policy = body.get("policy", "slo-odbs")
    if policy not in POLICIES:
        raise InvalidRequest(f"policy must be one of {list(POLICIES)}, got {policy!r}",
                             param="policy")
    params = body.get("params", {})
    if not isinstance(params, dict) or set(params) - _TUNABLE - {"step_ms",
                                                                  "prefill_tokens_per_s"}:
        raise InvalidRequest(f"params must be an object with keys among "
                             f"{sorted(_TUNABLE | {'step_ms', 'prefill_tokens_per_s'})}",
                             param="params")
    try:
        service = ServiceModel(step_s=params.get("step_ms", 20.0) / 1000.0,
                               prefill_tokens_per_s=params.get("prefill_tokens_per_s", 2000.0))
        tunables = {k: v for k, v in params.items() if k in _TUNABLE}
        return replace(BatchingConfig(policy=policy, service=service), **tunables)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"params: {exc}", param="params") from None


def _jobs(body: dict[str, Any], predicted: list[int | None]) -> list[Job]:
    jobs = []
    for i, item in enumerate(body["requests"]):
        where = f"requests[{i}]"
        rid = str(item.get("id", i))
        slo_ms = _number(item, "slo_ms", where, minimum=1e-9)
        arrival_ms = _number(item, "arrival_ms", where, default=0.0, minimum=-math.inf)
        length = predicted[i]
        if length is None:
            length = int(_number(item, "predicted_len", where, integer=True))
        prompt_len = int(_number(item, "prompt_len", where, default=0, integer=True))
        jobs.append(Job(rid, arrival_ms / 1000.0, slo_ms / 1000.0, length, prompt_len))
    if len({j.id for j in jobs}) != len(jobs):
        raise InvalidRequest("requests[].id must be unique", param="requests")
    return jobs


async def plan_batches(request: web.Request) -> web.Response:
    body = await _json_body(request)
    items = body.get("requests")
    if not isinstance(items, list) or not items or len(items) > MAX_REQUESTS or not all(
            isinstance(r, dict) for r in items):
        raise InvalidRequest(f"requests must be a non-empty list (at most {MAX_REQUESTS}) of "
                             "objects with slo_ms and predicted_len (or prompt/messages when "
                             "the sidecar has a length predictor)", param="requests")
    cfg = _batching_config(body)
    texts = [_item_text(item, f"requests[{i}]") if "predicted_len" not in item else None
             for i, item in enumerate(items)]
    predicted: list[int | None] = [None] * len(items)
    wanted = [i for i, t in enumerate(texts) if t is not None]
    if wanted:
        found = await _predict(request.app, [texts[i] or "" for i in wanted])
        for i, prediction in zip(wanted, found, strict=True):
            predicted[i] = prediction.length
    jobs = _jobs(body, predicted)
    now_s = _number(body, "now_ms", "body", default=max(j.arrival_s for j in jobs) * 1000,
                    minimum=-math.inf) / 1000.0
    batches = form_batches(jobs, now_s, cfg)
    return web.json_response({
        "policy": cfg.policy,
        "batches": [[j.id for j in batch] for batch in batches],
        "order": [j.id for batch in batches for j in batch],
        "predicted_len": {j.id: j.predicted_len
                          for j, p in zip(jobs, predicted, strict=True) if p is not None},
    })


def _item_text(item: dict[str, Any], where: str) -> str:
    if isinstance(item.get("prompt"), str) and item["prompt"]:
        return str(item["prompt"])
    messages = item.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return messages_text(messages)
    raise InvalidRequest(f"{where} needs predicted_len, or a prompt string or messages list to "
                         "predict it from", param=where)


async def _predict(app: web.Application, texts: list[str]) -> list[Any]:
    predictor = app.get(PREDICTOR)
    if predictor is None:
        raise InvalidRequest("this sidecar has no length predictor (start it with "
                             "--length-predictor PATH); give predicted_len instead",
                             code="no_length_predictor")
    return await asyncio.to_thread(predictor.predict_many, texts)  # type: ignore[attr-defined]


async def predict_length(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if "prompts" in body:
        prompts = body["prompts"]
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, str) and p for p in prompts):
            raise InvalidRequest("prompts must be a non-empty list of non-empty strings",
                                 param="prompts")
        texts = list(prompts)
    elif "messages" in body:
        texts = [_item_text(body, "body")]
    else:
        raise InvalidRequest('expected {"prompts": [...]} or {"messages": [...]}',
                             param="prompts")
    if len(texts) > MAX_REQUESTS:
        raise InvalidRequest(f"at most {MAX_REQUESTS} prompts per call", param="prompts")
    found = await _predict(request.app, texts)
    return web.json_response({"predictions": [p.as_dict() for p in found]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok",
                              "length_predictor": request.app.get(PREDICTOR) is not None})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def sidecar_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPNotFound:
        exc = NotFound(f"no route {request.method} {request.path}")
        return web.json_response(exc.body(), status=404)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = InvalidRequest(exc.reason or "request rejected", status=exc.status)
        return web.json_response(err.body(), status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = RouterError("internal sidecar error; see the sidecar log")
        return web.json_response(err.body(), status=500)


def add_sidecar_routes(app: web.Application, predictor: object | None = None) -> None:
    if predictor is not None:
        app[PREDICTOR] = predictor
    app.router.add_post("/v1/plan/placement", plan_placement, name="plan_placement")
    app.router.add_post("/v1/plan/batches", plan_batches, name="plan_batches")
    app.router.add_post("/v1/predict/length", predict_length, name="predict_length")


def create_sidecar_app(predictor: object | None = None) -> web.Application:
    app = web.Application(middlewares=[sidecar_errors], client_max_size=16 * 1024 * 1024)
    add_sidecar_routes(app, predictor)
    app.router.add_get("/health", health, name="health")
    return app
