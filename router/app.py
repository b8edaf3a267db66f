"""The router's app factory: state under typed keys, one ``ClientSession``, background loops in
the cleanup context."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from router import keys, policy
from router.admission import Admission
from router.config import RouterConfig
from router.handlers import add_routes, auth_middleware, error_middleware
from router.metrics import RouterMetrics
from router.proxy import Proxy
from router.workers import WorkerPool

MAX_BODY_BYTES = 64 * 1024 * 1024


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[keys.SESSION] = session
        app[keys.PROXY] = Proxy(session, app[keys.POOL], app[keys.METRICS], cfg.retry,
                                cfg.read_timeout_s, cfg.connect_timeout_s,
                                forward_auth=cfg.api_key is None)
        async with app[keys.POOL].running(session):
            yield


def create_app(cfg: RouterConfig) -> web.Application:
    """Build the router app; raises ValueError for a bad policy spec."""
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=MAX_BODY_BYTES)
    pool = WorkerPool(cfg.workers, cfg.health, cfg.load_poll_interval_s, cfg.tokenizer_path,
                      cfg.breaker)
    admission = Admission(cfg.admission)
    app[keys.CONFIG] = cfg
    app[keys.POOL] = pool
    app[keys.POLICY] = policy.build(cfg.policy)
    app[keys.ADMISSION] = admission
    app[keys.METRICS] = RouterMetrics(pool, admission)
    app[keys.STARTED_AT] = time.time()
    app.cleanup_ctx.append(_upstream)
    add_routes(app)
    return app
