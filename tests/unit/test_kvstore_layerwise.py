"""Layer-wise loading: the fill queue's ordering and gates, the client's page lease, the backend's
deferred fills into a ``layer_first`` host pool, and the patched asynchronous L2->L1 loop.

The host pool here is a stand-in carrying SGLang's own ``MHATokenToKVPoolHost`` page methods
(bound from the real class), so the bytes land exactly where SGLang's synchronous path puts them.
The real scheduler path runs in tests/integration/test_kvstore_sglang.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.pool_host.mha")
from sglang.srt.mem_cache.l2_transfer import L2Transfer  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402

from kvstore import layerwise  # noqa: E402
from kvstore.client import KVStoreClient  # noqa: E402
from kvstore.layerwise import Fill, LayerFillError, LayerFills, ThreadEvent  # noqa: E402
from kvstore.server import KVStoreServer  # noqa: E402
from kvstore.sglang_backend import KVStoreHiCache  # noqa: E402
from runtime_patches import hicache_layerwise  # noqa: E402
from tests.unit.test_kvstore_server import running_server  # noqa: E402
from tests.unit.test_kvstore_sglang_backend import storage_config  # noqa: E402

PAGE, LAYERS, HEADS, DIM = 4, 3, 2, 8


class LayerFirstPool:
    """A ``layer_first`` MHA host pool: ``kv_buffer`` is (2, layers, slots, heads, dim), with the
    page methods of SGLang's ``MHATokenToKVPoolHost``."""

    layout = "layer_first"
    get_data_page = MHATokenToKVPoolHost.get_data_page
    set_from_flat_data_page = MHATokenToKVPoolHost.set_from_flat_data_page
    get_dummy_flat_data_page = MHATokenToKVPoolHost.get_dummy_flat_data_page

    def __init__(self, size: int = 64) -> None:
        self.page_size, self.layer_num, self.head_num, self.head_dim = PAGE, LAYERS, HEADS, DIM
        self.dtype, self.device, self.pin_memory = torch.bfloat16, "cpu", False
        self.kv_buffer = torch.zeros(2, LAYERS, size, HEADS, DIM, dtype=self.dtype)


@pytest.fixture
def server() -> Iterator[KVStoreServer]:
    with running_server() as s:
        yield s


def _fill(copy: Any, layers: int = LAYERS, done: list[str] | None = None, name: str = "f",
          ) -> Fill:
    return Fill(num_layers=layers, copy_layer=copy,
                finish=lambda: done.append(name) if done is not None else None)


# -- the fill queue ------------------------------------------------------------------------------

def test_thread_event_starts_done_and_arm_makes_it_pending() -> None:
    event = ThreadEvent()
    assert event.query()
    event.arm()
    assert not event.query()
    threading.Timer(0.05, event.record).start()
    event.synchronize()
    assert event.query()


def test_wait_layer_returns_once_that_layer_of_every_earlier_fill_is_written() -> None:
    fills = LayerFills()
    gate = threading.Event()
    written: list[tuple[str, int]] = []
    finished: list[str] = []

    def slow(layer: int) -> None:
        if layer == 1:
            gate.wait(5)
        written.append(("second", layer))

    first = fills.submit(_fill(lambda layer: written.append(("first", layer)), done=finished,
                               name="first"))
    second = fills.submit(_fill(slow, done=finished, name="second"))
    assert (first, second) == (1, 2) and fills.mark() == 2
    fills.wait_layer(second, 0)  # layer 0 of fill 2, hence all of fill 1
    assert ("first", LAYERS - 1) in written and ("second", 0) in written
    waiter = threading.Thread(target=fills.wait_layer, args=(second, 1))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "layer 1 of the second fill is not written yet"
    gate.set()
    waiter.join(5)
    fills.wait_all(second)
    assert finished == ["first", "second"] and fills.pending() == 0


def test_a_failed_fill_fails_its_waiters_instead_of_serving_stale_bytes() -> None:
    fills = LayerFills()
    finished: list[str] = []

    def broken(layer: int) -> None:
        raise RuntimeError("copy failed")

    seq = fills.submit(_fill(broken, done=finished))
    with pytest.raises(LayerFillError, match="copy failed"):
        fills.wait_layer(seq, 0)
    assert finished == ["f"], "the pages are released even when the copy fails"


# -- the client's lease --------------------------------------------------------------------------

@pytest.mark.parametrize("use_shm", [True, False])
def test_a_lease_holds_the_pages_until_released(server: KVStoreServer, use_shm: bool) -> None:
    pages = {f"k{i}": bytes([i]) * 1000 for i in range(3)}
    with KVStoreClient("127.0.0.1", server.port, use_shm=use_shm, max_connections=2) as client:
        client.put(list(pages.items()))
        lease = client.get_leased(["k0", "k1", "missing", "k2"], page_bytes=1000)
        assert lease.sizes == [1000, 1000, None, 1000]
        assert [bytes(lease.page(i) or b"") for i in (0, 1, 3)] == [pages["k0"], pages["k1"],
                                                                    pages["k2"]]
        # the leased connection is not handed to others: their reads do not touch the pages
        assert client.get(["k2"]) == [pages["k2"]]
        client.get_into(["k0"], [bytearray(1000)])
        assert bytes(lease.page(0) or b"") == pages["k0"]
        lease.release()
        lease.release()  # idempotent
        assert lease.page(0) is None
        with client.get_leased(["k1"], page_bytes=10) as small:
            assert small.sizes == [None], "a page larger than its room is a miss"


# -- the backend's deferred fills ----------------------------------------------------------------

def _backend(port: int, pool: LayerFirstPool, layerwise_on: bool) -> KVStoreHiCache:
    config = storage_config(port)
    config.extra_config = {**(config.extra_config or {}), "kvstore_layerwise": layerwise_on}
    b = KVStoreHiCache(config, {})
    b.register_mem_pool_host(pool)
    return b


def test_layerwise_reads_land_exactly_where_the_synchronous_path_puts_them(
        server: KVStoreServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerwise, "_gates_check", lambda: True)
    writer_pool, sync_pool, layered_pool = LayerFirstPool(), LayerFirstPool(), LayerFirstPool()
    writer_pool.kv_buffer.normal_()
    hashes = [c * 64 for c in "abc"]
    writer = _backend(server.port, writer_pool, False)
    assert writer.batch_set_v1(hashes, torch.arange(8, 8 + 3 * PAGE)) == [True] * 3
    targets = torch.arange(40, 40 + 4 * PAGE)
    sync = _backend(server.port, sync_pool, False)
    assert sync._fills is None
    assert sync.batch_get_v1(hashes + ["d" * 64], targets) == [True, True, True, False]
    layered = _backend(server.port, layered_pool, True)
    assert layered._fills is not None
    assert layered.batch_get_v1(hashes + ["d" * 64], targets) == [True, True, True, False]
    layered._fills.wait_all(layered._fills.mark())
    assert torch.equal(layered_pool.kv_buffer, sync_pool.kv_buffer)
    assert torch.equal(layered_pool.kv_buffer[:, :, 40:52], writer_pool.kv_buffer[:, :, 8:20])


def test_without_the_runtime_patches_layerwise_stays_off(server: KVStoreServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # this test process runs without BANASERVE_KV_LAYERWISE, so the gates are not installed
    assert not hicache_layerwise.gates_applied()
    assert not layerwise.gates_applied()
    with caplog.at_level("WARNING"):
        b = _backend(server.port, LayerFirstPool(), True)
    assert b._fills is None
    assert "layer-wise loading off" in caplog.text


def test_the_backend_reads_the_gates_check_the_patch_module_registers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerwise, "_gates_check", None)
    assert not layerwise.gates_applied(), "no patch boot in this process: gates are off"
    monkeypatch.setattr(hicache_layerwise.REGISTRY, "_patches", {})
    hicache_layerwise.register()
    assert layerwise._gates_check is hicache_layerwise.gates_applied
    assert not layerwise.gates_applied(), "registered but not applied"
    monkeypatch.setattr(hicache_layerwise.REGISTRY, "_applied",
                        set(hicache_layerwise.PATCH_NAMES))
    assert layerwise.gates_applied()


# -- the patched L2->L1 loop ---------------------------------------------------------------------

class _RecordingHostPool:
    layer_num = LAYERS
    shared_allocation_domain = None

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def load_to_device_per_layer_physical(self, device_pool: Any, host_indices: Any,
                                          device_indices: Any, layer_id: int, io_backend: str,
                                          *, is_draft: bool = False) -> None:
        self.loaded.append(layer_id)


class _Engine:
    io_backend = "direct"

    @staticmethod
    def _prepare_transfers(transfers: list[Any]) -> list[Any]:
        return transfers


def test_l2_to_l1_runs_on_a_thread_and_waits_for_each_layer_of_the_store_fill(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fills = LayerFills()
    monkeypatch.setattr(layerwise, "_active", fills)
    gate = threading.Event()
    fills.submit(_fill(lambda layer: gate.wait(5) if layer == 1 else None))
    producer = hicache_layerwise.ThreadLayerLoadingEvent(LAYERS)
    producer.arm()
    host = _RecordingHostPool()
    submit = hicache_layerwise._async_host_to_device(lambda *a, **k: pytest.fail("sync path"))
    completion = submit(_Engine(), [L2Transfer(host, None, torch.arange(8), torch.arange(8))],
                        transfer_layer_id_max=LAYERS, on_layer_done=producer.complete)
    producer.wait(0)  # the forward's layer 0 may run while layer 1 is still being filled
    time.sleep(0.1)
    assert host.loaded == [0] and not producer.load_events[1].query()
    assert not completion.finish_event.query()
    gate.set()
    producer.wait(LAYERS - 1)
    completion.finish_event.synchronize()
    assert host.loaded == list(range(LAYERS))


def test_producer_slot_is_rearmed_only_after_its_previous_load_finished() -> None:
    from sglang.srt.managers.cache_controller import LayerDoneCounter

    counter = LayerDoneCounter.__new__(LayerDoneCounter)
    counter.num_layers, counter.num_counters = LAYERS, 3
    counter.events = [hicache_layerwise.ThreadLayerLoadingEvent(LAYERS) for _ in range(3)]
    counter.producer_index = counter.consumer_index = -1
    update = hicache_layerwise._producer_reuse(LayerDoneCounter.update_producer)
    assert update(counter) == 0
    assert not counter.events[0].finish_event.query(), "armed for the new load"
    for layer in range(LAYERS):
        counter.events[0].complete(layer)
    counter.producer_index = 2  # the next call reuses slot 0
    assert update(counter) == 0


def test_a_failed_l2_to_l1_load_makes_the_forward_raise_instead_of_hanging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerwise, "_active", None)

    class BrokenHostPool(_RecordingHostPool):
        def load_to_device_per_layer_physical(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("copy failed")

    producer = hicache_layerwise.ThreadLayerLoadingEvent(LAYERS)
    producer.arm()
    submit = hicache_layerwise._async_host_to_device(lambda *a, **k: pytest.fail("sync path"))
    submit(_Engine(), [L2Transfer(BrokenHostPool(), None, torch.arange(8), torch.arange(8))],
           transfer_layer_id_max=LAYERS, on_layer_done=producer.complete)
    with pytest.raises(RuntimeError, match="layer 0 is not in place"):
        producer.wait(0)
    producer.arm()  # the slot is usable again for the next load
    assert producer.error is None and not producer.load_events[0].query()
