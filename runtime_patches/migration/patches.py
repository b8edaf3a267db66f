"""Wires layer migration and head offload into SGLang 0.5.23 (four wraps; the logic lives in
``manager.py``).

- ``Scheduler.handle_rpc_request``: RPCs named ``banaserve_migration`` go to this scheduler's
  :class:`~runtime_patches.migration.manager.MigrationManager` (created on first use); the
  reply carries ``(status, body)`` as JSON, which SGLang's own handler cannot return.
- ``Scheduler.run_batch``: a model step that fails with ``StepLost`` (a layer or head host
  gone mid-step) restores the layers or heads locally, aborts the requests in flight, and
  runs the step again on the worker's own layers so SGLang's result processing proceeds as
  usual; every token of that step belongs to an aborted request and is never returned.
- ``Scheduler.get_new_batch_prefill``: before each scheduling step, finish a restore that was
  waiting for KV slots, and admit no new prefill while KV lost with a host is flushed.
- ``http_server._setup_and_run_http_server``: adds the ``/banaserve/*`` routes (``control.py``)
  and learns SGLang's RPC socket name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from runtime_patches import SGLANG_VERSION
from runtime_patches.registry import REGISTRY, Patch

logger = logging.getLogger(__name__)

_ATTR = "_banaserve_migration"
_SCHED = "sglang.srt.managers.scheduler:Scheduler"


def manager_of(scheduler: Any, create: bool = True) -> Any:
    manager = getattr(scheduler, _ATTR, None)
    if manager is None and create:
        from runtime_patches.migration.manager import MigrationManager

        manager = MigrationManager(scheduler)
        setattr(scheduler, _ATTR, manager)
    return manager


def _wrap_handle_rpc(original: Callable[..., Any]) -> Callable[..., Any]:
    from runtime_patches.migration.control import RPC_METHOD

    def handle_rpc_request(self: Any, recv_req: Any) -> Any:
        if getattr(recv_req, "method", None) != RPC_METHOD:
            return original(self, recv_req)
        from sglang.srt.managers.io_struct import RpcReqOutput

        params = recv_req.parameters or {}
        try:
            body = json.loads(str(params.get("body") or "{}"))
            status, payload = manager_of(self).handle(str(params.get("op")), body)
        except Exception as exc:  # a bug: report it, keep the scheduler alive
            logger.exception("migration control %s failed", params.get("op"))
            status, payload = 500, {"error": f"{type(exc).__name__}: {exc}"}
        return RpcReqOutput(success=True, message=json.dumps(
            {"call_id": params.get("call_id"), "status": status, "body": payload}))

    return handle_rpc_request


def _wrap_run_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    from runtime_patches.migration.remote import StepLost

    def run_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, batch, *args, **kwargs)
        except StepLost as exc:
            manager_of(self).on_step_lost(exc, batch)
            return original(self, batch, *args, **kwargs)

    return run_batch


def _wrap_get_new_batch_prefill(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_new_batch_prefill(self: Any, *args: Any, **kwargs: Any) -> Any:
        manager = manager_of(self, create=False)
        if manager is not None and not manager.before_schedule():
            return None
        return original(self, *args, **kwargs)

    return get_new_batch_prefill


def _wrap_http_setup(original: Callable[..., Any]) -> Callable[..., Any]:
    import inspect

    signature = inspect.signature(original)

    def _setup_and_run_http_server(*args: Any, **kwargs: Any) -> Any:
        import sys

        from runtime_patches.migration import control

        bound = signature.bind_partial(*args, **kwargs)
        control.install(sys.modules[original.__module__].app, bound.arguments["port_args"])
        return original(*args, **kwargs)

    return _setup_and_run_http_server


def register() -> None:
    why = ("layer migration (runtime_patches.migration): ")
    for name, target, factory, reason in (
        ("migration.control_rpc", f"{_SCHED}.handle_rpc_request", _wrap_handle_rpc,
         "answer the /banaserve/* control RPC with a status and a body"),
        ("migration.host_loss", f"{_SCHED}.run_batch", _wrap_run_batch,
         "turn a lost layer host mid-step into local layers and aborted requests"),
        ("migration.flush_gate", f"{_SCHED}.get_new_batch_prefill",
         _wrap_get_new_batch_prefill, "admit no prefill while KV lost with a host is flushed"),
        ("migration.http_routes",
         "sglang.srt.entrypoints.http_server:_setup_and_run_http_server", _wrap_http_setup,
         "serve /banaserve/migrate_layers, /restore_layers, /offload_heads, /recall_heads "
         "and /status"),
    ):
        REGISTRY.add(Patch(name=name, target=target, kind="wrap", new=factory,
                           package="sglang", version=SGLANG_VERSION, rationale=why + reason))
