"""The cluster description: the schema of one YAML file, as frozen dataclasses.

Who calls: ``scripts.cluster.plan`` (the processes to start, for SSH and Slurm) and
``scripts.cluster.k8s`` (Kubernetes manifests) read a ``ClusterSpec``;
``scripts.cluster.load.load_spec`` is the only way one is built from a file (it parses, then
``scripts.cluster.checks`` validates; this module imports neither). Every error is a
``SpecError`` whose message starts with the dotted path of the bad field
(``workers[1].nodes[0]: unknown node 'h9'``), so the CLI prints one line.

The schema (every key, its default and its meaning; docs/deployment.md has worked examples)::

    name: demo                      # cluster name: log folder, Kubernetes names and labels
    model: smollm2                  # prepared model name (smollm2, tiny) or a folder on every node
    workdir: /opt/banaserve         # ssh/slurm: the checkout on every node (same path)
    python: .venv/bin/python        # ssh/slurm: interpreter, relative to workdir or absolute
    log_dir: /tmp/banaserve         # ssh/slurm: logs and pid files on every node
    image: banaserve:0.1.0          # kubernetes: the container image
    namespace: default              # kubernetes: the namespace
    nodes:                          # ssh/slurm hosts; kubernetes ignores them (it schedules)
      - {name: h1, address: 10.0.0.1, user: root, port: 22, ssh_key: ~/.ssh/id_ed25519,
         ssh_options: [ProxyJump=bastion], env: {GLOO_SOCKET_IFNAME: eth0}}
    router:
      node: h1
      port: 30000
      policy: cost_aware
      args: []                      # extra `python -m router` flags
    kvstore:                        # optional: the global KV store
      node: h1                      # where the store (tiered) or the Mooncake master runs
      backend: tiered               # tiered (one server, memory + SSD) | mooncake (one per node)
      port: 30500                   # kvstore server port (every node, with mooncake)
      memory_gb: 1.0
      ssd_dir: null                 # tiered only
      ssd_gb: 4.0
      layerwise: false              # workers load store hits layer by layer (CPU)
      mooncake: {master_port: 50051, metadata_port: 8080, metrics_port: 9003, segment_gb: 1.0}
    workers:                        # one entry per group of identical workers
      - name: decode
        role: regular               # regular | prefill | decode
        nodes: [h2, h3]             # one replica per nodes_per_replica consecutive nodes
        nodes_per_replica: 1        # > 1: a multi-node replica (SGLang --nnodes/--node-rank)
        pp_size: 1                  # pipeline ranks of a replica (runtime_patches.launch)
        replicas: null              # kubernetes: replica count (default len(nodes)/npr)
        port: 31000                 # replica i listens on port + i
        cpus: null                  # CPU only: cores of each replica, e.g. "0" or "0-3"
        gpus: 0                     # GPUs per node (Kubernetes resource request)
        dist_init_port: 32500       # rank 0's torch.distributed port (multi-node replicas)
        bootstrap_port: 8998        # prefill only: SGLang's disaggregation bootstrap port
        layer_host_port: null       # a layer host beside each replica (port + i)
        args: []                    # extra sglang.launch_server flags for this group
    sglang_args:                    # per-role SGLang flags, before each group's own args
      all: []
      regular: []
      prefill: [--disaggregation-transfer-backend, mooncake]
      decode: []
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

ROLES = ("regular", "prefill", "decode")
BACKENDS = ("tiered", "mooncake")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")
"""A DNS label (Kubernetes names are built from it), at most 42 characters."""


class SpecError(ValueError):
    """A cluster description is invalid; the message starts with the field's dotted path."""


@dataclass(frozen=True)
class Node:
    name: str
    """The node's name in this file (workers refer to it)."""
    address: str
    """Host name or IP that SSH reaches and the other nodes reach its services on."""
    user: str | None = None
    """SSH user (default: ssh's own)."""
    port: int = 22
    """SSH port."""
    ssh_key: str | None = None
    """SSH identity file (default: ssh's own)."""
    ssh_options: tuple[str, ...] = ()
    """Extra ``ssh -o`` options, e.g. ``[ProxyJump=bastion, UserKnownHostsFile=/dev/null]``;
    they take precedence over the launcher's defaults."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment of every process on this node (SSH, Slurm), e.g. ``GLOO_SOCKET_IFNAME`` /
    ``NCCL_SOCKET_IFNAME`` for a multi-node replica's interface; Kubernetes ignores it."""


@dataclass(frozen=True)
class RouterSpec:
    node: str
    """The node the router runs on (ssh/slurm)."""
    port: int = 30000
    """The OpenAI-compatible endpoint's port."""
    policy: str = "cost_aware"
    """Dispatch policy (``python -m router --help``)."""
    args: tuple[str, ...] = ()
    """Extra ``python -m router`` flags."""


@dataclass(frozen=True)
class MooncakeSpec:
    master_port: int = 50051
    """mooncake_master's RPC port (on ``kvstore.node``)."""
    metadata_port: int = 8080
    """The master's HTTP metadata service port (the transfer engine's handshake)."""
    metrics_port: int = 9003
    """The master's Prometheus ``/metrics`` and ``/health`` port."""
    segment_gb: float = 1.0
    """Memory each node's kvstore server contributes to the distributed store."""


@dataclass(frozen=True)
class KVStoreSpec:
    node: str
    """Where the store runs (``tiered``) or the Mooncake master runs (``mooncake``)."""
    backend: str = "tiered"
    """``tiered``: one kvstore server (memory + SSD) every worker reaches over TCP;
    ``mooncake``: a kvstore server on every worker node, all backed by one Mooncake Store."""
    port: int = 30500
    """kvstore server port (its HTTP stats/metrics port is ``port + 1``)."""
    memory_gb: float = 1.0
    """Memory tier of the tiered store (GiB)."""
    ssd_dir: str | None = None
    """SSD tier directory of the tiered store (none: memory only)."""
    ssd_gb: float = 4.0
    """SSD tier capacity (GiB)."""
    layerwise: bool = False
    """Workers load store hits layer by layer, overlapped with the forward (CPU)."""
    mooncake: MooncakeSpec = field(default_factory=MooncakeSpec)
    """Mooncake master ports and per-node segment (``backend: mooncake``)."""


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    """Group name (Kubernetes object names, log files)."""
    nodes: tuple[str, ...]
    """Nodes of the group's replicas, ``nodes_per_replica`` consecutive nodes per replica (the
    first is rank 0). ssh/slurm need them; Kubernetes uses only their count."""
    role: str = "regular"
    """``regular`` (prefill and decode), ``prefill`` or ``decode`` (PD disaggregation)."""
    nodes_per_replica: int = 1
    """Nodes one replica spans (SGLang ``--nnodes``); > 1 becomes a LeaderWorkerSet."""
    replicas: int | None = None
    """Kubernetes replica count (default ``len(nodes) // nodes_per_replica``)."""
    port: int = 31000
    """HTTP port of replica 0; replica ``i`` uses ``port + i``."""
    cpus: str | None = None
    """Cores each replica is pinned to on CPU (``runtime_patches.launch --cpus``)."""
    gpus: int = 0
    """GPUs per node (Kubernetes ``nvidia.com/gpu`` request; Slurm ``--gpus-per-node``)."""
    dist_init_port: int = 32500
    """torch.distributed port on a multi-node replica's rank-0 node (``port + i`` per replica)."""
    bootstrap_port: int = 8998
    """Prefill workers' disaggregation bootstrap port (``port + i`` per replica)."""
    layer_host_port: int | None = None
    """Start a layer host beside each replica (on ``port + i``); every worker of the cluster
    may then migrate layers or offload attention heads to it."""
    pp_size: int = 1
    """Pipeline-parallel ranks of one replica (``runtime_patches.launch --pp-size``; on CPU
    the way a replica spans nodes): 1 or a multiple of ``nodes_per_replica``. GPU replicas usually
    span nodes with ``--tp-size`` in ``args`` instead."""
    args: tuple[str, ...] = ()
    """Extra ``sglang.launch_server`` flags for this group."""

    @property
    def num_replicas(self) -> int:
        return self.replicas if self.replicas is not None else (
            len(self.nodes) // self.nodes_per_replica)

    def replica_nodes(self, i: int) -> tuple[str, ...]:
        """The nodes of replica ``i`` (rank order) for ssh/slurm."""
        n = self.nodes_per_replica
        return self.nodes[i * n:(i + 1) * n]


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    model: str
    nodes: tuple[Node, ...]
    router: RouterSpec
    workers: tuple[WorkerGroup, ...]
    kvstore: KVStoreSpec | None = None
    workdir: str = "/opt/banaserve"
    python: str = ".venv/bin/python"
    log_dir: str = "/tmp/banaserve"
    image: str = "banaserve:0.1.0"
    namespace: str = "default"
    sglang_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Per-role SGLang flags (keys ``all``, ``regular``, ``prefill``, ``decode``)."""

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    @property
    def disaggregated(self) -> bool:
        return any(g.role != "regular" for g in self.workers)

    def python_path(self) -> str:
        return self.python if os.path.isabs(self.python) else f"{self.workdir}/{self.python}"

    def role_args(self, group: WorkerGroup) -> tuple[str, ...]:
        return (*self.sglang_args.get("all", ()), *self.sglang_args.get(group.role, ()),
                *group.args)
