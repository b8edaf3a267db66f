"""SGLang's own load generator as the replay suite's client: ``python -m sglang.bench_serving``.

Used by ``scripts.bench.replay.run`` (``client: bench_serving`` in a config) and by
``scripts.bench.agree``. bench_serving runs as SGLang ships it, in a subprocess, against the
system under test; its per-request details (``--output-details``) are turned into this suite's
``Result``s, so both clients' numbers come out of one ``summarise`` and sit side by side.

- ``argv(...)`` builds the command line (pure): the caller's dataset arguments plus the URL,
  model, tokenizer, backend (``sglang-oai-chat`` for chat, ``sglang-oai`` for completions), rate
  (``inf`` for all at once), seed, warm-up and output file.
- ``run(...)`` runs it and returns bench_serving's own record (the JSON line it writes).
- ``results_from_details(record)`` is pure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from scripts.bench.replay.client import Result


def argv(url: str, model: str, tokenizer_dir: str, api: str, rate: float | None, seed: int,
         warmup: int, dataset_args: Sequence[str], out: str) -> list[str]:
    backend = "sglang-oai-chat" if api == "chat" else "sglang-oai"
    return [sys.executable, "-m", "sglang.bench_serving", "--backend", backend,
            "--base-url", url, "--model", model, "--tokenizer", tokenizer_dir,
            *dataset_args,
            "--request-rate", "inf" if rate is None or rate == float("inf") else str(rate),
            "--seed", str(seed), "--warmup-requests", str(warmup),
            "--output-file", out, "--output-details", "--disable-tqdm"]


def run(url: str, model: str, tokenizer_dir: str, api: str, rate: float | None, seed: int,
        warmup: int, dataset_args: Sequence[str], timeout_s: float = 3600) -> dict[str, Any]:
    """bench_serving's record for one run; RuntimeError with its last output if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench_serving.jsonl")
        cmd = argv(url, model, tokenizer_dir, api, rate, seed, warmup, dataset_args, out)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError("bench_serving failed: " + (done.stderr or done.stdout)[-1500:])
        with open(out) as fh:
            record: dict[str, Any] = json.loads(fh.read().strip().splitlines()[-1])
    record["command"] = cmd[1:]
    return record


def results_from_details(details: dict[str, Any]) -> list[Result]:
    """bench_serving's per-request details (``--output-details``) as our ``Result``s."""
    out = []
    for i, (ttft, itl, n_out, error) in enumerate(zip(
            details["ttfts"], details["itls"], details["output_lens"], details["errors"],
            strict=True)):
        ok = not error and ttft > 0
        out.append(Result(i, 0.0, ok=ok, error=error or None, ttft=ttft if ok else None,
                          e2e=ttft + sum(itl) if ok else None, itl=list(itl),
                          output_tokens=n_out, prompt_tokens=details["input_lens"][i]))
    return out


SUMMARY_KEYS = ("completed", "duration", "request_throughput", "output_throughput",
                "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                "p99_tpot_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms")
"""What of bench_serving's own record a result file keeps (its numbers, as it printed them)."""
