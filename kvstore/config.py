"""``StoreConfig``: the store behind one kvstore server, and ``build_store`` that makes it.

``python -m kvstore`` builds a ``StoreConfig`` from its flags (flags left out keep the defaults
here) and calls ``build_store``. ``backend`` chooses the ``PageStore``:

- ``tiered`` (default, one host): a ``TieredStore`` with a memory tier and, when ``ssd_dir`` is
  set, an SSD tier written behind.
- ``mooncake`` (a cluster): a ``MooncakeStore``, this server's client of a Mooncake Store shared
  by every host's server (``kvstore.backends.mooncake``); ``mooncake`` says which one.
  ``memory_bytes`` and the SSD fields do not apply (the host lends ``mooncake.segment_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.backends.base import PageStore
from kvstore.backends.mooncake_setup import MooncakeConfig

_GIB = 1 << 30
BACKENDS = ("tiered", "mooncake")


@dataclass(frozen=True)
class StoreConfig:
    memory_bytes: int = 2 * _GIB
    """Memory tier capacity in bytes (pages, not counting index overhead)."""
    ssd_dir: str | None = None
    """Directory of the SSD tier; ``None`` runs with the memory tier only."""
    ssd_bytes: int = 16 * _GIB
    """SSD tier capacity in bytes (header, key and page of every file)."""
    max_page_bytes: int = 64 << 20
    """Largest page accepted; larger puts are refused (``False``), never stored partly."""
    fsync: bool = False
    """fsync every page file and its directory (survives power loss; slower)."""
    write_queue_pages: int = 1024
    """Pages the SSD writer may have waiting; when full, a put waits briefly for room, then
    leaves its new pages in memory only (counted as ``write_drops``)."""
    backend: str = "tiered"
    """``tiered`` (memory + SSD on this host) or ``mooncake`` (a shared Mooncake Store)."""
    mooncake: MooncakeConfig | None = None
    """The Mooncake Store to join: required with ``backend="mooncake"``, refused otherwise."""

    def __post_init__(self) -> None:
        self._check_backend()
        for name in ("memory_bytes", "ssd_bytes", "max_page_bytes", "write_queue_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"StoreConfig.{name}: must be an integer, got {value!r}")
        for name in ("memory_bytes", "max_page_bytes", "write_queue_pages"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StoreConfig.{name}: must be > 0, got {getattr(self, name)}")
        if not isinstance(self.fsync, bool):
            raise ValueError(f"StoreConfig.fsync: must be a bool, got {self.fsync!r}")
        if self.ssd_dir is None:
            return
        if not isinstance(self.ssd_dir, str) or not self.ssd_dir.strip():
            raise ValueError(f"StoreConfig.ssd_dir: must be a directory path, got "
                             f"{self.ssd_dir!r}")
        if self.ssd_bytes <= 0:
            raise ValueError(f"StoreConfig.ssd_bytes: must be > 0 with an ssd_dir, got "
                             f"{self.ssd_bytes}")

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"StoreConfig.backend: must be one of {', '.join(BACKENDS)}, got "
                             f"{self.backend!r}")
        if self.backend == "mooncake":
            if not isinstance(self.mooncake, MooncakeConfig):
                raise ValueError(f"StoreConfig.mooncake: a MooncakeConfig is required with "
                                 f"backend 'mooncake', got {self.mooncake!r}")
            if self.ssd_dir is not None:
                raise ValueError(f"StoreConfig.ssd_dir: only the tiered backend has an SSD "
                                 f"tier, got {self.ssd_dir!r} with backend 'mooncake'")
        elif self.mooncake is not None:
            raise ValueError(f"StoreConfig.mooncake: only used with backend 'mooncake', got a "
                             f"MooncakeConfig with backend {self.backend!r}")


def build_store(cfg: StoreConfig) -> PageStore:
    """The configured store; ``StoreError`` if the SSD directory cannot be created, scanned or
    locked (another store is using it), or the Mooncake Store cannot be joined."""
    if cfg.backend == "mooncake":
        from kvstore.backends.mooncake import MooncakeStore

        assert cfg.mooncake is not None  # checked by StoreConfig
        return MooncakeStore(cfg.mooncake, cfg.max_page_bytes)
    from kvstore.backends.disk import DiskStore
    from kvstore.backends.memory import MemoryStore
    from kvstore.backends.tiered import TieredStore

    memory = MemoryStore(cfg.memory_bytes, cfg.max_page_bytes)
    disk = (DiskStore(cfg.ssd_dir, cfg.ssd_bytes, cfg.max_page_bytes, cfg.fsync)
            if cfg.ssd_dir is not None else None)
    return TieredStore(memory, disk, cfg.write_queue_pages)
