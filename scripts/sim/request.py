"""One simulated request: what it asks for and what happened to it.

Who owns what: ``scripts.sim.workload`` creates ``SimRequest``s (the ask); the instance a request
runs on writes its progress fields (``cached_tokens`` ... ``finish_s``); ``scripts.sim.metrics``
reads the finished ones. Nobody else writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SimRequest:
    index: int
    arrival_s: float
    """When the client sends it (seconds after the start of the run)."""
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()
    """Prefix block ids (Mooncake ``hash_ids``); requests sharing leading ids share a prefix."""
    block_tokens: int = 512
    """Tokens per prefix block."""
    shared_prefix_tokens: int = 0
    """Leading tokens every request has (a chat template's system prompt), held by an
    instance's prefix cache once it has served one request."""
    slo_s: float = 30.0
    """End-to-end SLO (router-side SLO-ODBS batching)."""

    # -- progress (written by the instance that runs it) ----------------------------------------
    dispatched_s: float | None = None
    """When the router handed it to an instance."""
    instance: int | None = None
    queued_s: float = 0.0
    """When it entered its instance's waiting queue."""
    cached_tokens: int = 0
    """Prompt tokens found in the instance's prefix cache."""
    store_tokens: int = 0
    """Prompt tokens loaded from the global KV store."""
    prefilled: int = 0
    """Prompt tokens computed so far (chunked prefill)."""
    generated: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    decode_instance: int | None = None
    """PD split: the decode instance chosen at dispatch."""
    extra_latency_s: float = 0.0
    """Outside the scheduler (HTTP, router): added to TTFT and end to end."""
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """A stand-in prompt for prefix-affinity policies: one 64-character chunk per block, so
        ``cache_aware``'s 64-character blocks line up with the trace's blocks."""
        if self.block_hashes:
            return "".join(f"{h & 0xFFFFFFFFFFFFFFFF:016x}" * 4 for h in self.block_hashes)
        return f"{self.index:016x}" * 4

    @property
    def ttft(self) -> float | None:
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.arrival_s + self.extra_latency_s

    @property
    def e2e(self) -> float | None:
        if self.finish_s is None:
            return None
        return self.finish_s - self.arrival_s + self.extra_latency_s

    @property
    def tpot(self) -> float | None:
        ttft, e2e = self.ttft, self.e2e
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)
