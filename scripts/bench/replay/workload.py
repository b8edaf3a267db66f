"""Workloads for the replay benchmark: when each request is sent, and what it asks.

Who calls: ``scripts.bench.replay.run`` builds one :class:`Workload` per configured run with
:func:`build`; the sender then walks ``workload.requests`` in order of ``at_s``.

Sources (``WorkloadConfig.source``):
- ``azure_conv``: Azure's 2023 conversation trace (``TIMESTAMP,ContextTokens,GeneratedTokens``):
  arrival times relative to the first row, times ``time_scale``; prompt and output lengths.
- ``mooncake``: Kimi's conversation trace (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``, one id per 512-token block): the prompt is built block by block from the ids, so
  requests that share leading ids share a prompt prefix, as in the trace.
- ``alpaca`` / ``sharegpt``: dataset prompts (their text), Poisson arrivals at ``rate``; the
  output length is the reference answer's length (alpaca) or ``max_output_tokens``.
- ``random``: no data file; every prompt is ``max_input_tokens`` tokens of unrelated text and
  every answer ``max_output_tokens`` tokens, as ``sglang.bench_serving --dataset-name random-ids
  --random-range-ratio 1``; Poisson arrivals at ``rate``, or all at once without one.
- ``shared_prefix``: no data file; like ``sglang.bench_serving --dataset-name
  generated-shared-prefix``: ``groups`` prefixes of ``prefix_tokens`` tokens, each request one
  group's prefix plus its own question, ``max_input_tokens`` tokens in all; the groups take turns
  in a seeded shuffled order; Poisson arrivals at ``rate``, or all at once without one.
With ``rate`` set, trace arrival times are replaced by Poisson arrivals at that rate (the
lengths and prefixes stay the trace's). Lengths are scaled by ``length_scale`` and capped at
``max_input_tokens`` / ``max_output_tokens`` (a CPU cluster cannot serve 7,000-token prompts at
trace rates); the description records what was changed.

Synthetic text is made of common English words, each one token for Llama-family BPE tokenizers
(SmolLM2: 1,000 words are 1,000 tokens); with a tokenizer the lengths are exact.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..",
                                         "shared", "data"))
DEFAULT_PATHS = {
    "azure_conv": "AzureLLMInferenceTrace_conv.csv",
    "mooncake": "mooncake_conversation_trace.jsonl",
    "alpaca": "alpaca_4000.json",
    "sharegpt": "ShareGPT_V3_filtered_1000.json",
}
SOURCES = (*DEFAULT_PATHS, "random", "shared_prefix")
SYNTHETIC = ("random", "shared_prefix")
MOONCAKE_BLOCK_TOKENS = 512
WORDS = ("time system data model value server request memory cache token layer batch queue "
         "worker router river stone light garden number engine winter market letter window "
         "signal forest music paper silver orange planet theory bridge story field record "
         "answer question table water city house family school world people music night").split()


class WorkloadError(ValueError):
    """The workload cannot be built (missing file, bad source); one line for the CLI."""


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. Every field has a default; see the module docstring for the sources."""

    source: str = "azure_conv"
    """``azure_conv``, ``mooncake``, ``alpaca``, ``sharegpt`` or ``random``."""
    path: str | None = None
    """The data file (default: ``../shared/data/`` + the source's file)."""
    num_requests: int = 50
    """Requests to send (the first ones of the trace, or sampled from the dataset)."""
    offset: int = 0
    """Skip this many trace rows first."""
    time_scale: float = 1.0
    """Trace arrival times are multiplied by this (0.5: twice as fast)."""
    rate: float | None = None
    """Requests per second, Poisson; replaces the trace's arrival times when set."""
    length_scale: float = 1.0
    """Prompt and output lengths (and Mooncake's 512-token blocks) are multiplied by this."""
    max_input_tokens: int = 2048
    max_output_tokens: int = 256
    min_output_tokens: int = 1
    groups: int = 8
    """``shared_prefix``: distinct prefixes."""
    prefix_tokens: int = 256
    """``shared_prefix``: tokens of each prefix (the question is the rest of
    ``max_input_tokens``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"WorkloadConfig.source: {self.source!r} is not one of {SOURCES}")
        for name in ("num_requests", "max_input_tokens", "max_output_tokens",
                     "min_output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorkloadConfig.{name}: must be >= 1 (got "
                                 f"{getattr(self, name)})")
        if self.offset < 0:
            raise ValueError(f"WorkloadConfig.offset: must be >= 0 (got {self.offset})")
        for name in ("time_scale", "length_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WorkloadConfig.{name}: must be > 0 (got "
                                 f"{getattr(self, name)})")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"WorkloadConfig.rate: must be > 0 (got {self.rate})")
        if self.source == "shared_prefix" and not (
                self.groups >= 1 and 1 <= self.prefix_tokens < self.max_input_tokens):
            raise ValueError(f"WorkloadConfig: shared_prefix needs groups >= 1 and 1 <= "
                             f"prefix_tokens < max_input_tokens (got groups {self.groups}, "
                             f"prefix_tokens {self.prefix_tokens}, max_input_tokens "
                             f"{self.max_input_tokens})")

    @property
    def file(self) -> str:
        if self.source in SYNTHETIC:
            return ""
        return self.path or os.path.join(DATA_DIR, DEFAULT_PATHS[self.source])


@dataclass(frozen=True)
class RequestSpec:
    index: int
    at_s: float
    """Seconds after the start of the run at which it is sent."""
    prompt: str
    prompt_tokens: int
    """Target prompt length (exact with a tokenizer, about that many words without)."""
    output_tokens: int
    """``max_tokens`` (sent with ``ignore_eos``, so the answer has exactly this many)."""


@dataclass
class Workload:
    requests: list[RequestSpec]
    description: dict[str, Any] = field(default_factory=dict)


class TextMaker:
    """Deterministic text of a given token length; blocks keyed by id repeat exactly."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def words(self, key: int, n: int) -> str:
        rng = random.Random(key * 7919 + 17)
        text = " ".join(rng.choice(WORDS) for _ in range(max(n, 0)))
        if self.tokenizer is None or n <= 0:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(ids) < n:  # a tokenizer that splits fewer words than tokens: add more
            text += " " + " ".join(rng.choice(WORDS) for _ in range(n - len(ids)))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return str(self.tokenizer.decode(ids[:n]))

    def fit(self, text: str, n: int, key: int) -> str:
        """``text`` trimmed or extended at its end to exactly ``n`` tokens (blocks joined by
        spaces can tokenize differently at the joins); unchanged without a tokenizer."""
        if self.tokenizer is None:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < n:
            text = text + " " + self.words(key, n - len(ids))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return str(self.tokenizer.decode(ids[:n])) if len(ids) != n else text


def _scaled(value: int, cfg: WorkloadConfig, cap: int, floor: int = 1) -> int:
    return max(floor, min(cap, round(value * cfg.length_scale)))


def _poisson_times(n: int, rate: float, seed: int) -> list[float]:
    rng, at, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(at)
        at += rng.expovariate(rate)
    return out


def _read_azure(cfg: WorkloadConfig) -> list[tuple[float, int, int, list[int] | None]]:
    rows: list[tuple[float, int, int, list[int] | None]] = []
    with open(cfg.file, newline="") as fh:
        reader = csv.DictReader(fh)
        first: datetime.datetime | None = None
        for i, row in enumerate(reader):
            if i < cfg.offset:
                continue
            if len(rows) >= cfg.num_requests:
                break
            stamp = datetime.datetime.fromisoformat(row["TIMESTAMP"].strip()[:26])
            first = first or stamp
            rows.append(((stamp - first).total_seconds(), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"]), None))
    return rows


def _read_mooncake(cfg: WorkloadConfig) -> list[tuple[float, int, int, list[int] | None]]:
    rows: list[tuple[float, int, int, list[int] | None]] = []
    with open(cfg.file) as fh:
        first: float | None = None
        for i, line in enumerate(fh):
            if i < cfg.offset:
                continue
            if len(rows) >= cfg.num_requests:
                break
            rec = json.loads(line)
            first = rec["timestamp"] if first is None else first
            rows.append(((rec["timestamp"] - first) / 1000.0, int(rec["input_length"]),
                         int(rec["output_length"]), list(rec["hash_ids"])))
    return rows


def _read_dataset(cfg: WorkloadConfig) -> list[tuple[str, int | None]]:
    with open(cfg.file) as fh:
        data = json.load(fh)
    out: list[tuple[str, int | None]] = []
    for rec in data:
        if cfg.source == "alpaca":
            prompt = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
            out.append((prompt, len(str(rec.get("output", "")).split()) or None))
        else:
            turns = rec.get("conversations") or []
            if turns:
                out.append((str(turns[0]["value"]), None))
    rng = random.Random(cfg.seed)
    rng.shuffle(out)
    return out[cfg.offset:cfg.offset + cfg.num_requests]


@dataclass(frozen=True)
class TraceRow:
    """One trace row as a run sends it: arrival time, scaled and capped lengths, block ids."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]
    """Mooncake's 512-token prefix blocks (empty for Azure)."""
    capped: bool
    """The scaled prompt was longer than ``max_input_tokens``."""


def trace_rows(cfg: WorkloadConfig) -> list[TraceRow]:
    """The rows of an ``azure_conv`` or ``mooncake`` trace with the config's arrivals, scaling
    and caps applied (shared by the replay and the simulator); ``WorkloadError`` if missing."""
    if not os.path.exists(cfg.file):
        raise WorkloadError(f"workload: {cfg.file} not found (the {cfg.source} data; see "
                            "../shared/data/README.md for where to download it)")
    rows = _read_azure(cfg) if cfg.source == "azure_conv" else _read_mooncake(cfg)
    if not rows:
        raise WorkloadError(f"workload: no rows in {cfg.file} after offset {cfg.offset}")
    times = (_poisson_times(len(rows), cfg.rate, cfg.seed) if cfg.rate
             else [t * cfg.time_scale for t, *_ in rows])
    out = []
    for (_, n_in, n_out, ids), at in zip(rows, times, strict=True):
        want = _scaled(n_in, cfg, 10**9)
        n_prompt = min(want, cfg.max_input_tokens)
        out.append(TraceRow(at, n_prompt,
                            _scaled(n_out, cfg, cfg.max_output_tokens, cfg.min_output_tokens),
                            tuple(ids or ()), n_prompt < want))
    return out


def build(cfg: WorkloadConfig, tokenizer: Any = None) -> Workload:
    """The requests of one run (raises WorkloadError when the data file is missing)."""
    if cfg.source == "random":
        return _random(cfg, TextMaker(tokenizer))
    if cfg.source == "shared_prefix":
        return _shared_prefix(cfg, TextMaker(tokenizer))
    if not os.path.exists(cfg.file):
        raise WorkloadError(f"workload: {cfg.file} not found (the {cfg.source} data; see "
                            "../shared/data/README.md for where to download it)")
    maker = TextMaker(tokenizer)
    if cfg.source in ("alpaca", "sharegpt"):
        return _from_dataset(cfg)
    rows = trace_rows(cfg)
    block = max(1, round(MOONCAKE_BLOCK_TOKENS * cfg.length_scale))
    requests = []
    for i, row in enumerate(rows):
        n_prompt = row.prompt_tokens
        if row.hash_ids:  # Mooncake: the prompt's blocks are its hash ids, the last one partial
            parts, left = [], n_prompt
            for h in row.hash_ids:
                if left <= 0:
                    break
                parts.append(maker.words(h, min(block, left)))
                left -= block
            prompt = maker.fit(" ".join(parts), n_prompt, 2_000_000 + cfg.offset + i)
        else:
            prompt = maker.words(1_000_000 + cfg.offset + i, n_prompt)
        requests.append(RequestSpec(i, row.at_s, prompt, n_prompt, row.output_tokens))
    times = [row.at_s for row in rows]
    capped = sum(row.capped for row in rows)
    description = {"source": cfg.source, "file": os.path.basename(cfg.file),
                   "rows": [cfg.offset, cfg.offset + len(rows)],
                   "arrivals": f"poisson {cfg.rate}/s" if cfg.rate
                   else f"trace x{cfg.time_scale}",
                   "span_s": round(times[-1], 3), "length_scale": cfg.length_scale,
                   "prompts_capped": capped,
                   "mean_prompt_tokens": sum(r.prompt_tokens for r in requests) / len(requests),
                   "mean_output_tokens": sum(r.output_tokens for r in requests) / len(requests),
                   "exact_lengths": tokenizer is not None}
    if cfg.source == "mooncake":
        description["block_tokens"] = block
    return Workload(requests, description)


def _from_dataset(cfg: WorkloadConfig) -> Workload:
    items = _read_dataset(cfg)
    if not items:
        raise WorkloadError(f"workload: no records in {cfg.file}")
    times = _poisson_times(len(items), cfg.rate or 1.0, cfg.seed)
    requests = []
    for i, ((prompt, n_ref), at) in enumerate(zip(items, times, strict=True)):
        words = prompt.split()
        if len(words) > cfg.max_input_tokens:  # words as a bound on tokens: keep it short
            prompt = " ".join(words[:cfg.max_input_tokens])
        n_gen = _scaled(n_ref or cfg.max_output_tokens, cfg, cfg.max_output_tokens,
                        cfg.min_output_tokens)
        requests.append(RequestSpec(i, at, prompt, min(len(words), cfg.max_input_tokens),
                                    n_gen))
    return Workload(requests, {"source": cfg.source, "file": os.path.basename(cfg.file),
                               "arrivals": f"poisson {cfg.rate or 1.0}/s",
                               "span_s": round(times[-1], 3)})


def _random(cfg: WorkloadConfig, maker: TextMaker) -> Workload:
    times = (_poisson_times(cfg.num_requests, cfg.rate, cfg.seed) if cfg.rate
             else [0.0] * cfg.num_requests)
    requests = [RequestSpec(i, at, maker.words(3_000_000 + cfg.seed * 100_000 + i,
                                               cfg.max_input_tokens),
                            cfg.max_input_tokens, cfg.max_output_tokens)
                for i, at in enumerate(times)]
    return Workload(requests, {"source": "random",
                               "arrivals": f"poisson {cfg.rate}/s" if cfg.rate else "all at once",
                               "span_s": round(times[-1], 3),
                               "mean_prompt_tokens": cfg.max_input_tokens,
                               "mean_output_tokens": cfg.max_output_tokens,
                               "exact_lengths": maker.tokenizer is not None})


def _shared_prefix(cfg: WorkloadConfig, maker: TextMaker) -> Workload:
    times = (_poisson_times(cfg.num_requests, cfg.rate, cfg.seed) if cfg.rate
             else [0.0] * cfg.num_requests)
    prefixes = [maker.words(4_000_000 + cfg.seed * 1_000 + g, cfg.prefix_tokens)
                for g in range(cfg.groups)]
    order = [i % cfg.groups for i in range(cfg.num_requests)]
    random.Random(cfg.seed).shuffle(order)
    question = cfg.max_input_tokens - cfg.prefix_tokens
    requests = [RequestSpec(i, at, maker.fit(
        prefixes[g] + " " + maker.words(5_000_000 + cfg.seed * 100_000 + i, question),
        cfg.max_input_tokens, 6_000_000 + i), cfg.max_input_tokens, cfg.max_output_tokens)
        for i, (g, at) in enumerate(zip(order, times, strict=True))]
    return Workload(requests, {"source": "shared_prefix", "groups": cfg.groups,
                               "prefix_tokens": cfg.prefix_tokens,
                               "arrivals": f"poisson {cfg.rate}/s" if cfg.rate else "all at once",
                               "span_s": round(times[-1], 3),
                               "mean_prompt_tokens": cfg.max_input_tokens,
                               "mean_output_tokens": cfg.max_output_tokens,
                               "exact_lengths": maker.tokenizer is not None})
