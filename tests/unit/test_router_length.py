"""Output-length annotation in the router: the micro-batcher (fake predictor) and the app wiring
(real aiohttp router on port 0 in front of a fake worker)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from router import keys
from router.app import create_app
from router.config import HealthConfig, RouterConfig
from router.length import (
    BUCKET_HEADER,
    LENGTH_HEADER,
    LengthAnnotator,
    LengthConfig,
    LengthEstimate,
)
from router.metrics import RouterMetrics
from tests.unit.fake_upstream import FakeUpstream


@dataclass
class FakePrediction:
    bucket: int
    label: str
    length: int


class FakePredictor:
    """Predicts len(text) tokens; records each batch; can fail or stall on demand."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.threads: set[str] = set()

    def predict(self, texts: Sequence[str]) -> list[FakePrediction]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(texts))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("predictor broke")
        return [FakePrediction(len(t) // 10, f"b{len(t) // 10}", len(t)) for t in texts]


def value(metrics: RouterMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    got = metrics.registry.get_sample_value(name, labels or {})
    return got or 0.0


async def run_annotator(predictor: FakePredictor, texts: Sequence[str | None],
                        **cfg: float) -> tuple[list[LengthEstimate | None], RouterMetrics]:
    metrics = RouterMetrics([])
    annotator = LengthAnnotator(predictor, LengthConfig(path="x", **cfg), metrics)  # type: ignore[arg-type]
    async with annotator.running():
        results = await asyncio.gather(*(annotator.annotate(t) for t in texts))
    return list(results), metrics


async def test_concurrent_requests_share_one_batch_and_get_their_own_answer() -> None:
    predictor = FakePredictor()
    texts = [f"prompt {'x' * i}" for i in range(10)]
    results, metrics = await run_annotator(predictor, texts, max_wait_ms=50.0)
    assert [r.length for r in results if r] == [len(t) for t in texts]
    assert len(predictor.batches) == 1 and len(predictor.batches[0]) == 10
    assert predictor.threads and not any("MainThread" in n for n in predictor.threads)
    assert value(metrics, "banaserve_router_length_predictions_total", {"result": "ok"}) == 10


async def test_batches_never_exceed_max_batch() -> None:
    predictor = FakePredictor()
    results, _ = await run_annotator(predictor, [str(i) for i in range(40)], max_batch=16,
                                     max_wait_ms=50.0)
    assert all(r is not None for r in results)
    assert max(len(b) for b in predictor.batches) <= 16
    assert sum(len(b) for b in predictor.batches) == 40


async def test_a_failing_predictor_leaves_requests_unannotated_and_keeps_serving() -> None:
    predictor = FakePredictor(fail=True)
    metrics = RouterMetrics([])
    annotator = LengthAnnotator(predictor, LengthConfig(path="x"), metrics)  # type: ignore[arg-type]
    async with annotator.running():
        assert await annotator.annotate("one") is None
        predictor.fail = False
        assert await annotator.annotate("two") == LengthEstimate(0, "b0", 3)
    assert value(metrics, "banaserve_router_length_predictions_total", {"result": "error"}) == 1


async def test_a_slow_prediction_times_out_to_none() -> None:
    results, metrics = await run_annotator(FakePredictor(delay_s=0.3), ["slow"], timeout_ms=50.0)
    assert results == [None]
    assert value(metrics, "banaserve_router_length_predictions_total",
                 {"result": "timeout"}) == 1


async def test_requests_without_text_are_not_predicted() -> None:
    predictor = FakePredictor()
    results, metrics = await run_annotator(predictor, [None])
    assert results == [None] and predictor.batches == []
    assert value(metrics, "banaserve_router_length_predictions_total",
                 {"result": "no_text"}) == 1


@pytest.mark.parametrize("field,bad", [("max_batch", 0), ("timeout_ms", 0.0), ("threads", 0)])
def test_config_rejects_bad_values(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=field):
        LengthConfig(path="x", **{field: bad})  # type: ignore[arg-type]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def router_with_predictor(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch,
                                ) -> AsyncIterator[tuple[str, web.Application, list]]:
    predictor = FakePredictor()
    monkeypatch.setattr("router.app.load_predictor", lambda cfg: predictor)
    cfg = RouterConfig(workers=(upstream.url,), policy="round_robin", load_poll_interval_s=0.1,
                       health=HealthConfig(interval_s=0.1, timeout_s=1, failure_threshold=1),
                       length=LengthConfig(path="unused"))
    app = create_app(cfg)
    seen: list = []
    policy = app[keys.POLICY]
    pick = policy.pick

    def recording_pick(candidates, request):  # type: ignore[no-untyped-def]
        seen.append(request)
        return pick(candidates, request)

    policy.pick = recording_pick  # type: ignore[method-assign]
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(url + "/health") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
    yield url, app, seen
    await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
async def test_router_annotates_requests_for_policies_and_in_headers(
        router_with_predictor: tuple[str, web.Application, list], stream: bool) -> None:
    url, app, seen = router_with_predictor
    text = "Write three haiku about the sea."
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}
    async with aiohttp.ClientSession() as session, session.post(
            url + "/v1/chat/completions", data=json.dumps(body),
            headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        assert resp.status == 200
        assert resp.headers[LENGTH_HEADER] == str(len(text))
        assert resp.headers[BUCKET_HEADER] == f"b{len(text) // 10}"
    assert seen[-1].predicted_length == len(text)
    assert seen[-1].predicted_bucket == len(text) // 10
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        metrics = await resp.text()
    assert 'banaserve_router_length_predictions_total{result="ok"} 1.0' in metrics
    assert "banaserve_router_length_prediction_seconds_count 1.0" in metrics


async def test_token_id_prompts_are_served_without_annotation(
        router_with_predictor: tuple[str, web.Application, list]) -> None:
    url, _, seen = router_with_predictor
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}
    async with aiohttp.ClientSession() as session, session.post(
            url + "/v1/completions", data=json.dumps(body),
            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert LENGTH_HEADER not in resp.headers
    assert seen[-1].predicted_length is None


def test_cli_rejects_a_missing_predictor_with_one_line(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: object) -> None:
    from router.__main__ import main

    assert main(["--workers", "http://127.0.0.1:9", "--length-predictor",
                 f"{tmp_path}/nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("router: --length-predictor:")
    assert "no such predictor folder" in err[0]
