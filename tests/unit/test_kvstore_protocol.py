"""kvstore.protocol: framing, decoding and request validation (no network)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from kvstore.protocol import (
    HEADER,
    NO_ID,
    OPS,
    SHM_PREFIX,
    ErrorCode,
    ProtocolError,
    decode_body,
    encode_frame,
    error_reply,
    frame_length,
    ok_reply,
    parse_request,
    request_id_of,
)


def _code(msg: Any, max_batch: int = 8) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        parse_request(msg, max_batch)
    return info.value.code


def test_frame_is_big_endian_length_then_msgpack_map() -> None:
    msg = {"op": "put", "id": 7, "keys": ["a"], "pages": [b"\x00\xff" * 10]}
    frame = encode_frame(msg)
    assert frame[:4] == len(frame[4:]).to_bytes(4, "big")
    assert frame_length(frame[:4], 1 << 20) == len(frame) - HEADER.size
    assert decode_body(frame[4:]) == msg


def test_pages_travel_as_binary_from_any_buffer() -> None:
    frame = encode_frame({"pages": [memoryview(b"ab"), bytearray(b"cd"), b"ef"]})
    assert decode_body(frame[4:]) == {"pages": [b"ab", b"cd", b"ef"]}


def test_header_above_limit_is_frame_too_large() -> None:
    with pytest.raises(ProtocolError) as info:
        frame_length(HEADER.pack(1025), 1024)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert frame_length(HEADER.pack(1024), 1024) == 1024


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", msgpack.packb({}) + b"\x00",
                                  msgpack.packb({1: 2})])
def test_undecodable_body_is_bad_msgpack(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_body(body)
    assert info.value.code == ErrorCode.BAD_MSGPACK


def test_replies_carry_id_and_ok() -> None:
    assert ok_reply(3, hits=2) == {"id": 3, "ok": True, "hits": 2}
    assert error_reply(4, ErrorCode.BAD_KEY, "empty") == {
        "id": 4, "ok": False, "error": {"code": "bad_key", "message": "empty"}}


def test_valid_requests_parse_per_op() -> None:
    assert parse_request({"op": "hello", "id": 0, "version": 3}, 8).version == 3
    assert parse_request({"op": "hello", "id": 0}, 8).version == 1
    get = parse_request({"op": "get", "id": 1, "keys": ["a", "b"]}, 8)
    assert (get.op, get.id, get.keys) == ("get", 1, ("a", "b"))
    put = parse_request({"op": "put", "id": 2, "keys": ["a"], "pages": [b"x"]}, 8)
    assert put.pages == (b"x",)
    into = parse_request({"op": "get_into", "id": 3, "keys": ["a", "b"], "offsets": [0, 8],
                          "capacities": [8, 8]}, 8)
    assert (into.offsets, into.sizes) == ((0, 8), (8, 8))
    put_from = parse_request({"op": "put_from", "id": 4, "keys": ["a"], "offsets": [5],
                              "sizes": [3]}, 8)
    assert (put_from.offsets, put_from.sizes) == ((5,), (3,))
    name = SHM_PREFIX + "0123456789abcdef"
    attach = parse_request({"op": "attach_shm", "id": 5, "name": name, "size": 4096}, 8)
    assert (attach.shm_name, attach.shm_size) == (name, 4096)
    assert parse_request({"op": "stats", "id": 6}, 8).keys == ()
    assert parse_request({"op": "exists", "id": 7, "keys": []}, 8).keys == ()
    assert parse_request({"op": "namespaces", "id": 8}, 8).op == "namespaces"
    assert set(OPS) == {"hello", "exists", "get", "put", "delete", "stats", "namespaces",
                        "attach_shm", "get_into", "put_from"}


def test_unknown_op() -> None:
    assert _code({"op": "flushall", "id": 1}) == ErrorCode.UNKNOWN_OP


@pytest.mark.parametrize("msg", [
    [1, 2],
    {"op": "get", "keys": ["a"]},
    {"op": "get", "id": -1, "keys": ["a"]},
    {"op": "get", "id": True, "keys": ["a"]},
    {"op": "get", "id": "1", "keys": ["a"]},
    {"op": 5, "id": 1},
    {"op": "get", "id": 1, "keys": "a"},
    {"op": "get", "id": 1},
    {"op": "put", "id": 1, "keys": ["a"], "pages": ["text"]},
    {"op": "put", "id": 1, "keys": ["a", "b"], "pages": [b"x"]},
    {"op": "get_into", "id": 1, "keys": ["a"], "offsets": [0]},
    {"op": "get_into", "id": 1, "keys": ["a"], "offsets": [-1], "capacities": [1]},
    {"op": "put_from", "id": 1, "keys": ["a"], "offsets": [0], "sizes": [1.5]},
    {"op": "attach_shm", "id": 1, "name": "../etc/passwd", "size": 10},
    {"op": "attach_shm", "id": 1, "name": "psm_0123456789abcdef", "size": 10},
    {"op": "attach_shm", "id": 1, "name": SHM_PREFIX + "0123456789abcdef/..", "size": 10},
    {"op": "attach_shm", "id": 1, "name": SHM_PREFIX + "0123456789abcdef", "size": 0},
    {"op": "hello", "id": 1, "version": "1"},
])
def test_wrong_types_are_bad_request(msg: Any) -> None:
    assert _code(msg) == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("key", ["", 5, None, "k" * 513])
def test_invalid_keys_are_bad_key(key: Any) -> None:
    assert _code({"op": "exists", "id": 1, "keys": ["ok", key]}) == ErrorCode.BAD_KEY


def test_more_keys_than_max_batch() -> None:
    assert _code({"op": "get", "id": 1, "keys": ["k"] * 9}, max_batch=8) == ErrorCode.TOO_MANY_KEYS
    assert len(parse_request({"op": "get", "id": 1, "keys": ["k"] * 8}, 8).keys) == 8


def test_request_id_of_falls_back_to_no_id() -> None:
    assert request_id_of({"id": 12}) == 12
    assert request_id_of({"id": -3}) == NO_ID
    assert request_id_of([1]) == NO_ID
