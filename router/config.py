"""Router configuration: frozen dataclasses that also supply the CLI defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port`` (ValueError if invalid)."""
    if "://" not in url:
        url = "http://" + url
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
        raise ValueError(f"worker URL {url!r} must look like http://HOST:PORT")
    return f"{parsed.scheme}://{parsed.hostname}:{parsed.port}"


@dataclass(frozen=True)
class HealthConfig:
    """Active health checking of workers (GET /health)."""

    interval_s: float = 2.0
    """Seconds between health checks of each worker."""
    timeout_s: float = 3.0
    """A health check slower than this counts as a failure."""
    failure_threshold: int = 2
    """Consecutive failed checks that mark a healthy worker unhealthy."""
    success_threshold: int = 1
    """Consecutive passed checks that mark an unhealthy worker healthy again."""

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"HealthConfig.interval_s/timeout_s: must be > 0 "
                             f"(got {self.interval_s}, {self.timeout_s})")
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("HealthConfig.failure_threshold/success_threshold: must be >= 1")


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``python -m router`` needs."""

    workers: tuple[str, ...]
    """SGLang worker base URLs (``http://host:port``)."""
    host: str = "127.0.0.1"
    """Interface the router listens on."""
    port: int = 30000
    """Port the router listens on."""
    policy: str = "load_aware"
    """Dispatch policy name (see ``router/policy/README.md``)."""
    load_poll_interval_s: float = 0.5
    """Seconds between polls of each worker's ``/v1/loads``."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Active health checking."""
    max_connect_retries: int = 2
    """Other workers tried when a worker refuses the connection (nothing was sent to it)."""
    connect_timeout_s: float = 5.0
    """Timeout for opening a connection to a worker."""
    read_timeout_s: float = 600.0
    """Longest silence tolerated from a worker while it answers (between stream chunks)."""
    tokenizer_path: str | None = None
    """Tokenizer/config folder used to count prompt tokens and check token ids; by default the
    ``tokenizer_path`` a worker reports in ``/model_info``, when that folder exists here."""
    log_level: str = "info"
    """Python logging level."""

    def __post_init__(self) -> None:
        if not self.workers:
            raise ValueError("RouterConfig.workers: at least one worker URL is required")
        object.__setattr__(self, "workers", tuple(normalize_url(u) for u in self.workers))
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"RouterConfig.workers: duplicate worker URL in {self.workers}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"RouterConfig.port: {self.port} is not a TCP port")
        if self.load_poll_interval_s <= 0:
            raise ValueError(f"RouterConfig.load_poll_interval_s: {self.load_poll_interval_s} <= 0")
        if self.max_connect_retries < 0:
            raise ValueError(f"RouterConfig.max_connect_retries: {self.max_connect_retries} < 0")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("RouterConfig.connect_timeout_s/read_timeout_s: must be > 0")
