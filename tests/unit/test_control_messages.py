"""The typed router <-> worker control messages (``router.rebalance.messages``): every message
round-trips, a status as the worker sends it parses back to the same JSON, malformed input names
its field, and the worker answers a malformed body with a 400 naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from router.rebalance.decide import KINDS, Decision
from router.rebalance.messages import (
    REQUEST_TYPES,
    AttentionStats,
    ControlEvent,
    ControlMessageError,
    ForwardStats,
    HeadsInfo,
    KvInfo,
    MigrateRequest,
    ModelInfo,
    OffloadHeadsReply,
    OffloadHeadsRequest,
    OffloadInfo,
    RadixCacheInfo,
    RangeInfo,
    RecalledOffload,
    RecallHeadsRequest,
    RestoreDone,
    RestoredRange,
    RestorePending,
    RestoreRequest,
    StatusReply,
    parse_request,
    parse_restore_reply,
)
from router.rebalance.signals import HeadOffload, LayerRange, parse_status

ROOT = Path(__file__).resolve().parents[2]

FORWARD = {"steps": 12, "step_seconds": 0.034512, "handoff_bytes": 98304, "mean_step_ms": 2.876}
ATTENTION = {"layer_calls": 24, "bytes_exchanged": 53248, "wait_seconds": 0.004321}
RANGE = {"layers": [2, 4], "target": "cold", "address": "127.0.0.1:7102",
         "weight_bytes": 4722688, "kv_bytes_moved": 65536, "kv_bytes_released": 1048576,
         "migration_seconds": 0.0412, "grow_seconds": 0.0031, "migrated_at": 1767000000.123,
         "forward": FORWARD}
OFFLOAD = {"id": 1, "layers": [0, 1], "heads": [3], "target": "cold",
           "address": "127.0.0.1:7102", "kv_bytes_moved": 8192, "kv_bytes_released": 131072,
           "offload_seconds": 0.0123, "grow_seconds": 0.002, "offloaded_at": 1767000001.5,
           "attention": ATTENTION}
WORKER_STATUS: dict[str, Any] = {
    # GET /banaserve/status of a worker with layers [2, 4) on its peer's layer host and KV
    # head 3 of layers 0 and 1 offloaded there: every field, as MigrationManager.status sends it
    "num_layers": 4, "local_layers": [0, 1], "ranges": [RANGE],
    "heads": {"num_kv_heads": 4, "num_q_heads": 16, "offloads": [OFFLOAD]},
    "targets": {"cold": "127.0.0.1:7102"}, "layer_host": "127.0.0.1:7101",
    "model": {"layer_weight_bytes": 2361344, "dtype": "bfloat16", "kv_dtype": "bfloat16",
              "dtype_reason": None},
    "kv": {"pool_tokens": 3000, "base_pool_tokens": 2000, "capacity_tokens": 3000,
           "used_tokens": 17, "bytes_per_token": 4096, "bytes_released": 1179648,
           "draining_to": None},
    "pending_restore": [], "pending_recall": [],
    "radix_cache": {"evictable_tokens": 12, "protected_tokens": 0},
    "invalidating": False, "num_aborted_on_host_loss": 0,
    "events": [{"at": 1767000000.12, "event": "migrate", **RANGE},
               {"at": 1767000002.0, "event": "grow_failed", "error": "host refused"}],
    "cannot_move": None,
}


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("request_", [
    MigrateRequest((28, 32), "tob"), RestoreRequest(), RestoreRequest((28, 32)),
    OffloadHeadsRequest((2, 3, 4), (6, 7), "tob"), RecallHeadsRequest(),
    RecallHeadsRequest(3)])
def test_each_request_round_trips(request_: Any) -> None:
    wire = json.loads(json.dumps(request_.to_json()))
    assert type(request_).from_json(wire) == request_
    assert parse_request(request_.KIND, wire) == request_


def test_requests_have_the_documented_bodies() -> None:
    assert MigrateRequest((28, 32), "tob").to_json() == {"layers": [28, 32], "target": "tob"}
    assert RestoreRequest().to_json() == {} and RecallHeadsRequest().to_json() == {}
    assert RecallHeadsRequest(3).to_json() == {"id": 3}
    assert OffloadHeadsRequest((2, 3), (7,), "tob").to_json() == {
        "layers": [2, 3], "heads": [7], "target": "tob"}
    assert sorted(REQUEST_TYPES) == sorted(k for k in KINDS if k != "skip")


@pytest.mark.parametrize("reply", [
    RangeInfo.from_json(RANGE),
    OffloadHeadsReply(OffloadInfo(1, (0, 1), (3,), "cold", "h:1", 1, 2, 0.1, 0.2, 5.0,
                                  AttentionStats(1, 2, 0.5)), pool_tokens=3000),
    RestoreDone(restored=()), RestoreDone(recalled=()),
    RestoreDone((RestoredRange((2, 4), "cold", 10, 0.5, ForwardStats(3, 0.1, 9, None)),
                 RestoredRange((6, 8), error="host lost; restored from the worker's own "
                                            "weights, requests in flight aborted")),
                (RecalledOffload(1, (0, 1), (3,), "cold", 20, 0.25, AttentionStats()),
                 RecalledOffload(2, error="host lost")), 3000),
    RestorePending(((2, 4),), (1,), 3000, 2000, 17),
    RestorePending((), (), 3000, None, 0)])
def test_each_reply_round_trips(reply: Any) -> None:
    wire = json.loads(json.dumps(reply.to_json()))
    parse = (parse_restore_reply if isinstance(reply, RestoreDone | RestorePending)
             else type(reply).from_json)
    assert parse(wire) == reply


def test_restore_replies_keep_their_shapes_and_statuses() -> None:
    assert RestoreDone(restored=()).to_json() == {"restored": []}
    assert RestoreDone(recalled=()).to_json() == {"recalled": []}
    assert RestoredRange((6, 8), error="gone").to_json() == {"layers": [6, 8], "error": "gone"}
    assert set(RestorePending((), (), 1, None, 0).to_json()) == {
        "pending", "pending_recall", "pool_tokens", "draining_to", "slots_held_above"}
    assert (RestoreDone.HTTP_STATUS, RestorePending.HTTP_STATUS) == (200, 202)


def test_a_status_as_the_worker_sends_it_parses_to_the_same_json() -> None:
    reply = StatusReply.from_json(json.loads(json.dumps(WORKER_STATUS)))
    assert reply.to_json() == WORKER_STATUS
    assert reply.ranges[0].forward == ForwardStats(12, 0.034512, 98304, 2.876)
    assert reply.heads.offloads[0].attention == AttentionStats(24, 53248, 0.004321)
    assert reply.events[1] == ControlEvent(1767000002.0, "grow_failed", {"error": "host refused"})
    assert reply.kv == KvInfo(3000, 2000, 3000, 17, 4096, 1179648, None)
    st = parse_status(WORKER_STATUS)  # the rebalancer's view of it
    assert st.ranges == (LayerRange(2, 4, "cold"),)
    assert st.offloads == (HeadOffload(1, (0, 1), (3,), "cold"),)
    assert (st.num_q_heads, st.layer_weight_bytes, st.target_for("127.0.0.1:7102")) == (
        16, 2361344, "cold")


def test_a_sparse_status_takes_the_defaults() -> None:
    reply = StatusReply.from_json({"num_layers": 4, "local_layers": [0, 1, 2, 3],
                                   "kv": None, "ranges": [{"layers": [0, 1], "target": "x"}]})
    assert (reply.kv, reply.heads, reply.model, reply.radix_cache) == (
        KvInfo(), HeadsInfo(), ModelInfo(), RadixCacheInfo())
    assert reply.ranges == (RangeInfo((0, 1), "x"),)


# -- malformed input -------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "body", "message"), [
    ("migrate_layers", {"target": "b"}, "migrate_layers: field 'layers' is required"),
    ("migrate_layers", {"layers": [0, "2"], "target": "b"}, "field 'layers': expected [start"),
    ("migrate_layers", {"layers": [2, 1], "target": "b"}, "field 'layers': [2, 1) is not a"),
    ("migrate_layers", {"layers": [0, 2], "target": 7}, "field 'target': unknown target 7"),
    ("migrate_layers", {"layers": [0, 2], "target": "b", "x": 1}, "unknown fields ['x']"),
    ("migrate_layers", [0, 2], "migrate_layers: the body must be a JSON object"),
    ("restore_layers", {"layers": None}, "restore_layers: field 'layers': expected"),
    ("offload_heads", {"layers": [0], "target": "b"}, "field 'heads' is required"),
    ("offload_heads", {"layers": [0], "heads": [1.5], "target": "b"}, "field 'heads': expected"),
    ("offload_heads", {"layers": [1, 1], "heads": [1], "target": "b"},
     "field 'layers' has duplicates"),
    ("recall_heads", {"id": "3"}, "recall_heads: field 'id': expected an integer, got '3'"),
    ("recall_heads", {"id": True}, "field 'id': expected an integer"),
    ("explode", {}, "unknown control request kind 'explode'"),
])
def test_a_malformed_request_names_its_field(kind: str, body: Any, message: str) -> None:
    with pytest.raises(ControlMessageError) as info:
        parse_request(kind, body)
    assert message in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_layers": None}, "status: field 'num_layers': expected a count"),
    ({"local_layers": [0, True]}, "field 'local_layers': expected a list of integers"),
    ({"ranges": [{"layers": [2, 4]}]}, "field 'ranges[].target' is required"),
    ({"ranges": [dict(RANGE, forward={"steps": -1})]}, "field 'ranges[].forward.steps'"),
    ({"heads": {"offloads": [dict(OFFLOAD, id="1")]}}, "field 'heads.offloads[].id'"),
    ({"kv": {"draining_to": 1.5}}, "field 'kv.draining_to': expected a count"),
    ({"model": {"dtype": 16}}, "field 'model.dtype': expected a string"),
    ({"invalidating": "no"}, "field 'invalidating': expected true or false"),
    ({"events": [{"event": "migrate"}]}, "field 'events[].at' is required"),
    ({"pending_restore": [[4, 2]]}, "field 'pending_restore[]': [4, 2) is not a"),
    ({"targets": {"cold": 7102}}, "field 'targets': expected an object of names"),
    ({"radix_cache": []}, "field 'radix_cache' must be a JSON object"),
])
def test_a_malformed_status_names_its_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ControlMessageError) as info:
        StatusReply.from_json({**WORKER_STATUS, **change})
    assert message in str(info.value)


def test_malformed_replies_name_their_field() -> None:
    with pytest.raises(ControlMessageError, match="restore reply: field 'restored' or"):
        parse_restore_reply({"pool_tokens": 1})
    with pytest.raises(ControlMessageError, match=r"field 'slots_held_above' is required"):
        parse_restore_reply({"pending": [], "pending_recall": [], "pool_tokens": 1,
                             "draining_to": None})
    with pytest.raises(ControlMessageError, match=r"field 'pool_tokens' is required"):
        OffloadHeadsReply.from_json(OFFLOAD)


def test_requests_built_in_code_are_checked_too() -> None:
    with pytest.raises(ControlMessageError, match="not a non-empty range"):
        MigrateRequest((4, 4), "tob")
    with pytest.raises(ControlMessageError, match="'heads': expected a non-empty list"):
        OffloadHeadsRequest((1,), (), "tob")
    with pytest.raises(ControlMessageError, match="unknown target None"):
        OffloadHeadsRequest((1,), (2,), None)  # type: ignore[arg-type]
    assert MigrateRequest([1, 2], "t").layers == (1, 2)  # type: ignore[arg-type]


def test_a_decision_validates_its_kind_and_request() -> None:
    with pytest.raises(ValueError, match=r"Decision.kind: must be one of .*'explode'"):
        Decision("explode", "http://a:1", "why")
    with pytest.raises(ValueError, match="Decision.request: a migrate_layers decision carries "
                                         "MigrateRequest"):
        Decision("migrate_layers", "http://a:1", "why", request=RestoreRequest((0, 2)))
    with pytest.raises(ValueError, match="a skip decision carries no request"):
        Decision("skip", "http://a:1", "why", request=RecallHeadsRequest(1))
    d = Decision("recall_heads", "http://a:1", "why", request=RecallHeadsRequest(1))
    assert (d.body, d.path, Decision("skip", "http://a:1", "why").body) == (
        {"id": 1}, "/banaserve/recall_heads", {})


def test_the_messages_import_without_aiohttp_torch_or_sglang() -> None:
    code = ("import sys, router.rebalance.messages, router.rebalance.signals, "
            "router.rebalance.decide; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'aiohttp', 'torch', 'sglang'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the worker ------------------------------------------------------------------------------------
def _worker() -> Any:
    """A MigrationManager over fake SGLang objects, with layers [2, 4) migrated to ``cold``."""
    from runtime_patches.migration.manager import MigrationManager
    from runtime_patches.migration.ranges import MigratedRange
    from runtime_patches.migration.remote import RemoteLayers
    from tests.unit.test_migration import _scheduler

    sched = _scheduler(size=8, layers=4, heads=2)
    runner = sched.tp_worker.model_runner
    runner.token_to_kv_pool.dtype, runner.dtype, runner.device = torch.float32, torch.float32, "cpu"
    runner.model = SimpleNamespace(model=SimpleNamespace(layers=nn.ModuleList(
        nn.Linear(2, 2) for _ in range(4))))
    sched.tree_cache = SimpleNamespace(evictable_size=lambda: 3, protected_size=lambda: 1)
    manager = MigrationManager(sched, targets={"cold": "127.0.0.1:7102"})
    manager.cannot_move = lambda: None  # needs SGLang's parallel config
    remote = RemoteLayers(SimpleNamespace(address="127.0.0.1:7102"), 2, 4, None, None)
    manager.ranges[2] = MigratedRange(2, 4, "cold", remote, [], [], 48, 96, 144, 0.5)
    manager.event("migrate", manager.ranges[2].describe().to_json())
    return manager


def test_the_workers_status_is_a_status_reply() -> None:
    status, payload = _worker().handle("status", {})
    wire = json.loads(json.dumps(payload))
    assert status == 200 and StatusReply.from_json(wire).to_json() == wire
    assert wire["local_layers"] == [0, 1] and wire["ranges"][0]["layers"] == [2, 4]
    assert wire["ranges"][0]["forward"] == {"steps": 0, "step_seconds": 0.0,
                                            "handoff_bytes": 0, "mean_step_ms": None}
    assert wire["events"][0]["event"] == "migrate" and wire["heads"]["num_q_heads"] is None
    st = parse_status(wire)
    assert st.ranges == (LayerRange(2, 4, "cold"),) and st.layer_weight_bytes == 24


@pytest.mark.parametrize(("op", "body", "message"), [
    ("migrate", {"layers": [0, 2], "target": 7}, "migrate_layers: field 'target'"),
    ("migrate", ["layers"], "migrate_layers: the body must be a JSON object"),
    ("restore", {"layers": "2-4"}, "restore_layers: field 'layers': expected [start, end]"),
    ("offload_heads", {"layers": [0], "heads": "1", "target": "cold"},
     "offload_heads: field 'heads': expected a non-empty list of integers, got '1'"),
    ("recall_heads", {"id": "1"}, "recall_heads: field 'id': expected an integer"),
])
def test_the_worker_answers_a_malformed_body_with_400_naming_the_field(
        op: str, body: Any, message: str) -> None:
    manager = _worker()
    status, payload = manager.handle(op, body)
    assert status == 400 and message in payload["error"], payload
    assert list(manager.ranges) == [2]  # nothing changed
