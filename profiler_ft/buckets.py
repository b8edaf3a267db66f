"""Output-length buckets: the classes the predictor chooses between.

A bucket set is a tuple of inclusive upper bounds in tokens; one more bucket holds everything
above the last bound. The default, ``pow2`` (<=32, 33-64, 65-128, 129-256, 257-512, >512), doubles
at each step, so the implied length of a bucket is never more than a factor of two from any length
in it, and memory planning (KV pages) sees a bounded relative error. The original work's tiers
(``uellm``: <=256, 257-512, 513-1024, >1024, from the batch-size tiers in UELLM's SLO-ODBS code)
are kept as a preset: on Alpaca they put 98.9% of answers in the first bucket (SmolLM2's tokenizer),
so the majority bucket alone scores 98.9% there (see docs/profiler_ft.md).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

PRESETS: dict[str, tuple[int, ...]] = {
    "pow2": (32, 64, 128, 256, 512),
    "uellm": (256, 512, 1024),
}
DEFAULT = "pow2"


@dataclass(frozen=True)
class Buckets:
    bounds: tuple[int, ...]
    """Inclusive upper bounds in tokens, strictly increasing, all >= 1."""

    def __post_init__(self) -> None:
        if not self.bounds:
            raise ValueError("bounds: need at least one bound (two buckets)")
        if any(not isinstance(b, int) or b < 1 for b in self.bounds):
            raise ValueError(f"bounds: every bound must be an integer >= 1, got {self.bounds}")
        if any(a >= b for a, b in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"bounds: must be strictly increasing, got {self.bounds}")

    @classmethod
    def parse(cls, spec: str) -> Buckets:
        """``pow2``, ``uellm`` or a comma-separated list of upper bounds such as ``64,256,1024``."""
        spec = spec.strip()
        if spec in PRESETS:
            return cls(PRESETS[spec])
        try:
            bounds = tuple(int(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"buckets {spec!r}: expected a preset ({', '.join(PRESETS)}) or "
                             "comma-separated integer upper bounds such as 64,256,1024") from None
        return cls(bounds)

    @property
    def num_buckets(self) -> int:
        return len(self.bounds) + 1

    def index(self, num_tokens: int) -> int:
        """The bucket holding an output of ``num_tokens`` tokens."""
        return bisect.bisect_left(self.bounds, num_tokens)

    def label(self, index: int) -> str:
        if index == 0:
            return f"<={self.bounds[0]}"
        if index == len(self.bounds):
            return f">{self.bounds[-1]}"
        return f"{self.bounds[index - 1] + 1}-{self.bounds[index]}"

    def labels(self) -> list[str]:
        return [self.label(i) for i in range(self.num_buckets)]

    def fallback_length(self, index: int) -> int:
        """An implied length for a bucket with no training example: its middle (top: 1.5x)."""
        low = 1 if index == 0 else self.bounds[index - 1] + 1
        high = self.bounds[index] if index < len(self.bounds) else int(self.bounds[-1] * 2)
        return (low + high) // 2
