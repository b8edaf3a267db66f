"""The kvstore wire protocol: msgpack maps in length-prefixed frames over TCP.

Who uses it: ``kvstore.server`` parses requests with ``parse_request`` and builds replies with
``ok_reply`` / ``error_reply``; ``kvstore.client`` builds requests and reads replies with the same
framing helpers. Nothing here does I/O.

Framing. Every message, both ways, is one frame: a 4-byte big-endian unsigned length ``n``, then
``n`` bytes holding one msgpack map (string keys, binary pages as msgpack ``bin``). A frame longer
than the server's ``max_frame_bytes`` (default 256 MiB) gets a ``frame_too_large`` error reply and
the server then closes the connection (it cannot skip the body safely). Every other error leaves
the connection open.

Requests are ``{"op": str, "id": int, ...fields}``; ``id`` is chosen by the client (an int >= 0)
and echoed in the reply. Replies are ``{"id": int, "ok": true, ...results}`` or
``{"id": int, "ok": false, "error": {"code": str, "message": str}}``; a reply to a request whose
id could not be read carries ``id`` -1. A client may pipeline: send several requests before
reading; one connection's replies come back in request order.

Ops (fields; results). ``keys`` is a list of at most ``max_batch`` strings (see
``kvstore.backends.base.check_key``); lists given beside it must have the same length.

- ``hello`` (``version``: the highest protocol version the client speaks; ``version``: the one
  the server chose, ``server``, ``max_frame_bytes``, ``max_batch``, ``max_page_bytes``, ``shm``:
  whether the server can map shared memory). Optional: without it version 1 is assumed.
- ``exists`` (``keys``; ``hits``: how many keys from the first are all stored, ``present``: one
  bool per key).
- ``get`` (``keys``; ``pages``: one ``bin`` or nil per key, nil for a miss).
- ``put`` (``keys``, ``pages``: one ``bin`` per key; ``stored``: one bool per key, false only for
  a page that can never be stored, for example larger than ``max_page_bytes``).
- ``delete`` (``keys``; ``removed``: how many were present).
- ``stats`` (none; ``tiers``: one map per tier, fastest first, ``server``: the server counters).
- ``namespaces`` (none; ``namespaces``: the key suffixes, from the last ``@`` on, of pages
  stored since the server started, most recently written first, at most 64; see
  ``kvstore.keys``). A router reads them to ask which prefixes the store holds for its workers.

Same-host zero-copy path. The client creates a ``multiprocessing.shared_memory`` segment and
names it; the server maps the same memory (``/dev/shm/NAME``), so pages cross with one copy on
each side instead of travelling through msgpack and the socket:

- ``attach_shm`` (``name``: the segment name, ``SHM_PREFIX`` then 16 to 64 hex digits, ``size``:
  its size in bytes; ``size``). Replaces an earlier segment of this connection. The prefix keeps
  a client from pointing the server at other programs' shared memory. Fails with
  ``shm_unavailable`` when the server cannot map it (another host, another user, no
  ``/dev/shm``); the client then uses ``get`` / ``put``.
- ``get_into`` (``keys``, ``offsets``, ``capacities``: where each page may be written; ``sizes``:
  per key the page size, -1 for a miss; a size larger than the capacity means the page did not
  fit and nothing was written there). The server copies each page straight from the store into
  the segment.
- ``put_from`` (``keys``, ``offsets``, ``sizes``: where each page lies in the segment;
  ``stored``). The store takes its own copy straight from the segment.

Ranges must lie inside the attached segment (``out_of_bounds`` otherwise, nothing is touched).
The segment is trusted like any same-user memory: a client that shrinks it under the server can
crash the server, so the path is for cooperating processes of one deployment.

Error codes: see ``ErrorCode``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack

from kvstore.backends.base import MAX_KEY_BYTES, check_key

PROTOCOL_VERSION = 1
"""The newest protocol version this code speaks."""
MIN_PROTOCOL_VERSION = 1
"""The oldest protocol version this code still speaks."""
HEADER = struct.Struct(">I")
"""The frame header: the body length as a 4-byte big-endian unsigned int."""
MAX_FRAME_LIMIT = 2**32 - 1
"""The largest body length a header can express."""
NO_ID = -1
"""The ``id`` of a reply to a request whose own id could not be read."""
_PREALLOCATE_BYTES = 1 << 20

SHM_PREFIX = "banaserve-kv-"
"""Every segment the server maps is named this plus random hex digits."""
_SHM_NAME = re.compile(re.escape(SHM_PREFIX) + "[0-9a-f]{16,64}")


class ErrorCode(StrEnum):
    """The ``error.code`` values of an error reply."""

    FRAME_TOO_LARGE = "frame_too_large"
    """The frame exceeds ``max_frame_bytes``; the server closes the connection after replying."""
    BAD_MSGPACK = "bad_msgpack"
    """The frame body is not exactly one msgpack object."""
    BAD_REQUEST = "bad_request"
    """Not a map, a missing or mistyped field, or lists of different lengths."""
    UNKNOWN_OP = "unknown_op"
    TOO_MANY_KEYS = "too_many_keys"
    """More than ``max_batch`` keys in one request."""
    BAD_KEY = "bad_key"
    """A key that is empty, not a string or longer than ``MAX_KEY_BYTES``."""
    UNSUPPORTED_VERSION = "unsupported_version"
    NO_SHM = "no_shm"
    """``get_into`` / ``put_from`` before a successful ``attach_shm``."""
    SHM_UNAVAILABLE = "shm_unavailable"
    """The server cannot map the named segment."""
    OUT_OF_BOUNDS = "out_of_bounds"
    """A range lies outside the attached segment."""
    STORE_ERROR = "store_error"
    """The backend failed (``StoreError``); a miss is never an error."""
    INTERNAL = "internal"
    """An unexpected server fault; the server logs it and keeps running."""


class ProtocolError(Exception):
    """A request the server answers with an error reply (``code``, ``message``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def pack(msg: dict[str, Any]) -> bytes | memoryview:
    """One msgpack map (pages may be ``bytes``, ``bytearray`` or ``memoryview``).

    A message carrying many page bytes is packed into a buffer sized for it up front (growing
    the buffer as it fills halves the packing speed) and returned as a view of that buffer."""
    pages = msg.get("pages")
    size = sum(len(page) for page in pages if page is not None) if pages else 0
    if size < _PREALLOCATE_BYTES:
        return msgpack.packb(msg, use_bin_type=True)
    packer = msgpack.Packer(use_bin_type=True, autoreset=False,
                            buf_size=size + 64 * len(pages) + 8 * MAX_KEY_BYTES + 4096)
    packer.pack(msg)
    return packer.getbuffer()


def encode_frame(msg: dict[str, Any]) -> bytes:
    """Header plus body, ready to send."""
    body = pack(msg)
    return HEADER.pack(len(body)) + bytes(body)


def frame_length(header: bytes, max_frame_bytes: int) -> int:
    """The body length a header announces; ``FRAME_TOO_LARGE`` above ``max_frame_bytes``."""
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            f"frame of {length} bytes exceeds max_frame_bytes {max_frame_bytes}")
    return length


def decode_body(body: bytes | bytearray | memoryview) -> Any:
    """The msgpack object in a frame body; ``BAD_MSGPACK`` if it is not exactly one object."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(ErrorCode.BAD_MSGPACK, f"undecodable frame: {exc}") from None


def ok_reply(request_id: int, **results: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **results}


def error_reply(request_id: int, code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": str(code), "message": message}}


@dataclass(frozen=True)
class Request:
    """A validated request. Fields an op does not use keep their empty defaults."""

    op: str
    id: int
    keys: tuple[str, ...] = ()
    pages: tuple[bytes, ...] = ()
    """``put``: one page per key."""
    offsets: tuple[int, ...] = ()
    """``get_into`` / ``put_from``: where each key's page goes or lies in the segment."""
    sizes: tuple[int, ...] = ()
    """``get_into``: the room at each offset (``capacities``); ``put_from``: each page's size."""
    version: int = PROTOCOL_VERSION
    """``hello``: the client's highest version."""
    shm_name: str = ""
    shm_size: int = 0


OPS = ("hello", "exists", "get", "put", "delete", "stats", "namespaces", "attach_shm",
       "get_into", "put_from")
"""Every op name, in the order the module docstring lists them."""
_KEYED_OPS = frozenset(("exists", "get", "put", "delete", "get_into", "put_from"))


def request_id_of(msg: Any) -> int:
    """The request's id if it has a valid one, else ``NO_ID`` (for error replies)."""
    if isinstance(msg, dict):
        value = msg.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return NO_ID


def parse_request(msg: Any, max_batch: int) -> Request:
    """Validate a decoded request map; ``ProtocolError`` naming the first problem."""
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"request must be a map, got {_kind(msg)}")
    request_id = request_id_of(msg)
    if request_id == NO_ID:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'id' must be an int >= 0")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'op' must be a string")
    if op not in OPS:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:40]!r}")
    if op not in _KEYED_OPS:
        return _parse_unkeyed(op, request_id, msg)
    keys = _keys(msg, max_batch)
    if op == "put":
        return Request(op, request_id, keys, pages=_pages(msg, len(keys)))
    if op == "get_into":
        return Request(op, request_id, keys, offsets=_ints(msg, "offsets", len(keys)),
                       sizes=_ints(msg, "capacities", len(keys)))
    if op == "put_from":
        return Request(op, request_id, keys, offsets=_ints(msg, "offsets", len(keys)),
                       sizes=_ints(msg, "sizes", len(keys)))
    return Request(op, request_id, keys)


def _parse_unkeyed(op: str, request_id: int, msg: dict[str, Any]) -> Request:
    if op == "hello":
        version = msg.get("version", PROTOCOL_VERSION)
        if not _is_int(version) or version < 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'version' must be an int >= 1")
        return Request(op, request_id, version=version)
    if op == "attach_shm":
        name, size = msg.get("name"), msg.get("size")
        if not isinstance(name, str) or not _SHM_NAME.fullmatch(name):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"field 'name' must be {SHM_PREFIX!r} and 16 to 64 hex digits")
        if not _is_int(size) or size <= 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'size' must be an int > 0")
        return Request(op, request_id, shm_name=name, shm_size=size)
    return Request(op, request_id)


def _keys(msg: dict[str, Any], max_batch: int) -> tuple[str, ...]:
    keys = msg.get("keys")
    if not isinstance(keys, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"field 'keys' must be a list of strings, got {_kind(keys)}")
    if len(keys) > max_batch:
        raise ProtocolError(ErrorCode.TOO_MANY_KEYS,
                            f"{len(keys)} keys in one request, max_batch is {max_batch}")
    for key in keys:
        try:
            check_key(key)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_KEY, str(exc)) from None
    return tuple(keys)


def _pages(msg: dict[str, Any], count: int) -> tuple[bytes, ...]:
    pages = msg.get("pages")
    if not isinstance(pages, list) or len(pages) != count:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"field 'pages' must be a list of {count} binaries, one per key")
    if not all(isinstance(page, bytes) for page in pages):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'pages' must hold only binaries")
    return tuple(pages)


def _ints(msg: dict[str, Any], name: str, count: int) -> tuple[int, ...]:
    values = msg.get(name)
    if not isinstance(values, list) or len(values) != count:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"field {name!r} must be a list of {count} ints, one per key")
    if not all(_is_int(value) and value >= 0 for value in values):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} must hold only ints >= 0")
    return tuple(values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "nil" if value is None else type(value).__name__
