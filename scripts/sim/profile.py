"""``python -m scripts.sim profile``: measure a real SGLang worker and fit a ``CostModel``.

Who calls: the CLI (``scripts/sim/__main__.py``) only. It talks to one worker's native HTTP API
(``POST /generate`` with ``input_ids`` and ``sampling_params``; ``POST /flush_cache``), either
one already running (``--url``) or one it starts itself (``--launch smollm2``, pinned to one core
through ``runtime_patches.launch.WorkerProcess``, as ``scripts/serve_local.sh`` does).

What is measured (wall clock at the client, so HTTP and scheduling overheads are included):
- request overhead: the round trip of ``GET /get_model_info`` (no model work);
- prefill: one request of n random token ids with ``max_new_tokens=1`` (the first token comes
  out of the prefill step), for several n, ``--reps`` times each;
- decode: B concurrent requests of P prompt tokens, once with 1 and once with ``--decode-tokens``
  new tokens; the difference over (tokens - 1) is the time of one decode step of a batch of B
  with about B * (P + tokens / 2) KV tokens;
- front end: a streamed ``/v1/chat/completions`` request of n words (time to the first content
  chunk) against a ``/generate`` of the same number of token ids (the prompt as the chat
  template makes it, measured by ``usage.prompt_tokens``); the difference is what the OpenAI
  path costs before and after the scheduler (HTTP, chat template, tokenizer, detokenizer, SSE);
- busy: a 128-token request sent while B requests decode, against the same request on an idle
  worker: how long an arrival waits behind a running batch (recorded to check the scheduler
  model, ``CostModel.overlap_schedule`` / ``delivery_lag_steps``; not fitted).
Least squares then fits ``prefill = p0 + p1 * tokens + p2 * n^2`` and
``step = d0 + d1 * B + d2 * kv_tokens`` (``scripts.sim.costs.fit_profile``); the profile JSON
holds both the coefficients and the raw points, so a fit can be redone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from scripts.bench.replay.workload import WORDS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfilePlan:
    """What ``profile`` sends."""

    prompt_lengths: tuple[int, ...] = (16, 64, 128, 256, 384, 512, 768, 1024)
    """Prompt lengths of the prefill probes."""
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Concurrent requests of the decode probes."""
    decode_prompts: tuple[int, ...] = (32, 320)
    """Prompt lengths of the decode probes (KV length)."""
    decode_tokens: int = 41
    """New tokens per decode probe (the step time is taken over tokens - 1 steps)."""
    busy_batches: tuple[int, ...] = (1, 4)
    """Decoding requests behind which the busy probes arrive."""
    frontend_words: tuple[int, ...] = (32, 256, 512)
    """Prompt lengths (words) of the front-end probes."""
    reps: int = 3
    """Repetitions of every probe (the median is kept)."""
    vocab: int = 49152
    """Random token ids are drawn from [100, vocab)."""
    seed: int = 0
    """Seed of the random prompts."""

    def __post_init__(self) -> None:
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ValueError(f"ProfilePlan.prompt_lengths: need lengths >= 1, got "
                             f"{self.prompt_lengths}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"ProfilePlan.batch_sizes: need sizes >= 1, got {self.batch_sizes}")
        if self.decode_tokens < 3:
            raise ValueError(f"ProfilePlan.decode_tokens: must be >= 3, got {self.decode_tokens}")
        if self.reps < 1:
            raise ValueError(f"ProfilePlan.reps: must be >= 1, got {self.reps}")
        if self.vocab <= 200:
            raise ValueError(f"ProfilePlan.vocab: must be > 200, got {self.vocab}")


class _Prober:
    def __init__(self, url: str, plan: ProfilePlan, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.plan = plan
        self.session = session
        self.rng = random.Random(plan.seed)

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.plan.vocab) for _ in range(n)]

    async def generate(self, n_prompt: int, n_new: int) -> float:
        body = {"input_ids": self.ids(n_prompt),
                "sampling_params": {"max_new_tokens": n_new, "ignore_eos": True,
                                    "temperature": 0}}
        started = time.perf_counter()
        async with self.session.post(self.url + "/generate", json=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"{self.url}/generate answered {resp.status}: {text[:200]}")
        return time.perf_counter() - started

    async def batch(self, b: int, n_prompt: int, n_new: int) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(self.generate(n_prompt, n_new) for _ in range(b)))
        return time.perf_counter() - started

    async def chat_ttft(self, n_words: int, served: str) -> tuple[float, int]:
        """(time to the first content chunk, prompt tokens) of a streamed chat request."""
        words = " ".join(self.rng.choice(WORDS) for _ in range(n_words))
        body = {"model": served, "messages": [{"role": "user", "content": words}],
                "max_tokens": 1, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first: float | None = None
        prompt = 0
        async with self.session.post(self.url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.url}/v1/chat/completions answered {resp.status}")
            async for line in resp.content:
                if not line.startswith(b"data:") or b"[DONE]" in line:
                    continue
                event = json.loads(line[5:])
                if first is None and event.get("choices"):
                    first = time.perf_counter() - started
                usage = event.get("usage") or {}
                prompt = int(usage.get("prompt_tokens") or prompt)
        return (first if first is not None else time.perf_counter() - started), prompt

    async def served_name(self) -> str:
        async with self.session.get(self.url + "/v1/models") as resp:
            return str((await resp.json())["data"][0]["id"])

    async def served(self) -> dict[str, Any] | None:
        """The served dtype and byte counts from ``/banaserve/status`` (None where the worker
        has no such endpoint, e.g. a worker not started with BanaServe's patches)."""
        async with self.session.get(self.url + "/banaserve/status") as resp:
            if resp.status != 200:
                return None
            status = await resp.json()
        model, kv = status.get("model") or {}, status.get("kv") or {}
        if "dtype" not in model or "bytes_per_token" not in kv:
            return None
        return {"dtype": model["dtype"], "kv_bytes_per_token": kv["bytes_per_token"],
                "layer_weight_bytes": model["layer_weight_bytes"]}

    async def flush(self) -> None:
        async with self.session.post(self.url + "/flush_cache") as resp:
            await resp.read()

    async def overhead(self) -> float:
        times = []
        for _ in range(10):
            started = time.perf_counter()
            async with self.session.get(self.url + "/get_model_info") as resp:
                await resp.read()
            times.append(time.perf_counter() - started)
        return statistics.median(times)


async def _measure(url: str, plan: ProfilePlan, progress: Any = None) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        p = _Prober(url, plan, session)
        for _ in range(3):  # warm-up
            await p.generate(64, 4)
        overhead = await p.overhead()
        prefill = []
        for n in plan.prompt_lengths:
            times = []
            for _ in range(plan.reps):
                await p.flush()
                times.append(await p.generate(n, 1))
            prefill.append({"tokens": n, "latency_s": statistics.median(times)})
            if progress is not None:
                progress.update(1)
        decode = []
        for b in plan.batch_sizes:
            for n in plan.decode_prompts:
                short, long_ = [], []
                for _ in range(plan.reps):
                    await p.flush()
                    short.append(await p.batch(b, n, 1))
                    await p.flush()
                    long_.append(await p.batch(b, n, plan.decode_tokens))
                steps = plan.decode_tokens - 1
                step_s = (statistics.median(long_) - statistics.median(short)) / steps
                decode.append({"batch": b, "prompt": n,
                               "kv_tokens": b * (n + plan.decode_tokens / 2),
                               "step_s": max(step_s, 0.0),
                               "batch_prefill_s": statistics.median(short)})
                if progress is not None:
                    progress.update(1)
        busy = await _busy(p, plan, progress)
        frontend = await _frontend(p, plan, progress)
        served = await p.served()
    return {"request_overhead_s": overhead, "prefill": prefill, "decode": decode,
            "frontend": frontend, "busy": busy, "served": served}


async def _busy(p: _Prober, plan: ProfilePlan, progress: Any) -> list[dict[str, Any]]:
    busy = []
    for b in plan.busy_batches:
        for _ in range(plan.reps):
            await p.flush()
            background = [asyncio.create_task(p.generate(32, 120)) for _ in range(b)]
            await asyncio.sleep(0.8 + p.rng.random() * 0.1)
            busy.append({"batch": b, "latency_s": await p.generate(128, 1)})
            await asyncio.gather(*background)
        if progress is not None:
            progress.update(1)
    return busy


async def _frontend(p: _Prober, plan: ProfilePlan, progress: Any) -> list[dict[str, Any]]:
    frontend = []
    served = await p.served_name()
    for n in plan.frontend_words:
        chat, direct, tokens = [], [], 0
        for _ in range(plan.reps):
            await p.flush()
            ttft, tokens = await p.chat_ttft(n, served)
            chat.append(ttft)
            await p.flush()
            direct.append(await p.generate(tokens, 1))
        frontend.append({"words": n, "prompt_tokens": tokens,
                         "chat_ttft_s": statistics.median(chat),
                         "generate_s": statistics.median(direct),
                         "frontend_s": statistics.median(chat) - statistics.median(direct)})
        if progress is not None:
            progress.update(1)
    return frontend


def measure(url: str, plan: ProfilePlan, progress: Any = None) -> dict[str, Any]:
    """The raw probe results of the worker at ``url`` (blocking)."""
    return asyncio.run(_measure(url, plan, progress))


def num_probes(plan: ProfilePlan) -> int:
    return (len(plan.prompt_lengths) + len(plan.batch_sizes) * len(plan.decode_prompts)
            + len(plan.frontend_words) + len(plan.busy_batches))
