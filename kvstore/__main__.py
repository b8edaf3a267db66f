"""``python -m kvstore``: BanaServe's global KV page store, shared by every SGLang instance.

Serves one store to clients over TCP, and over shared memory to clients on the same host (see
kvstore/protocol.py), plus GET /stats and GET /metrics on an HTTP side port. The store is either
this host's own (--backend tiered: RAM in front of SSD, written behind) or this host's share of a
Mooncake Store that every host's server joins (--backend mooncake: a page put on one host is
readable on all; see kvstore/backends/mooncake.py for the master's command line).

SIGTERM or SIGINT stops it gracefully: connections finish their current request, pages still
queued for the SSD are written, files are closed (a mooncake server leaves the store, and the
pages in its segment go with it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from typing import Any, NoReturn

from kvstore.server import KVStoreServer, ServerConfig

logger = logging.getLogger("kvstore")

_S = ServerConfig()  # only for its defaults
_GIB = 1 << 30
_MIB = 1 << 20


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One readable line instead of usage plus error."""
        self.exit(2, f"kvstore: {message} (see --help)\n")


def _store_default(name: str, scale: int = 1) -> str:
    """StoreConfig's default for the help text, if ``kvstore.config`` is importable."""
    try:
        from kvstore.config import StoreConfig

        value = StoreConfig.__dataclass_fields__[name].default
    except (ImportError, KeyError):
        return "StoreConfig's default"
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, int) and not isinstance(value, bool) and scale > 1:
        return f"{value / scale:g}"
    return str(value)


def _mooncake_default(name: str) -> str:
    """MooncakeConfig's default for the help text."""
    from kvstore.backends.mooncake_setup import MooncakeConfig

    value = MooncakeConfig.__dataclass_fields__[name].default
    return "required" if value is dataclasses.MISSING else str(value)


_MOONCAKE_FLAGS = {  # flag attribute -> MooncakeConfig field
    "mooncake_master": "master_address", "mooncake_metadata": "metadata_server",
    "mooncake_local_host": "local_hostname", "mooncake_segment_bytes": "segment_bytes",
    "mooncake_buffer_bytes": "local_buffer_bytes",
    "mooncake_master_metrics": "master_metrics_url",
    "mooncake_connect_timeout": "connect_timeout_s", "mooncake_prefer_local": "prefer_local"}
_TIERED_FLAGS = {"memory_gb": "--memory-gb", "ssd_dir": "--ssd-dir", "ssd_gb": "--ssd-gb",
                 "fsync": "--fsync", "write_queue_pages": "--write-queue-pages"}


def _build_parser() -> _Parser:
    parser = _Parser(prog="python -m kvstore", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n  python -m kvstore --memory-gb 8 --ssd-dir /mnt/nvme/kv "
                            "--ssd-gb 200\n  python -m kvstore --backend mooncake "
                            "--mooncake-master 10.0.0.1:50051 --mooncake-metadata "
                            "http://10.0.0.1:8080/metadata --mooncake-local-host 10.0.0.2 "
                            "--mooncake-segment-bytes 8589934592")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=_S.host,
                     help=f"listen address; 0.0.0.0 serves other hosts, without auth ({_S.host})")
    net.add_argument("--port", type=int, default=_S.port,
                     help=f"TCP port for clients; 0 picks a free one ({_S.port})")
    net.add_argument("--http-port", type=int, default=_S.http_port,
                     help=f"port for GET /stats and GET /metrics ({_S.http_port})")
    net.add_argument("--no-http", action="store_true", help="serve no HTTP side port")
    net.add_argument("--max-frame-mb", type=float, default=_S.max_frame_bytes / _MIB,
                     help="largest request frame in MiB; larger ones are refused and the "
                          f"connection closed ({_S.max_frame_bytes / _MIB:g})")
    net.add_argument("--max-batch", type=int, default=_S.max_batch,
                     help=f"most keys in one request ({_S.max_batch})")
    net.add_argument("--threads", type=int, default=_S.threads,
                     help=f"threads running store calls ({_S.threads})")
    common = parser.add_argument_group("store")
    common.add_argument("--backend", choices=["tiered", "mooncake"], default=None,
                        help="tiered: this host's own store; mooncake: this host's server on a "
                             "Mooncake Store shared by the cluster "
                             f"({_store_default('backend')})")
    common.add_argument("--max-page-mb", type=float, default=None,
                        help="largest page in MiB; larger puts are refused "
                             f"({_store_default('max_page_bytes', _MIB)})")
    store = parser.add_argument_group("tiered backend (this host's RAM and SSD)")
    store.add_argument("--memory-gb", type=float, default=None,
                       help="RAM tier size in GiB "
                            f"({_store_default('memory_bytes', _GIB)})")
    store.add_argument("--ssd-dir", default=None,
                       help=f"directory of the SSD tier ({_store_default('ssd_dir')})")
    store.add_argument("--ssd-gb", type=float, default=None,
                       help=f"SSD tier size in GiB ({_store_default('ssd_bytes', _GIB)})")
    store.add_argument("--fsync", action="store_true", default=None,
                       help="fsync each page written to the SSD (durable across power loss, "
                            f"slower) ({_store_default('fsync')})")
    store.add_argument("--write-queue-pages", type=int, default=None,
                       help="pages waiting for the SSD before puts wait for the writer "
                            f"({_store_default('write_queue_pages')})")
    _add_mooncake_flags(parser)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    return parser


def _add_mooncake_flags(parser: _Parser) -> None:
    mc = parser.add_argument_group("mooncake backend (a Mooncake Store shared by the cluster)")
    mc.add_argument("--mooncake-master", metavar="HOST:PORT", default=None,
                    help="the cluster's mooncake_master RPC address (required)")
    mc.add_argument("--mooncake-metadata", metavar="URL", default=None,
                    help="http://HOST:PORT/metadata (the master's embedded metadata server, "
                         "-enable_http_metadata_server) or P2PHANDSHAKE; the same on every host "
                         f"({_mooncake_default('metadata_server')})")
    mc.add_argument("--mooncake-local-host", metavar="HOST", default=None,
                    help="this host's address as the other hosts reach it "
                         f"({_mooncake_default('local_hostname')})")
    mc.add_argument("--mooncake-segment-bytes", metavar="N", type=int, default=None,
                    help="RAM this host lends the store, in bytes: 0 or >= 16 MiB "
                         f"({_mooncake_default('segment_bytes')})")
    mc.add_argument("--mooncake-buffer-bytes", metavar="N", type=int, default=None,
                    help="Mooncake's client staging buffer, in bytes "
                         f"({_mooncake_default('local_buffer_bytes')})")
    mc.add_argument("--mooncake-master-metrics", metavar="URL", default=None,
                    help="the master's http://HOST:PORT/metrics, for cluster-wide pages, bytes "
                         "and capacity in /stats and /metrics (none)")
    mc.add_argument("--mooncake-connect-timeout", metavar="S", type=float, default=None,
                    help="seconds start-up waits for the master to accept connections "
                         f"({_mooncake_default('connect_timeout_s')})")
    mc.add_argument("--mooncake-no-prefer-local", dest="mooncake_prefer_local",
                    action="store_false", default=None,
                    help="place pages in any host's segment, not this host's first")


def _mooncake_config(parser: _Parser, args: argparse.Namespace) -> Any:
    """The MooncakeConfig of the flags (--backend mooncake), or None after checking that no
    mooncake flag was given (--backend tiered); exits 2 with one line on a bad combination."""
    given = {field: getattr(args, flag) for flag, field in _MOONCAKE_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.backend != "mooncake":
        if given:
            flag = next(f for f in _MOONCAKE_FLAGS if getattr(args, f) is not None)
            parser.error(f"--{flag.replace('_', '-')}: only applies to --backend mooncake")
        return None
    tiered = [f for attr, f in _TIERED_FLAGS.items() if getattr(args, attr) is not None]
    if tiered:
        parser.error(f"{tiered[0]}: only applies to --backend tiered")
    if "master_address" not in given:
        parser.error("--mooncake-master: required with --backend mooncake")
    from kvstore.backends.mooncake_setup import MooncakeConfig

    try:
        return MooncakeConfig(**given)
    except ValueError as exc:
        parser.error(str(exc))


def _bytes(parser: _Parser, flag: str, value: float | None, scale: int) -> int | None:
    if value is None:
        return None
    if not value >= 0:  # also refuses NaN
        parser.error(f"{flag}: must be >= 0, got {value:g}")
    return int(value * scale)


def parse_args(argv: list[str] | None) -> tuple[Any, ServerConfig, str]:
    """``(StoreConfig, ServerConfig, log level)``; exits 2 with one line on a bad value."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    store_fields = {
        "memory_bytes": _bytes(parser, "--memory-gb", args.memory_gb, _GIB),
        "ssd_dir": args.ssd_dir,
        "ssd_bytes": _bytes(parser, "--ssd-gb", args.ssd_gb, _GIB),
        "max_page_bytes": _bytes(parser, "--max-page-mb", args.max_page_mb, _MIB),
        "fsync": args.fsync,
        "write_queue_pages": args.write_queue_pages,
        "backend": args.backend,
        "mooncake": _mooncake_config(parser, args)}
    try:
        server_cfg = ServerConfig(
            host=args.host, port=args.port, http_port=None if args.no_http else args.http_port,
            max_frame_bytes=_bytes(parser, "--max-frame-mb", args.max_frame_mb, _MIB),
            max_batch=args.max_batch, threads=args.threads)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        from kvstore.config import StoreConfig
    except ImportError as exc:
        parser.exit(2, f"kvstore: the store configuration is not available ({exc})\n")
    try:
        # Flags left out keep StoreConfig's defaults (it owns them).
        store_cfg = StoreConfig(**{k: v for k, v in store_fields.items() if v is not None})
    except ValueError as exc:
        parser.error(str(exc))
    return store_cfg, server_cfg, args.log_level


async def _serve(store: Any, cfg: ServerConfig, max_page_bytes: int | None) -> int:
    server = KVStoreServer(store, cfg, max_page_bytes=max_page_bytes)
    try:
        await server.start()
    except OSError as exc:
        store.close()
        print(f"kvstore: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tiers = ", ".join(f"{t.name} {t.capacity_bytes / _GIB:g} GiB" for t in store.stats())
    http = f"http://{cfg.host}:{server.http_port}" if server.http_port is not None else "off"
    logger.info("listening on %s:%d (stats %s; %s)", cfg.host, server.port, http, tiers)
    await stop.wait()
    logger.info("stopping: finishing requests, flushing the store")
    await server.stop()
    logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    store_cfg, server_cfg, log_level = parse_args(argv)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvstore.config import build_store

    try:
        store = build_store(store_cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"kvstore: cannot build the store: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_serve(store, server_cfg, store_cfg.max_page_bytes))


if __name__ == "__main__":
    sys.exit(main())
