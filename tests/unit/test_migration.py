"""Layer migration logic without SGLang running: frames, the TCP transport's failure modes,
control-request validation, and the launcher's wiring of layer hosts."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from runtime_patches.launch import WorkerConfig, build_command, parse_layer_hosts
from runtime_patches.migration import TARGETS_ENV
from runtime_patches.migration.manager import MigrationManager, parse_targets
from runtime_patches.migration.remote import PassThroughLayer
from runtime_patches.migration.transport import (
    LayerHostLost,
    LayerHostRefused,
    TcpTransport,
    parse_address,
)
from runtime_patches.migration.wire import WireError, recv_message, send_message

# -- wire --------------------------------------------------------------------------------------


def test_frames_carry_tensors_bitwise() -> None:
    a, b = socket.socketpair()
    tensors = {"h": torch.randn(3, 5, dtype=torch.bfloat16),
               "ids": torch.arange(7, dtype=torch.int32), "empty": torch.empty(0, 4),
               "scalar": torch.tensor(2.5)}
    sent = send_message(a, {"op": "forward", "mode": 2, "nested": {1: "x"}}, tensors)
    fields, got, received = recv_message(b)
    assert sent == received
    assert fields == {"op": "forward", "mode": 2, "nested": {1: "x"}}
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           t.reshape(-1).view(torch.uint8))


def test_a_foreign_frame_is_refused() -> None:
    a, b = socket.socketpair()
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(WireError, match="magic"):
        recv_message(b)


def test_a_peer_closing_mid_frame_is_a_connection_error() -> None:
    a, b = socket.socketpair()
    a.sendall(b"\x00\x00\x00\x10")
    a.close()
    with pytest.raises(ConnectionError):
        recv_message(b)


# -- transport ---------------------------------------------------------------------------------


class _FakeHost(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        super().__init__(("127.0.0.1", 0), _FakeHandler)


class _FakeHandler(socketserver.BaseRequestHandler):
    server: _FakeHost

    def handle(self) -> None:
        while True:
            try:
                fields, tensors, _ = recv_message(self.request)
            except (ConnectionError, OSError):
                return
            behaviour = self.server.behaviour
            if behaviour == "close":
                return
            if behaviour == "silent":
                threading.Event().wait(5)
                return
            if behaviour == "refuse":
                send_message(self.request, {"ok": False, "error": {"code": "refused",
                                                                   "message": "no room"}})
            else:
                send_message(self.request, {"ok": True, "echo": fields["op"]},
                             {k: v * 2 for k, v in tensors.items()})


@pytest.fixture
def fake_host(request: pytest.FixtureRequest) -> Iterator[str]:
    server = _FakeHost(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("fake_host", ["echo"], indirect=True)
def test_a_call_returns_the_reply(fake_host: str) -> None:
    transport = TcpTransport(fake_host)
    fields, tensors = transport.call("forward", {}, {"x": torch.ones(3)})
    assert fields["echo"] == "forward" and torch.equal(tensors["x"], torch.full((3,), 2.0))
    assert transport.bytes_sent > 12 and transport.bytes_received > 12
    transport.close()


@pytest.mark.parametrize("fake_host", ["refuse"], indirect=True)
def test_an_error_reply_is_a_refusal_and_keeps_the_connection(fake_host: str) -> None:
    transport = TcpTransport(fake_host)
    with pytest.raises(LayerHostRefused, match="no room"):
        transport.call("open")
    with pytest.raises(LayerHostRefused):
        transport.call("open")
    transport.close()


@pytest.mark.parametrize("fake_host", ["close"], indirect=True)
def test_a_closed_connection_is_a_lost_host(fake_host: str) -> None:
    transport = TcpTransport(fake_host)
    with pytest.raises(LayerHostLost, match="forward failed"):
        transport.call("forward")
    with pytest.raises(LayerHostLost, match="already closed"):
        transport.call("forward")


@pytest.mark.parametrize("fake_host", ["silent"], indirect=True)
def test_no_reply_in_time_is_a_lost_host(fake_host: str) -> None:
    transport = TcpTransport(fake_host, call_timeout=0.3)
    with pytest.raises(LayerHostLost, match="no reply in time"):
        transport.call("forward")


def test_an_unreachable_host_is_lost_at_connect() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LayerHostLost, match="unreachable"):
        TcpTransport(f"127.0.0.1:{port}", connect_timeout=1.0)


@pytest.mark.parametrize("bad", ["nohost", "h:", ":80", "h:0", "h:70000", "h:x"])
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(bad)


# -- control validation ------------------------------------------------------------------------


def _manager(num_layers: int = 4) -> MigrationManager:
    model = SimpleNamespace(model=SimpleNamespace(layers=nn.ModuleList(
        nn.Identity() for _ in range(num_layers))))
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(
        model=model, device="cpu")))
    return MigrationManager(scheduler, targets={"b": "127.0.0.1:1"})


@pytest.mark.parametrize(("body", "message"), [
    ({"layers": [0, 5], "target": "b"}, "not a non-empty range"),
    ({"layers": [3, 3], "target": "b"}, "not a non-empty range"),
    ({"layers": [True, 2], "target": "b"}, "two integers"),
    ({"layers": "0-2", "target": "b"}, "two integers"),
    ({"layers": [0, 2], "target": "c"}, "unknown target 'c'"),
    ({"layers": [0, 2], "target": "b", "x": 1}, "unknown fields"),
])
def test_bad_migrate_requests_are_400(body: dict[str, Any], message: str) -> None:
    manager = _manager()
    status, out = manager.handle("migrate", body)
    assert status == 400 and message in out["error"]
    assert manager.ranges == {}
    assert all(isinstance(m, nn.Identity) for m in manager.layers)


def test_restore_of_a_range_that_is_not_migrated_is_400() -> None:
    status, out = _manager().handle("restore", {"layers": [0, 2]})
    assert status == 400 and "not a migrated range" in out["error"]
    assert _manager().handle("restore", {}) == (200, {"restored": []})


def test_unknown_ops_are_404() -> None:
    assert _manager().handle("explode", {})[0] == 404


def test_targets_parse_and_refuse_garbage() -> None:
    assert parse_targets("a=127.0.0.1:7001, b=h:9") == {"a": "127.0.0.1:7001", "b": "h:9"}
    assert parse_targets("") == {}
    with pytest.raises(ValueError):
        parse_targets("a")
    with pytest.raises(ValueError):
        parse_targets("a=h")


def test_pass_through_layers_return_their_input() -> None:
    hidden = torch.randn(2, 3)
    assert PassThroughLayer(2)(torch.arange(2), hidden, None) is hidden


# -- launcher ----------------------------------------------------------------------------------


def test_layer_hosts_reach_the_worker_and_turn_off_the_overlap_loop() -> None:
    cfg = WorkerConfig(model_path="/m", port=8000, device="cpu",
                       layer_hosts=parse_layer_hosts(["b=127.0.0.1:7001", "c=10.0.0.2:7002"]))
    argv, env = build_command(cfg)
    assert env[TARGETS_ENV] == "b=127.0.0.1:7001,c=10.0.0.2:7002"
    assert "--disable-overlap-schedule" in argv
    argv, env = build_command(WorkerConfig(model_path="/m", port=8000, device="cpu"))
    assert env[TARGETS_ENV] == "" and "--disable-overlap-schedule" not in argv


@pytest.mark.parametrize("items", [["b"], ["b=nohost"], ["=h:1"]])
def test_bad_layer_hosts_are_refused(items: list[str]) -> None:
    with pytest.raises(ValueError):
        WorkerConfig(model_path="/m", port=8000, layer_hosts=parse_layer_hosts(items))


# -- KV capacity -------------------------------------------------------------------------------


class _Pool:
    """The parts of SGLang's MHATokenToKVPool that KVCapacity touches."""

    def __init__(self, size: int, layers: int, heads: int = 1) -> None:
        self.size, self.page_size, self.start_layer, self.head_num = size, 1, 0, heads
        fused = [torch.zeros((2, size + 1, heads, 2)) for _ in range(layers)]
        self.k_buffer = [f[0] for f in fused]
        self.v_buffer = [f[1] for f in fused]


class _Allocator:
    def __init__(self, size: int) -> None:
        self.size, self.page_size = size, 1
        self.free_pages = torch.arange(1, size + 1)
        self.release_pages = torch.empty(0, dtype=torch.int64)

    def alloc(self, n: int) -> torch.Tensor:
        out, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        return out

    def free(self, ids: torch.Tensor) -> None:
        self.free_pages = torch.cat((self.free_pages, ids))


def _scheduler(size: int = 8, layers: int = 4, heads: int = 1) -> Any:
    pool = _Pool(size, layers, heads)
    sched = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(
        token_to_kv_pool=pool)), token_to_kv_pool_allocator=_Allocator(size),
        max_total_num_tokens=size)
    sched.pool_stats = SimpleNamespace(max_total_num_tokens=size)
    return sched


def test_the_pool_grows_by_the_memory_migrated_layers_leave() -> None:
    from runtime_patches.migration.capacity import KVCapacity

    sched = _scheduler(size=8, layers=4)
    capacity = KVCapacity(sched)
    pool = sched.tp_worker.model_runner.token_to_kv_pool
    allocator = sched.token_to_kv_pool_allocator
    assert capacity.size_for(4) == 8 and capacity.size_for(2) == 17 and capacity.size_for(1) == 35
    held = allocator.alloc(3)
    pool.k_buffer[0][held] = 7.0
    capacity.resize(17)
    assert pool.size == allocator.size == 17 and pool.k_buffer[0].shape[0] == 18
    assert torch.equal(pool.k_buffer[0][held], torch.full((3, 1, 2), 7.0))  # rows kept
    assert sorted(allocator.free_pages.tolist()) == list(range(4, 18))
    assert sched.max_total_num_tokens == sched.pool_stats.max_total_num_tokens == 17
    assert capacity.used_slots().tolist() == held.tolist()


def test_a_drain_keeps_new_kv_below_and_accounting_exact() -> None:
    from runtime_patches.migration.capacity import KVCapacity

    sched = _scheduler(size=8, layers=2)
    capacity = KVCapacity(sched)
    allocator = sched.token_to_kv_pool_allocator
    capacity.resize(17)
    allocator.free_pages = torch.cat((allocator.free_pages[10:], allocator.free_pages[:10]))
    high = allocator.alloc(2)  # slots 11 and 12: above the original 8
    assert high.tolist() == [11, 12]
    capacity.drain(8)
    assert capacity.sweep() == 2  # still held
    assert int(allocator.free_pages.max()) <= 8
    # Capacity excludes drained slots: free + held == capacity, as SGLang's idle check wants.
    assert sched.max_total_num_tokens == len(allocator.free_pages) + 2
    new = allocator.alloc(3)
    assert int(new.max()) <= 8
    allocator.free(high)
    assert capacity.sweep() == 0 and int(allocator.free_pages.max()) <= 8
    allocator.free(new)
    capacity.finish_drain()
    assert capacity.size == allocator.size == 8 == sched.max_total_num_tokens
    assert sorted(allocator.free_pages.tolist()) == list(range(1, 9))


def test_an_undrain_gives_the_slots_back() -> None:
    from runtime_patches.migration.capacity import KVCapacity

    sched = _scheduler(size=8, layers=2)
    capacity = KVCapacity(sched)
    capacity.resize(17)
    capacity.drain(8)
    assert sched.max_total_num_tokens == 8
    capacity.undrain()
    assert sched.max_total_num_tokens == 17
    assert sorted(sched.token_to_kv_pool_allocator.free_pages.tolist()) == list(range(1, 18))
