"""The Mooncake backend's own logic, with no Mooncake running: page layout and checksums, key
mapping, config and CLI validation, the master's command line, and ``MooncakeStore`` against a
fake client that keeps objects in a dict and speaks the real client's batch calls and codes."""

from __future__ import annotations

import ctypes
import re
from dataclasses import FrozenInstanceError
from types import SimpleNamespace
from typing import Any

import pytest

from kvstore.__main__ import parse_args
from kvstore.backends.base import StoreError
from kvstore.backends.mooncake import MooncakeConfig, MooncakeStore, mooncake_master_command
from kvstore.backends.mooncake_pages import (
    HEADER,
    KEY_PREFIX,
    MAGIC,
    PageCheck,
    decode_page,
    encode_page,
    mooncake_key,
)
from kvstore.backends.mooncake_setup import parse_master_metrics
from kvstore.config import StoreConfig
from kvstore.metrics import ServerCounters, render_metrics

MASTER = "127.0.0.1:50051"


def page(i: int, size: int = 1000) -> bytes:
    return bytes((i * 31 + j) % 256 for j in range(size))


# -- key mapping and page layout ------------------------------------------------------------------
def test_mooncake_key_is_deterministic_fixed_length_and_distinct() -> None:
    keys = ["a", "a" * 512, "é" * 256, "0" * 64 + "@m|tp0|bf16|layer_first"]
    mapped = [mooncake_key(k) for k in keys]
    assert mapped == [mooncake_key(k) for k in keys]
    assert len(set(mapped)) == len(keys)
    for m in mapped:
        assert m.startswith(KEY_PREFIX)
        assert re.fullmatch(r"[0-9a-f]{64}", m[len(KEY_PREFIX):])


@pytest.mark.parametrize("value", [page(1), bytearray(page(2)), memoryview(page(3)), b""])
def test_page_round_trips_through_its_value(value: Any) -> None:
    encoded = encode_page("key-1", value)
    assert encoded[:4] == MAGIC
    assert len(encoded) == HEADER.size + len("key-1") + len(bytes(value))
    assert decode_page("key-1", encoded) == (PageCheck.OK, bytes(value))
    assert decode_page("key-1", bytes(encoded)) == (PageCheck.OK, bytes(value))


def _flip(value: bytearray, index: int) -> bytearray:
    damaged = bytearray(value)
    damaged[index] ^= 0x01
    return damaged


def test_any_damage_is_detected_as_corrupt() -> None:
    good = encode_page("key-1", page(4))
    damaged = [_flip(good, -1), _flip(good, HEADER.size), _flip(good, 0), _flip(good, 4),
               _flip(good, 10), good[:-1], good + b"x", good[:HEADER.size - 1], bytearray()]
    for value in damaged:
        assert decode_page("key-1", value) == (PageCheck.CORRUPT, None)


def test_a_whole_page_of_another_key_is_told_apart_from_corruption() -> None:
    assert decode_page("key-1", encode_page("key-2", page(5))) == (PageCheck.OTHER_KEY, None)


# -- config, CLI, master command ------------------------------------------------------------------
def test_config_defaults_and_frozen() -> None:
    cfg = MooncakeConfig(MASTER)
    assert (cfg.metadata_server, cfg.protocol, cfg.local_hostname) == (
        "P2PHANDSHAKE", "tcp", "127.0.0.1")
    MooncakeConfig(MASTER, metadata_server="http://10.0.0.1:8080/metadata", segment_bytes=0,
                   master_metrics_url="http://10.0.0.1:9003/metrics")
    with pytest.raises(FrozenInstanceError):
        cfg.segment_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value"), [
    ("master_address", "nohost"), ("master_address", "h:0"), ("master_address", "h:x"),
    ("master_address", ""), ("metadata_server", "etcd://h:2379"), ("local_hostname", " h"),
    ("protocol", "rdma"), ("segment_bytes", 1 << 20), ("segment_bytes", -1),
    ("segment_bytes", 1.5), ("local_buffer_bytes", 0), ("prefer_local", 1),
    ("connect_timeout_s", 0), ("no_space_retry_s", -0.1), ("master_metrics_url", "h:9003"),
])
def test_config_validation_names_the_field_and_value(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {"master_address": MASTER, field: value}
    with pytest.raises(ValueError, match=rf"MooncakeConfig\.{field}: .*{re.escape(repr(value))}"):
        MooncakeConfig(**kwargs)


def test_store_config_backend_combinations() -> None:
    mc = MooncakeConfig(MASTER)
    assert StoreConfig(backend="mooncake", mooncake=mc).mooncake is mc
    with pytest.raises(ValueError, match="StoreConfig.backend: .*'redis'"):
        StoreConfig(backend="redis")
    with pytest.raises(ValueError, match="StoreConfig.mooncake: .*required.*None"):
        StoreConfig(backend="mooncake")
    with pytest.raises(ValueError, match="StoreConfig.mooncake: only used with backend 'mooncake'"):
        StoreConfig(mooncake=mc)
    with pytest.raises(ValueError, match="StoreConfig.ssd_dir: only the tiered backend"):
        StoreConfig(backend="mooncake", mooncake=mc, ssd_dir="/tmp/x")


def test_cli_builds_the_mooncake_config() -> None:
    store, _, _ = parse_args([
        "--backend", "mooncake", "--mooncake-master", "10.0.0.1:50051", "--mooncake-metadata",
        "http://10.0.0.1:8080/metadata", "--mooncake-local-host", "10.0.0.2",
        "--mooncake-segment-bytes", str(1 << 30), "--mooncake-buffer-bytes", str(32 << 20),
        "--mooncake-master-metrics", "http://10.0.0.1:9003/metrics",
        "--mooncake-connect-timeout", "5", "--mooncake-no-prefer-local", "--max-page-mb", "4"])
    assert store.backend == "mooncake" and store.max_page_bytes == 4 << 20
    assert store.mooncake == MooncakeConfig(
        "10.0.0.1:50051", "http://10.0.0.1:8080/metadata", "10.0.0.2", 1 << 30, 32 << 20,
        prefer_local=False, connect_timeout_s=5.0,
        master_metrics_url="http://10.0.0.1:9003/metrics")
    tiered, _, _ = parse_args(["--memory-gb", "1"])
    assert (tiered.backend, tiered.mooncake) == ("tiered", None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "mooncake"], "--mooncake-master: required with --backend mooncake"),
    (["--mooncake-master", MASTER], "--mooncake-master: only applies to --backend mooncake"),
    (["--backend", "tiered", "--mooncake-segment-bytes", "0"],
     "--mooncake-segment-bytes: only applies to --backend mooncake"),
    (["--backend", "mooncake", "--mooncake-master", MASTER, "--ssd-dir", "/x"],
     "--ssd-dir: only applies to --backend tiered"),
    (["--backend", "mooncake", "--mooncake-master", MASTER, "--mooncake-segment-bytes", "5"],
     "MooncakeConfig.segment_bytes: must be 0 or >= 16777216"),
])
def test_cli_refuses_bad_combinations_in_one_line(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_master_command_line() -> None:
    argv = mooncake_master_command(rpc_port=50051, metadata_port=8080, host="10.0.0.1",
                                   binary="/venv/bin/mooncake_master")
    assert argv == ["/venv/bin/mooncake_master", "-rpc_port=50051", "-rpc_address=10.0.0.1",
                    "-enable_http_metadata_server=true", "-http_metadata_server_port=8080",
                    "-http_metadata_server_host=10.0.0.1", "-metrics_host=10.0.0.1",
                    "-default_kv_lease_ttl=1000"]
    p2p = mooncake_master_command(50051, metrics_port=9100, lease_ttl_ms=None)
    assert not [a for a in p2p if "metadata" in a or "lease" in a]
    assert "-metrics_port=9100" in p2p
    with pytest.raises(ValueError, match="mooncake_master_command.metadata_port: .*70000"):
        mooncake_master_command(50051, 70000)
    with pytest.raises(ValueError, match="mooncake_master_command.lease_ttl_ms: .*0"):
        mooncake_master_command(50051, lease_ttl_ms=0)


def test_master_metrics_parsing() -> None:
    text = ("# HELP master_key_count x\nmaster_key_count 17\nmaster_allocated_bytes 1.7e+06\n"
            "master_total_capacity_bytes 134217728\nmaster_evicted_key_count 3\n"
            "master_key_count_other 9\nmaster_active_clients 2\n")
    assert parse_master_metrics(text) == {"pages": 17, "bytes": 1700000,
                                          "capacity_bytes": 134217728, "evictions": 3}


# -- MooncakeStore against a fake client ----------------------------------------------------------
class FakeMooncake:
    """The batch calls ``MooncakeStore`` makes, on a dict, with Mooncake's return codes."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.put_codes: list[int] = []
        """Codes the next ``batch_put_from`` calls return for their first key (then normal)."""
        self.get_code: int | None = None
        self.exist_code: int | None = None
        self.fail: Exception | None = None
        self.calls: list[str] = []
        self.closed = 0

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.fail is not None:
            raise self.fail

    def batch_get_replica_desc(self, keys: list[str]) -> dict[str, list[Any]]:
        self._enter("batch_get_replica_desc")
        return {k: [_replica(len(self.objects[k]))] for k in keys if k in self.objects}

    def batch_get_into(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        self._enter("batch_get_into")
        out = []
        for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
            value = self.objects.get(key)
            if self.get_code is not None or value is None:
                out.append(self.get_code or -704)
                continue
            assert len(value) <= size
            ctypes.memmove(ptr, value, len(value))
            out.append(len(value))
        return out

    def batch_put_from(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        self._enter("batch_put_from")
        out = []
        for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
            code = self.put_codes.pop(0) if self.put_codes else 0
            if code == 0 and key not in self.objects:
                self.objects[key] = ctypes.string_at(ptr, size)
            out.append(code)
        return out

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        self._enter("batch_is_exist")
        if self.exist_code is not None:
            return [self.exist_code] * len(keys)
        return [int(k in self.objects) for k in keys]

    def batch_remove(self, keys: list[str], force: bool = False) -> list[int]:
        self._enter("batch_remove")
        assert force
        return [0 if self.objects.pop(k, None) is not None else -704 for k in keys]

    def close(self) -> int:
        self.closed += 1
        return 0


def _replica(size: int) -> SimpleNamespace:
    """A memory replica as ``batch_get_replica_desc`` describes it."""
    memory = SimpleNamespace(buffer_descriptor=SimpleNamespace(size=size))
    return SimpleNamespace(is_memory_replica=lambda: True, get_memory_descriptor=lambda: memory)


def make_store(max_page_bytes: int | None = 1 << 20, **cfg: Any) -> tuple[MooncakeStore,
                                                                          FakeMooncake]:
    fake = FakeMooncake()
    store = MooncakeStore(MooncakeConfig(MASTER, segment_bytes=0, no_space_retry_s=0.001, **cfg),
                          max_page_bytes, client=fake)
    return store, fake


def test_put_then_get_contains_prefix_and_delete() -> None:
    store, fake = make_store()
    pages = [(f"k{i}", page(i)) for i in range(5)]
    assert store.put_many(pages) == [True] * 5
    assert store.get_many(["k0", "nope", "k4"]) == [page(0), None, page(4)]
    assert store.contains_many(["k1", "nope"]) == [True, False]
    assert store.prefix_hits(["k0", "k1", "nope", "k3"]) == 2
    assert store.delete_many(["k1", "k2", "nope"]) == 2
    assert store.contains_many(["k1", "k3"]) == [False, True]
    assert store.get_many([]) == [] and store.contains_many([]) == []
    (tier,) = store.stats()
    assert (tier.name, tier.hits, tier.misses, tier.puts, tier.errors) == ("mooncake", 2, 1, 5, 0)
    assert tier.extra["bytes_put"] == 5000 and tier.extra["bytes_read"] == 2000
    assert set(fake.objects) == {mooncake_key(k) for k in ("k0", "k3", "k4")}


def test_putting_an_existing_key_keeps_the_first_page() -> None:
    store, _ = make_store()
    assert store.put_many([("k", page(1))]) == [True]
    assert store.put_many([("k", page(2))]) == [True]
    assert store.get_many(["k"]) == [page(1)]


def test_a_corrupted_page_is_a_miss_counted_and_removed() -> None:
    store, fake = make_store()
    store.put_many([("k", page(1)), ("j", page(2))])
    damaged = bytearray(fake.objects[mooncake_key("k")])
    damaged[-10] ^= 0xFF
    fake.objects[mooncake_key("k")] = bytes(damaged)
    assert store.get_many(["k", "j"]) == [None, page(2)]
    assert mooncake_key("k") not in fake.objects
    (tier,) = store.stats()
    assert (tier.errors, tier.hits, tier.misses) == (1, 1, 1)


def test_another_keys_page_under_our_object_is_a_miss_left_alone() -> None:
    store, fake = make_store()
    fake.objects[mooncake_key("k")] = bytes(encode_page("other", page(1)))
    assert store.get_many(["k"]) == [None]
    assert mooncake_key("k") in fake.objects
    (tier,) = store.stats()
    assert (tier.errors, tier.extra["other_key"]) == (0, 1)


def test_no_room_is_retried_once_then_refused() -> None:
    store, fake = make_store()
    fake.put_codes = [-200, 0]  # room after the retry
    assert store.put_many([("a", page(1))]) == [True]
    fake.put_codes = [-200, -200]
    assert store.put_many([("b", page(2))]) == [False]
    assert fake.calls.count("batch_put_from") == 4
    (tier,) = store.stats()
    assert tier.extra["no_space"] == 1 and tier.puts == 1


def test_pages_that_can_never_fit_are_refused() -> None:
    store, fake = make_store(max_page_bytes=1000)
    assert store.put_many([("big", page(1, 1001)), ("ok", page(2))]) == [False, True]
    fake.put_codes = [-600]  # larger than any segment
    assert store.put_many([("huge", page(3))]) == [False]
    assert store.stats()[0].extra["too_large"] == 2
    with pytest.raises(ValueError, match="longer than 512"):
        store.put_many([("x" * 513, page(4))])


def test_a_dead_peer_is_a_miss_and_a_dead_master_an_error() -> None:
    store, fake = make_store()
    store.put_many([("k", page(1))])
    fake.get_code = -800  # the segment's host is gone
    assert store.get_many(["k"]) == [None]
    assert store.stats()[0].extra["read_failures"] == 1
    fake.get_code = -900
    with pytest.raises(StoreError, match="-900"):
        store.get_many(["k"])
    fake.get_code, fake.exist_code = None, -900
    with pytest.raises(StoreError, match="exists failed"):
        store.contains_many(["k"])
    with pytest.raises(StoreError, match="lookup failed"):
        store.get_many(["nope"])  # nothing found: the lookup is checked with an exists call
    fake.put_codes = [-900]
    with pytest.raises(StoreError, match="put of 'p' failed: code -900"):
        store.put_many([("p", page(2))])
    fake.fail = RuntimeError("boom")
    with pytest.raises(StoreError, match="batch_remove failed: boom"):
        store.delete_many(["k"])


def test_close_is_idempotent_and_later_calls_fail() -> None:
    store, fake = make_store()
    store.close()
    store.close()
    assert fake.closed == 1
    with pytest.raises(StoreError, match="closed"):
        store.get_many(["k"])


def test_metrics_show_the_mooncake_tier() -> None:
    store, _ = make_store()
    store.put_many([("k", page(1))])
    store.get_many(["k", "nope"])
    text = render_metrics(store, ServerCounters()).decode()
    assert 'banaserve_kvstore_tier_hits_total{tier="mooncake"} 1.0' in text
    assert 'banaserve_kvstore_tier_misses_total{tier="mooncake"} 1.0' in text
    assert 'banaserve_kvstore_tier_extra{name="no_space",tier="mooncake"} 0.0' in text
