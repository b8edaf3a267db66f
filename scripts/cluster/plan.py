"""From a ``ClusterSpec`` to the processes that make the cluster: pure, deterministic.

Who calls: ``scripts.cluster.ssh`` starts, checks and stops these units on their nodes;
``scripts.cluster.slurm`` writes them into a batch script. Nothing here touches the network or
the file system, so the same spec always gives the same plan (the unit tests compare plans).

A ``Unit`` is one long-running process on one node: its argv (run from ``spec.workdir``), its
environment additions, the URL that answers 200 once it is ready (checked on the node itself),
and its stage. Units start stage by stage (Mooncake master, kvstore servers, workers, router),
every unit of a stage ready before the next stage starts; they stop in the reverse order.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace

from scripts.cluster.spec import ClusterSpec, WorkerGroup

STAGES = ("kvstore-master", "kvstore", "workers", "router")


@dataclass(frozen=True)
class Unit:
    name: str
    """Unique in the cluster; names the log (``<log_dir>/<name>.log``) and pid files."""
    node: str
    """The node it runs on."""
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    ready_url: str | None = None
    """Answers 200 once the unit serves (fetched on the node); ``None``: running is ready."""
    stage: int = 0
    """Index into ``STAGES``."""

    def shell(self) -> str:
        """The command line as one shell string (env assignments first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        return f"env {env} {cmd}" if env else cmd


@dataclass(frozen=True)
class Endpoint:
    """A worker replica as the router sees it."""

    url: str
    role: str
    bootstrap_port: int | None = None


def build_plan(spec: ClusterSpec) -> list[Unit]:
    """Every unit of the cluster, in start order; each gets its node's ``env``."""
    units = _kvstore_units(spec)
    units += _worker_units(spec)
    units.append(_router_unit(spec))
    return [replace(u, env=(*u.env, *sorted(spec.node(u.node).env.items()))) for u in units]


def _addr(spec: ClusterSpec, node: str) -> str:
    return spec.node(node).address


def _kvstore_units(spec: ClusterSpec) -> list[Unit]:
    kv = spec.kvstore
    if kv is None:
        return []
    py = spec.python_path()
    if kv.backend == "tiered":
        addr = _addr(spec, kv.node)
        argv = [py, "-m", "kvstore", "--host", addr, "--port", str(kv.port),
                "--http-port", str(kv.port + 1), "--memory-gb", f"{kv.memory_gb:g}"]
        if kv.ssd_dir:
            argv += ["--ssd-dir", kv.ssd_dir, "--ssd-gb", f"{kv.ssd_gb:g}"]
        return [Unit("kvstore", kv.node, tuple(argv),
                     ready_url=f"http://{addr}:{kv.port + 1}/stats", stage=1)]
    from kvstore.backends.mooncake import mooncake_master_command

    mc = kv.mooncake
    master_addr = _addr(spec, kv.node)
    units = [Unit("mooncake-master", kv.node,
                  tuple(mooncake_master_command(
                      rpc_port=mc.master_port, metadata_port=mc.metadata_port,
                      metrics_port=mc.metrics_port, host=master_addr,
                      binary=_venv_bin(spec, "mooncake_master"))),
                  ready_url=f"http://{master_addr}:{mc.metrics_port}/health",
                  stage=0)]
    for node in _worker_nodes(spec):
        addr = _addr(spec, node)
        units.append(Unit(
            f"kvstore-{node}", node,
            (py, "-m", "kvstore", "--host", "0.0.0.0", "--port", str(kv.port),
             "--http-port", str(kv.port + 1), "--backend", "mooncake",
             "--mooncake-master", f"{master_addr}:{mc.master_port}",
             "--mooncake-metadata", f"http://{master_addr}:{mc.metadata_port}/metadata",
             "--mooncake-local-host", addr,
             "--mooncake-segment-bytes", str(int(mc.segment_gb * (1 << 30))),
             "--mooncake-master-metrics", f"http://{master_addr}:{mc.metrics_port}/metrics"),
            ready_url=f"http://127.0.0.1:{kv.port + 1}/stats", stage=1))
    return units


def _venv_bin(spec: ClusterSpec, name: str) -> str:
    py = spec.python_path()
    return py.rsplit("/", 1)[0] + "/" + name if "/" in py else name


def _worker_nodes(spec: ClusterSpec) -> list[str]:
    """Nodes that run a worker (any rank: each rank's scheduler has its own store client), in
    order of first appearance."""
    seen: list[str] = []
    for g in spec.workers:
        for node in g.nodes:
            if node not in seen:
                seen.append(node)
    return seen


def _layer_hosts(spec: ClusterSpec) -> list[tuple[str, str]]:
    """(name, host:port) of every layer host in the cluster."""
    hosts = []
    for g in spec.workers:
        if g.layer_host_port is None:
            continue
        for i in range(g.num_replicas):
            addr = _addr(spec, g.replica_nodes(i)[0])
            hosts.append((f"{g.name}-{i}", f"{addr}:{g.layer_host_port + i}"))
    return hosts


def endpoints(spec: ClusterSpec) -> list[Endpoint]:
    """The worker replicas the router is given (rank 0 of each)."""
    out = []
    for g in spec.workers:
        for i in range(g.num_replicas):
            addr = _addr(spec, g.replica_nodes(i)[0])
            out.append(Endpoint(f"http://{addr}:{g.port + i}", g.role,
                                g.bootstrap_port + i if g.role == "prefill" else None))
    return out


def _worker_units(spec: ClusterSpec) -> list[Unit]:
    units = []
    layer_hosts = _layer_hosts(spec)
    for g in spec.workers:
        for i in range(g.num_replicas):
            nodes = g.replica_nodes(i)
            for rank, node in enumerate(nodes):
                units.append(_worker_unit(spec, g, i, rank, node, layer_hosts))
    return units


def _worker_unit(spec: ClusterSpec, g: WorkerGroup, i: int, rank: int, node: str,
                 layer_hosts: list[tuple[str, str]]) -> Unit:
    addr = _addr(spec, node)
    name = f"{g.name}-{i}" + (f"-rank{rank}" if g.nodes_per_replica > 1 else "")
    argv = [spec.python_path(), "-m", "runtime_patches.launch", "--model", spec.model,
            "--host", addr, "--port", str(g.port + i),
            "--log-file", f"{spec.log_dir}/{name}.sglang.log", "--ready-timeout", "1800"]
    if g.cpus:
        argv += ["--cpus", g.cpus]
    if g.pp_size > 1:
        argv += ["--pp-size", str(g.pp_size)]
    kv = spec.kvstore
    if kv is not None:
        # mooncake: the node's own server, on loopback so pages cross in shared memory
        store = (f"{_addr(spec, kv.node)}:{kv.port}" if kv.backend == "tiered"
                 else f"127.0.0.1:{kv.port}")
        argv += ["--kvstore", store] + (["--kvstore-layerwise"] if kv.layerwise else [])
    own = f"{g.name}-{i}"
    if g.layer_host_port is not None and rank == 0:
        argv += ["--layer-host-port", str(g.layer_host_port + i)]
    if rank == 0:
        for host_name, address in layer_hosts:
            if host_name != own:
                argv += ["--layer-host", f"{host_name}={address}"]
    head = _addr(spec, g.replica_nodes(i)[0])
    extra = sglang_worker_args(spec, g, bootstrap_port=g.bootstrap_port + i, node_rank=str(rank),
                               dist_init_addr=f"{head}:{g.dist_init_port + i}")
    if extra:
        argv += ["--", *extra]
    ready = f"http://{addr}:{g.port + i}/health" if rank == 0 else None
    return Unit(name, node, tuple(argv), ready_url=ready, stage=2)


def sglang_worker_args(spec: ClusterSpec, g: WorkerGroup, *, bootstrap_port: int,
                       node_rank: str, dist_init_addr: str) -> list[str]:
    """The ``sglang.launch_server`` flags of a worker of ``g`` (after ``--``): the role's and the
    group's own, then the ones the launcher owns (disaggregation mode and bootstrap port,
    ``--nnodes/--node-rank/--dist-init-addr`` for a multi-node replica). Shared by SSH / Slurm
    and Kubernetes, which differ only in the addresses they pass."""
    extra = list(spec.role_args(g))
    if g.role != "regular":
        extra += ["--disaggregation-mode", g.role]
    if g.role == "prefill":
        extra += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
    if g.nodes_per_replica > 1:
        extra += ["--nnodes", str(g.nodes_per_replica), "--node-rank", node_rank,
                  "--dist-init-addr", dist_init_addr]
    return extra


def router_args(spec: ClusterSpec) -> list[str]:
    """``python -m router`` arguments naming the workers (static list)."""
    eps = endpoints(spec)
    if not spec.disaggregated:
        return ["--workers", *(e.url for e in eps)]
    args: list[str] = []
    for e in eps:
        args += (["--prefill", e.url, str(e.bootstrap_port)] if e.role == "prefill"
                 else ["--decode", e.url])
    return args


def store_args(spec: ClusterSpec, address: Callable[[ClusterSpec, str], str]) -> list[str]:
    """``--kvstore HOST:PORT`` for the router when every worker reads one tiered store (the
    router then prices the prefixes it holds); none with Mooncake (a server per node) or in
    prefill/decode mode (the router's prefix index is off there)."""
    kv = spec.kvstore
    if kv is None or kv.backend != "tiered" or spec.disaggregated:
        return []
    return ["--kvstore", f"{address(spec, kv.node)}:{kv.port}"]


def _router_unit(spec: ClusterSpec) -> Unit:
    r = spec.router
    addr = _addr(spec, r.node)
    argv = [spec.python_path(), "-m", "router", *router_args(spec), "--host", "0.0.0.0",
            "--port", str(r.port), "--policy", r.policy, *store_args(spec, _addr), *r.args]
    return Unit("router", r.node, tuple(argv), ready_url=f"http://{addr}:{r.port}/health",
                stage=3)
