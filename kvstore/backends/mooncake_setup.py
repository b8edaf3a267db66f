"""Joining a Mooncake Store: ``MooncakeConfig``, the master's command line, the client set-up.

Who calls it: ``kvstore.config`` holds a ``MooncakeConfig`` in ``StoreConfig.mooncake`` and
``kvstore.__main__`` builds it from the ``--mooncake-*`` flags; ``MooncakeStore`` calls
``connect`` once at start-up and ``master_figures`` from ``stats()``; ``scripts/cluster`` calls
``mooncake_master_command`` (re-exported by ``kvstore.backends.mooncake``) to start the master.

What works with ``mooncake-transfer-engine-non-cuda`` 0.3.13.post1 (checked on loopback, two
processes): ``setup(local_hostname, metadata_server, global_segment_size, local_buffer_size,
"tcp", "", "HOST:PORT")`` with ``metadata_server`` either ``P2PHANDSHAKE`` or the master's
embedded ``http://HOST:PORT/metadata`` (``-enable_http_metadata_server=true``; no separate
``mooncake_http_metadata_server`` is needed). A segment of 0 bytes is allowed (a pure client);
otherwise it must be at least 16 MiB. The segment is reserved, not touched: RAM is committed as
pages land in it.
"""

from __future__ import annotations

import logging
import socket
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from kvstore.backends.base import StoreError

logger = logging.getLogger(__name__)

METADATA_P2P = "P2PHANDSHAKE"
MIN_SEGMENT_BYTES = 16 << 20
"""Smallest segment Mooncake accepts (0 contributes no memory: a pure client)."""
_MASTER_GAUGES = {"master_key_count": "pages", "master_allocated_bytes": "bytes",
                  "master_total_capacity_bytes": "capacity_bytes",
                  "master_evicted_key_count": "evictions"}
"""Master ``/metrics`` lines -> ``TierStats`` fields (cluster-wide)."""


def host_port(text: str, name: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``; ``ValueError`` naming ``name`` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}: must be HOST:PORT, got {text!r}")
    return host, int(port)


def _http_url(text: str, name: str, what: str = "an http:// URL") -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{name}: must be {what}, got {text!r}")
    return url


@dataclass(frozen=True)
class MooncakeConfig:
    master_address: str
    """``HOST:PORT`` of the cluster's ``mooncake_master`` RPC service."""
    metadata_server: str = METADATA_P2P
    """Where transfer engines find each other: ``http://HOST:PORT/metadata`` (the master's
    embedded HTTP metadata server) or ``P2PHANDSHAKE`` (no metadata service). Every server of a
    cluster uses the same."""
    local_hostname: str = "127.0.0.1"
    """This host's address as other hosts reach it (Mooncake names the segment after it)."""
    segment_bytes: int = 2 << 30
    """RAM this host lends the store; 0 (a pure client) or at least 16 MiB."""
    local_buffer_bytes: int = 16 << 20
    """Mooncake's client staging buffer (``MooncakeStore`` reads and writes through its own)."""
    protocol: str = "tcp"
    """Transfer protocol; only ``tcp`` (``MooncakeStore`` does not register its buffers, which
    RDMA needs)."""
    prefer_local: bool = True
    """Place pages put here in this host's segment first (reads here stay local)."""
    connect_timeout_s: float = 30.0
    """How long start-up waits for the master (and an HTTP metadata server) to accept TCP."""
    no_space_retry_s: float = 0.1
    """Wait before retrying, once, puts Mooncake had no room for; 0 does not retry."""
    master_metrics_url: str | None = None
    """The master's ``http://HOST:PORT/metrics``: cluster-wide pages, bytes, capacity and
    evictions in ``stats()``. None: this server's figures only."""

    def __post_init__(self) -> None:
        for name in ("master_address", "metadata_server", "local_hostname", "protocol"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or value != value.strip():
                raise ValueError(f"MooncakeConfig.{name}: must be a non-empty string without "
                                 f"surrounding spaces, got {value!r}")
        host_port(self.master_address, "MooncakeConfig.master_address")
        if self.metadata_server != METADATA_P2P:
            _http_url(self.metadata_server, "MooncakeConfig.metadata_server",
                      f"{METADATA_P2P} or an http://HOST:PORT/metadata URL")
        if self.master_metrics_url is not None:
            _http_url(self.master_metrics_url, "MooncakeConfig.master_metrics_url")
        if self.protocol != "tcp":
            raise ValueError(f"MooncakeConfig.protocol: only 'tcp' is supported (buffers are not "
                             f"registered for RDMA), got {self.protocol!r}")
        for name in ("segment_bytes", "local_buffer_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MooncakeConfig.{name}: must be an integer >= 0, got {value!r}")
        if 0 < self.segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"MooncakeConfig.segment_bytes: must be 0 or >= {MIN_SEGMENT_BYTES} "
                             f"(16 MiB), got {self.segment_bytes}")
        if self.local_buffer_bytes == 0:
            raise ValueError("MooncakeConfig.local_buffer_bytes: must be > 0, got 0")
        if not isinstance(self.prefer_local, bool):
            raise ValueError(f"MooncakeConfig.prefer_local: must be a bool, got "
                             f"{self.prefer_local!r}")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"MooncakeConfig.connect_timeout_s: must be > 0, got "
                             f"{self.connect_timeout_s!r}")
        if not self.no_space_retry_s >= 0:
            raise ValueError(f"MooncakeConfig.no_space_retry_s: must be >= 0, got "
                             f"{self.no_space_retry_s!r}")


def mooncake_master_command(rpc_port: int, metadata_port: int | None = None, *,
                            host: str = "0.0.0.0", metrics_port: int | None = None,
                            binary: str = "mooncake_master",
                            lease_ttl_ms: int | None = 1000) -> list[str]:
    """argv of the cluster's ``mooncake_master``: RPC on ``host:rpc_port``, the embedded HTTP
    metadata server on ``host:metadata_port`` (None: none; servers then use ``P2PHANDSHAKE``),
    Prometheus ``/metrics`` and ``/health`` on ``host:metrics_port`` (None: Mooncake's 9003).

    Ready when ``http://host:metadata_port/health`` (or the metrics port's ``/health``) answers
    200; ``/metadata?key=...`` answers 404 for a key nobody wrote, so it is no readiness probe.
    ``binary``: ``mooncake_master`` from the virtual environment's ``bin`` (the PyPI package
    installs it there).

    ``lease_ttl_ms``: how long a read or an exists check keeps an object from eviction (None:
    Mooncake's 10 s). With 10 s, a full store whose recent pages were all read refused most puts
    of a put-and-read burst (55 % of them in a two-server loopback stress run; 1.5 % with 1 s).
    Reads take milliseconds, and a read torn by an eviction fails its checksum (a miss)."""
    ports = {"rpc_port": rpc_port, "metadata_port": metadata_port, "metrics_port": metrics_port}
    for name, port in ports.items():
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 < port < 65536):
            raise ValueError(f"mooncake_master_command.{name}: must be a port, got {port!r}")
    if not host or not binary:
        raise ValueError(f"mooncake_master_command: host and binary must be set, got "
                         f"{host!r}, {binary!r}")
    if lease_ttl_ms is not None and (isinstance(lease_ttl_ms, bool)
                                     or not isinstance(lease_ttl_ms, int) or lease_ttl_ms <= 0):
        raise ValueError(f"mooncake_master_command.lease_ttl_ms: must be an integer > 0, got "
                         f"{lease_ttl_ms!r}")
    argv = [binary, f"-rpc_port={rpc_port}", f"-rpc_address={host}"]
    if metadata_port is not None:
        argv += ["-enable_http_metadata_server=true", f"-http_metadata_server_port={metadata_port}",
                 f"-http_metadata_server_host={host}"]
    if metrics_port is not None:
        argv.append(f"-metrics_port={metrics_port}")
    argv.append(f"-metrics_host={host}")
    if lease_ttl_ms is not None:
        argv.append(f"-default_kv_lease_ttl={lease_ttl_ms}")
    return argv


def connect(cfg: MooncakeConfig) -> Any:
    """A Mooncake client set up per ``cfg``; ``StoreError`` with the reason if it cannot be."""
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise StoreError("mooncake backend: the mooncake package is not installed "
                         "(pip install mooncake-transfer-engine-non-cuda)") from exc
    # setup() retries an unreachable master for about 45 s; find out first, and say so.
    _wait_reachable("mooncake master", *host_port(cfg.master_address, "master_address"),
                    cfg.connect_timeout_s)
    if cfg.metadata_server != METADATA_P2P:
        url = _http_url(cfg.metadata_server, "metadata_server")
        port = url.port or (443 if url.scheme == "https" else 80)
        _wait_reachable("mooncake metadata server", url.hostname or "", port,
                        cfg.connect_timeout_s)
    client = MooncakeDistributedStore()
    try:
        code = client.setup(cfg.local_hostname, cfg.metadata_server, cfg.segment_bytes,
                            cfg.local_buffer_bytes, cfg.protocol, "", cfg.master_address)
    except Exception as exc:
        raise StoreError(f"mooncake backend: setup failed: {exc}") from exc
    if code != 0:
        raise StoreError(f"mooncake backend: setup failed with code {code} (master "
                         f"{cfg.master_address}, metadata {cfg.metadata_server}, local host "
                         f"{cfg.local_hostname}, segment {cfg.segment_bytes} bytes)")
    logger.info("joined the mooncake store at %s as %s (segment %d MiB)", cfg.master_address,
                client.get_hostname(), cfg.segment_bytes >> 20)
    return client


def replicate_config(client: Any, cfg: MooncakeConfig) -> Any:
    """Puts prefer this host's segment, if it lends one and ``prefer_local``; else None."""
    if not cfg.prefer_local or cfg.segment_bytes == 0:
        return None
    from mooncake.store import ReplicateConfig

    replicate = ReplicateConfig()
    replicate.preferred_segment = client.get_hostname()
    return replicate


def master_figures(url: str, timeout_s: float = 1.0) -> dict[str, int] | None:
    """Cluster-wide ``TierStats`` fields from the master's ``/metrics``; None if unreadable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except (OSError, ValueError) as exc:
        logger.debug("mooncake master metrics unavailable: %s", exc)
        return None
    return parse_master_metrics(text)


def parse_master_metrics(text: str) -> dict[str, int]:
    figures: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _MASTER_GAUGES:
            try:
                figures[_MASTER_GAUGES[name]] = int(float(value))
            except ValueError:
                continue
    return figures


def _wait_reachable(what: str, host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise StoreError(f"mooncake backend: cannot reach the {what} at {host}:{port} "
                                 f"within {timeout_s:g} s: {exc.strerror or exc}") from exc
            time.sleep(0.2)
