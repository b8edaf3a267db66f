"""A cluster on loopback for one system under test: SGLang CPU workers behind a router.

Who calls: ``scripts.bench.replay.run`` enters one ``Cluster`` per entry of a config's
``systems`` (``with Cluster(cfg, name) as url: ...``), replays every rate against ``url``, and
leaves it, which stops every process (``scripts.bench.procs.Fleet``). Each system therefore
starts from cold workers and an empty KV store, on the same cores as the others.

What a ``ClusterConfig`` can express (all on one machine, every worker pinned to one core, worker
``i`` on core ``i mod cpus``):

- ``router: banaserve``: ``python -m router`` with ``--policy``, optionally the global KV store
  (``python -m kvstore``; every worker uses it as its L3), layer hosts beside every worker and the
  rebalancer (``--rebalance``), router-side batching (``--batching slo-odbs`` / ``fcfs``).
- ``router: smg``: SGLang's own router (Shepherd Model Gateway, ``pip install -r
  requirements/bench.txt``) with its ``--policy`` (``cache_aware``, ``round_robin``, ...).
- ``pd: [P, D]``: a static prefill/decode split (DistServe-like): P prefill and D decode workers
  (SGLang's disaggregation over ``mooncake_tcp``), behind either router.

A process that fails to come up stops the benchmark with its log's tail. Every process logs to
``logs/bench/<config name>/<system>/`` (kept after the run, overwritten by the next).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from types import TracebackType

from scripts.bench.procs import HOST, Fleet, free_port, log, wait_http

ROUTERS = ("banaserve", "smg")
BATCHING = ("slo-odbs", "slo-odbs-code", "fcfs", "spf", "s3")


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "smollm2"
    """Prepared model name (``smollm2``, ``tiny``) or a model folder."""
    workers: int = 2
    """Colocated workers (each serves prefill and decode); ignored when ``pd`` is set."""
    router: str = "banaserve"
    """``banaserve`` (``python -m router``) or ``smg`` (SGLang's router)."""
    policy: str = "cost_aware"
    """The router's dispatch policy (its own names: ``python -m router --help`` / ``smg
    launch --help``)."""
    pd: tuple[int, int] | None = None
    """``[prefill, decode]`` worker counts for a static prefill/decode split."""
    kvstore: bool = False
    """Start the global KV store and make every worker use it (banaserve only)."""
    store_index: bool = True
    """With ``kvstore``: the router asks the store which prefixes it holds (``--kvstore``;
    only prefix-aware policies use it). False: the router prices the workers' caches only."""
    kvstore_layerwise: bool = False
    """Load store hits layer by layer, overlapped with the forward (with ``kvstore``)."""
    layer_hosts: bool = False
    """A layer host beside every worker; each worker may migrate layers / offload heads to the
    others' hosts."""
    rebalance: bool = False
    """The router's rebalancer (needs ``layer_hosts``)."""
    batching: str | None = None
    """Router-side batching of requests beyond the workers' slots (``slo-odbs``, ``fcfs``,
    ...; see ``python -m router --help``)."""
    max_total_tokens: int | None = None
    """Each worker's KV pool in tokens (default: the launcher's)."""
    max_running_requests: int | None = None
    """Each worker's running-request slots (default: the launcher's)."""
    worker_args: tuple[str, ...] = ()
    """Extra ``sglang.launch_server`` arguments for every worker."""
    router_args: tuple[str, ...] = ()
    """Extra router arguments."""
    ready_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"cluster.router: {self.router!r} is not one of {ROUTERS}")
        if self.workers < 1:
            raise ValueError(f"cluster.workers: must be >= 1 (got {self.workers})")
        if self.pd is not None:
            if len(self.pd) != 2 or min(self.pd) < 1:
                raise ValueError(f"cluster.pd: {self.pd!r} is not [prefill>=1, decode>=1]")
            if self.kvstore or self.layer_hosts or self.batching:
                raise ValueError("cluster.pd: the static split runs without kvstore, "
                                 "layer_hosts and batching")
        if self.router == "smg" and (self.kvstore or self.layer_hosts or self.rebalance
                                     or self.batching):
            raise ValueError("cluster: kvstore, layer_hosts, rebalance and batching are "
                             "BanaServe features; router smg takes none of them")
        if self.kvstore and self.layer_hosts:
            raise ValueError("cluster: kvstore and layer_hosts cannot be combined yet: a worker "
                             "running the hierarchical cache refuses layer migration and head "
                             "offload (the cache would back up KV that left); compare them as "
                             "two systems")
        if self.rebalance and not self.layer_hosts:
            raise ValueError("cluster.rebalance: needs layer_hosts (somewhere to send layers)")
        if self.kvstore_layerwise and not self.kvstore:
            raise ValueError("cluster.kvstore_layerwise: needs kvstore")
        if self.batching is not None and self.batching not in BATCHING:
            raise ValueError(f"cluster.batching: {self.batching!r} is not one of {BATCHING}")

    @property
    def num_workers(self) -> int:
        return sum(self.pd) if self.pd else self.workers

    def describe(self) -> str:
        shape = (f"{self.pd[0]} prefill + {self.pd[1]} decode" if self.pd
                 else f"{self.workers} workers")
        store = "kvstore" if self.store_index or self.router != "banaserve" else \
            "kvstore (not indexed)"
        extras = [name for name, on in ((store, self.kvstore),
                                         ("layer hosts", self.layer_hosts),
                                         ("rebalancer", self.rebalance)) if on]
        if self.batching:
            extras.append(f"batching {self.batching}")
        return f"{self.router} {self.policy}, {shape}" + (
            f" + {', '.join(extras)}" if extras else "")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def smg_binary() -> str:
    found = shutil.which("smg") or shutil.which("smg", path=os.path.dirname(sys.executable))
    if found is None:
        raise ValueError("router smg: SGLang's router is not installed "
                         "(pip install -r requirements/bench.txt)")
    return found


class Cluster:
    """Starts the processes of one ``ClusterConfig``; ``__enter__`` returns the router's URL."""

    def __init__(self, cfg: ClusterConfig, name: str, group: str = "cluster") -> None:
        self.cfg = cfg
        self.name = name
        self.log_dir = os.path.join("logs", "bench", _safe(group), _safe(name))
        self.fleet = Fleet(os.getcwd(), self.log_dir)
        self.worker_urls: list[str] = []
        self._scratch = tempfile.mkdtemp(prefix="bench-cluster-")
        self._store: str | None = None

    def __enter__(self) -> str:
        try:
            if self.cfg.router == "smg":
                smg_binary()  # fail before starting anything
            return self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.fleet.__exit__(exc_type, exc, tb)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _start(self) -> str:
        cfg = self.cfg
        started = time.monotonic()
        log(f"{self.name}: starting {cfg.describe()}")
        store = self._start_kvstore() if cfg.kvstore else None
        self._store = store
        cpus = os.cpu_count() or 1
        roles = (["prefill"] * cfg.pd[0] + ["decode"] * cfg.pd[1]) if cfg.pd else (
            ["colocated"] * cfg.workers)
        host_ports = [free_port() for _ in roles] if cfg.layer_hosts else []
        bootstrap = [free_port() if role == "prefill" else None for role in roles]
        procs = []
        for i, role in enumerate(roles):
            port = free_port()
            argv = [sys.executable, "-m", "runtime_patches.launch", "--model", cfg.model,
                    "--port", str(port), "--cpus", str(i % cpus),
                    "--log-file", self.fleet.log_path(f"worker-{i}-sglang")]
            if cfg.max_total_tokens:
                argv += ["--max-total-tokens", str(cfg.max_total_tokens)]
            if cfg.max_running_requests:
                argv += ["--max-running-requests", str(cfg.max_running_requests)]
            if store:
                argv += ["--kvstore", store] + (["--kvstore-layerwise"]
                                                if cfg.kvstore_layerwise else [])
            if host_ports:
                argv += ["--layer-host-port", str(host_ports[i])]
                for j, other in enumerate(host_ports):
                    if j != i:
                        argv += ["--layer-host", f"w{j}={HOST}:{other}"]
            extra = list(cfg.worker_args)
            if role != "colocated":
                extra += ["--disaggregation-mode", role,
                          "--disaggregation-transfer-backend", "mooncake_tcp"]
            if role == "prefill":
                extra += ["--disaggregation-bootstrap-port", str(bootstrap[i]),
                          "--disable-overlap-schedule"]
            if extra:
                argv += ["--", *extra]
            procs.append(self.fleet.start(f"worker-{i}", argv, cpu=None))
            self.worker_urls.append(f"http://{HOST}:{port}")
        for url, proc in zip(self.worker_urls, procs, strict=True):
            wait_http(url + "/health", cfg.ready_timeout_s, proc)
        url = self._start_router(roles, bootstrap)
        log(f"{self.name}: ready at {url} after {time.monotonic() - started:.0f} s")
        return url

    def _start_kvstore(self) -> str:
        port, http_port = free_port(), free_port()
        proc = self.fleet.start("kvstore", [
            sys.executable, "-m", "kvstore", "--port", str(port), "--http-port", str(http_port),
            "--memory-gb", "1", "--ssd-dir", os.path.join(self._scratch, "ssd"), "--ssd-gb", "4"],
            cpu=None)
        wait_http(f"http://{HOST}:{http_port}/stats", 60, proc)
        return f"{HOST}:{port}"

    def _start_router(self, roles: list[str], bootstrap: list[int | None]) -> str:
        cfg = self.cfg
        port = free_port()
        if cfg.pd:
            targets: list[str] = []
            for url, role, boot in zip(self.worker_urls, roles, bootstrap, strict=True):
                targets += (["--prefill", url, str(boot)] if role == "prefill"
                            else ["--decode", url])
        else:
            targets = ["--workers" if cfg.router == "banaserve" else "--worker-urls",
                       *self.worker_urls]
        if cfg.router == "smg":
            argv = [smg_binary(), "launch", "--host", HOST, "--port", str(port),
                    *(["--pd-disaggregation"] if cfg.pd else []), *targets,
                    "--policy", cfg.policy, "--log-level", "warn",
                    "--prometheus-host", HOST, "--prometheus-port", str(free_port())]
        else:
            argv = [sys.executable, "-m", "router", *targets, "--port", str(port),
                    "--policy", cfg.policy]
            if cfg.rebalance:
                argv.append("--rebalance")
            if cfg.batching:
                argv += ["--batching", cfg.batching]
            if self._store and cfg.store_index and not cfg.pd:
                argv += ["--kvstore", self._store]
        argv += list(cfg.router_args)
        proc = self.fleet.start("router", argv, cpu=None)
        url = f"http://{HOST}:{port}"
        wait_http(url + "/health", 120, proc)
        wait_http(url + "/v1/models", 120, proc)  # smg registers its workers after /health
        return url
