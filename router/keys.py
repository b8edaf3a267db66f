"""Typed application state keys (``aiohttp.web.AppKey``): who owns each object is noted."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from router.admission import Admission
from router.batcher import Batcher
from router.cache_report import CacheReport
from router.config import RouterConfig
from router.discovery import Discovery
from router.kv_events import KvEvents
from router.length import LengthAnnotator
from router.metrics import RouterMetrics
from router.pd import PDProxy
from router.policy import Policy
from router.proxy import Proxy
from router.rebalance.loop import Rebalancer
from router.store_index import StoreIndex
from router.workers import WorkerPool

CONFIG = web.AppKey("config", RouterConfig)
POOL = web.AppKey("pool", WorkerPool)  # owns worker state (decode workers in PD mode)
PREFILL_POOL = web.AppKey("prefill_pool", WorkerPool)  # PD mode only
PREFILL_POLICY = web.AppKey("prefill_policy", Policy)  # PD mode only
PD_PROXY = web.AppKey("pd_proxy", PDProxy)  # PD mode only
POLICY = web.AppKey("policy", Policy)  # built once at start-up
METRICS = web.AppKey("metrics", RouterMetrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)  # the one upstream session
PROXY = web.AppKey("proxy", Proxy)
STARTED_AT = web.AppKey("started_at", float)
ADMISSION = web.AppKey("admission", Admission)  # concurrency slots and the waiting queue
LENGTH = web.AppKey("length", LengthAnnotator)  # --length-predictor only; owns the predictor
BATCHER = web.AppKey("batcher", Batcher)  # --batching only; owns requests held for a batch
REBALANCER = web.AppKey("rebalancer", Rebalancer)  # --rebalance only; owns decisions, signals
KV_EVENTS = web.AppKey("kv_events", KvEvents)  # unless --no-kv-index; owns the prefix index
DISCOVERY = web.AppKey("discovery", Discovery)  # --service-discovery only; owns the watch state
CACHE_REPORT = web.AppKey("cache_report", CacheReport)  # unless --cache-report-interval 0
STORE_INDEX = web.AppKey("store_index", StoreIndex)  # --kvstore only; owns the store connection
