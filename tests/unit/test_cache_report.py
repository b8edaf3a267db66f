"""``router.cache_report``: a worker's prompt and per-tier cached-token counters, parsed from its
Prometheus text (as SGLang 0.5.23 writes it), scraped over HTTP and exported by the router."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from router.cache_report import CacheReport, parse
from router.config import HealthConfig
from router.metrics import RouterMetrics
from router.workers import WorkerPool

# copied from a SmolLM2 CPU worker's /metrics (two streaming modes, one device series)
WORKER_TEXT = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{engine_type="unified",is_streaming="false",model_name="S"} 6.0
sglang:prompt_tokens_total{engine_type="unified",is_streaming="true",model_name="S"} 11234.0
# HELP sglang:cached_tokens_total Number of cached prompt tokens by source (device/host/storage).
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{cache_source="device",engine_type="unified",model_name="S"} 1279.0
sglang:cached_tokens_total{cache_source="storage",engine_type="unified",model_name="S"} 4.096e+03
sglang:num_requests_total{model_name="S"} 40.0
"""


def test_parse_sums_series_and_splits_tiers() -> None:
    c = parse(WORKER_TEXT)
    assert c.prompt_tokens == 11240.0
    assert c.cached_tokens == {"device": 1279.0, "host": 0.0, "storage": 4096.0}


def test_parse_counts_an_unlabelled_total_as_device_and_ignores_other_metrics() -> None:
    c = parse("sglang:cached_tokens_total 12.0\nsglang:prompt_tokens_total 30\n"
              "sglang:cached_tokens_totalx 99\nother:prompt_tokens_total 5\n")
    assert (c.prompt_tokens, c.cached_tokens["device"]) == (30.0, 12.0)


class MetricsWorker:
    """Serves ``text`` at /metrics, gzipped when the client accepts gzip (as SGLang does)."""

    def __init__(self) -> None:
        self.text = WORKER_TEXT
        self.status = 200
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(self.app)
        self.url = ""

    async def metrics(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.Response(status=self.status)
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(self.text.encode()),
                                headers={"Content-Encoding": "gzip"})
        return web.Response(text=self.text)


@pytest.fixture
async def worker() -> AsyncIterator[MetricsWorker]:
    w = MetricsWorker()
    await w.runner.setup()
    site = web.TCPSite(w.runner, "127.0.0.1", 0)
    await site.start()
    w.url = f"http://127.0.0.1:{w.runner.addresses[0][1]}"
    yield w
    await w.runner.cleanup()


async def test_scrape_reads_each_member_and_the_router_exports_it(worker: MetricsWorker) -> None:
    pool = WorkerPool((worker.url,), HealthConfig(), 0.5)
    report = CacheReport(pool, 5.0)
    metrics = RouterMetrics([pool])
    metrics.watch_cache_report(report.counters)
    # the router's session passes bytes through undecoded: the scrape must ask for plain text
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        assert report.stats()[worker.url] == {"available": False, "why": "not read yet"}
        await report.scrape_all(session)
        row = report.stats()[worker.url]
        assert row["cached_tokens"] == {"device": 1279.0, "host": 0.0, "storage": 4096.0}
        assert row["hit_rate"]["storage"] == pytest.approx(4096 / 11240)
        text = metrics.render().decode()
        assert (f'banaserve_worker_cached_tokens_total{{tier="storage",worker="{worker.url}"}} '
                "4096.0") in text
        assert f'banaserve_worker_prompt_tokens_total{{worker="{worker.url}"}} 11240.0' in text

        worker.status = 404  # started without --enable-metrics: noted, last reading kept
        await report.scrape_all(session)
        assert report.counters()[worker.url].prompt_tokens == 11240.0
        assert report.stats()[worker.url]["available"] is True

        pool.remove(worker.url)  # left the pool: forgotten
        await report.scrape_all(session)
        assert report.counters() == {}


async def test_a_worker_that_never_answers_is_reported_unavailable(worker: MetricsWorker) -> None:
    worker.status = 404
    pool = WorkerPool((worker.url,), HealthConfig(), 0.5)
    report = CacheReport(pool, 5.0)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await report.scrape_all(session)
    assert report.stats()[worker.url] == {"available": False,
                                          "why": "GET /metrics answered 404"}


def test_interval_must_be_positive() -> None:
    pool = WorkerPool(("http://127.0.0.1:1",), HealthConfig(), 0.5)
    with pytest.raises(ValueError, match="cache report interval must be > 0 s"):
        CacheReport(pool, 0)
