"""``python -m kvstore``: BanaServe's global KV page store, shared by every SGLang instance.

Serves one store (RAM in front of SSD, written behind) to clients over TCP, and over shared
memory to clients on the same host (see kvstore/protocol.py), plus GET /stats and GET /metrics
on an HTTP side port. SIGTERM or SIGINT stops it gracefully: connections finish their current
request, pages still queued for the SSD are written, files are closed.
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


def _build_parser() -> _Parser:
    parser = _Parser(prog="python -m kvstore", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="example: python -m kvstore --memory-gb 8 --ssd-dir /mnt/nvme/kv "
                            "--ssd-gb 200")
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
    store = parser.add_argument_group("store")
    store.add_argument("--memory-gb", type=float, default=None,
                       help="RAM tier size in GiB "
                            f"({_store_default('memory_bytes', _GIB)})")
    store.add_argument("--ssd-dir", default=None,
                       help=f"directory of the SSD tier ({_store_default('ssd_dir')})")
    store.add_argument("--ssd-gb", type=float, default=None,
                       help=f"SSD tier size in GiB ({_store_default('ssd_bytes', _GIB)})")
    store.add_argument("--max-page-mb", type=float, default=None,
                       help="largest page in MiB; larger puts are refused "
                            f"({_store_default('max_page_bytes', _MIB)})")
    store.add_argument("--fsync", action="store_true", default=None,
                       help="fsync each page written to the SSD (durable across power loss, "
                            f"slower) ({_store_default('fsync')})")
    store.add_argument("--write-queue-pages", type=int, default=None,
                       help="pages waiting for the SSD before puts wait for the writer "
                            f"({_store_default('write_queue_pages')})")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    return parser


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
        "write_queue_pages": args.write_queue_pages}
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
