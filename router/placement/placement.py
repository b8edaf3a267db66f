"""HELR placement for operators: a request in, a plan and an SGLang launch command out.

Who calls what:
  ``plan_placement(spec)``  anything holding a validated ``PlacementSpec``: costs + cluster ->
                            helr.Problem -> helr.solve -> ``Plan`` (raises helr.InfeasibleError)
  ``plan_from_json(body)``  the sidecar's ``POST /v1/plan/placement`` handler; bad fields raise
                            ``PlacementError`` (HTTP 400), no fit raises ``InfeasibleError`` (422)
  ``render_plan`` and the ``plan-placement`` CLI live in ``router/sidecar/cli_placement.py``

How a plan maps onto SGLang 0.5.23 (checked against its source): ``--pp-size N``;
``SGLANG_PP_LAYER_PARTITION`` lists transformer layers per PP rank (``get_pp_indices``); the
embedding is built on rank 0 and the final norm + LM head on the last rank, so HELR never cuts
right after the embedding or right before the head; PP rank r runs on local GPU
``base_gpu_id + r * tp_size`` (tp 1 here), so ``CUDA_VISIBLE_DEVICES`` lists the stages' GPUs in
rank order with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so ids mean what ``nvidia-smi`` shows.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from dataclasses import dataclass
from typing import Any

from router.placement import helr
from router.placement.costs import (
    ModelCosts,
    ModelShape,
    Workload,
    load_model_config,
    model_costs,
    unit_time,
)
from router.placement.helr import MODE_WEIGHTS, InfeasibleError
from router.placement.topology import (
    Cluster,
    cluster_from_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["InfeasibleError", "LaunchPlan", "Plan", "PlacementError", "PlacementSpec",
           "PlannedStage", "build_problem", "launch_plan", "plan_from_json", "plan_placement",
           "spec_from_fields"]

_SGLANG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class PlacementError(ValueError):
    """A bad request field; the message starts with the field's name."""


@dataclass(frozen=True)
class PlacementSpec:
    """Everything one placement needs."""

    costs: ModelCosts
    """Per-unit memory and work of the model (costs.model_costs)."""
    cluster: Cluster
    """GPUs and links to place onto."""
    model_path: str = "<model-path>"
    """What ``--model-path`` says in the launch command."""
    mode: str = "helr"
    """``lr`` (latency), ``he`` (fewest GPUs) or ``helr`` (blend by ``weight``)."""
    weight: float | None = None
    """Blend weight for ``helr`` (0 = LR, 1 = HE; default 0.5); fixed by ``lr`` and ``he``."""
    objective: str = "sum"
    """``sum`` (one request's latency) or ``bottleneck`` (slowest stage: pipeline throughput)."""
    workload: Workload = Workload()
    """Batch the placement is sized for: KV reserve r = b(s + o) and the stage times."""
    headroom: float = 0.1
    """Fraction of each GPU's free memory left unused."""
    contention: float = 0.0
    """gamma: a GPU at utilization u runs (1 + gamma * u) times slower."""

    def __post_init__(self) -> None:
        if self.mode not in MODE_WEIGHTS:
            raise PlacementError(f"mode: expected one of {', '.join(MODE_WEIGHTS)}, "
                                 f"got {self.mode!r}")
        if self.weight is not None:
            if not _is_number(self.weight):
                raise PlacementError(f"weight: expected a number, got {self.weight!r}")
            if self.mode != "helr" and self.weight != MODE_WEIGHTS[self.mode]:
                raise PlacementError(f"weight: only mode helr takes a weight (mode "
                                     f"{self.mode} is weight {MODE_WEIGHTS[self.mode]})")
        try:
            helr.check_objective(self.blend_weight, self.objective)
        except ValueError as exc:
            raise PlacementError(str(exc)) from exc
        if not _is_number(self.headroom) or not 0 <= self.headroom < 1:
            raise PlacementError(f"headroom: expected a number in [0, 1), got {self.headroom!r}")
        if not _is_number(self.contention) or self.contention < 0:
            raise PlacementError(f"contention: expected a number >= 0, got {self.contention!r}")
        if not isinstance(self.model_path, str) or not self.model_path:
            raise PlacementError(f"model_path: expected a non-empty string, "
                                 f"got {self.model_path!r}")

    @property
    def blend_weight(self) -> float:
        """The weight the solver uses."""
        return MODE_WEIGHTS[self.mode] if self.weight is None else float(self.weight)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class PlannedStage:
    """One pipeline stage of a plan (PP rank ``rank``)."""

    rank: int
    """PP rank."""
    gpu_id: int
    """Physical GPU id."""
    first_layer: int
    """First transformer layer (0-based)."""
    end_layer: int
    """One past the last transformer layer."""
    has_embedding: bool
    """Holds the embedding (rank 0)."""
    has_lm_head: bool
    """Holds the final norm and LM head (last rank)."""
    memory_bytes: int
    """Weights + reserved KV + activation workspace."""
    usable_bytes: int
    """The GPU's free memory after headroom."""
    compute_s: float
    """Predicted time of the stage's units for the workload."""
    handoff_in_s: float
    """Predicted hand-off time from the previous stage (0 for rank 0)."""


@dataclass(frozen=True)
class LaunchPlan:
    """How to start SGLang with the plan."""

    pp_size: int
    """``--pp-size``."""
    layer_partition: tuple[int, ...]
    """Transformer layers per PP rank (``SGLANG_PP_LAYER_PARTITION``)."""
    cuda_visible_devices: tuple[int, ...]
    """GPU ids in PP-rank order."""
    env: tuple[tuple[str, str], ...]
    """Environment variables to set."""
    argv: tuple[str, ...]
    """The launch command's arguments."""

    @property
    def command(self) -> str:
        """The shell command line."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env),
                         shlex.join(self.argv)])


@dataclass(frozen=True)
class Plan:
    """A placement: stages, predictions, and the SGLang launch plan."""

    stages: tuple[PlannedStage, ...]
    """In PP-rank order."""
    mode: str
    """Mode asked for."""
    weight: float
    """Blend weight used."""
    objective: str
    """``sum`` or ``bottleneck``."""
    latency_s: float
    """Predicted latency under ``objective``."""
    end_to_end_s: float
    """Sum of stage times and hand-offs (one batch, start to finish)."""
    bottleneck_s: float
    """Slowest stage or hand-off (the pipeline's period)."""
    score: float
    """Blended objective J."""
    best_by_count: tuple[tuple[int, float], ...]
    """(GPUs, best latency with exactly that many) for each feasible count."""
    num_gpus_total: int
    """GPUs in the cluster."""
    launch: LaunchPlan
    """How to start SGLang with it."""
    warnings: tuple[str, ...] = ()
    """Things the operator should check before launching."""

    @property
    def memory_per_gpu(self) -> dict[int, int]:
        """Bytes the plan puts on each GPU it uses."""
        return {st.gpu_id: st.memory_bytes for st in self.stages}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``POST /v1/plan/placement``, ``--json``)."""
        stages = [{"rank": st.rank, "gpu_id": st.gpu_id, "first_layer": st.first_layer,
                   "last_layer_exclusive": st.end_layer,
                   **{k: v for k, v in dataclasses.asdict(st).items()
                      if k not in ("rank", "gpu_id", "first_layer", "end_layer")}}
                  for st in self.stages]
        return {
            "mode": self.mode, "weight": self.weight, "objective": self.objective,
            "latency_s": self.latency_s, "end_to_end_s": self.end_to_end_s,
            "bottleneck_s": self.bottleneck_s, "score": self.score,
            "num_gpus": len(self.stages), "num_gpus_total": self.num_gpus_total,
            "best_latency_by_gpu_count": {str(k): v for k, v in self.best_by_count},
            "stages": stages,
            "memory_per_gpu": {str(k): v for k, v in self.memory_per_gpu.items()},
            "sglang": {"pp_size": self.launch.pp_size,
                       "layer_partition": list(self.launch.layer_partition),
                       "cuda_visible_devices": list(self.launch.cuda_visible_devices),
                       "env": dict(self.launch.env), "argv": list(self.launch.argv),
                       "command": self.launch.command},
            "warnings": list(self.warnings),
        }


def build_problem(spec: PlacementSpec) -> helr.Problem:
    """Turn a spec into the solver's numbers (bytes, seconds)."""
    costs, work, gpus = spec.costs, spec.workload, spec.cluster.gpus
    times = tuple(
        tuple(unit_time(unit, work, g.tflops * 1e12, g.mem_bw_gbps * 1e9)
              * (1 + spec.contention * g.utilization) for g in gpus)
        for unit in costs.units)
    handoff = work.batch_size * (work.prompt_tokens + work.output_tokens)
    handoff *= costs.handoff_bytes_per_token
    comm = tuple(tuple(0.0 if link is None else link.seconds(handoff, 1 + work.output_tokens)
                       for link in row) for row in spec.cluster.links)
    last_layer_unit = costs.num_layers
    return helr.Problem(
        unit_names=tuple(u.name for u in costs.units),
        weight_bytes=tuple(u.weight_bytes for u in costs.units),
        kv_bytes=tuple(u.kv_bytes_per_token * work.reserved_tokens for u in costs.units),
        unit_times=times,
        capacity_bytes=tuple(int((1 - spec.headroom) * g.free_bytes) for g in gpus),
        comm_s=comm,
        stage_overhead_bytes=work.activation_bytes(costs),
        shared_bytes=costs.shared_bytes,
        cut_allowed=tuple(u not in (0, last_layer_unit) for u in range(len(costs.units) - 1)))


def plan_placement(spec: PlacementSpec) -> Plan:
    """Solve and describe the placement (raises ``InfeasibleError`` naming what binds)."""
    problem = build_problem(spec)
    sol = helr.solve(problem, spec.blend_weight, spec.objective)
    gpus = spec.cluster.gpus
    layers = spec.costs.num_layers
    stages = []
    for rank, st in enumerate(sol.stages):
        prev = sol.stages[rank - 1].gpu if rank else None
        stages.append(PlannedStage(
            rank=rank, gpu_id=gpus[st.gpu].id, first_layer=max(st.first, 1) - 1,
            end_layer=min(st.end, layers + 1) - 1, has_embedding=st.first == 0,
            has_lm_head=st.end == problem.num_units,
            memory_bytes=problem.stage_bytes(st.first, st.end),
            usable_bytes=problem.capacity_bytes[st.gpu],
            compute_s=sum(problem.unit_times[u][st.gpu] for u in range(st.first, st.end)),
            handoff_in_s=0.0 if prev is None else problem.comm_s[prev][st.gpu]))
    launch = launch_plan(tuple(stages), spec)
    return Plan(stages=tuple(stages), mode=spec.mode, weight=spec.blend_weight,
                objective=spec.objective, latency_s=sol.latency_s,
                end_to_end_s=helr.evaluate(problem, sol.stages, "sum"),
                bottleneck_s=helr.evaluate(problem, sol.stages, "bottleneck"),
                score=sol.score, best_by_count=sol.best_by_count,
                num_gpus_total=len(gpus), launch=launch, warnings=_warnings(spec, len(stages)))


def launch_plan(stages: tuple[PlannedStage, ...], spec: PlacementSpec) -> LaunchPlan:
    """The SGLang environment and arguments that realise ``stages``."""
    partition = tuple(st.end_layer - st.first_layer for st in stages)
    devices = tuple(st.gpu_id for st in stages)
    env = []
    if len(stages) > 1:
        env.append(("SGLANG_PP_LAYER_PARTITION", ",".join(map(str, partition))))
    env += [("CUDA_VISIBLE_DEVICES", ",".join(map(str, devices))),
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")]
    argv = ["python", "-m", "sglang.launch_server", "--model-path", spec.model_path,
            "--pp-size", str(len(stages)), "--base-gpu-id", "0", "--gpu-id-step", "1"]
    if spec.costs.dtype in _SGLANG_DTYPES:
        argv += ["--dtype", _SGLANG_DTYPES[spec.costs.dtype]]
    return LaunchPlan(len(stages), partition, devices, tuple(env), tuple(argv))


def _warnings(spec: PlacementSpec, num_stages: int) -> tuple[str, ...]:
    found = []
    if num_stages > 1 and spec.costs.shared_bytes:
        found.append("tied embeddings with --pp-size > 1: SGLang 0.5.23's LlamaForCausalLM "
                     "reuses embed_tokens as the LM head, which only PP rank 0 builds; "
                     "check that this model runs pipelined before relying on the plan")
    if spec.costs.dtype == "int8":
        found.append("int8 weights: add the --quantization option your checkpoint needs")
    return tuple(found)


_JSON_FIELDS = {"model", "model_path", "dtype", "cluster", "mode", "weight", "objective",
                "batch_size", "prompt_tokens", "output_tokens", "prefill_chunk_tokens",
                "headroom", "contention"}


def _costs_from(model: object, dtype: object) -> ModelCosts:
    if not isinstance(model, str | dict) or not model:
        raise PlacementError("model: expected a model folder path or a config.json object")
    if dtype is not None and not isinstance(dtype, str):
        raise PlacementError(f"dtype: expected a string, got {dtype!r}")
    try:
        shape = ModelShape.from_config(load_model_config(model))
    except ValueError as exc:
        text = str(exc)
        raise PlacementError(text if text.startswith("model") else f"model: {text}") from exc
    try:
        return model_costs(shape, dtype)
    except ValueError as exc:
        raise PlacementError(str(exc)) from exc


def _workload(fields: dict[str, Any]) -> Workload:
    defaults = Workload()
    try:
        return Workload(**{name: fields.get(name, getattr(defaults, name))
                           for name in ("batch_size", "prompt_tokens", "output_tokens",
                                        "prefill_chunk_tokens")})
    except ValueError as exc:
        raise PlacementError(str(exc)) from exc


def spec_from_fields(fields: dict[str, Any], cluster: Cluster) -> PlacementSpec:
    """A spec from request-style fields (``plan_from_json``'s body, the CLI's options)."""
    costs = _costs_from(fields.get("model"), fields.get("dtype"))
    model = fields.get("model")
    model_path = fields.get("model_path") or (model if isinstance(model, str) else None)
    options = {name: fields[name] for name in ("mode", "weight", "objective", "headroom",
                                               "contention") if fields.get(name) is not None}
    for name in ("headroom", "contention", "weight"):
        if name in options and not _is_number(options[name]):
            raise PlacementError(f"{name}: expected a number, got {options[name]!r}")
    return PlacementSpec(costs=costs, cluster=cluster, workload=_workload(fields),
                         model_path=model_path or "<model-path>", **options)


def plan_from_json(body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/plan/placement``: validate ``body``, plan, return ``Plan.as_dict()``."""
    if not isinstance(body, dict):
        raise PlacementError("body: expected a JSON object")
    unknown = set(body) - _JSON_FIELDS
    if unknown:
        raise PlacementError(f"{sorted(unknown)[0]}: unknown field; known: "
                             f"{', '.join(sorted(_JSON_FIELDS))}")
    if "cluster" not in body:
        raise PlacementError("cluster: required (gpus and links, as in the cluster YAML)")
    try:
        cluster = cluster_from_dict(body["cluster"])
    except ValueError as exc:
        text = str(exc)
        raise PlacementError(text if text.startswith("cluster") else f"cluster.{text}") from exc
    return plan_placement(spec_from_fields(body, cluster)).as_dict()
