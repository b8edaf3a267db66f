"""The worker's migration endpoints, served by SGLang's own HTTP server.

``POST /banaserve/migrate_layers`` ``{"layers": [s, e], "target": NAME}``,
``POST /banaserve/restore_layers`` ``{}`` (every range) or ``{"layers": [s, e]}``,
``POST /banaserve/offload_heads`` ``{"layers": [...], "heads": [...], "target": NAME}``,
``POST /banaserve/recall_heads`` ``{}`` (every offload) or ``{"id": N}``,
``GET /banaserve/status``.

Who calls what: the patch on ``http_server._setup_and_run_http_server`` calls
:func:`install` with SGLang's ``app`` and ``port_args`` before uvicorn starts. Each request is
forwarded to the scheduler process as SGLang's own RPC message (``RpcReqInput``, method
``banaserve_migration``) over SGLang's RPC socket, which the scheduler polls between model
steps; the scheduler-side patch answers with ``(status, body)`` as JSON in ``RpcReqOutput``.
The bodies and answers are the typed messages of ``router.rebalance.messages`` (read and built
by ``MigrationManager.handle``; a malformed body is a 400 naming the field). Errors use the
OpenAI error body. One control request runs at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from typing import Any

logger = logging.getLogger(__name__)

RPC_METHOD = "banaserve_migration"
RPC_TIMEOUT_S = 900.0


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class _RpcClient:
    """SGLang's RPC socket, bound in the HTTP process (SGLang's ``Engine`` does the same)."""

    def __init__(self, rpc_ipc_name: str) -> None:
        self._name = rpc_ipc_name
        self._lock = threading.Lock()
        self._sock: Any = None

    def call(self, op: str, body: dict[str, Any], timeout_s: float) -> tuple[int, dict[str, Any]]:
        import zmq
        from sglang.srt.managers.io_struct import RpcReqInput, RpcReqOutput, sock_recv, sock_send
        from sglang.srt.utils.network import get_zmq_socket

        with self._lock:
            if self._sock is None:
                self._sock = get_zmq_socket(zmq.Context.instance(), zmq.DEALER, self._name, True)
            call_id = uuid.uuid4().hex
            sock_send(self._sock, RpcReqInput(method=RPC_METHOD, parameters={
                "op": op, "body": json.dumps(body), "call_id": call_id}))
            while True:
                if not self._sock.poll(int(timeout_s * 1000)):
                    return 504, error_body(504, f"the scheduler did not answer {op} within "
                                                f"{timeout_s:.0f} s")
                reply = sock_recv(self._sock)
                if not isinstance(reply, RpcReqOutput):
                    continue
                if not reply.success:
                    return 500, error_body(500, f"scheduler: {reply.message}")
                try:
                    answer = json.loads(reply.message)
                except ValueError:
                    continue  # a reply to another RPC
                if answer.get("call_id") != call_id:
                    continue  # a late reply to a call that timed out
                status = int(answer["status"])
                payload = answer["body"]
                if status >= 400:
                    return status, error_body(status, payload.get("error", "failed"))
                return status, payload


_client: _RpcClient | None = None


async def _forward(op: str, body: dict[str, Any]) -> Any:
    from fastapi.responses import ORJSONResponse

    if _client is None:
        return ORJSONResponse(error_body(503, "migration control is not initialised"), 503)
    status, payload = await asyncio.to_thread(_client.call, op, body, RPC_TIMEOUT_S)
    return ORJSONResponse(payload, status_code=status)


async def _json_body(request: Any) -> dict[str, Any] | Any:
    from fastapi.responses import ORJSONResponse

    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return ORJSONResponse(error_body(400, f"the body is not JSON: {exc}"), 400)
    if not isinstance(body, dict):
        return ORJSONResponse(error_body(400, "the body must be a JSON object"), 400)
    return body


async def migrate_layers(request: Any) -> Any:
    body = await _json_body(request)
    return body if not isinstance(body, dict) else await _forward("migrate", body)


async def restore_layers(request: Any) -> Any:
    body = await _json_body(request)
    return body if not isinstance(body, dict) else await _forward("restore", body)


async def offload_heads(request: Any) -> Any:
    body = await _json_body(request)
    return body if not isinstance(body, dict) else await _forward("offload_heads", body)


async def recall_heads(request: Any) -> Any:
    body = await _json_body(request)
    return body if not isinstance(body, dict) else await _forward("recall_heads", body)


async def status(request: Any) -> Any:
    return await _forward("status", {})


def install(app: Any, port_args: Any) -> None:
    """Add the routes to SGLang's FastAPI app (once) and remember the RPC socket name."""
    global _client
    _client = _RpcClient(port_args.rpc_ipc_name)
    if any(getattr(r, "path", None) == "/banaserve/status" for r in app.routes):
        return
    from fastapi import Request

    for path, handler, methods in (("/banaserve/migrate_layers", migrate_layers, ["POST"]),
                                   ("/banaserve/restore_layers", restore_layers, ["POST"]),
                                   ("/banaserve/offload_heads", offload_heads, ["POST"]),
                                   ("/banaserve/recall_heads", recall_heads, ["POST"]),
                                   ("/banaserve/status", status, ["GET"])):
        async def endpoint(request: Any, _handler: Any = handler) -> Any:
            return await _handler(request)

        # FastAPI injects the request by annotation; this module's annotations are strings.
        endpoint.__annotations__ = {"request": Request, "return": Any}
        app.add_api_route(path, endpoint, methods=methods, include_in_schema=True)
    logger.info("migration endpoints installed under /banaserve/")
