"""``BatcherConfig``: the router's ``--batching`` knobs, validated on construction.

Who reads it: ``router/config.py`` (``RouterConfig.batching``), ``router/__main__.py`` (the CLI
defaults), the asyncio batcher (``router/batcher.py``) and the simulator (``scripts/sim``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.batching.slo_odbs import BatchingConfig
from router.cli_fields import flag


@dataclass(frozen=True)
class BatcherConfig:
    """``--batching`` and its knobs."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """The batch-forming policy and SLO-ODBS's parameters."""
    window_ms: float = field(default=50.0, metadata=flag(
        "--batch-window-ms", "longest a request is held for companions (%(default)s ms)"))
    """Longest the oldest waiting request is held for others to join its batch while a worker
    has a free slot (the bounded batching window)."""
    slots_per_worker: int = field(default=8, metadata=flag(
        "--batch-slots-per-worker", "requests kept running on each worker; match the workers' "
        "--max-running-requests (%(default)s)"))
    """Requests this router keeps running on each worker; more wait here."""
    default_slo_ms: float = field(default=30000.0, metadata=flag(
        "--default-slo-ms", "SLO of a request that names none (%(default).0f ms)"))
    """SLO of a request that names none (``slo_ms`` in the body or the X-BanaServe-SLO-Ms
    header)."""
    max_waiting: int = 4096
    """Requests held here at once; more are answered 429."""

    def __post_init__(self) -> None:
        if self.window_ms < 0:
            raise ValueError(f"BatcherConfig.window_ms: must be >= 0, got {self.window_ms}")
        if self.slots_per_worker < 1:
            raise ValueError(f"BatcherConfig.slots_per_worker: must be >= 1, got "
                             f"{self.slots_per_worker}")
        if self.default_slo_ms <= 0:
            raise ValueError(f"BatcherConfig.default_slo_ms: must be > 0, got "
                             f"{self.default_slo_ms}")
        if self.max_waiting < 1:
            raise ValueError(f"BatcherConfig.max_waiting: must be >= 1, got {self.max_waiting}")
