"""Router configuration: frozen dataclasses that also supply the CLI defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from router.admission import AdmissionConfig
from router.batching.config import BatcherConfig
from router.breaker import BreakerConfig
from router.cli_fields import Flag, flag
from router.length import LengthConfig
from router.rebalance.config import RebalanceConfig
from router.store_index import StoreIndexConfig


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port`` (ValueError if invalid)."""
    if "://" not in url:
        url = "http://" + url
    parsed = urlparse(url)
    try:
        port = parsed.port  # urllib raises for a port that is not a number in 0-65535
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not port:
        raise ValueError(f"worker URL {url!r} must look like http://HOST:PORT (port 1-65535)")
    return f"{parsed.scheme}://{parsed.hostname}:{port}"


@dataclass(frozen=True)
class HealthConfig:
    """Active health checking of workers (GET /health)."""

    interval_s: float = field(default=2.0, metadata=flag(
        "--health-interval", "seconds between health checks (%(default)s)"))
    """Seconds between health checks of each worker."""
    timeout_s: float = field(default=3.0, metadata=flag(
        "--health-timeout", "health check timeout in seconds (%(default)s)"))
    """A health check slower than this counts as a failure."""
    failure_threshold: int = field(default=2, metadata=flag(
        "--health-failure-threshold",
        "failed checks before a worker is unhealthy (%(default)s)"))
    """Consecutive failed checks that mark a healthy worker unhealthy."""
    success_threshold: int = field(default=1, metadata=flag(
        "--health-success-threshold", "passed checks before it is healthy again (%(default)s)"))
    """Consecutive passed checks that mark an unhealthy worker healthy again."""
    busy_grace_s: float = field(default=30.0, metadata=flag(
        "--health-busy-grace",
        "seconds a worker with requests in flight may leave health checks unanswered (SGLang "
        "answers /health only between forward passes) before they count as failures "
        "(%(default)s)"))
    """SGLang answers ``/health`` by generating a token, so a worker busy with a long forward
    pass (seconds on CPU) answers late. A check that times out while the worker has requests
    from this router in flight counts as busy, not failed, until nothing (no health answer, no
    load reading) came back from the worker for this long. Refused connections and error
    statuses always count."""

    def __post_init__(self) -> None:
        if self.busy_grace_s < 0:
            raise ValueError(f"HealthConfig.busy_grace_s: must be >= 0 (got {self.busy_grace_s})")
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"HealthConfig.interval_s/timeout_s: must be > 0 "
                             f"(got {self.interval_s}, {self.timeout_s})")
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("HealthConfig.failure_threshold/success_threshold: must be >= 1")


@dataclass(frozen=True)
class RetryConfig:
    """Retries of requests that failed before any byte reached the client."""

    max_retries: int = field(default=2, metadata=flag(
        "--max-retries", "retries on another worker after a connection error, timeout or 5xx "
        "before the first byte reached the client (%(default)s)"))
    """Extra attempts, each on another worker, after a connection error, a timeout waiting for
    the answer, or a 5xx answer. Never once streaming to the client has started."""
    initial_backoff_s: float = field(default=0.02, metadata=flag(
        "--retry-initial-backoff",
        "first retry delay in seconds, doubled each retry (%(default)s)"))
    """Delay before the first retry; doubled each time, up to ``max_backoff_s``."""
    max_backoff_s: float = field(default=1.0, metadata=flag(
        "--retry-max-backoff", "largest retry delay in seconds (%(default)s)"))
    """Largest delay between attempts."""
    jitter: float = 0.5
    """Each delay is scaled by a random factor in [1 - jitter, 1]."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"RetryConfig.max_retries: {self.max_retries} < 0")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("RetryConfig: need 0 <= initial_backoff_s <= max_backoff_s")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryConfig.jitter: {self.jitter} not in [0, 1]")

    def backoff_s(self, attempt: int, rand: float) -> float:
        """Delay before retry number ``attempt`` (1-based), ``rand`` uniform in [0, 1)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return base * (1 - self.jitter * rand)


@dataclass(frozen=True)
class PrefillWorker:
    """A prefill worker in prefill/decode mode."""

    url: str
    """Base URL (``http://host:port``)."""
    bootstrap_port: int | None = None
    """Its ``--disaggregation-bootstrap-port`` (None: SGLang's default, 8998)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        if self.bootstrap_port is not None and not 0 < self.bootstrap_port < 65536:
            raise ValueError(f"PrefillWorker.bootstrap_port: {self.bootstrap_port} is not a port")


def parse_prefill(groups: list[list[str]]) -> tuple[PrefillWorker, ...]:
    """``--prefill URL [BOOTSTRAP_PORT]``, repeated -> the prefill workers (ValueError if bad)."""
    workers = []
    for group in groups:
        if len(group) > 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(group)}")
        try:
            port = int(group[1]) if len(group) == 2 else None
        except ValueError:
            raise ValueError(f"--prefill bootstrap port {group[1]!r} is not a number") from None
        workers.append(PrefillWorker(group[0], port))
    return tuple(workers)


BOOTSTRAP_PORT_ANNOTATION = "sglang.ai/bootstrap-port"
"""Pod annotation carrying a prefill worker's bootstrap port (the name SGLang's router reads)."""


def parse_selector(items: list[str] | tuple[str, ...], flag: str) -> tuple[tuple[str, str], ...]:
    """``["app=sglang", "role=prefill tier=gpu"]`` -> ``(("app", "sglang"), ...)``.

    Like smg, one item may hold several space-separated pairs. A token without ``=`` is a
    ValueError naming ``flag`` (smg's Python launcher skips it silently; its Rust CLI refuses)."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        for token in item.split():
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise ValueError(f"{flag}: {token!r} is not KEY=VALUE")
            pairs.append((key, value))
    return tuple(pairs)


def _selector_flag(name: str, what: str) -> dict[str, Flag]:
    return flag(f"--{name}", f"label selector of {what}; all pairs must match (as smg's "
                f"--{name})", nargs="+", action="extend", metavar="KEY=VALUE", to_cli=list,
                from_cli=lambda items: parse_selector(items, f"--{name}"))


@dataclass(frozen=True)
class DiscoveryConfig:
    """Kubernetes service discovery of worker pods (``--service-discovery``; flag names and
    defaults follow smg / sgl-router). Give ``selector`` for plain workers, or
    ``prefill_selector`` and/or ``decode_selector`` for prefill/decode mode."""

    selector: tuple[tuple[str, str], ...] = field(default=(), metadata=_selector_flag(
        "selector", "worker pods"))
    """Label selector (``key=value`` pairs, all must match) of regular worker pods."""
    prefill_selector: tuple[tuple[str, str], ...] = field(default=(), metadata=_selector_flag(
        "prefill-selector", "prefill worker pods (prefill/decode mode)"))
    """Label selector of prefill worker pods (prefill/decode mode)."""
    decode_selector: tuple[tuple[str, str], ...] = field(default=(), metadata=_selector_flag(
        "decode-selector", "decode worker pods (prefill/decode mode)"))
    """Label selector of decode worker pods (prefill/decode mode)."""
    port: int = field(default=80, metadata=flag(
        "--service-discovery-port", "port of the SGLang server in each discovered pod "
        "(%(default)s, as smg)", metavar="PORT"))
    """Port of the SGLang server in each pod: a pod's worker URL is ``http://{podIP}:{port}``."""
    namespace: str | None = field(default=None, metadata=flag(
        "--service-discovery-namespace", "namespace to watch (default: every namespace, which "
        "needs a ClusterRole; as smg)", metavar="NS"))
    """Namespace to watch; None watches every namespace (needs a ClusterRole), as in smg."""
    api_url: str | None = field(default=None, metadata=flag(
        "--k8s-api-url", "Kubernetes API base URL, https or http (e.g. kubectl proxy's "
        "http://127.0.0.1:8001); default: in-cluster, from KUBERNETES_SERVICE_HOST/_PORT and "
        "the pod's service account", metavar="URL"))
    """Kubernetes API base URL (``https://...`` or, for tests and ``kubectl proxy``,
    ``http://...``); None: in-cluster, from ``KUBERNETES_SERVICE_HOST``/``_PORT``."""
    token_file: str | None = field(default=None, metadata=flag(
        "--k8s-token-file", "bearer token file, re-read before each request (default: the "
        "service-account token in-cluster, none with --k8s-api-url)", metavar="PATH"))
    """Bearer token file, re-read before every list and watch (service-account tokens rotate).
    None: the pod's service-account token in-cluster, no token with ``api_url``."""
    ca_file: str | None = field(default=None, metadata=flag(
        "--k8s-ca-file", "CA bundle for the API's certificate (default: the service-account "
        "ca.crt in-cluster, the system CAs with --k8s-api-url)", metavar="PATH"))
    """CA bundle for an https API. None: the service-account ``ca.crt`` in-cluster, the system
    CAs with ``api_url``."""
    bootstrap_port_annotation: str = BOOTSTRAP_PORT_ANNOTATION
    """Pod annotation holding a prefill pod's ``--disaggregation-bootstrap-port``; absent:
    SGLang's default (8998)."""
    watch_timeout_s: int = 300
    """``timeoutSeconds`` of each watch request; the API server then ends the stream and the
    watch resumes from the last resourceVersion."""
    initial_backoff_s: float = 0.5
    """Delay before re-listing after a failed list or watch; doubled each failure in a row."""
    max_backoff_s: float = 30.0
    """Largest delay between failed attempts."""

    @property
    def pd_mode(self) -> bool:
        return bool(self.prefill_selector or self.decode_selector)

    def selectors(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Role (``regular``, ``prefill``, ``decode``) -> its non-empty label selector."""
        roles = {"regular": self.selector, "prefill": self.prefill_selector,
                 "decode": self.decode_selector}
        return {role: sel for role, sel in roles.items() if sel}

    def __post_init__(self) -> None:
        if not (self.selector or self.pd_mode):
            raise ValueError("DiscoveryConfig.selector: --service-discovery needs --selector "
                             "(or --prefill-selector/--decode-selector)")
        if self.selector and self.pd_mode:
            raise ValueError("DiscoveryConfig.selector: give --selector or "
                             "--prefill-selector/--decode-selector, not both")
        for name in ("selector", "prefill_selector", "decode_selector"):
            for pair in getattr(self, name):
                if len(pair) != 2 or not pair[0] or any(c in "=,!" for c in pair[0]):
                    raise ValueError(f"DiscoveryConfig.{name}: bad label {pair!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"DiscoveryConfig.port: {self.port} is not a TCP port")
        if self.namespace is not None and not self.namespace:
            raise ValueError("DiscoveryConfig.namespace: must not be empty")
        if self.api_url is not None:
            parsed = urlparse(self.api_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"DiscoveryConfig.api_url: {self.api_url!r} must look like "
                                 "https://HOST[:PORT]")
        if self.watch_timeout_s < 1:
            raise ValueError(f"DiscoveryConfig.watch_timeout_s: {self.watch_timeout_s} < 1")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("DiscoveryConfig.initial_backoff_s/max_backoff_s: need "
                             f"0 < {self.initial_backoff_s} <= {self.max_backoff_s}")


def label_selector(pairs: tuple[tuple[str, str], ...]) -> str:
    """The ``labelSelector`` query value: ``k1=v1,k2=v2``."""
    return ",".join(f"{k}={v}" for k, v in pairs)


def _policy_help() -> str:
    from router import policy  # the registry, imported only to list its names in --help

    return (f"dispatch policy, optionally with parameters, e.g. 'load_aware:w_memory=0.5'; one "
            f"of {', '.join(policy.names())} (default %(default)s; see router/policy/README.md)")


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``python -m router`` needs."""

    workers: tuple[str, ...] = field(default=(), metadata=flag(
        "--workers", "SGLang worker base URLs, e.g. http://127.0.0.1:31000", nargs="+",
        metavar="URL", to_cli=list, from_cli=tuple))
    """SGLang worker base URLs (``http://host:port``); empty in prefill/decode mode."""
    prefill: tuple[PrefillWorker, ...] = field(default=(), metadata=flag(
        "--prefill", "a prefill worker and, optionally, its --disaggregation-bootstrap-port "
        "(repeat for more prefill workers)", nargs="+", action="append",
        metavar=("URL", "BOOTSTRAP_PORT"), to_cli=list, from_cli=parse_prefill))
    """Prefill workers (prefill/decode mode)."""
    decode: tuple[str, ...] = field(default=(), metadata=flag(
        "--decode", "decode worker base URLs (repeatable)", nargs="+", action="append",
        metavar="URL", to_cli=list,
        from_cli=lambda groups: tuple(url for group in groups for url in group)))
    """Decode worker base URLs (prefill/decode mode)."""
    prefill_policy: str | None = field(default=None, metadata=flag(
        "--prefill-policy", "policy for choosing the prefill worker (default: --policy)"))
    """Policy for choosing the prefill worker (default: ``policy``)."""
    decode_policy: str | None = field(default=None, metadata=flag(
        "--decode-policy", "policy for choosing the decode worker (default: --policy)"))
    """Policy for choosing the decode worker (default: ``policy``)."""
    host: str = field(default="127.0.0.1", metadata=flag(
        "--host", "listen address (default %(default)s)"))
    """Interface the router listens on."""
    port: int = field(default=30000, metadata=flag("--port", "listen port (%(default)s)"))
    """Port the router listens on."""
    policy: str = field(default="cost_aware", metadata=flag("--policy", _policy_help))
    """Dispatch policy name (see ``router/policy/README.md``)."""
    load_poll_interval_s: float = field(default=0.5, metadata=flag(
        "--load-poll-interval", "seconds between /v1/loads polls (%(default)s)"))
    """Seconds between polls of each worker's ``/v1/loads``."""
    cache_report_interval_s: float = field(default=5.0, metadata=flag(
        "--cache-report-interval", "seconds between reads of each worker's prompt and cached-"
        "token counters (its /metrics), exported per cache tier as "
        "banaserve_worker_cached_tokens; 0 turns it off (%(default)s)"))
    """Seconds between scrapes of each worker's ``/metrics`` for its prompt tokens and cached
    tokens per tier (``router.cache_report``); 0: not scraped, not exported."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Active health checking."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries before the first byte reaches the client."""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    """Per-worker circuit breaker."""
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """Concurrency limit and waiting queue (429 when full)."""
    request_timeout_s: float = field(default=1800.0, metadata=flag(
        "--request-timeout", "longest a request may take end to end (%(default)s s)"))
    """Longest a request may take end to end (504 before streaming, an error event after)."""
    api_key: str | None = field(default=None, metadata=flag(
        "--api-key", "require 'Authorization: Bearer KEY' (default: $BANASERVE_API_KEY; "
        "/health and /metrics stay open)", env="BANASERVE_API_KEY"))
    """If set, generation and admin routes need ``Authorization: Bearer <api_key>``."""
    shutdown_timeout_s: float = field(default=30.0, metadata=flag(
        "--shutdown-timeout", "seconds in-flight requests get to finish on SIGTERM "
        "(%(default)s)"))
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish."""
    connect_timeout_s: float = 5.0
    """Timeout for opening a connection to a worker."""
    read_timeout_s: float = field(default=600.0, metadata=flag(
        "--read-timeout", "longest silence from a worker, seconds (%(default)s)"))
    """Longest silence tolerated from a worker while it answers (between stream chunks)."""
    tokenizer_path: str | None = field(default=None, metadata=flag(
        "--tokenizer", "tokenizer folder for prompt-length and token-id checks (default: the "
        "folder the workers report, if readable here)"))
    """Tokenizer/config folder used to count prompt tokens and check token ids; by default the
    ``tokenizer_path`` a worker reports in ``/model_info``, when that folder exists here."""
    kv_index: bool = field(default=True, metadata=flag(
        "--no-kv-index", "do not follow the workers' KV events (SGLang --kv-events-config, on by "
        "default in runtime_patches.launch): no exact index of which worker caches which prefix",
        action="store_false"))
    """Follow each worker's KV events into the router's prefix index (``router.kv_events``)."""
    kvstore: str | None = field(default=None, metadata=flag(
        "--kvstore", "HOST:PORT of the shared kvstore the workers read (runtime_patches.launch "
        "--kvstore): cost_aware asks it which leading pages of each prompt it holds and prices "
        "them as loadable on every worker (needs the KV index; default: not asked)",
        metavar="HOST:PORT"))
    """The shared store (``router.store_index``); every worker of the pool is assumed to read
    it. Only prefix-aware policies with the KV index ask it, outside prefill/decode mode."""
    log_level: str = field(default="info", metadata=flag(
        "--log-level", None, choices=["debug", "info", "warning", "error"]))
    """Python logging level."""
    length: LengthConfig | None = None
    """The output-length predictor (``--length-predictor``); None: requests are not annotated."""
    sidecar: bool = field(default=False, metadata=flag(
        "--sidecar", "also serve the operators' sidecar API from the router: POST "
        "/v1/plan/placement (HELR), /v1/plan/batches (SLO-ODBS), /v1/predict/length (with "
        "--length-predictor); see python -m router.sidecar --help"))
    """Serve the operators' sidecar routes (``/v1/plan/placement``, ``/v1/plan/batches``,
    ``/v1/predict/length``) from the router process too."""
    batching: BatcherConfig | None = None
    """SLO-aware batching (``--batching``); None: each request is dispatched as it arrives."""
    rebalance: RebalanceConfig | None = field(default=None, metadata=flag(
        "--rebalance", "run the rebalancing controller (not in prefill/decode mode)",
        action="store_true", default=False, switch=True))
    """The rebalancing controller (``--rebalance``, ``docs/rebalancer.md``); None: off."""
    discovery: DiscoveryConfig | None = field(default=None, metadata=flag(
        "--service-discovery", "enable Kubernetes service discovery (as smg's "
        "--service-discovery)", action="store_true", default=False, switch=True))
    """Kubernetes service discovery (``--service-discovery``); None: the static lists only.
    Discovered workers join the same pools as ``workers`` / ``prefill`` / ``decode``."""

    @property
    def pd_mode(self) -> bool:
        return bool(self.prefill or self.decode) or (
            self.discovery is not None and self.discovery.pd_mode)

    def __post_init__(self) -> None:
        self._check_fleet()
        object.__setattr__(self, "workers", tuple(normalize_url(u) for u in self.workers))
        object.__setattr__(self, "decode", tuple(normalize_url(u) for u in self.decode))
        urls = [*self.workers, *self.decode, *(p.url for p in self.prefill)]
        if len(set(urls)) != len(urls):
            raise ValueError(f"RouterConfig.workers: duplicate worker URL in {urls}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"RouterConfig.port: {self.port} is not a TCP port")
        if self.load_poll_interval_s <= 0:
            raise ValueError(f"RouterConfig.load_poll_interval_s: {self.load_poll_interval_s} <= 0")
        if self.cache_report_interval_s < 0:
            raise ValueError(f"RouterConfig.cache_report_interval_s: "
                             f"{self.cache_report_interval_s} < 0")
        if self.request_timeout_s <= 0 or self.shutdown_timeout_s < 0:
            raise ValueError("RouterConfig.request_timeout_s/shutdown_timeout_s: must be > 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("RouterConfig.api_key: must not be empty")
        if self.batching is not None and self.pd_mode:
            raise ValueError("RouterConfig.batching: --batching is not supported in "
                             "prefill/decode mode yet; use it with --workers")
        if self.rebalance is not None and self.pd_mode:
            raise ValueError("RouterConfig.rebalance: --rebalance is not supported in "
                             "prefill/decode mode yet; use it with --workers")
        if self.kvstore is not None:
            StoreIndexConfig.parse(self.kvstore)
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("RouterConfig.connect_timeout_s/read_timeout_s: must be > 0")

    def _check_fleet(self) -> None:
        """Static workers and discovery selectors must describe one mode with every role."""
        disc = self.discovery
        if self.pd_mode:
            has_prefill = bool(self.prefill or (disc and disc.prefill_selector))
            has_decode = bool(self.decode or (disc and disc.decode_selector))
            regular = bool(self.workers or (disc and disc.selector))
            if regular or not (has_prefill and has_decode):
                raise ValueError("RouterConfig: prefill/decode mode needs prefill workers "
                                 "(--prefill or --prefill-selector) and decode workers "
                                 "(--decode or --decode-selector), and no --workers or "
                                 "--selector")
        elif not self.workers and disc is None:
            raise ValueError("RouterConfig.workers: at least one worker URL is required "
                             "(or --service-discovery)")
