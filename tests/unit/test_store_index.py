"""``router.store_index``: the router's lookups of a prompt's leading pages in a real kvstore
server (in-process, on port 0), and its page hashes against SGLang's own."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator

import pytest

from kvstore.client import KVStoreClient
from kvstore.keys import PageNamespace
from kvstore.server import KVStoreServer
from router.store_index import StoreIndex, StoreIndexConfig, page_hashes
from tests.unit.test_kvstore_client import free_port
from tests.unit.test_kvstore_server import running_server

NS = PageNamespace(model="SmolLM2", layout="page_first", dtype="float32", page_size=16,
                   num_layers=2, num_kv_heads=1, head_dim=4)
IDS = [random.Random(7).randrange(49152) for _ in range(100)]  # 6 whole pages of 16


def test_page_hashes_are_sglangs_storage_hashes() -> None:
    from sglang.srt.mem_cache.utils import get_storage_hash_str
    for size in (1, 16, 64):
        ours = page_hashes(IDS, size, 1000)
        whole = IDS[:len(IDS) // size * size]
        assert ours == list(get_storage_hash_str(whole, None, page_size=size))
    assert page_hashes(IDS, 16, 2) == page_hashes(IDS, 16, 1000)[:2]
    # a different token changes its page's hash and every later one, not the ones before
    other = page_hashes([*IDS[:40], IDS[40] + 1, *IDS[41:]], 16, 1000)
    assert other[:2] == page_hashes(IDS, 16, 1000)[:2]
    assert all(a != b for a, b in zip(other[2:], page_hashes(IDS, 16, 1000)[2:], strict=True))
    assert page_hashes([1, 2, -3, 4], 2, 10) == page_hashes([1, 2], 2, 10)  # claims no more


@pytest.fixture
def server() -> Iterator[KVStoreServer]:
    with running_server() as server:
        yield server


def store_pages(server: KVStoreServer, ns: PageNamespace, ids: list[int], pages: int) -> None:
    with KVStoreClient("127.0.0.1", server.port) as client:
        keys = ns.keys(page_hashes(ids, ns.page_size, pages))
        assert client.put([(key, b"page") for key in keys]) == [True] * len(keys)


def lookup(index: StoreIndex, ids: list[int], body: dict | None = None) -> int:
    async def run() -> int:
        async with index.running():
            return await index.leading_tokens(ids, body)
    return asyncio.run(run())


def test_it_finds_the_leading_pages_the_store_holds(server: KVStoreServer) -> None:
    index = StoreIndex(StoreIndexConfig("127.0.0.1", server.port, refresh_s=0))
    assert lookup(index, IDS) == 0  # nothing written: no namespace known
    assert index.stats.lookups["skipped"] == 1
    store_pages(server, NS, IDS, 4)
    assert lookup(index, IDS) == 64
    assert lookup(index, IDS[:40]) == 32  # only whole pages of the prompt
    assert lookup(index, [IDS[0] + 1, *IDS[1:]]) == 0  # another first page: another chain
    assert index.stats.lookups == {"hit": 2, "miss": 1, "error": 0, "skipped": 1}
    assert index.stats.tokens == 96
    # a hole in the chain ends the prefix there
    with KVStoreClient("127.0.0.1", server.port) as client:
        client.delete(NS.keys(page_hashes(IDS, 16, 4))[1:2])
    assert lookup(index, IDS) == 16


def test_the_namespace_holding_most_wins_and_page_sizes_are_read_from_it(
        server: KVStoreServer) -> None:
    big = PageNamespace(**{**NS.__dict__, "page_size": 32})
    store_pages(server, NS, IDS, 1)
    store_pages(server, big, IDS, 3)
    index = StoreIndex(StoreIndexConfig("127.0.0.1", server.port))
    assert lookup(index, IDS) == 96
    assert lookup(StoreIndex(StoreIndexConfig("127.0.0.1", server.port, max_keys=2)),
                  IDS) == 32  # one key per namespace: the first page of each


def test_prompts_sglang_hashes_with_a_namespace_are_not_looked_up(server: KVStoreServer) -> None:
    store_pages(server, NS, IDS, 4)
    index = StoreIndex(StoreIndexConfig("127.0.0.1", server.port))
    for body in ({"lora_path": "adapter"}, {"cache_salt": "s"}, {"extra_key": "k"}):
        assert lookup(index, IDS, body) == 0
    assert lookup(index, IDS, {"cache_salt": None, "model": "m"}) == 64
    assert index.stats.lookups["skipped"] == 3


def test_an_unreachable_store_costs_one_error_then_a_backoff() -> None:
    index = StoreIndex(StoreIndexConfig("127.0.0.1", free_port(), backoff_s=60))
    assert lookup(index, IDS) == 0
    assert lookup(index, IDS) == 0
    assert index.stats.lookups == {"hit": 0, "miss": 0, "error": 1, "skipped": 1}


def test_a_store_that_does_not_answer_times_out() -> None:
    """A listener that never replies: the lookup gives up after ``timeout_s``, not later."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        index = StoreIndex(StoreIndexConfig("127.0.0.1", silent.getsockname()[1],
                                            timeout_s=0.2))

        async def timed() -> tuple[int, float]:
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with index.running():
                return await index.leading_tokens(IDS), loop.time() - start
        found, took = asyncio.run(timed())
    assert found == 0 and index.stats.lookups["error"] == 1
    assert took < 5.0  # bounded by the timeout (0.2 s), with room for a slow machine


def test_bad_addresses_are_refused() -> None:
    for address in ("localhost", "host:0", ":80", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            StoreIndexConfig.parse(address)
    assert StoreIndexConfig.parse("[::1]:9000").host == "::1"


class _Stub:
    def __init__(self, **attrs: object) -> None:
        self.__dict__.update(attrs)


def test_the_handlers_hand_the_store_figure_to_a_prefix_aware_policy() -> None:
    """``handlers._routing_features``: with ``--kvstore`` the prompt's ids go to the store index
    and its answer reaches the policy as ``store_tokens``; without it, or for a load-only
    policy, the store is not asked (the controls)."""
    from aiohttp import web

    from router import keys, policy
    from router.handlers import _routing_features
    from router.validation import ParsedRequest

    asked: list[tuple[int, ...]] = []

    class Index:
        async def leading_tokens(self, ids: tuple[int, ...], body: dict) -> int:
            asked.append(tuple(ids))
            return 32

    def app_with(policy_name: str, store: bool) -> web.Application:
        app = web.Application()
        app[keys.POLICY] = policy.build(policy_name)
        app[keys.POOL] = _Stub(model_info=lambda: None)  # type: ignore[assignment]
        app[keys.KV_EVENTS] = _Stub(index=_Stub(match=lambda ids: {}))  # type: ignore[assignment]
        if store:
            app[keys.STORE_INDEX] = Index()  # type: ignore[assignment]
        return app

    parsed = ParsedRequest(route="generate", body={"input_ids": IDS}, raw=b"", stream=False,
                           max_tokens=4, prompt_tokens=len(IDS))

    def features(app: web.Application) -> object:
        return asyncio.run(_routing_features(_Stub(app=app), parsed))  # type: ignore[arg-type]

    got = features(app_with("cost_aware", store=True))
    assert got.store_tokens == 32 and asked == [tuple(IDS)]  # type: ignore[attr-defined]
    assert features(app_with("cost_aware", store=False)).store_tokens == 0  # type: ignore[attr-defined]
    assert features(app_with("load_aware", store=True)).store_tokens == 0  # type: ignore[attr-defined]
    assert len(asked) == 1


def test_a_lookup_that_times_out_waiting_for_another_leaves_its_connection_alone(
        server: KVStoreServer) -> None:
    """Only the lookup that holds the connection may drop it: one that gave up while waiting
    for the lock must not close the connection under the lookup in progress."""
    store_pages(server, NS, IDS, 4)
    index = StoreIndex(StoreIndexConfig("127.0.0.1", server.port, timeout_s=5.0))

    async def run() -> tuple[int, int]:
        async with index.running():
            assert await index.leading_tokens(IDS) == 64  # connected, namespaces read
            conn = index._conn
            async with index._lock:  # another lookup holds the connection
                index.cfg = StoreIndexConfig("127.0.0.1", server.port, timeout_s=0.05)
                waited = await index.leading_tokens(IDS)
                assert index._conn is conn  # not closed by the lookup that gave up
            index._down_until = float("-inf")
            return waited, await index.leading_tokens(IDS)
    assert asyncio.run(run()) == (0, 64)
    assert index.stats.lookups["error"] == 1


def test_a_store_that_named_no_namespace_yet_is_asked_again_soon(server: KVStoreServer) -> None:
    """Cold start: the first lookup finds no namespace; pages written after it are priced
    within ``EMPTY_REFRESH_S``, not after the full ``refresh_s`` (60 s here)."""
    from router.store_index import EMPTY_REFRESH_S
    index = StoreIndex(StoreIndexConfig("127.0.0.1", server.port, refresh_s=60))

    async def run() -> tuple[int, int]:
        async with index.running():
            cold = await index.leading_tokens(IDS)
            store_pages(server, NS, IDS, 2)
            await asyncio.sleep(EMPTY_REFRESH_S + 0.1)
            return cold, await index.leading_tokens(IDS)
    assert asyncio.run(run()) == (0, 32)
    # once a namespace is known the full interval applies: a new one is not seen at once
    store_pages(server, PageNamespace(**{**NS.__dict__, "page_size": 32}), IDS, 3)
    assert lookup(index, IDS) == 32
