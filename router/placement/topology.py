"""The cluster HELR places onto: GPUs (memory, speed) and the link between every ordered pair.

Who calls what:
  ``cluster_from_dict``   placement.py, on the ``cluster`` field of ``POST /v1/plan/placement``
                          and on a parsed ``--cluster`` YAML file (``load_cluster_yaml``)
  ``parse_nvidia_smi_topo``  placement.py, on the text of ``nvidia-smi topo -m`` (``--nvidia-smi-
                          topo FILE``); ``cluster_from_topo`` joins it with GPU specs

Units, as GPU spec sheets write them: ``memory_gb``/``used_gb`` in GiB (2^30 bytes, what
``nvidia-smi`` reports divided by 1024), ``tflops`` in 10^12 FLOP/s, ``mem_bw_gbps`` and
``bandwidth_gbps`` in GB/s (10^9 bytes/s, one direction), ``latency_us`` in microseconds.
The YAML format and the link-type table are documented in docs/helr.md.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from router.placement.helr import GIB, MAX_GPUS

logger = logging.getLogger(__name__)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Link:
    """One direction of the path between two GPUs."""

    bandwidth_gbps: float
    """GB/s (10^9 bytes/s) in this direction."""
    latency_us: float
    """Per-message latency in microseconds."""
    kind: str = ""
    """Link type it came from (``NV18``, ``SYS``...), empty when given as numbers."""

    def __post_init__(self) -> None:
        if not _number(self.bandwidth_gbps) or self.bandwidth_gbps <= 0:
            raise ValueError(f"bandwidth_gbps: expected a positive number, "
                             f"got {self.bandwidth_gbps!r}")
        if not _number(self.latency_us) or self.latency_us < 0:
            raise ValueError(f"latency_us: expected a number >= 0, got {self.latency_us!r}")

    def seconds(self, num_bytes: float, num_messages: int = 1) -> float:
        """Time to move ``num_bytes`` in ``num_messages`` messages."""
        return num_bytes / (self.bandwidth_gbps * 1e9) + num_messages * self.latency_us * 1e-6


LINK_TYPES: dict[str, Link] = {
    "NV": Link(25.0, 2.0, "NV#"),   # per NVLink (NVLink 3/4: 25 GB/s per direction); NV# = # x
    "PIX": Link(25.0, 5.0, "PIX"),  # one PCIe switch (Gen4 x16 ~25 GB/s effective)
    "PXB": Link(20.0, 6.0, "PXB"),  # several PCIe switches
    "PHB": Link(16.0, 8.0, "PHB"),  # through the CPU's PCIe host bridge
    "NODE": Link(12.0, 10.0, "NODE"),  # between host bridges of one NUMA node
    "SYS": Link(8.0, 15.0, "SYS"),  # across sockets (QPI/UPI/Infinity Fabric)
    "NET": Link(12.5, 20.0, "NET"),  # another node over 100 Gb/s RDMA (YAML only)
}
"""Default bandwidth (GB/s per direction) and latency per link type; YAML ``link_types`` overrides
or extends it."""

_NV = re.compile(r"^NV(\d+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def link_for_kind(kind: str, table: dict[str, Link] | None = None) -> Link:
    """The link a type name stands for: ``NV<n>`` is n bonded NVLinks."""
    table = LINK_TYPES if table is None else table
    kind = str(kind).strip().upper()
    match = _NV.match(kind)
    if match and int(match.group(1)) > 0:
        per = table["NV"]
        return Link(per.bandwidth_gbps * int(match.group(1)), per.latency_us, kind)
    if kind not in table or kind == "NV":
        raise ValueError(f"unknown link type {kind!r}; known: NV<n>, "
                         f"{', '.join(k for k in table if k != 'NV')}")
    found = table[kind]
    return Link(found.bandwidth_gbps, found.latency_us, kind)


@dataclass(frozen=True)
class Gpu:
    """One GPU and what is left of it."""

    id: int
    """Physical index, as ``nvidia-smi`` and ``CUDA_VISIBLE_DEVICES`` (PCI bus order) count."""
    memory_gb: float
    """Total memory, GiB."""
    tflops: float
    """Peak dense FLOP/s at the serving dtype, in 10^12."""
    mem_bw_gbps: float = 3350.0
    """Memory bandwidth, GB/s (default: H100 SXM)."""
    used_gb: float = 0.0
    """Memory already taken by other work, GiB."""
    utilization: float = 0.0
    """Compute share already taken by other work, in [0, 1] (scaled by ``contention``)."""

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"gpus[].id: expected an integer >= 0, got {self.id!r}")
        for name in ("memory_gb", "tflops", "mem_bw_gbps"):
            value = getattr(self, name)
            if not _number(value) or value <= 0:
                raise ValueError(f"gpus[{self.id}].{name}: expected a positive number, "
                                 f"got {value!r}")
        if not _number(self.used_gb) or not 0 <= self.used_gb <= self.memory_gb:
            raise ValueError(f"gpus[{self.id}].used_gb: expected 0..memory_gb "
                             f"({self.memory_gb}), got {self.used_gb!r}")
        if not _number(self.utilization) or not 0 <= self.utilization <= 1:
            raise ValueError(f"gpus[{self.id}].utilization: expected 0..1, "
                             f"got {self.utilization!r}")

    @property
    def free_bytes(self) -> int:
        """Memory not in use, bytes."""
        return int((self.memory_gb - self.used_gb) * GIB)


@dataclass(frozen=True)
class Cluster:
    """GPUs and the directed link matrix between them (``links[a][b]`` for positions a, b)."""

    gpus: tuple[Gpu, ...]
    """The GPUs HELR may use, in any order."""
    links: tuple[tuple[Link | None, ...], ...]
    """``links[a][b]``: from ``gpus[a]`` to ``gpus[b]``; ``None`` on the diagonal only."""

    def __post_init__(self) -> None:
        count = len(self.gpus)
        if not 1 <= count <= MAX_GPUS:
            raise ValueError(f"gpus: expected 1..{MAX_GPUS} GPUs, got {count}")
        ids = [g.id for g in self.gpus]
        if len(set(ids)) != count:
            raise ValueError(f"gpus: duplicate ids in {ids}")
        if len(self.links) != count or any(len(row) != count for row in self.links):
            raise ValueError(f"links.matrix: expected {count}x{count} entries")
        for a in range(count):
            for b in range(count):
                if (self.links[a][b] is None) != (a == b):
                    raise ValueError(f"links.matrix[{a}][{b}]: a link is needed between "
                                     f"distinct GPUs and none on the diagonal")


def _link_from_entry(entry: object, table: dict[str, Link], where: str) -> Link:
    try:
        if isinstance(entry, str):
            return link_for_kind(entry, table)
        if isinstance(entry, dict):
            unknown = set(entry) - {"bandwidth_gbps", "latency_us"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            return Link(entry.get("bandwidth_gbps"), entry.get("latency_us", 0.0))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    raise ValueError(f"{where}: expected a link type name or "
                     f"{{bandwidth_gbps, latency_us}}, got {entry!r}")


def _link_table(links: dict[str, Any]) -> dict[str, Link]:
    table = dict(LINK_TYPES)
    overrides = links.get("link_types") or {}
    if not isinstance(overrides, dict):
        raise ValueError("links.link_types: expected a mapping of type name to link")
    for name, entry in overrides.items():
        table[str(name).upper()] = _link_from_entry(entry, table, f"links.link_types.{name}")
    return table


def _parse_gpu(entry: object, index: int) -> Gpu:
    if not isinstance(entry, dict):
        raise ValueError(f"gpus[{index}]: expected a mapping, got {entry!r}")
    known = {"id", "memory_gb", "tflops", "mem_bw_gbps", "used_gb", "utilization"}
    unknown = set(entry) - known
    if unknown:
        raise ValueError(f"gpus[{index}]: unknown keys {sorted(unknown)}")
    if "memory_gb" not in entry or "tflops" not in entry:
        raise ValueError(f"gpus[{index}]: memory_gb and tflops are required")
    return Gpu(**{"id": index, **entry})


def cluster_from_dict(data: object, links_override: list[list[str]] | None = None) -> Cluster:
    """Build a cluster from the YAML/JSON structure (``gpus`` and ``links``, see docs/helr.md).
    ``links_override`` (link type names, e.g. from ``nvidia-smi topo -m``) replaces the matrix."""
    if not isinstance(data, dict):
        raise ValueError(f"cluster: expected a mapping with gpus and links, got {data!r}")
    unknown = set(data) - {"gpus", "links"}
    if unknown:
        raise ValueError(f"cluster: unknown keys {sorted(unknown)}")
    raw_gpus = data.get("gpus")
    if not isinstance(raw_gpus, list) or not raw_gpus:
        raise ValueError("cluster.gpus: expected a non-empty list")
    gpus = tuple(_parse_gpu(entry, i) for i, entry in enumerate(raw_gpus))
    links = data.get("links") or {}
    if not isinstance(links, dict):
        raise ValueError("cluster.links: expected a mapping")
    unknown = set(links) - {"default", "matrix", "link_types"}
    if unknown:
        raise ValueError(f"cluster.links: unknown keys {sorted(unknown)}")
    table = _link_table(links)
    matrix = links_override if links_override is not None else links.get("matrix")
    if matrix is None:
        if "default" not in links and len(gpus) > 1:
            raise ValueError("cluster.links: give a default link or a matrix for "
                             f"{len(gpus)} GPUs")
        default = _link_from_entry(links.get("default", "NET"), table, "cluster.links.default")
        return Cluster(gpus, tuple(tuple(None if a == b else default for b in range(len(gpus)))
                                   for a in range(len(gpus))))
    return Cluster(gpus, _matrix_links(matrix, len(gpus), table))


def _matrix_links(matrix: object, count: int, table: dict[str, Link]
                  ) -> tuple[tuple[Link | None, ...], ...]:
    if (not isinstance(matrix, list) or len(matrix) != count
            or any(not isinstance(row, list) or len(row) != count for row in matrix)):
        raise ValueError(f"cluster.links.matrix: expected {count} rows of {count} entries "
                         f"(one per GPU, in gpus order)")
    rows = []
    for a, row in enumerate(matrix):
        rows.append(tuple(None if a == b else
                          _link_from_entry(entry, table, f"cluster.links.matrix[{a}][{b}]")
                          for b, entry in enumerate(row)))
    return tuple(rows)


def load_cluster_yaml(path: str) -> dict[str, Any]:
    """Parse a cluster YAML file into the structure ``cluster_from_dict`` takes."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"cluster: cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"cluster: {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"cluster: {path} does not hold a mapping")
    return data


@dataclass(frozen=True)
class TopoMatrix:
    """What ``nvidia-smi topo -m`` says about the GPUs: ids and the link type between each pair."""

    gpu_ids: tuple[int, ...]
    """GPU indices, in row order."""
    kinds: tuple[tuple[str, ...], ...]
    """``kinds[a][b]``: ``X`` on the diagonal, else ``NV<n>``, ``PIX``, ``PXB``, ``PHB``,
    ``NODE`` or ``SYS``."""


def parse_nvidia_smi_topo(text: str) -> TopoMatrix:
    """Parse the matrix of ``nvidia-smi topo -m`` (tabs or spaces; ANSI colour codes ignored).
    NIC rows and columns, CPU/NUMA affinity columns and the legend are skipped."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header_at = next((i for i, line in enumerate(lines)
                      if line.split() and line.split()[0] == "GPU0"), None)
    if header_at is None:
        raise ValueError("nvidia-smi topo: no header row starting with GPU0 found")
    header = lines[header_at].split()
    columns = [tok for tok in header if re.fullmatch(r"GPU\d+", tok)]
    if header[: len(columns)] != columns:
        raise ValueError("nvidia-smi topo: GPU columns must come first in the header")
    rows: dict[str, list[str]] = {}
    for line in lines[header_at + 1:]:
        tokens = line.split()
        if not tokens or tokens[0].startswith("Legend"):
            if rows:
                break
            continue
        if re.fullmatch(r"GPU\d+", tokens[0]):
            if len(tokens) < len(columns) + 1:
                raise ValueError(f"nvidia-smi topo: row {tokens[0]} has fewer than "
                                 f"{len(columns)} entries")
            rows[tokens[0]] = [tok.upper() for tok in tokens[1:len(columns) + 1]]
    if sorted(rows) != sorted(columns):
        raise ValueError(f"nvidia-smi topo: rows {sorted(rows)} do not match columns {columns}")
    kinds = tuple(tuple(rows[name]) for name in columns)
    for a, row in enumerate(kinds):
        for b, kind in enumerate(row):
            if (kind == "X") != (a == b):
                raise ValueError(f"nvidia-smi topo: {columns[a]} to {columns[b]} is {kind!r}")
            if a != b:
                try:
                    link_for_kind(kind, {k: v for k, v in LINK_TYPES.items() if k != "NET"})
                except ValueError as exc:
                    raise ValueError(f"nvidia-smi topo: {columns[a]} to {columns[b]}: "
                                     f"{exc}") from exc
    return TopoMatrix(tuple(int(name[3:]) for name in columns), kinds)


def cluster_from_topo(topo: TopoMatrix, gpu_specs: dict[str, Any] | list[dict[str, Any]],
                      link_types: dict[str, Any] | None = None) -> Cluster:
    """Join a parsed topology with GPU specs: one dict applied to every GPU (``memory_gb``,
    ``tflops``, optional ``mem_bw_gbps``/``used_gb``), or a list with one entry per GPU."""
    if isinstance(gpu_specs, dict):
        gpus = [{**gpu_specs, "id": gid} for gid in topo.gpu_ids]
    else:
        gpus = _match_specs(topo.gpu_ids, gpu_specs)
    links: dict[str, Any] = {"link_types": link_types} if link_types else {}
    return cluster_from_dict({"gpus": gpus, "links": links},
                             links_override=[list(row) for row in topo.kinds])


def _match_specs(gpu_ids: tuple[int, ...], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Specs by ``id`` when every spec has one, else by position."""
    if len(specs) != len(gpu_ids):
        raise ValueError(f"cluster.gpus: {len(specs)} GPUs given but nvidia-smi topo "
                         f"lists {len(gpu_ids)}")
    if not all(isinstance(spec, dict) for spec in specs):
        raise ValueError("cluster.gpus: expected a list of mappings")
    if all("id" in spec for spec in specs):
        by_id = {spec["id"]: spec for spec in specs}
        if sorted(by_id, key=str) != sorted(gpu_ids, key=str):
            raise ValueError(f"cluster.gpus: ids {sorted(by_id, key=str)} do not match "
                             f"nvidia-smi topo's {list(gpu_ids)}")
        return [dict(by_id[gid]) for gid in gpu_ids]
    return [{**spec, "id": gid} for gid, spec in zip(gpu_ids, specs, strict=True)]


def load_cluster(cluster_yaml: str | None, topo_file: str | None,
                 gpu_spec: dict[str, Any] | None = None) -> Cluster:
    """The CLI's cluster: a YAML file alone, or ``nvidia-smi topo -m`` output for the links with
    the GPUs from the YAML's ``gpus`` or from ``gpu_spec`` (applied to every GPU)."""
    data = load_cluster_yaml(cluster_yaml) if cluster_yaml else None
    if not topo_file:
        if data is None:
            raise ValueError("cluster: give --cluster YAML or --nvidia-smi-topo FILE")
        return cluster_from_dict(data)
    try:
        with open(topo_file) as f:
            topo = parse_nvidia_smi_topo(f.read())
    except OSError as exc:
        raise ValueError(f"nvidia-smi-topo: cannot read {topo_file}: "
                         f"{exc.strerror or exc}") from exc
    if data is not None:
        links = data.get("links") if isinstance(data.get("links"), dict) else {}
        return cluster_from_topo(topo, data.get("gpus") or [], links.get("link_types"))
    if gpu_spec is None or gpu_spec.get("memory_gb") is None or gpu_spec.get("tflops") is None:
        raise ValueError("gpu-memory-gb: --nvidia-smi-topo needs --gpu-memory-gb and "
                         "--gpu-tflops (or --cluster for the GPUs)")
    return cluster_from_topo(topo, gpu_spec)
