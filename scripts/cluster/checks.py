"""Checks of a parsed cluster file that span fields: references, ports, roles, owned flags.

Who calls: ``scripts.cluster.load.parse_spec``, once the file has parsed into a ``ClusterSpec``
(types and unknown keys are checked there). Every failure is a ``SpecError`` whose message
starts with the dotted path of the field it names.
"""

from __future__ import annotations

import re
from typing import Any

from scripts.cluster.spec import BACKENDS, DNS_LABEL, ROLES, ClusterSpec, SpecError, WorkerGroup

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _fail(path: str, why: str) -> SpecError:
    return SpecError(f"{path}: {why}")


def _port(value: int, path: str) -> None:
    if not 1 <= value <= 65535:
        raise _fail(path, f"must be a TCP port (1-65535), got {value}")


def validate(spec: ClusterSpec) -> None:
    """Checks that span fields; ``SpecError`` naming the first bad one."""
    if not DNS_LABEL.match(spec.name):
        raise _fail("name", f"{spec.name!r} must be a lowercase DNS label (a-z, 0-9, '-', "
                            "at most 42 characters)")
    if not spec.model.strip():
        raise _fail("model", "must not be empty")
    seen: set[str] = set()
    for i, n in enumerate(spec.nodes):
        if n.name in seen:
            raise _fail(f"nodes[{i}].name", f"duplicate node name {n.name!r}")
        seen.add(n.name)
        if not n.address.strip():
            raise _fail(f"nodes[{i}].address", "must not be empty")
        _port(n.port, f"nodes[{i}].port")
        for key in n.env:
            if not ENV_NAME.match(key):
                raise _fail(f"nodes[{i}].env.{key}", "is not an environment variable name")

    def known_node(name: str, path: str) -> None:
        if spec.nodes and name not in seen:
            raise _fail(path, f"unknown node {name!r}; nodes: {', '.join(sorted(seen))}")

    known_node(spec.router.node, "router.node")
    _port(spec.router.port, "router.port")
    if spec.kvstore is not None:
        kv = spec.kvstore
        known_node(kv.node, "kvstore.node")
        if kv.backend not in BACKENDS:
            raise _fail("kvstore.backend", f"{kv.backend!r} is not one of {BACKENDS}")
        _port(kv.port, "kvstore.port")
        for name in ("memory_gb", "ssd_gb"):
            if getattr(kv, name) <= 0:
                raise _fail(f"kvstore.{name}", f"must be > 0, got {getattr(kv, name)}")
        if kv.backend == "mooncake":
            _port(kv.mooncake.master_port, "kvstore.mooncake.master_port")
            _port(kv.mooncake.metadata_port, "kvstore.mooncake.metadata_port")
            _port(kv.mooncake.metrics_port, "kvstore.mooncake.metrics_port")
            if kv.mooncake.segment_gb <= 0:
                raise _fail("kvstore.mooncake.segment_gb", "must be > 0")
            if kv.ssd_dir is not None:
                raise _fail("kvstore.ssd_dir", "only the tiered backend has an SSD tier")
    if not spec.workers:
        raise _fail("workers", "needs at least one worker group")
    names: set[str] = set()
    for i, g in enumerate(spec.workers):
        _validate_group(g, f"workers[{i}]", known_node, bool(spec.nodes))
        if g.name in names:
            raise _fail(f"workers[{i}].name", f"duplicate group name {g.name!r}")
        names.add(g.name)
    roles = {g.role for g in spec.workers}
    if roles & {"prefill", "decode"} and not {"prefill", "decode"} <= roles:
        raise _fail("workers", "prefill/decode disaggregation needs both a prefill and a "
                               "decode group")
    if "regular" in roles and len(roles) > 1:
        raise _fail("workers", "mix of regular and prefill/decode groups; the router serves "
                               "one or the other")
    _check_ports(spec)


def _validate_group(g: WorkerGroup, path: str, known_node: Any, have_nodes: bool) -> None:
    if not DNS_LABEL.match(g.name):
        raise _fail(f"{path}.name", f"{g.name!r} must be a lowercase DNS label")
    if g.role not in ROLES:
        raise _fail(f"{path}.role", f"{g.role!r} is not one of {ROLES}")
    if g.nodes_per_replica < 1:
        raise _fail(f"{path}.nodes_per_replica", f"must be >= 1, got {g.nodes_per_replica}")
    if g.pp_size < 1 or (g.pp_size > 1 and g.pp_size % g.nodes_per_replica):
        raise _fail(f"{path}.pp_size", f"must be 1 or a multiple of nodes_per_replica="
                                       f"{g.nodes_per_replica}, got {g.pp_size}")
    for j, n in enumerate(g.nodes):
        known_node(n, f"{path}.nodes[{j}]")
    if have_nodes:
        if not g.nodes:
            raise _fail(f"{path}.nodes", "needs at least one node")
        if len(g.nodes) % g.nodes_per_replica:
            raise _fail(f"{path}.nodes", f"{len(g.nodes)} nodes is not a multiple of "
                                         f"nodes_per_replica={g.nodes_per_replica}")
        for i in range(len(g.nodes) // g.nodes_per_replica):
            rn = g.replica_nodes(i)
            if len(set(rn)) != len(rn):
                raise _fail(f"{path}.nodes", f"replica {i} lists a node twice: {list(rn)}")
    if g.replicas is not None and g.replicas < 1:
        raise _fail(f"{path}.replicas", f"must be >= 1, got {g.replicas}")
    if g.gpus < 0:
        raise _fail(f"{path}.gpus", f"must be >= 0, got {g.gpus}")
    for name in ("port", "dist_init_port", "bootstrap_port", "layer_host_port"):
        value = getattr(g, name)
        if value is not None:
            _port(value, f"{path}.{name}")
            _port(value + max(g.num_replicas, 1) - 1, f"{path}.{name}")
    for j, a in enumerate(g.args):
        if a in _OWNED_FLAGS:
            raise _fail(f"{path}.args[{j}]", f"{a} is set by the launcher from the cluster file")


_OWNED_FLAGS = frozenset({"--port", "--host", "--model-path", "--nnodes", "--node-rank",
                          "--dist-init-addr", "--disaggregation-mode",
                          "--disaggregation-bootstrap-port"})
"""SGLang flags the launcher derives from the cluster file; setting them by hand is an error."""


def _check_ports(spec: ClusterSpec) -> None:
    """No two services of the cluster on one node share a port."""
    used: dict[tuple[str, int], str] = {}

    def claim(node: str, port: int, what: str) -> None:
        key = (node, port)
        if key in used:
            raise _fail(what, f"port {port} on node {node!r} is also {used[key]}")
        used[key] = what

    claim(spec.router.node, spec.router.port, "router.port")
    kv = spec.kvstore
    if kv is not None:
        if kv.backend == "tiered":
            claim(kv.node, kv.port, "kvstore.port")
            claim(kv.node, kv.port + 1, "kvstore.port (+1, its HTTP port)")
        else:
            claim(kv.node, kv.mooncake.master_port, "kvstore.mooncake.master_port")
            claim(kv.node, kv.mooncake.metadata_port, "kvstore.mooncake.metadata_port")
            claim(kv.node, kv.mooncake.metrics_port, "kvstore.mooncake.metrics_port")
            for node in sorted({n for g in spec.workers for n in g.nodes}):
                claim(node, kv.port, "kvstore.port")
                claim(node, kv.port + 1, "kvstore.port (+1, its HTTP port)")
    for gi, g in enumerate(spec.workers):
        for i in range(len(g.nodes) // g.nodes_per_replica if spec.nodes else 0):
            rn = g.replica_nodes(i)
            claim(rn[0], g.port + i, f"workers[{gi}].port (replica {i})")
            if g.nodes_per_replica > 1:
                claim(rn[0], g.dist_init_port + i, f"workers[{gi}].dist_init_port (replica {i})")
            if g.role == "prefill":
                claim(rn[0], g.bootstrap_port + i, f"workers[{gi}].bootstrap_port (replica {i})")
            if g.layer_host_port is not None:
                claim(rn[0], g.layer_host_port + i, f"workers[{gi}].layer_host_port (replica {i})")
