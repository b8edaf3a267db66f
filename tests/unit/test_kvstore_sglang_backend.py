"""The SGLang storage adapter against a real kvstore server, with a host pool shaped like SGLang's.

``FakeHostPool`` implements the four ``MHATokenToKVPoolHost`` members the adapter uses
(``get_data_page``, ``set_from_flat_data_page``, ``get_dummy_flat_data_page`` and the shape
attributes) over a real ``page_first`` tensor, exactly as SGLang 0.5.23 lays it out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402

from kvstore.keys import PageNamespace  # noqa: E402
from kvstore.server import KVStoreServer  # noqa: E402
from kvstore.sglang_backend import KVStoreHiCache, worker_args  # noqa: E402
from tests.unit.test_kvstore_server import running_server  # noqa: E402

PAGE, LAYERS, HEADS, DIM = 4, 3, 2, 8


class FakeHostPool:
    """SGLang's ``page_first`` MHA host pool: ``kv_buffer`` is (2, size, layers, heads, dim)."""

    layout = "page_first"

    def __init__(self, size: int = 64, dtype: torch.dtype = torch.bfloat16) -> None:
        self.page_size, self.layer_num, self.head_num, self.head_dim = PAGE, LAYERS, HEADS, DIM
        self.dtype = dtype
        self.kv_buffer = torch.zeros(2, size, LAYERS, HEADS, DIM, dtype=dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, index:index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * LAYERS * PAGE * HEADS * DIM, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.kv_buffer[:, index:index + self.page_size] = data_page.reshape(
            2, PAGE, LAYERS, HEADS, DIM)


def storage_config(port: int, model: str = "m", tp_rank: int = 0,
                   metrics: bool = False) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=metrics, is_page_first_layout=True,
        model_name=model, extra_config={"kvstore_address": f"127.0.0.1:{port}",
                                        "kvstore_timeout_s": 1.0})


def backend(port: int, pool: FakeHostPool, **kwargs: object) -> KVStoreHiCache:
    b = KVStoreHiCache(storage_config(port, **kwargs), {})  # type: ignore[arg-type]
    b.register_mem_pool_host(pool)
    return b


@pytest.fixture
def server() -> Iterator[KVStoreServer]:
    with running_server() as s:
        yield s


def test_a_page_written_by_one_worker_is_loaded_by_another(server: KVStoreServer) -> None:
    writer_pool, reader_pool = FakeHostPool(), FakeHostPool()
    writer_pool.kv_buffer.normal_()
    hashes = ["a" * 64, "b" * 64, "c" * 64]
    writer, reader = backend(server.port, writer_pool), backend(server.port, reader_pool)
    slots = torch.arange(8, 8 + 3 * PAGE, dtype=torch.int64)  # pages at slots 8, 12, 16
    assert writer.batch_set_v1(hashes, slots) == [True] * 3
    assert reader.batch_exists(hashes + ["d" * 64]) == 3
    targets = torch.arange(40, 40 + 3 * PAGE, dtype=torch.int64)
    assert reader.batch_get_v1(hashes, targets) == [True] * 3
    assert torch.equal(reader_pool.kv_buffer[:, 40:52], writer_pool.kv_buffer[:, 8:20])
    # writing the same pages again sends nothing new
    puts_before = server.counters.snapshot()["requests"].get("put", 0)
    assert writer.batch_set_v1(hashes, slots) == [True] * 3
    assert server.counters.snapshot()["requests"].get("put", 0) == puts_before


def test_reads_stop_at_the_first_miss(server: KVStoreServer) -> None:
    pool = FakeHostPool()
    pool.kv_buffer.normal_()
    b = backend(server.port, pool)
    assert b.batch_set_v1(["a" * 64, "c" * 64], torch.arange(0, 2 * PAGE)) == [True, True]
    before = pool.kv_buffer.clone()
    got = b.batch_get_v1(["a" * 64, "b" * 64, "c" * 64], torch.arange(32, 32 + 3 * PAGE))
    assert got == [True, False, False]  # c is stored, but only the leading run may be used
    assert torch.equal(pool.kv_buffer[:, 36:44], before[:, 36:44])


def test_pages_of_another_model_or_shard_are_not_shared(server: KVStoreServer) -> None:
    pool = FakeHostPool()
    backend(server.port, pool).batch_set_v1(["a" * 64], torch.arange(0, PAGE))
    assert backend(server.port, FakeHostPool(), model="other").batch_exists(["a" * 64]) == 0
    assert backend(server.port, FakeHostPool(), tp_rank=1).batch_exists(["a" * 64]) == 0
    assert backend(server.port, FakeHostPool(dtype=torch.float16)).batch_exists(["a" * 64]) == 0
    assert backend(server.port, FakeHostPool()).batch_exists(["a" * 64]) == 1


def test_a_page_of_the_wrong_size_is_a_miss(server: KVStoreServer) -> None:
    pool = FakeHostPool()
    b = backend(server.port, pool)
    assert b.namespace is not None
    server.store.put_many([(b.namespace.key("a" * 64), b"short")])
    assert b.batch_get_v1(["a" * 64], torch.arange(0, PAGE)) == [False]


def test_store_down_means_misses_and_failed_writes_not_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    pool = FakeHostPool()
    b = backend(port, pool)
    assert b.batch_exists(["a" * 64]) == 0
    assert b.batch_get_v1(["a" * 64], torch.arange(0, PAGE)) == [False]
    assert b.batch_set_v1(["a" * 64], torch.arange(0, PAGE)) == [False]
    b.close()


def test_legacy_flat_page_interface(server: KVStoreServer) -> None:
    pool = FakeHostPool()
    pool.kv_buffer.normal_()
    b = backend(server.port, pool)
    page = pool.get_data_page(0)
    assert b.batch_set(["a" * 64], [page])
    target = pool.get_dummy_flat_data_page()
    got = b.batch_get(["a" * 64, "b" * 64], [target, pool.get_dummy_flat_data_page()])
    assert got[1] is None and torch.equal(target, page)


def test_missing_address_and_non_mha_pool_stop_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANASERVE_KVSTORE", raising=False)
    cfg = storage_config(1)
    cfg.extra_config = {}
    with pytest.raises(ValueError, match="kvstore address"):
        KVStoreHiCache(cfg, {})
    b = KVStoreHiCache(storage_config(1), {})
    with pytest.raises(ValueError, match="MHA"):
        b.register_mem_pool_host(object())


def test_worker_args_name_this_backend() -> None:
    args = worker_args("127.0.0.1:7000")
    assert args[args.index("--hicache-storage-backend") + 1] == "dynamic"
    extra = args[args.index("--hicache-storage-backend-extra-config") + 1]
    assert '"class_name": "KVStoreHiCache"' in extra and '"interface_v1": 1' in extra
    # every prefill goes to the store (a prefix computed once on A can be loaded by B)
    assert args[args.index("--hicache-write-policy") + 1] == "write_through"
    selective = worker_args("127.0.0.1:7000", write_policy="write_through_selective")
    assert selective[selective.index("--hicache-write-policy") + 1] == "write_through_selective"
    with pytest.raises(ValueError, match="write policy must be one of"):
        worker_args("127.0.0.1:7000", write_policy="sometimes")


def test_namespace_suffix_names_everything_that_must_match() -> None:
    ns = PageNamespace("org/Model 1", "page_first", "bfloat16", 64, 30, 3, 64, 1, 2)
    assert ns.key("ab") == "ab@org-Model-1/page_first/bfloat16/p64/l30h3d64/tp1of2"
    with pytest.raises(ValueError, match="tp_rank"):
        PageNamespace("m", "page_first", "bfloat16", 64, 30, 3, 64, 2, 2)


def test_storage_metrics_report_pages_and_bandwidth_per_call_then_reset(
        server: KVStoreServer) -> None:
    pool = FakeHostPool()
    pool.kv_buffer.normal_()
    b = backend(server.port, pool, metrics=True)
    assert b.batch_set_v1(["a" * 64, "b" * 64], torch.arange(0, 2 * PAGE)) == [True, True]
    assert b.batch_get_v1(["a" * 64, "b" * 64, "c" * 64], torch.arange(32, 32 + 3 * PAGE)) == [
        True, True, False]
    stats = b.get_stats()
    assert stats.backup_pgs == [2] and stats.prefetch_pgs == [2]
    assert len(stats.backup_bandwidth) == 1 and stats.backup_bandwidth[0] > 0
    assert len(stats.prefetch_bandwidth) == 1 and stats.prefetch_bandwidth[0] > 0
    again = b.get_stats()
    assert again.prefetch_pgs == [] and again.backup_pgs == []
    assert backend(server.port, FakeHostPool()).get_stats() is None  # metrics off
