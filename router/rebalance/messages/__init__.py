"""The control messages between the rebalancer (router) and a worker's migration control, typed.

Who uses what:
- the worker: ``runtime_patches.migration.manager.MigrationManager.handle`` reads every request
  with ``X.from_json`` (a ``ControlMessageError`` becomes a 400 through ``MigrationError``) and
  builds its answer as ``StatusReply``, ``RangeInfo``, ``OffloadHeadsReply``, ``RestoreDone`` or
  ``RestorePending``, sent as ``to_json()``;
- the rebalancer: ``router.rebalance.signals.parse_status`` reads ``GET /banaserve/status`` with
  ``StatusReply.from_json``; a ``router.rebalance.decide.Decision`` carries one request, which
  ``router.rebalance.loop.Rebalancer`` POSTs as its ``to_json()``.

Routes (``runtime_patches/migration/control.py``), request, reply:
- ``GET /banaserve/status``: ``StatusReply`` (200).
- ``POST /banaserve/migrate_layers``: ``MigrateRequest`` ``{"layers": [s, e], "target": NAME}``;
  the migrated range's ``RangeInfo`` (200).
- ``POST /banaserve/offload_heads``: ``OffloadHeadsRequest`` ``{"layers": [...], "heads": [...],
  "target": NAME}``; ``OffloadHeadsReply`` (200).
- ``POST /banaserve/restore_layers``: ``RestoreRequest`` ``{}`` (every range) or
  ``{"layers": [s, e]}``; ``POST /banaserve/recall_heads``: ``RecallHeadsRequest`` ``{}`` (every
  offload) or ``{"id": N}``. Both answer ``RestoreDone`` (200) or, while the pool drains,
  ``RestorePending`` (202: it finishes by itself).
- Any error: the OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
  or 5xx status (``control.error_body``); nothing was changed.

Reading and writing. ``X.from_json(obj)`` is the one place a message is read: it checks every
type and required field and raises ``ControlMessageError`` naming the message and the field
(``status: field 'kv.capacity_tokens': expected a count (an int >= 0), got -1``); ``to_json()``
is the one place one is written. Requests are strict: an unknown field is an error. Replies are
lenient: unknown fields are ignored and every field but the identifying ones may be absent or
null and then takes its default, so an older worker's status still parses (the worker always
sends them all). Checks that need no worker state (a range is non-empty, no id repeats) also run
in ``__post_init__``, so a request built in code is checked too; checks that need the worker (a
range inside its layers, a known target) stay on the worker.

Modules: ``fields`` (the reader and ``ControlMessageError``), ``requests``, ``status`` (the
status and its parts; ``RangeInfo`` is also the migrate reply), ``replies``. Stdlib only, so the
worker imports this package without aiohttp.
"""

from router.rebalance.messages.fields import ControlMessageError
from router.rebalance.messages.replies import (
    OffloadHeadsReply,
    RecalledOffload,
    RestoreDone,
    RestoredRange,
    RestorePending,
    parse_restore_reply,
)
from router.rebalance.messages.requests import (
    REQUEST_TYPES,
    ControlRequest,
    MigrateRequest,
    OffloadHeadsRequest,
    RecallHeadsRequest,
    RestoreRequest,
    parse_request,
)
from router.rebalance.messages.status import (
    AttentionStats,
    ControlEvent,
    ForwardStats,
    HeadsInfo,
    KvInfo,
    ModelInfo,
    OffloadInfo,
    RadixCacheInfo,
    RangeInfo,
    StatusReply,
)

__all__ = [
    "REQUEST_TYPES", "AttentionStats", "ControlEvent", "ControlMessageError", "ControlRequest",
    "ForwardStats", "HeadsInfo", "KvInfo", "MigrateRequest", "ModelInfo", "OffloadHeadsReply",
    "OffloadHeadsRequest", "OffloadInfo", "RadixCacheInfo", "RangeInfo", "RecallHeadsRequest",
    "RecalledOffload", "RestoreDone", "RestorePending", "RestoreRequest", "RestoredRange",
    "StatusReply", "parse_request", "parse_restore_reply",
]
