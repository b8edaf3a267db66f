"""Store keys for SGLang's KV pages (pure functions, no I/O).

SGLang's HiCache names each page by a 64-hex-digit SHA-256 chain over the page's token ids
(``sglang.srt.mem_cache.utils.get_storage_hash_str``): page ``i``'s hash covers every token up to
and including page ``i``, so equal hashes mean equal prefixes. The hash says nothing about the
model or how the bytes are laid out, so the store key appends a namespace: two workers may share
a page only if they serve the same model with the same KV shape, dtype, page size, host layout
and tensor-parallel shard. Anything else would load wrong bytes and produce wrong tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_PAGE_SIZE = re.compile(r"/p([1-9][0-9]*)/")
MARK = "@"
"""Separates a page hash from its namespace suffix in a store key."""


def suffix_of(key: str) -> str | None:
    """The namespace suffix of a store key (``@...``), or None for a key without one."""
    at = key.rfind(MARK)
    return key[at:] if at > 0 else None


def page_size_of(suffix: str) -> int | None:
    """Tokens per page named in a suffix (``.../p64/...``), or None if it names none."""
    found = _PAGE_SIZE.search(suffix)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class PageNamespace:
    """What must match for two workers to share a stored page."""

    model: str
    """Served model name (SGLang's ``storage_config.model_name``)."""
    layout: str
    """Host pool layout (``page_first``, ``layer_first``, ...): the byte order of a page."""
    dtype: str
    """KV dtype, e.g. ``bfloat16``."""
    page_size: int
    """Tokens per page."""
    num_layers: int
    """Layers whose KV a page holds."""
    num_kv_heads: int
    """KV heads in this worker's shard."""
    head_dim: int
    """Head dimension."""
    tp_rank: int = 0
    """Tensor-parallel rank whose head shard the page holds."""
    tp_size: int = 1
    """Tensor-parallel size."""

    def __post_init__(self) -> None:
        for name in ("page_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PageNamespace.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"PageNamespace.tp_rank: {self.tp_rank} not in [0, {self.tp_size})")

    @property
    def suffix(self) -> str:
        """The key suffix, e.g. ``@SmolLM2/page_first/bfloat16/p64/l30h3d64/tp0of1``."""
        model = _UNSAFE.sub("-", self.model).strip("-") or "model"
        return (f"{MARK}{model}/{self.layout}/{self.dtype}/p{self.page_size}/"
                f"l{self.num_layers}h{self.num_kv_heads}d{self.head_dim}/"
                f"tp{self.tp_rank}of{self.tp_size}")

    def key(self, page_hash: str) -> str:
        """The store key of one SGLang page hash."""
        return page_hash + self.suffix

    def keys(self, page_hashes: list[str]) -> list[str]:
        suffix = self.suffix
        return [h + suffix for h in page_hashes]
