"""``python -m runtime_patches.launch``: start one SGLang worker, wait for health, stop it cleanly.

On CPU (no CUDA device, or ``--device cpu``) the worker gets the flags SGLang 0.5.23 needs to serve
on a small CPU box: the CPU engine, torch-native attention and sampling, no CUDA graphs, no grammar
backend, a bounded KV pool and ``--sleep-on-idle`` (without it an idle scheduler spins a core).
On GPU it gets SGLang's defaults. Arguments after ``--`` go to ``sglang.launch_server`` unchanged.

The Python API (:class:`WorkerProcess`) is what ``scripts/serve_local.sh`` and the tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import IO

from router.batching.slo_odbs import POLICIES
from runtime_patches import cpu_dtype, slo_queue
from runtime_patches.registry import REGISTRY, PatchError

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A worker could not be started or did not become healthy."""


def detect_device() -> str:
    """``cuda`` where torch sees a CUDA device, else ``cpu``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


PP_PARTITION_ENV = "SGLANG_PP_LAYER_PARTITION"
"""SGLang's environment variable for layers per pipeline rank (``distributed/utils.py``)."""
CPU_PD_HEARTBEAT_MAX_FAILURE = 12
"""Missed heartbeats (one every 5 s) before a CPU decode worker gives up on its prefill worker."""
MOONCAKE_TCP_QUEUES = (("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "16384"),
                       ("MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER", "16384"),
                       ("MC_TCP_ADMISSION_TIMEOUT_MS", "60000"))
"""Mooncake's TCP transport queues per peer, for every prefill/decode worker (an operator's own
values in the environment win). Its defaults (1,024 queued slices, 1,024 waiting for
admission, 1 s admission) reject a burst outright: a prefill worker sends each request's KV as
many slices, and at 6 requests/s on two SmolLM2 CPU workers the queue filled ("TCP lane
queue-full rejection count: 1 ... 1024"), the transfer failed, SGLang marked the decode
session failed and failed every transfer to it for up to 30 s: 37 of 60 requests lost
(``docs/benchmarks.md``, "Prefill/decode on CPU"). Mooncake accepts at most 65,535 here and
falls back to its default, with one warning, for anything above."""
_PP_FLAGS = frozenset({"--pp-size", "--pipeline-parallel-size"})

_LAYERWISE_CPU_ONLY = ("kvstore_layerwise: layer-wise store fills are implemented for the CPU "
                       "engine only (on a GPU SGLang pipelines L2->L1 itself)")


@dataclass(frozen=True)
class WorkerConfig:
    """One SGLang worker process."""

    model_path: str
    """HF model folder served by the worker."""
    port: int
    """HTTP port of the worker."""
    host: str = "127.0.0.1"
    """Interface the worker listens on."""
    served_model_name: str | None = None
    """Model id reported by ``/v1/models`` (SGLang defaults to the model path)."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """Weights' and KV cache's dtype: ``auto`` is, on CPU, ``bfloat16`` where the CPU has native
    bf16 and ``float32`` otherwise (``runtime_patches.cpu_dtype``), and SGLang's default on GPU;
    or ``bfloat16``, ``float32``, ``float16``. A ``--dtype`` among ``extra_args`` also works."""
    max_total_tokens: int = 4096
    """KV pool size in tokens (CPU only; GPU sizes it from memory)."""
    max_running_requests: int = 8
    """Concurrent requests per batch (CPU only)."""
    cpus: str | None = None
    """CPU cores the worker runs on, e.g. ``0``, ``0-3`` or ``0,2`` (CPU only): every process of
    the worker is pinned to them and its OpenMP/torch thread pool sized to them. SGLang's own
    ``SGLANG_CPU_OMP_THREADS_BIND`` takes effect only on AMX and arm64 CPUs; without pinning, two
    workers on a 2-core box each run a 2-thread pool and spin against each other (measured
    here: 4 requests spread over 2 workers took 20 s, against 6 s on one pinned worker)."""
    enable_metrics: bool = True
    """Expose SGLang's Prometheus ``/metrics``."""
    kvstore: str | None = None
    """``host:port`` of a kvstore server (``python -m kvstore``) to use as the worker's shared L3
    KV cache (HiCache with BanaServe's storage backend, pages of ``kvstore_page_size`` tokens)."""
    kvstore_page_size: int = 16
    """Tokens per KV page when ``kvstore`` is set (one store key per page). 16, not 64: prefixes
    match page by page (a 64-token page leaves up to 63 tokens of every prefix to recompute),
    and on a CPU worker 64-token pages cost TTFT even on prompts no cache can help
    (``scripts/bench/store_overhead.py``; ``docs/benchmarks.md``, "What the store costs when it
    serves nothing")."""
    kvstore_layerwise: bool = False
    """Load store hits layer by layer, overlapped with the forward (CPU engine; see
    ``kvstore.layerwise``): the worker answers SGLang's prefetch once the pages are read and
    copies each layer into the host and device pools while earlier layers compute."""
    pp_size: int = 1
    """Pipeline-parallel ranks (``--pp-size``): the decoder layers are split over this many
    scheduler processes, which pass activations over ``gloo`` on CPU. On CPU every rank uses the
    worker's whole ``cpus`` set (SGLang's per-rank core binding needs one ``|`` group per rank)."""
    pp_layer_partition: tuple[int, ...] | None = None
    """Layers per pipeline rank, in rank order (``SGLANG_PP_LAYER_PARTITION``), e.g. ``(1, 3)``:
    a HELR placement plan. ``None`` keeps SGLang's even split (extra layers go to the last ranks).
    The sum must equal the model's ``num_hidden_layers``; SGLang checks that at start-up."""
    queue_policy: str = "fcfs"
    """Order of the worker's waiting queue (``runtime_patches.slo_queue``): ``fcfs`` keeps
    SGLang's; ``slo-odbs``, ``slo-odbs-code``, ``spf`` or ``s3`` reorder it each step from every
    request's ``custom_params`` (``banaserve_slo_ms``, ``banaserve_predicted_len``)."""
    queue_default_slo_ms: float = 30000.0
    """SLO the queue policy assumes for a request without ``banaserve_slo_ms``."""
    layer_hosts: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """Layer hosts this worker may migrate decoder layers to, as (name, ``host:port``) pairs:
    the ``target`` names ``POST /banaserve/migrate_layers`` and ``/offload_heads`` accept (see
    ``runtime_patches.migration``)."""
    own_layer_host: str | None = None
    """``host:port`` of the layer host started beside this worker (``--layer-host-port``),
    reported in ``GET /banaserve/status`` as ``layer_host``."""
    kv_events: bool = True
    """Publish SGLang's KV cache events (``--kv-events-config``, ZMQ) so the router can index
    which worker caches which prefix (``router.kv_events``). Needs ``kv_events_ports``, which
    ``WorkerProcess.start`` picks when unset; a ``--kv-events-config`` among ``extra_args``
    wins."""
    kv_events_ports: tuple[int, int] | None = None
    """(publish, replay) TCP ports of the KV event publisher, bound on every interface."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """More ``sglang.launch_server`` arguments, passed through unchanged."""
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """More environment variables for the worker's processes, as (name, value) pairs."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"WorkerConfig.port: {self.port} is not a TCP port")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"WorkerConfig.device: {self.device!r} is not auto, cpu or cuda")
        if self.dtype not in cpu_dtype.CHOICES:
            raise ValueError(f"WorkerConfig.dtype: {self.dtype!r} is not one of "
                             f"{', '.join(cpu_dtype.CHOICES)}")
        passthrough = _flag_values(self.extra_args, "--dtype")
        if passthrough and self.dtype != "auto":
            raise ValueError(f"WorkerConfig.dtype: {self.dtype!r} and --dtype {passthrough[-1]} "
                             "in extra_args; give one")
        if self.max_total_tokens <= 0 or self.max_running_requests <= 0:
            raise ValueError("WorkerConfig.max_total_tokens/max_running_requests: must be > 0")
        if self.cpus is not None:
            parse_cpus(self.cpus)
        if self.kvstore is not None:
            from kvstore.sglang_args import worker_args

            worker_args(self.kvstore)  # ValueError unless host:port
        if self.kvstore_layerwise and self.kvstore is None:
            raise ValueError("WorkerConfig.kvstore_layerwise: needs kvstore (a store address)")
        if self.kvstore_layerwise and self.device == "cuda":
            raise ValueError(_LAYERWISE_CPU_ONLY)
        if self.kvstore_page_size <= 0:
            raise ValueError(f"WorkerConfig.kvstore_page_size: must be > 0, got "
                             f"{self.kvstore_page_size}")
        self._check_pipeline()
        self._check_queue()
        for name, address in self.layer_hosts:
            if not name or "," in name or "=" in name:
                raise ValueError(f"WorkerConfig.layer_hosts: bad name {name!r}")
            from runtime_patches.migration.transport import parse_address

            parse_address(address)

    def _check_queue(self) -> None:
        if self.queue_policy not in POLICIES:
            raise ValueError(f"WorkerConfig.queue_policy: {self.queue_policy!r} is not one of "
                             f"{', '.join(POLICIES)}")
        if not self.queue_default_slo_ms > 0:
            raise ValueError(f"WorkerConfig.queue_default_slo_ms: must be > 0, got "
                             f"{self.queue_default_slo_ms}")
        clash = [n for n, _ in self.extra_env if n in (slo_queue.ENV_POLICY,
                                                        slo_queue.ENV_DEFAULT_SLO_MS)]
        if clash:
            raise ValueError(f"WorkerConfig.extra_env: {clash} are set from queue_policy / "
                             "queue_default_slo_ms; set those instead")

    def _check_pipeline(self) -> None:
        if self.pp_size < 1:
            raise ValueError(f"WorkerConfig.pp_size: must be >= 1, got {self.pp_size}")
        if self.pp_layer_partition is not None:
            if len(self.pp_layer_partition) != self.pp_size:
                raise ValueError(f"WorkerConfig.pp_layer_partition: {self.pp_layer_partition} "
                                 f"has {len(self.pp_layer_partition)} entries, pp_size is "
                                 f"{self.pp_size}")
            if any(n < 1 for n in self.pp_layer_partition):
                raise ValueError(f"WorkerConfig.pp_layer_partition: {self.pp_layer_partition} "
                                 "gives a rank fewer than 1 layer")
        clash = [a for a in self.extra_args if a.partition("=")[0] in _PP_FLAGS]
        if clash:
            raise ValueError(f"WorkerConfig.extra_args: {clash} set pipeline "
                             "parallelism; use pp_size instead")
        if any(name == PP_PARTITION_ENV for name, _ in self.extra_env):
            raise ValueError(f"WorkerConfig.extra_env: {PP_PARTITION_ENV} is set from "
                             "pp_layer_partition; set that instead")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def dtype_choice(self, device: str | None = None) -> cpu_dtype.DtypeChoice:
        """The dtype this worker is started with, and why (``device``: the resolved device)."""
        device = device or (detect_device() if self.device == "auto" else self.device)
        passthrough = _flag_values(self.extra_args, "--dtype")
        return cpu_dtype.resolve(self.dtype, device, passthrough[-1] if passthrough else None)


def parse_cpus(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``; ValueError naming the spec if it is not a core list."""
    cores: set[int] = set()
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            lo, hi = int(first), int(last or first)
            if lo < 0 or hi < lo:
                raise ValueError
            cores.update(range(lo, hi + 1))
    except ValueError:
        raise ValueError(f"WorkerConfig.cpus: {spec!r} is not a core list like 0, 0-3 or 0,2") \
            from None
    return sorted(cores)


def format_cpus(cores: list[int]) -> str:
    """``[0, 1, 2, 3, 6]`` -> ``"0-3,6"`` (the inverse of :func:`parse_cpus` on sorted cores)."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_partition(spec: str) -> tuple[int, ...]:
    """``"1,3"`` -> ``(1, 3)``; ValueError naming the spec if it is not a list of integers."""
    try:
        return tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise ValueError(f"pp_layer_partition: {spec!r} is not a comma-separated list of layer "
                         "counts like 1,3") from None


def _flag_values(args: tuple[str, ...], flag: str) -> list[str]:
    """Values given to ``flag`` in ``args`` (``--flag value`` or ``--flag=value``)."""
    out = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
    return out


def parse_layer_hosts(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``["b=127.0.0.1:7001"]`` -> ``(("b", "127.0.0.1:7001"),)``; ValueError on a bad item."""
    out = []
    for item in items:
        name, sep, address = item.partition("=")
        if not sep:
            raise ValueError(f"--layer-host: {item!r} is not NAME=HOST:PORT")
        out.append((name, address))
    return tuple(out)


CPU_NO_CRASH_DIAGNOSTICS = ("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "SGLANG_CUDA_COREDUMP_BEFORE_CRASH")
"""SGLang's pre-crash diagnostics, off on CPU (an operator's own setting wins)."""


def build_command(
    cfg: WorkerConfig, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start ``cfg`` (pure; no process is started)."""
    device = detect_device() if cfg.device == "auto" else cfg.device
    argv = [python, "-m", "sglang.launch_server", "--model-path", cfg.model_path,
            "--host", cfg.host, "--port", str(cfg.port)]
    if cfg.served_model_name:
        argv += ["--served-model-name", cfg.served_model_name]
    if cfg.enable_metrics:
        argv += ["--enable-metrics"]
    choice = cfg.dtype_choice(device)
    if choice.dtype is not None:
        argv += ["--dtype", choice.dtype]
    env = dict(os.environ)
    env[cpu_dtype.REASON_ENV] = choice.reason
    if device == "cpu":
        argv += ["--device", "cpu", "--attention-backend", "torch_native",
                 "--sampling-backend", "pytorch",
                 "--cuda-graph-backend-decode", "disabled",
                 "--cuda-graph-backend-prefill", "disabled",
                 "--grammar-backend", "none",
                 "--max-total-tokens", str(cfg.max_total_tokens),
                 "--max-running-requests", str(cfg.max_running_requests),
                 "--sleep-on-idle"]
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        # On a stop, SGLang sleeps 5 s "to let GPU activity settle" before a py-spy dump and a
        # CUDA core dump; a CPU worker has neither, so each stop would wait 5 s for nothing.
        for name in CPU_NO_CRASH_DIAGNOSTICS:
            env.setdefault(name, "0")
        if _flag_values(cfg.extra_args, "--disaggregation-mode"):
            for name, value in MOONCAKE_TCP_QUEUES:
                env.setdefault(name, value)
        if "decode" in _flag_values(cfg.extra_args, "--disaggregation-mode"):
            # A decode worker declares its prefill worker dead after 2 missed heartbeats (a
            # 3 s read timeout every 5 s) and fails every transfer in flight from it. A CPU
            # prefill worker sharing its core with a long prefill answers late, not never:
            # measured here, a Mooncake burst failed 10 of 40 requests that way. Allow a minute.
            env.setdefault("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
                           str(CPU_PD_HEARTBEAT_MAX_FAILURE))
        if cfg.cpus:
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cfg.cpus
            env["OMP_NUM_THREADS"] = str(len(parse_cpus(cfg.cpus)))
        if cfg.pp_size > 1:
            # SGLang wants one "|" group per rank, or one NUMA node per rank when unset.
            cores = cfg.cpus or format_cpus(_usable_cores())
            env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join([cores] * cfg.pp_size)
    else:
        env.pop("SGLANG_USE_CPU_ENGINE", None)
    if cfg.kvstore:
        from kvstore.sglang_args import CPU_HICACHE_ARGS, worker_args

        argv += [*worker_args(cfg.kvstore), "--page-size", str(cfg.kvstore_page_size),
                 "--enable-cache-report"]
        if device == "cpu":
            argv += CPU_HICACHE_ARGS
    if cfg.kvstore_layerwise:
        from kvstore.layerwise import ENV_ENABLE

        if device != "cpu":
            raise ValueError(_LAYERWISE_CPU_ONLY)
        env[ENV_ENABLE] = "1"
    if cfg.pp_size > 1:
        argv += ["--pp-size", str(cfg.pp_size)]
    if cfg.pp_layer_partition is not None:
        env[PP_PARTITION_ENV] = ",".join(str(n) for n in cfg.pp_layer_partition)
    else:
        env.pop(PP_PARTITION_ENV, None)
    from runtime_patches.migration import OWN_HOST_ENV, TARGETS_ENV

    env[TARGETS_ENV] = ",".join(f"{name}={address}" for name, address in cfg.layer_hosts)
    if cfg.own_layer_host:
        env[OWN_HOST_ENV] = cfg.own_layer_host
    else:
        env.pop(OWN_HOST_ENV, None)
    if (cfg.kv_events and cfg.kv_events_ports is not None
            and "--kv-events-config" not in cfg.extra_args):
        publish, replay = cfg.kv_events_ports
        argv += ["--kv-events-config", json.dumps(
            {"publisher": "zmq", "endpoint": f"tcp://*:{publish}",
             "replay_endpoint": f"tcp://*:{replay}", "topic": "kv"})]
    if cfg.layer_hosts and "--disable-overlap-schedule" not in cfg.extra_args:
        # Migration swaps layers between scheduler steps; the overlap loop launches step N+1
        # before step N's results are processed (on CPU its streams are no-ops: no gain lost).
        argv += ["--disable-overlap-schedule"]
    env[slo_queue.ENV_POLICY] = cfg.queue_policy
    env[slo_queue.ENV_DEFAULT_SLO_MS] = str(cfg.queue_default_slo_ms)
    argv += list(cfg.extra_args)
    env.update(dict(cfg.extra_env))
    return argv, env


def preflight() -> None:
    """Stop with one line if the installed versions do not match the registered patches, or a
    patch's environment setting is not one it knows."""
    from runtime_patches import boot
    from runtime_patches.cpu import extend_attention

    boot.install()
    REGISTRY.check_versions()
    extend_attention.choice()


def _dtype_line(argv: list[str], env: dict[str, str]) -> str:
    """``float32 (auto: CPU has no native bf16 ...)`` for the log, from a built command."""
    dtypes = _flag_values(tuple(argv), "--dtype")
    return f"{dtypes[-1] if dtypes else 'SGLang default'} ({env.get(cpu_dtype.REASON_ENV, '')})"


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


_HANDED_OUT: set[int] = set()


SGLANG_PORT_PICKS = (22000, 29999)
"""The range SGLang 0.5.23 draws its own ports from at random (``nccl_port`` and the pipeline's
dist-init port: ``sglang.srt.utils.network.get_free_port_below_ephemeral``), checking only that
they are free at that moment. :func:`free_port` never hands these out: a port it gave a worker's
KV-event publisher was taken by a pipeline-parallel worker's SGLang starting beside it (CI at
01fb711, ``ZMQError: Address already in use``). ``tests/unit/test_launch_ports.py`` checks the
range against SGLang's."""

PORTS_ENV = "BANASERVE_PORTS"
"""``LO-HI``: the ports :func:`free_port` may hand out in this process and its children, for
several launchers or test processes on one machine that must never pick the same port."""


def port_range_from_env() -> tuple[int, int]:
    """``BANASERVE_PORTS`` as ``(lo, hi)``, both inclusive; every port when it is unset."""
    spec = os.environ.get(PORTS_ENV, "").strip()
    if not spec:
        return 1, 65535
    lo, sep, hi = spec.partition("-")
    try:
        first, last = int(lo), int(hi)
    except ValueError:
        first, last = 0, -1
    if not sep or not 1 <= first <= last <= 65535:
        raise ValueError(f"{PORTS_ENV}={spec!r} is not a port range like 10000-20999")
    return first, last


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


PORT_CLAIMS_DIR = os.path.join("/tmp", "banaserve-port-claims")
"""One empty file per port handed out on this machine (``free_port``): another process skips
a port claimed in the last ``PORT_CLAIM_S`` seconds."""
PORT_CLAIM_S = 120.0


def _claim(port: int) -> bool:
    """Claim ``port`` across processes on this machine; False if another process claimed it in
    the last ``PORT_CLAIM_S`` seconds. A pick is bound by its user seconds later (an SGLang
    worker binds its KV-event ports after loading the model), and two launchers started at
    once each found one port free and both handed it out (seen in the benchmark suite)."""
    path = os.path.join(PORT_CLAIMS_DIR, str(port))
    for _ in range(2):
        try:
            os.makedirs(PORT_CLAIMS_DIR, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return True
        except FileExistsError:
            try:
                if time.time() - os.stat(path).st_mtime < PORT_CLAIM_S:
                    return False
                os.unlink(path)  # a stale claim: take it over
            except FileNotFoundError:
                pass
        except OSError:
            return True  # no claims directory to write: the bind check alone
    return False


def free_port(host: str = "") -> int:
    """A TCP port free to listen on now, chosen outside the kernel's ephemeral range.

    A port picked by binding port 0 comes from that range, and between the pick and the real
    bind (by another process, seconds later) any outgoing connection on the machine may take it
    as its local port: the listener then fails with EADDRINUSE (seen here with a layer host in
    the benchmark suite). Ports outside the range are never given to outgoing connections, nor
    those SGLang picks for itself (``SGLANG_PORT_PICKS``). A port is not handed out twice by one
    process, nor by two processes on one machine within ``PORT_CLAIM_S`` (``_claim``), and only
    from ``BANASERVE_PORTS`` where it is set."""
    lo, hi = _ephemeral_range()
    first, last = port_range_from_env()
    sg_lo, sg_hi = SGLANG_PORT_PICKS
    pool = [p for p in (*range(10000, lo), *range(hi + 1, 65536))
            if first <= p <= last and not sg_lo <= p <= sg_hi and p not in _HANDED_OUT]
    rng = random.Random()
    for port in rng.sample(pool, min(len(pool), 200)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        if not _claim(port):
            continue
        return port
    with socket.socket() as s:  # nothing free outside the range: the kernel's pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


LOAD_SNAPSHOT_PREFIX = "/dev/shm/sglang_loads_"
"""SGLang's per-worker load-snapshot files (``sglang.srt.managers.load_snapshot``)."""


def mapped_files(pid: int, prefix: str) -> list[str]:
    """Files under ``prefix`` that process ``pid`` has mapped (``/proc/PID/maps``); [] when the
    process is gone or the platform has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f if prefix in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith(prefix))


class WorkerProcess:
    """Owns one SGLang worker process: start, wait until healthy, stop."""

    def __init__(self, cfg: WorkerConfig, log_path: str | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._shm: list[str] = []
        """SGLang's load-snapshot files of this worker (``/dev/shm/sglang_loads_*``)."""

    @property
    def url(self) -> str:
        return self.cfg.url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        if self.cfg.kv_events and self.cfg.kv_events_ports is None:
            self.cfg = dataclasses.replace(self.cfg, kv_events_ports=(free_port(), free_port()))
        argv, env = build_command(self.cfg)
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "wb")
        logger.info("starting worker on %s: %s", self.url, " ".join(argv))
        logger.info("worker %s dtype: %s", self.url, _dtype_line(argv, env))
        cores = self.cpu_affinity()
        if cores and not set(cores) <= os.sched_getaffinity(0):
            raise LaunchError(f"worker {self.url}: cpus {self.cfg.cpus} are not all available to "
                              f"this process (it may use {sorted(os.sched_getaffinity(0))})")
        self._proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)

    def cpu_affinity(self) -> list[int] | None:
        """The cores every process of this worker is pinned to (CPU workers with ``cpus``)."""
        if not self.cfg.cpus or not hasattr(os, "sched_setaffinity"):
            return None
        device = detect_device() if self.cfg.device == "auto" else self.cfg.device
        return parse_cpus(self.cfg.cpus) if device == "cpu" else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until ``/health`` answers 200; raise LaunchError if the process dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                raise LaunchError(f"worker {self.url} exited with code "
                                  f"{self._proc.returncode if self._proc else None}"
                                  f"{self._log_hint()}")
            if _get(self.url + "/health", timeout=5) == 200:
                self._shm = mapped_files(self._proc.pid, LOAD_SNAPSHOT_PREFIX) \
                    if self._proc else []
                return
            time.sleep(0.5)
        raise LaunchError(f"worker {self.url} not healthy after {timeout_s:.0f}s{self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace").strip().splitlines()
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        return f" (log {self.log_path}: {last[:300]})"

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (used by failure tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._shm = sorted({*self._shm, *mapped_files(self._proc.pid, LOAD_SNAPSHOT_PREFIX)})
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._remove_shm()

    def _remove_shm(self) -> None:
        """SGLang unlinks its load-snapshot file only on a clean exit; a worker stopped by
        signal left one in ``/dev/shm`` per start (hundreds a day on a test machine)."""
        for path in self._shm:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._shm = []

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``timeout_s``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._shm = sorted({*self._shm, *mapped_files(self._proc.pid, LOAD_SNAPSHOT_PREFIX)})
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # SGLang's children, if any survived
        except ProcessLookupError:
            pass
        if self._proc.poll() is None:
            self._proc.wait()
        self._remove_shm()
        if self._log is not None:
            self._log.close()
            self._log = None


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    raw = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in raw:
        cut = raw.index("--")
        raw, extra = raw[:cut], raw[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m runtime_patches.launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m runtime_patches.launch --model smollm2 --port 31000 "
               "-- --page-size 64")
    parser.add_argument("--model", default="smollm2",
                        help="prepared model name (smollm2, tiny) or an HF folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=cpu_dtype.CHOICES,
                        help="weights' and KV cache's dtype. auto (default): on CPU bfloat16 "
                             "where the CPU has native bf16 (amx_bf16 or avx512_bf16), else "
                             "float32 (emulated bf16 matmuls are ~60x slower); on GPU SGLang's "
                             "default")
    parser.add_argument("--max-total-tokens", type=int, default=4096,
                        help="KV pool size in tokens on CPU (default 4096)")
    parser.add_argument("--max-running-requests", type=int, default=8)
    parser.add_argument("--cpus", help="cores for the worker's threads on CPU, e.g. 0 or 0-3")
    parser.add_argument("--kvstore", metavar="HOST:PORT",
                        help="use this kvstore server (python -m kvstore) as the worker's shared "
                             "L3 KV cache")
    parser.add_argument("--kvstore-layerwise", action="store_true",
                        help="with --kvstore on CPU: load store hits layer by layer, overlapped "
                             "with the forward pass")
    parser.add_argument("--pp-size", type=int, default=1,
                        help="pipeline-parallel ranks the layers are split over (default 1)")
    parser.add_argument("--pp-layer-partition", metavar="N,N,...",
                        help="layers per pipeline rank, e.g. 1,3 (default: SGLang's even split)")
    parser.add_argument("--queue-policy", default="fcfs", choices=POLICIES,
                        help="order of the worker's waiting queue, from each request's "
                             "custom_params banaserve_slo_ms / banaserve_predicted_len "
                             "(default fcfs: SGLang's own)")
    parser.add_argument("--queue-default-slo-ms", type=float, default=30000.0,
                        help="SLO assumed for requests that carry none (default 30000)")
    parser.add_argument("--layer-host", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="a layer host (python -m runtime_patches layer-host) this worker may "
                             "migrate decoder layers to, named for POST "
                             "/banaserve/migrate_layers; repeatable")
    parser.add_argument("--layer-host-port", type=int, metavar="PORT",
                        help="also start a layer host on this port beside the worker, on its "
                             "cores, so other workers can migrate layers to this one")
    parser.add_argument("--no-kv-events", action="store_true",
                        help="do not publish KV cache events (by default the worker publishes "
                             "them over ZMQ on two free ports, read from GET /get_server_info, "
                             "so the router indexes which worker caches which prefix)")
    parser.add_argument("--log-file", help="write the worker's output here (default: inherit)")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    return parser.parse_args(raw), extra


def node_rank(extra: list[str]) -> int:
    """SGLang's ``--node-rank`` among the pass-through arguments (0 when absent)."""
    for i, arg in enumerate(extra):
        if arg == "--node-rank" and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--node-rank="):
            return int(arg.split("=", 1)[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args, extra = _parse(argv)
    from runtime_patches import models

    try:
        preflight()
        model_path, served = models.resolve(args.model)
        cfg = WorkerConfig(
            model_path=model_path, port=args.port, host=args.host, served_model_name=served,
            device=args.device, dtype=args.dtype, max_total_tokens=args.max_total_tokens,
            max_running_requests=args.max_running_requests, cpus=args.cpus,
            kvstore=args.kvstore, kvstore_layerwise=args.kvstore_layerwise,
            pp_size=args.pp_size,
            pp_layer_partition=(parse_partition(args.pp_layer_partition)
                                if args.pp_layer_partition else None),
            queue_policy=args.queue_policy, queue_default_slo_ms=args.queue_default_slo_ms,
            layer_hosts=parse_layer_hosts(args.layer_host),
            own_layer_host=(f"{args.host}:{args.layer_host_port}" if args.layer_host_port
                            else None), kv_events=not args.no_kv_events,
            extra_args=tuple(extra))
    except (PatchError, ValueError, RuntimeError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    worker = WorkerProcess(cfg, log_path=args.log_file)
    layer_host = None
    if args.layer_host_port:
        from runtime_patches.migration.host_process import LayerHostConfig, LayerHostProcess

        try:
            layer_host = LayerHostProcess(
                LayerHostConfig(port=args.layer_host_port, host=args.host,
                                cpus=parse_cpus(args.cpus) if args.cpus else None,
                                device="cpu" if cfg.device != "cuda" else "cuda",
                                warm_model=model_path,
                                warm_dtype=cfg.dtype_choice().dtype),
                log_path=(args.log_file + ".layer-host") if args.log_file else None)
        except ValueError as exc:
            print(f"launch: {exc}", file=sys.stderr)
            return 1
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if layer_host is not None:
            layer_host.start()
            layer_host.wait_ready()
            print(f"layer host ready: {layer_host.address}", flush=True)
        print(f"worker dtype: {_dtype_line(*build_command(cfg))}", flush=True)
        worker.start()
        rank = node_rank(extra)
        if rank:  # SGLang serves HTTP on rank 0 only; the others join its torch.distributed
            print(f"worker node rank {rank} started (rank 0 serves {worker.url})", flush=True)
        else:
            worker.wait_ready(args.ready_timeout)
            print(f"worker ready: {worker.url} (model {served})", flush=True)
        while worker.is_running():
            time.sleep(1.0)
        return 1  # the worker exited on its own
    except (LaunchError, ValueError, RuntimeError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        worker.stop()
        if layer_host is not None:
            layer_host.stop()


if __name__ == "__main__":
    sys.exit(main())
