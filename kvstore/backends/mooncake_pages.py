"""How ``MooncakeStore`` lays a page out in Mooncake Store: its object key and its value.

Pure functions, no Mooncake import (unit-tested on their own). Who calls them:
``kvstore.backends.mooncake`` on every put (``mooncake_key``, ``encode_page``) and get
(``mooncake_key``, ``decode_page``).

Object key: ``KEY_PREFIX`` + ``sha256(key)`` in hex (79 characters for any store key up to
``MAX_KEY_BYTES``): a fixed length and alphabet whatever Mooncake's key rules are in a given
release, and a prefix that keeps our objects apart from other users of the same master (SGLang's
own Mooncake L3, for example). The original key travels in the value, so a hash collision is
detected on read instead of serving another key's page.

Value: a 20-byte header, the key, the page (the same idea as ``DiskStore``'s files):

    magic b"BKVM" | version u16 | key length u16 | page length u64 | crc32(key + page) u32

Checksum: ``zlib.crc32`` over key and page (stdlib, releases the GIL on large buffers); it guards
against torn transfers (a reader racing an eviction and a new allocation in the same place, which
Mooncake protects only with its lease) and bit rot, not against an adversary.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib

from kvstore.backends.base import Page

KEY_PREFIX = "banaserve/kv1/"
MAGIC = b"BKVM"
VERSION = 1
HEADER = struct.Struct(">4sHHQI")


class PageCheck(enum.Enum):
    """What ``decode_page`` found."""

    OK = "ok"
    CORRUPT = "corrupt"
    """Header, length or checksum wrong: the object is damaged (remove it; a miss)."""
    OTHER_KEY = "other_key"
    """A whole, valid page of another key (a hash collision): a miss, but leave it alone."""


def mooncake_key(key: str) -> str:
    """The Mooncake object key of a store key (deterministic, same on every host)."""
    return KEY_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def page_nbytes(page: Page) -> int:
    return page.nbytes if isinstance(page, memoryview) else len(page)


def encode_page(key: str, page: Page) -> bytearray:
    """Header, key and page in one new buffer (the value ``batch_put_from`` sends)."""
    key_bytes = key.encode()
    view = memoryview(page).cast("B")
    value = bytearray(HEADER.size + len(key_bytes) + view.nbytes)
    crc = zlib.crc32(view, zlib.crc32(key_bytes))
    HEADER.pack_into(value, 0, MAGIC, VERSION, len(key_bytes), view.nbytes, crc)
    start = HEADER.size + len(key_bytes)
    value[HEADER.size:start] = key_bytes
    value[start:] = view
    return value


def decode_page(key: str, value: bytes | bytearray | memoryview) -> tuple[PageCheck, bytes | None]:
    """``(OK, page)`` if ``value`` is ``key``'s whole page, else ``(CORRUPT | OTHER_KEY, None)``."""
    view = memoryview(value).cast("B")
    if view.nbytes < HEADER.size:
        return PageCheck.CORRUPT, None
    magic, version, key_len, page_len, crc = HEADER.unpack_from(view, 0)
    start = HEADER.size + key_len
    if magic != MAGIC or version != VERSION or view.nbytes != start + page_len:
        return PageCheck.CORRUPT, None
    stored_key = view[HEADER.size:start]
    page = view[start:]
    if zlib.crc32(page, zlib.crc32(stored_key)) != crc:
        return PageCheck.CORRUPT, None
    if stored_key != key.encode():
        return PageCheck.OTHER_KEY, None
    return PageCheck.OK, page.tobytes()
