"""``python -m scripts.bench run CONFIG.yaml``: replay a trace or dataset against an endpoint.

A config names the endpoint (any OpenAI-compatible server: BanaServe's router, one SGLang
worker, SGLang's router), the workload (``workload.WorkloadConfig``), the rates to sweep and
the SLO; each rate is one run (warm-up requests first, untimed), and the result is one JSON file
(every request's timings, per-run summaries, per-worker load over time) and one PNG.

Example (``scripts/bench/configs/azure_smollm2.yaml``)::

    name: azure-conv-smollm2
    target: {url: http://127.0.0.1:30000, api: chat}
    workload: {source: azure_conv, num_requests: 40, length_scale: 0.25,
               max_input_tokens: 512, max_output_tokens: 64}
    rates: [null, 1.0, 2.0]     # null: the trace's own arrival times (times time_scale)
    slo: {ttft_ms: 3000, tpot_ms: 250}
    out: results/bench/azure_smollm2.json

With ``systems``, the benchmark brings up each system's cluster itself on loopback
(``scripts.bench.replay.cluster.ClusterConfig``: workers, router, policy, KV store, layer hosts,
rebalancer, batching, static prefill/decode split), replays every rate against it, and stops it
before the next one; ``target.url`` is then ignored. ``repeats`` runs the whole comparison again,
systems in an order rotated per repeat, so slow drift of the machine hits every system alike::

    systems:
      banaserve: {policy: load_aware, kvstore: true, layer_hosts: true, rebalance: true}
      smg-cache-aware: {router: smg, policy: cache_aware}
      static-pd: {pd: [1, 1]}

Keys not listed in the dataclasses below are refused with their name (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import platform
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from scripts.bench.replay import bench_serving
from scripts.bench.replay.client import Result, send_all
from scripts.bench.replay.cluster import Cluster, ClusterConfig
from scripts.bench.replay.metrics import SLO, LoadSampler, summarise
from scripts.bench.replay.report import plot
from scripts.bench.replay.workload import WorkloadConfig, build


@dataclass(frozen=True)
class TargetConfig:
    url: str = "http://127.0.0.1:30000"
    """The endpoint's base URL (no path)."""
    model: str | None = None
    """The served model name (default: the first of ``GET /v1/models``)."""
    api: str = "chat"
    """``chat`` (``/v1/chat/completions``) or ``completions`` (``/v1/completions``)."""
    tokenizer: str | None = None
    """A tokenizer folder or prepared model name (``smollm2``, ``tiny``) for exact prompt
    lengths; without it, synthetic prompts are about one token per word."""
    timeout_s: float = 1800.0
    """Per-request limit."""

    def __post_init__(self) -> None:
        if self.api not in ("chat", "completions"):
            raise ValueError(f"target.api: {self.api!r} is not 'chat' or 'completions'")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"target.url: {self.url!r} must start with http:// or https://")


@dataclass(frozen=True)
class BenchConfig:
    name: str = "replay"
    target: TargetConfig = field(default_factory=TargetConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    rates: tuple[float | None, ...] = (None,)
    """One run per entry; None keeps the workload's own arrivals (trace times or its rate)."""
    slo: SLO = field(default_factory=SLO)
    warmup_requests: int = 2
    load_interval_s: float = 1.0
    out: str = "results/bench/replay.json"
    plot: str | None = None
    """Default: ``out`` with ``.png``."""
    systems: dict[str, ClusterConfig] | None = None
    """Clusters to bring up and compare, by name (None: replay against ``target.url``)."""
    repeats: int = 1
    """Times the whole sweep is run (with ``systems``: in an order rotated per repeat)."""
    client: str = "replay"
    """``replay`` (this suite's client, ``workload`` says what it sends) or ``bench_serving``
    (SGLang's ``python -m sglang.bench_serving`` as shipped, sending what ``bench_serving_args``
    says; ``workload`` is then unused but for its ``seed``; a null rate is ``inf``). Both
    clients' per-request timings are summarised by the same code."""
    bench_serving_args: tuple[str, ...] = ()
    """bench_serving's dataset arguments, e.g. ``[--dataset-name, generated-shared-prefix,
    --gsp-num-groups, '6', ...]``; the runner adds the URL, model, tokenizer (``target``'s),
    backend (from ``target.api``), rate, seed, warm-up (``warmup_requests``) and output."""

    def __post_init__(self) -> None:
        if self.client not in ("replay", "bench_serving"):
            raise ValueError(f"client: {self.client!r} is not 'replay' or 'bench_serving'")
        if self.client == "bench_serving" and not self.bench_serving_args:
            raise ValueError("client: bench_serving needs bench_serving_args (its dataset)")
        if self.client == "bench_serving" and not self.target.tokenizer:
            raise ValueError("client: bench_serving needs target.tokenizer")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1 (got {self.repeats})")
        if self.systems is not None and not self.systems:
            raise ValueError("systems: name at least one system, or leave the key out")
        if not self.rates:
            raise ValueError("rates: give at least one rate (null for the workload's own)")
        for rate in self.rates:
            if rate is not None and rate <= 0:
                raise ValueError(f"rates: {rate} must be > 0 or null")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests: must be >= 0 (got {self.warmup_requests})")


def _build(cls: Any, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    return cls(**raw)


def load_config(path: str) -> BenchConfig:
    """Parse a YAML config (ValueError with one readable line on any problem)."""
    import yaml

    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    try:
        top = dict(raw)
        top["target"] = _build(TargetConfig, raw.get("target"), "target")
        top["workload"] = _build(WorkloadConfig, raw.get("workload"), "workload")
        top["slo"] = _build(SLO, raw.get("slo"), "slo")
        if isinstance(top.get("bench_serving_args"), list):
            top["bench_serving_args"] = tuple(str(a) for a in top["bench_serving_args"])
        if "rates" in top:
            top["rates"] = tuple(top["rates"]) if isinstance(top["rates"], list) else (
                top["rates"],)
        if raw.get("systems") is not None:
            if not isinstance(raw["systems"], dict):
                raise ValueError(f"{path}: systems must map a name to a cluster")
            top["systems"] = {str(name): _build(ClusterConfig, _tuples(spec), f"systems.{name}")
                              for name, spec in raw["systems"].items()}
        return _build(BenchConfig, top, "config")  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _tuples(spec: Any) -> Any:
    """YAML lists become the tuples the frozen dataclasses hold."""
    if not isinstance(spec, dict):
        return spec
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def _served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        models = json.load(resp).get("data") or []
    if not models:
        raise ValueError(f"{url}/v1/models lists no model; set target.model")
    return str(models[0]["id"])


def _tokenizer_dir(name: str) -> str:
    if os.path.isdir(name):
        return name
    from runtime_patches import models

    path, _ = models.resolve(name)
    return str(path)


def _tokenizer(name: str | None) -> Any:
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir(name))


async def _cache_counters(worker_urls: list[str]) -> dict[str, float] | None:
    """The workers' prompt and cached-token counters (``sglang:*_tokens_total``, per tier),
    summed; None when a worker does not answer ``/metrics``."""
    import aiohttp

    from router.cache_report import TIERS, parse

    total = {"prompt": 0.0, **dict.fromkeys(TIERS, 0.0)}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for url in worker_urls:
                async with session.get(url + "/metrics",
                                       headers={"Accept-Encoding": "identity"}) as resp:
                    if resp.status != 200:
                        return None
                    counters = parse(await resp.text())
                total["prompt"] += counters.prompt_tokens
                for tier, value in counters.cached_tokens.items():
                    total[tier] = total.get(tier, 0.0) + value
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    return total


async def _one_run(cfg: BenchConfig, model: str, workload: Any, label: str,
                   worker_urls: list[str] | None = None,
                   wl_cfg: WorkloadConfig | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    warm = [dataclasses.replace(r, at_s=0.0, output_tokens=min(r.output_tokens, 8))
            for r in workload.requests[:cfg.warmup_requests]]
    if warm and cfg.client == "replay":  # bench_serving warms up itself
        await send_all(cfg.target.url, model, cfg.target.api, warm, cfg.target.timeout_s)
    before = await _cache_counters(worker_urls) if worker_urls else None
    sampler = LoadSampler(cfg.target.url, cfg.load_interval_s)
    sampler.start()
    bar = tqdm(total=len(workload.requests), desc=label, unit="req", file=sys.stderr)

    def done(result: Result) -> None:
        bar.update(1)
        if not result.ok:
            bar.set_postfix_str(f"failed: {result.error}"[:60])

    extra: dict[str, Any] = {}
    try:
        if cfg.client == "bench_serving":
            bar.close()
            record = await asyncio.to_thread(
                bench_serving.run, cfg.target.url, model, _tokenizer_dir(str(cfg.target.tokenizer)),
                cfg.target.api, wl_cfg.rate if wl_cfg else None, wl_cfg.seed if wl_cfg else 0,
                cfg.warmup_requests,
                cfg.bench_serving_args, cfg.target.timeout_s)
            results = bench_serving.results_from_details(record)
            wall = float(record["duration"])
            extra["bench_serving"] = {k: record.get(k) for k in bench_serving.SUMMARY_KEYS}
            extra["bench_serving"]["command"] = record["command"]
        else:
            results, wall = await send_all(cfg.target.url, model, cfg.target.api,
                                           workload.requests, cfg.target.timeout_s, done)
    finally:
        bar.close()
        await sampler.stop()
    out: dict[str, Any] = {
        "label": label, **extra,
        "workload": workload.description if cfg.client == "replay" else {
            "source": "bench_serving", "args": list(cfg.bench_serving_args),
            "rate": wl_cfg.rate if wl_cfg else None, "seed": wl_cfg.seed if wl_cfg else 0},
        "summary": summarise(results, wall, cfg.slo),
        "requests": [r.as_dict() for r in results], "load": sampler.samples}
    after = await _cache_counters(worker_urls) if before is not None and worker_urls else None
    if before is not None and after is not None:
        # prompt tokens the workers were sent during the run and found cached, per tier
        out["summary"]["cache_tokens"] = {k: after[k] - before.get(k, 0.0) for k in after}
    rebalance = await _rebalance_decisions(cfg.target.url)
    if rebalance is not None:
        out["rebalance_decisions"] = rebalance
    return out


async def _rebalance_decisions(url: str) -> list[dict[str, Any]] | None:
    """What BanaServe's rebalancer decided (``GET /rebalance``), when the target has one."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url + "/rebalance") as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    decisions = body.get("recent_decisions") if isinstance(body, dict) else None
    return decisions if isinstance(decisions, list) else None


def run(cfg: BenchConfig) -> dict[str, Any]:
    tokenizer = _tokenizer(cfg.target.tokenizer)
    result: dict[str, Any] = {
        "name": cfg.name, "config": dataclasses.asdict(cfg), "model": None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "started": datetime.datetime.now(datetime.UTC).isoformat(), "runs": []}
    if cfg.systems is None:
        for repeat in range(cfg.repeats):
            result["model"] = _sweep(cfg, cfg.target, tokenizer, None, repeat, result["runs"])
    else:
        names = list(cfg.systems)
        for repeat in range(cfg.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                cluster = Cluster(cfg.systems[name], name, cfg.name)
                with cluster as url:
                    target = dataclasses.replace(cfg.target, url=url)
                    result["model"] = _sweep(cfg, target, tokenizer, name, repeat,
                                             result["runs"], cluster.worker_urls)
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat()
    return result


def _sweep(cfg: BenchConfig, target: TargetConfig, tokenizer: Any, system: str | None,
           repeat: int, runs: list[dict[str, Any]], worker_urls: list[str] | None = None) -> str:
    """Every rate of ``cfg`` once against ``target``; appends the runs, returns the model."""
    model = target.model or _served_model(target.url)
    one = dataclasses.replace(cfg, target=dataclasses.replace(target, model=model))
    for rate in cfg.rates:
        wl_cfg = cfg.workload if rate is None else dataclasses.replace(cfg.workload, rate=rate)
        workload = build(wl_cfg, tokenizer)
        label = f"rate {rate}/s" if rate is not None else workload.description["arrivals"]
        if system is not None:
            label = f"{system} {label}"
        if cfg.repeats > 1:
            label += f" #{repeat + 1}"
        run_result = asyncio.run(_one_run(one, model, workload, label, worker_urls, wl_cfg))
        run_result.update(rate=rate if rate is not None else wl_cfg.rate, system=system,
                          repeat=repeat)
        runs.append(run_result)
        s = run_result["summary"]
        print(f"{cfg.name} [{label}]: {s['completed']}/{s['requests']} ok, "
              f"{_f(s['output_tokens_per_s'])} tok/s, TTFT p50/p99 "
              f"{_f(s['ttft_s']['p50'])}/{_f(s['ttft_s']['p99'])} s, TPOT p50/p99 "
              f"{_ms(s['tpot_s']['p50'])}/{_ms(s['tpot_s']['p99'])} ms, goodput "
              f"{_f(100 * (s['goodput_share'] or 0), 0)}%{_hits(s)}", flush=True)
    return model


def _hits(summary: dict[str, Any]) -> str:
    cache = summary.get("cache_tokens")
    if not cache or not cache.get("prompt"):
        return ""
    tiers = "/".join(f"{100 * cache.get(t, 0) / cache['prompt']:.0f}"
                     for t in ("device", "host", "storage"))
    return f", cached device/host/storage {tiers}% of {cache['prompt']:.0f} prompt tokens"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def save(cfg: BenchConfig, result: dict[str, Any]) -> tuple[str, str]:
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as fh:
        json.dump(result, fh, indent=1)
    png = cfg.plot or os.path.splitext(cfg.out)[0] + ".png"
    plot(result, png)
    return cfg.out, png
