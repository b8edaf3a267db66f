"""The router's app factory: state under typed keys, one ``ClientSession``, background loops in
the cleanup context."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from router import keys, policy
from router.admission import Admission
from router.batcher import Batcher
from router.cache_report import CacheReport
from router.config import RouterConfig
from router.discovery import Discovery
from router.handlers import add_routes, auth_middleware, error_middleware
from router.kube import KubeApi
from router.kv_events import KvEvents
from router.length import LengthAnnotator, load_predictor
from router.metrics import RouterMetrics
from router.pd import PDProxy
from router.proxy import Proxy
from router.rebalance.api import add_rebalance_routes
from router.rebalance.loop import Rebalancer
from router.sidecar.app import add_sidecar_routes
from router.store_index import StoreIndex, StoreIndexConfig
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
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(app[keys.POOL].running(session))
            if cfg.pd_mode:
                prefill_pool = app[keys.PREFILL_POOL]
                app[keys.PD_PROXY] = PDProxy(
                    app[keys.PROXY], session, prefill_pool,
                    {p.url: p.bootstrap_port for p in cfg.prefill}, cfg.retry.max_retries)
                await stack.enter_async_context(prefill_pool.running(session))
            if keys.DISCOVERY in app:
                bootstrap = app[keys.PD_PROXY].set_bootstrap_port if cfg.pd_mode else None
                await stack.enter_async_context(app[keys.DISCOVERY].running(bootstrap))
            if keys.KV_EVENTS in app:
                await stack.enter_async_context(app[keys.KV_EVENTS].running(session))
            if keys.CACHE_REPORT in app:
                await stack.enter_async_context(app[keys.CACHE_REPORT].running(session))
            if keys.STORE_INDEX in app:
                await stack.enter_async_context(app[keys.STORE_INDEX].running())
            if keys.LENGTH in app:
                await stack.enter_async_context(app[keys.LENGTH].running())
            if keys.BATCHER in app:
                await stack.enter_async_context(app[keys.BATCHER].running())
            if keys.REBALANCER in app:
                await stack.enter_async_context(app[keys.REBALANCER].running(session))
            yield


def create_app(cfg: RouterConfig) -> web.Application:
    """Build the router app; raises ValueError for a bad policy spec, length predictor or
    Kubernetes API setting (``--service-discovery``)."""
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=MAX_BODY_BYTES)
    serving = cfg.decode if cfg.pd_mode else cfg.workers
    pool = WorkerPool(serving, cfg.health, cfg.load_poll_interval_s, cfg.tokenizer_path,
                      cfg.breaker)
    pools = [pool]
    admission = Admission(cfg.admission)
    app[keys.CONFIG] = cfg
    app[keys.POOL] = pool
    app[keys.POLICY] = policy.build(cfg.decode_policy or cfg.policy)
    if cfg.pd_mode:
        prefill_pool = WorkerPool(tuple(p.url for p in cfg.prefill), cfg.health,
                                  cfg.load_poll_interval_s, cfg.tokenizer_path, cfg.breaker)
        app[keys.PREFILL_POOL] = prefill_pool
        app[keys.PREFILL_POLICY] = policy.build(cfg.prefill_policy or cfg.policy)
        pools.append(prefill_pool)
    app[keys.ADMISSION] = admission
    app[keys.METRICS] = RouterMetrics(pools, admission)
    if cfg.kv_index and not cfg.pd_mode:
        kv_events = KvEvents(pool)
        app[keys.KV_EVENTS] = kv_events
        app[keys.METRICS].watch_kv_index(kv_events.stats)
        if cfg.kvstore is not None:
            store_index = StoreIndex(StoreIndexConfig.parse(cfg.kvstore))
            app[keys.STORE_INDEX] = store_index
            app[keys.METRICS].watch_store_index(store_index.stats)
    if cfg.cache_report_interval_s > 0:
        report = CacheReport(pool, cfg.cache_report_interval_s)
        app[keys.CACHE_REPORT] = report
        app[keys.METRICS].watch_cache_report(report.counters)
    if cfg.discovery is not None:
        by_role = ({"prefill": app[keys.PREFILL_POOL], "decode": pool} if cfg.pd_mode
                   else {"regular": pool})
        discovery = Discovery(cfg.discovery, KubeApi.from_config(cfg.discovery), by_role)
        app[keys.DISCOVERY] = discovery
        app[keys.METRICS].watch_discovery(discovery.num_discovered, discovery.watch_restarts)
    predictor = load_predictor(cfg.length) if cfg.length is not None else None
    if cfg.length is not None:
        app[keys.LENGTH] = LengthAnnotator(predictor, cfg.length, app[keys.METRICS])
    if cfg.sidecar:
        add_sidecar_routes(app, predictor)
    if cfg.batching is not None:
        batcher = Batcher(cfg.batching, lambda: [w.url for w in pool.healthy()],
                          app[keys.METRICS])
        app[keys.BATCHER] = batcher
        app[keys.METRICS].watch_batcher(lambda: batcher.num_waiting)
    if cfg.rebalance is not None:
        rebalancer = Rebalancer(cfg.rebalance, pool, app[keys.METRICS])
        app[keys.REBALANCER] = rebalancer
        app[keys.METRICS].watch_rebalancer(lambda: rebalancer.signals)
        add_rebalance_routes(app)
    app[keys.STARTED_AT] = time.time()
    app.cleanup_ctx.append(_upstream)
    add_routes(app)
    return app
