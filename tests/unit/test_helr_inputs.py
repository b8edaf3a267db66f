"""HELR's inputs and glue: per-layer costs from real model folders (costs.py), the cluster from
YAML and from `nvidia-smi topo -m` text (topology.py), and plans, SGLang launch plans, the JSON
endpoint body (placement.py) and the CLI (router/sidecar/cli_placement.py)."""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from typing import Any

import pytest

from router.placement.costs import ModelShape, Workload, load_model_config, model_costs, unit_time
from router.placement.helr import GIB, InfeasibleError
from router.placement.placement import (
    PlacementError,
    PlacementSpec,
    plan_from_json,
    plan_placement,
)
from router.placement.topology import (
    LINK_TYPES,
    cluster_from_dict,
    cluster_from_topo,
    link_for_kind,
    parse_nvidia_smi_topo,
)
from router.sidecar.cli_placement import add_placement_arguments, run_placement

MODEL_CACHE = os.environ.get("BANASERVE_MODEL_CACHE") or os.path.expanduser(
    "~/.cache/banaserve/models")
TINY = os.path.join(MODEL_CACHE, "tiny")
SMOLLM2 = os.path.join(MODEL_CACHE, "smollm2")

LEGEND = "".join(line + "\n" for line in (
    "", "Legend:", "",
    "  X    = Self",
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes "
    "(e.g., QPI/UPI)",
    "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges "
    "within a NUMA node",
    "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)",
    "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host "
    "Bridge)",
    "  PIX  = Connection traversing at most a single PCIe bridge",
    "  NV#  = Connection traversing a bonded set of # NVLinks"))

# `nvidia-smi topo -m` on a DGX H100 (NVSwitch: NV18 between every pair), as copied from a
# terminal: columns aligned with spaces, underline escape codes around the header.
DGX_TOPO = """\
        \x1b[4mGPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    NIC0    NIC1    NIC2    NIC3    CPU Affinity    NUMA Affinity   GPU NUMA ID\x1b[0m
GPU0     X      NV18    NV18    NV18    NV18    NV18    NV18    NV18    PIX     NODE    SYS     SYS     0-55,112-167    0               N/A
GPU1    NV18     X      NV18    NV18    NV18    NV18    NV18    NV18    PIX     NODE    SYS     SYS     0-55,112-167    0               N/A
GPU2    NV18    NV18     X      NV18    NV18    NV18    NV18    NV18    NODE    PIX     SYS     SYS     0-55,112-167    0               N/A
GPU3    NV18    NV18    NV18     X      NV18    NV18    NV18    NV18    NODE    PIX     SYS     SYS     0-55,112-167    0               N/A
GPU4    NV18    NV18    NV18    NV18     X      NV18    NV18    NV18    SYS     SYS     PIX     NODE    56-111,168-223  1               N/A
GPU5    NV18    NV18    NV18    NV18    NV18     X      NV18    NV18    SYS     SYS     PIX     NODE    56-111,168-223  1               N/A
GPU6    NV18    NV18    NV18    NV18    NV18    NV18     X      NV18    SYS     SYS     NODE    PIX     56-111,168-223  1               N/A
GPU7    NV18    NV18    NV18    NV18    NV18    NV18    NV18     X      SYS     SYS     NODE    PIX     56-111,168-223  1               N/A
NIC0    PIX     PIX     NODE    NODE    SYS     SYS     SYS     SYS      X      NODE    SYS     SYS
NIC1    NODE    NODE    PIX     PIX     SYS     SYS     SYS     SYS     NODE     X      SYS     SYS
NIC2    SYS     SYS     SYS     SYS     PIX     PIX     NODE    NODE    SYS     SYS      X      NODE
NIC3    SYS     SYS     SYS     SYS     NODE    NODE    PIX     PIX     SYS     SYS     NODE     X
""" + LEGEND + """
NIC Legend:

  NIC0: mlx5_0
  NIC1: mlx5_1
  NIC2: mlx5_2
  NIC3: mlx5_3
"""  # noqa: E501

# A 4-GPU PCIe workstation, saved with `nvidia-smi topo -m > topo.txt` (tab-separated): two
# GPUs per PCIe switch, one switch per socket.
PCIE_TOPO = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tPIX\tSYS\tSYS\t0-15,32-47\t0\t\tN/A
GPU1\tPIX\t X \tSYS\tSYS\t0-15,32-47\t0\t\tN/A
GPU2\tSYS\tSYS\t X \tPIX\t16-31,48-63\t1\t\tN/A
GPU3\tSYS\tSYS\tPIX\t X \t16-31,48-63\t1\t\tN/A
""" + LEGEND

SMOLLM2_CONFIG = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json (the fields that matter)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
LLAMA3_70B_CONFIG = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# 8 layers of 29 MiB, embedding and head 62.5 MiB each: 0.35 GiB in bf16.
SMALL_CONFIG = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
    "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
    "torch_dtype": "bfloat16"}


def safetensors_unit_bytes(folder: str) -> dict[str, int]:
    """Bytes per placement unit, read from the safetensors headers (no torch needed)."""
    units: dict[str, int] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for tensor, meta in header.items():
            if tensor.startswith("model.layers."):
                unit = f"layer {tensor.split('.')[2]}"
            elif tensor.startswith("model.embed_tokens"):
                unit = "embedding"
            else:  # model.norm, lm_head
                unit = "lm_head"
            units[unit] = units.get(unit, 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
    return units


def require(folder: str, recipe: str) -> None:
    if not os.path.exists(os.path.join(folder, "config.json")):
        pytest.skip(f"{folder} not prepared: run `python -m runtime_patches.models prepare "
                    f"{recipe}` to test against the real checkpoint")


def test_tiny_llama_costs_match_its_safetensors() -> None:
    require(TINY, "tiny")
    costs = model_costs(ModelShape.from_config(load_model_config(TINY)))
    on_disk = safetensors_unit_bytes(TINY)
    assert costs.dtype == "bf16"
    assert {u.name: u.weight_bytes for u in costs.units} == on_disk
    assert costs.total_weight_bytes() == sum(on_disk.values())
    shape = ModelShape.from_config(load_model_config(TINY))
    assert shape.checkpoint_params() * 2 == sum(on_disk.values())


@pytest.mark.smollm2
def test_smollm2_costs_match_its_safetensors() -> None:
    require(SMOLLM2, "smollm2")
    costs = model_costs(ModelShape.from_config(load_model_config(SMOLLM2)))
    on_disk = safetensors_unit_bytes(SMOLLM2)
    assert costs.total_weight_bytes() == sum(on_disk.values())
    assert costs.shared_bytes == on_disk["embedding"]  # tied: no lm_head.weight on disk


def test_published_parameter_counts() -> None:
    assert ModelShape.from_config(SMOLLM2_CONFIG).checkpoint_params() == 134_515_008
    assert ModelShape.from_config(LLAMA3_70B_CONFIG).checkpoint_params() == 70_553_706_496


def test_tied_head_needs_its_own_copy_only_on_another_stage() -> None:
    costs = model_costs(ModelShape.from_config(SMOLLM2_CONFIG))
    embed = 49152 * 576 * 2
    assert costs.units[0].weight_bytes == embed
    assert costs.units[-1].weight_bytes == embed + 576 * 2
    assert costs.shared_bytes == embed
    assert costs.total_weight_bytes() == 134_515_008 * 2


def test_layer_kv_flops_and_dtypes() -> None:
    shape = ModelShape.from_config(LLAMA3_70B_CONFIG)
    bf16, int8, fp32 = (model_costs(shape, d) for d in ("bf16", "int8", "float32"))
    layer = bf16.units[1]
    assert layer.name == "layer 0" and len(bf16.units) == 82 and bf16.num_layers == 80
    assert layer.kv_bytes_per_token == 2 * 8 * 128 * 2
    assert layer.matmul_flops_per_token == 2 * (855_654_400 - 2 * 8192)
    assert layer.attention_flops_per_context == 4 * 64 * 128
    assert int8.units[1].weight_bytes * 2 == layer.weight_bytes == fp32.units[1].weight_bytes // 2
    assert int8.units[1].kv_bytes_per_token == layer.kv_bytes_per_token  # 16-bit KV
    assert bf16.handoff_bytes_per_token == 2 * 8192 * 2


def test_unit_time_is_a_roofline() -> None:
    costs = model_costs(ModelShape.from_config(LLAMA3_70B_CONFIG))
    layer = costs.units[1]
    prefill_only = Workload(batch_size=1, prompt_tokens=4096, output_tokens=0)
    t = unit_time(layer, prefill_only, 989e12, 3350e9)
    flops = 4096 * layer.matmul_flops_per_token + layer.attention_flops_per_context * 4096**2 / 2
    assert t == pytest.approx(flops / 989e12)  # long prefill: compute-bound
    one_step = Workload(batch_size=1, prompt_tokens=1, output_tokens=1)
    decode = unit_time(layer, one_step, 989e12, 3350e9) - unit_time(
        layer, Workload(1, 1, 0), 989e12, 3350e9)
    assert decode == pytest.approx((layer.weight_bytes + 1.5 * layer.kv_bytes_per_token) / 3350e9)


@pytest.mark.parametrize(("config", "field"), [
    ({**SMALL_CONFIG, "hidden_size": 0}, "config.hidden_size"),
    ({k: v for k, v in SMALL_CONFIG.items() if k != "vocab_size"}, "config.vocab_size"),
    ({**SMALL_CONFIG, "num_key_value_heads": 5}, "config.num_key_value_heads"),
    ({**SMALL_CONFIG, "torch_dtype": "float8"}, "config.torch_dtype: unknown dtype 'float8'"),
])
def test_bad_config_names_the_key(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        ModelShape.from_config(config)


def test_link_type_table() -> None:
    assert link_for_kind("NV18").bandwidth_gbps == 18 * LINK_TYPES["NV"].bandwidth_gbps == 450
    assert link_for_kind("nv4").bandwidth_gbps == 100
    speeds = [link_for_kind(k).bandwidth_gbps for k in ("PIX", "PXB", "PHB", "NODE", "SYS")]
    assert speeds == sorted(speeds, reverse=True)
    with pytest.raises(ValueError, match="unknown link type 'QPI'"):
        link_for_kind("QPI")


def test_parse_dgx_topology() -> None:
    topo = parse_nvidia_smi_topo(DGX_TOPO)
    assert topo.gpu_ids == tuple(range(8))
    assert all(topo.kinds[a][b] == ("X" if a == b else "NV18")
               for a in range(8) for b in range(8))
    cluster = cluster_from_topo(topo, {"memory_gb": 80, "tflops": 989})
    link = cluster.links[0][7]
    assert link is not None and link.bandwidth_gbps == 450 and link.kind == "NV18"


@pytest.mark.parametrize("spaces", [False, True])
def test_parse_pcie_topology(spaces: bool) -> None:
    text = PCIE_TOPO.expandtabs(8) if spaces else PCIE_TOPO
    topo = parse_nvidia_smi_topo(text)
    assert topo.gpu_ids == (0, 1, 2, 3)
    assert topo.kinds[0] == ("X", "PIX", "SYS", "SYS")
    assert topo.kinds[3] == ("SYS", "SYS", "PIX", "X")


@pytest.mark.parametrize(("text", "message"), [
    ("nothing here", "no header row"),
    (PCIE_TOPO.replace("GPU1\tPIX\t X \tSYS", "GPU1\tPIX\tPIX\tSYS"), "GPU1 to GPU1 is 'PIX'"),
    (PCIE_TOPO.replace("GPU2\tSYS\tSYS", "GPU2\tSYS\tQPI"), "GPU2 to GPU1: unknown link type"),
    (PCIE_TOPO.replace("GPU3\tSYS\tSYS\tPIX\t X \t", "GPU3\tSYS\t"),
     "GPU3 to GPU1: unknown link type '16-31,48-63'"),
    ("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tNV4\n", "row GPU1 has fewer than 2 entries"),
])
def test_bad_topology_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_nvidia_smi_topo(text)


def small_cluster(memory_gb: float = 0.25, matrix: list[list[Any]] | None = None,
                  count: int = 4) -> dict[str, Any]:
    gpus = [{"id": i, "memory_gb": memory_gb, "tflops": 100, "mem_bw_gbps": 1000}
            for i in range(count)]
    links: dict[str, Any] = {"default": {"bandwidth_gbps": 25, "latency_us": 10}}
    if matrix is not None:
        links["matrix"] = matrix
    return {"gpus": gpus, "links": links}


def test_cluster_from_yaml_structure() -> None:
    data = small_cluster(matrix=[["X", "NV4", "SYS", {"bandwidth_gbps": 5, "latency_us": 50}],
                                 ["NV4", "X", "SYS", "SYS"], ["SYS", "SYS", "X", "PIX"],
                                 ["NET", "SYS", "PIX", "X"]])
    data["links"]["link_types"] = {"NET": {"bandwidth_gbps": 50, "latency_us": 3}}
    cluster = cluster_from_dict(data)
    assert [g.id for g in cluster.gpus] == [0, 1, 2, 3]
    assert cluster.links[0][1].bandwidth_gbps == 100  # type: ignore[union-attr]
    assert cluster.links[0][3].bandwidth_gbps == 5  # type: ignore[union-attr]
    assert cluster.links[3][0].bandwidth_gbps == 50  # type: ignore[union-attr]
    assert cluster.links[1][1] is None
    default_only = cluster_from_dict(small_cluster())
    assert default_only.links[2][1].latency_us == 10  # type: ignore[union-attr]
    assert cluster.gpus[0].free_bytes == int(0.25 * GIB)


@pytest.mark.parametrize(("data", "field"), [
    ({"gpus": []}, "cluster.gpus"),
    ({"gpus": [{"id": 0, "memory_gb": 8}]}, r"gpus\[0\]: memory_gb and tflops"),
    ({"gpus": [{"memory_gb": 8, "tflops": -1}]}, r"gpus\[0\].tflops"),
    ({"gpus": [{"memory_gb": 8, "tflops": 1, "used_gb": 9}]}, r"gpus\[0\].used_gb"),
    ({"gpus": [{"memory_gb": 8, "tflops": 1}] * 2}, "cluster.links: give a default"),
    ({**small_cluster(count=2), "links": {"matrix": [["X", "PIX"]]}}, "cluster.links.matrix"),
    ({**small_cluster(count=2), "links": {"matrix": [["X", "QPI"], ["PIX", "X"]]}},
     r"cluster.links.matrix\[0\]\[1\]: unknown link type"),
    ({**small_cluster(count=2), "links": {"default": {"bandwidth_gbps": 0}}},
     "cluster.links.default: bandwidth_gbps"),
    ({"gpus": [{"memory_gb": 8, "tflops": 1}], "extra": 1}, "cluster: unknown keys"),
])
def test_bad_cluster_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cluster_from_dict(data)


def small_spec(**overrides: Any) -> PlacementSpec:
    fields: dict[str, Any] = {
        "costs": model_costs(ModelShape.from_config(SMALL_CONFIG)),
        "cluster": cluster_from_dict(small_cluster()), "model_path": "/models/small",
        "workload": Workload(batch_size=1, prompt_tokens=16, output_tokens=16)}
    fields.update(overrides)
    return PlacementSpec(**fields)


def test_plan_maps_onto_sglang_pipeline_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.35 GiB of weights on 0.25 GiB GPUs: two stages. Only GPUs 1 and 3 share NVLink.
    slow = {"bandwidth_gbps": 1, "latency_us": 100}
    matrix = [["X" if a == b else ("NV12" if {a, b} == {1, 3} else slow) for b in range(4)]
              for a in range(4)]
    spec = small_spec(cluster=cluster_from_dict(small_cluster(matrix=matrix)), mode="lr")
    plan = plan_placement(spec)
    assert sorted(plan.memory_per_gpu) == [1, 3]
    assert [st.rank for st in plan.stages] == [0, 1]
    assert plan.stages[0].has_embedding and not plan.stages[0].has_lm_head
    assert plan.stages[1].has_lm_head and plan.stages[0].end_layer == plan.stages[1].first_layer
    partition = plan.launch.layer_partition
    assert sum(partition) == 8 and all(p >= 1 for p in partition)
    devices = ",".join(str(st.gpu_id) for st in plan.stages)
    assert plan.launch.command == (
        f"SGLANG_PP_LAYER_PARTITION={partition[0]},{partition[1]} CUDA_VISIBLE_DEVICES={devices} "
        "CUDA_DEVICE_ORDER=PCI_BUS_ID python -m sglang.launch_server --model-path /models/small "
        "--pp-size 2 --base-gpu-id 0 --gpu-id-step 1 --dtype bfloat16")
    for st in plan.stages:
        assert st.memory_bytes <= st.usable_bytes == int(0.9 * 0.25 * GIB)
    sglang_utils = pytest.importorskip("sglang.srt.distributed.utils")
    monkeypatch.setenv("SGLANG_PP_LAYER_PARTITION", ",".join(map(str, partition)))
    for st in plan.stages:
        assert sglang_utils.get_pp_indices(8, st.rank, 2) == (st.first_layer, st.end_layer)


def test_single_gpu_plan_has_no_partition_and_he_uses_fewest() -> None:
    spec = small_spec(cluster=cluster_from_dict(small_cluster(memory_gb=1.0)), mode="he")
    plan = plan_placement(spec)
    assert len(plan.stages) == 1 and plan.stages[0].end_layer == 8
    assert plan.launch.pp_size == 1
    assert "SGLANG_PP_LAYER_PARTITION" not in plan.launch.command
    assert plan.launch.command.startswith("CUDA_VISIBLE_DEVICES=0 ")
    as_json = json.loads(json.dumps(plan.as_dict()))
    assert as_json["stages"][0]["last_layer_exclusive"] == 8
    assert as_json["sglang"]["pp_size"] == 1 and as_json["num_gpus_total"] == 4


def test_tied_model_over_several_stages_warns() -> None:
    spec = small_spec(costs=model_costs(ModelShape.from_config(SMOLLM2_CONFIG)),
                      cluster=cluster_from_dict(small_cluster(memory_gb=0.2)))
    plan = plan_placement(spec)
    assert len(plan.stages) >= 2
    assert any("tied embeddings" in w for w in plan.warnings)


def test_infeasible_plan_names_the_constraint() -> None:
    spec = small_spec(cluster=cluster_from_dict(small_cluster(memory_gb=0.05)))
    with pytest.raises(InfeasibleError, match="alone needs|together need") as exc:
        plan_placement(spec)
    assert exc.value.constraint == "unit_memory"
    spec = small_spec(cluster=cluster_from_dict(small_cluster(memory_gb=0.11, count=3)))
    with pytest.raises(InfeasibleError, match="in total"):
        plan_placement(spec)


def body(**overrides: Any) -> dict[str, Any]:
    return {"model": SMALL_CONFIG, "cluster": small_cluster(), "mode": "helr", "weight": 0.5,
            "objective": "sum", "batch_size": 1, "prompt_tokens": 16, "output_tokens": 16,
            "headroom": 0.1, **overrides}


def test_plan_from_json() -> None:
    result = plan_from_json(body(model_path="/models/small"))
    assert result["num_gpus"] == 2 and result["mode"] == "helr"
    assert "--model-path /models/small" in result["sglang"]["command"]
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize(("overrides", "field"), [
    ({"model": None}, "model"), ({"model": "/no/such/folder"}, "model"),
    ({"model": {**SMALL_CONFIG, "vocab_size": "x"}}, "model: config.vocab_size"),
    ({"dtype": "fp8"}, "dtype"), ({"dtype": 3}, "dtype"),
    ({"cluster": {"gpus": [{"memory_gb": 1}]}}, "cluster.gpus"),
    ({"cluster": {"gpus": [{"memory_gb": 1, "tflops": 1}], "links": 3}}, "cluster.links"),
    ({"mode": "fast"}, "mode"), ({"weight": 2}, "weight"), ({"weight": "x"}, "weight"),
    ({"mode": "lr", "weight": 0.5}, "weight"), ({"objective": "max"}, "objective"),
    ({"batch_size": 0}, "batch_size"), ({"prompt_tokens": "8"}, "prompt_tokens"),
    ({"output_tokens": -1}, "output_tokens"), ({"headroom": 1.0}, "headroom"),
    ({"contention": -1}, "contention"), ({"colour": "red"}, "colour"),
])
def test_plan_from_json_bad_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(PlacementError, match=f"^{field}"):
        plan_from_json(body(**overrides))


def test_plan_from_json_missing_cluster() -> None:
    data = body()
    del data["cluster"]
    with pytest.raises(PlacementError, match="^cluster: required"):
        plan_from_json(data)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="plan-placement")
    add_placement_arguments(parser)
    return run_placement(parser.parse_args(argv))


@pytest.fixture
def files(tmp_path: Any) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMALL_CONFIG))
    import yaml

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(small_cluster()))
    (tmp_path / "bad.yaml").write_text("gpus: [1, 2\n")
    (tmp_path / "topo.txt").write_text(PCIE_TOPO)
    return {"model": str(model), "cluster": str(tmp_path / "cluster.yaml"),
            "bad": str(tmp_path / "bad.yaml"), "topo": str(tmp_path / "topo.txt")}


def test_cli_prints_plan_and_command(files: dict[str, str], capsys: Any) -> None:
    assert cli(["--model", files["model"], "--cluster", files["cluster"],
                "--prompt-tokens", "16", "--output-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "HELR plan: mode helr (weight 0.50), objective sum, 2 of 4 GPUs" in out
    assert "SGLANG_PP_LAYER_PARTITION=" in out and "--pp-size 2" in out


def test_cli_json_and_nvidia_smi_topo(files: dict[str, str], capsys: Any) -> None:
    assert cli(["--model", files["model"], "--nvidia-smi-topo", files["topo"],
                "--gpu-memory-gb", "0.25", "--gpu-tflops", "100", "--prompt-tokens", "16",
                "--output-tokens", "16", "--mode", "lr", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # two stages on one PCIe switch (PIX), not across sockets (SYS)
    assert sorted(result["memory_per_gpu"]) in (["0", "1"], ["2", "3"])


def test_cli_check(files: dict[str, str], capsys: Any) -> None:
    args = ["--model", files["model"], "--cluster", files["cluster"], "--check"]
    assert cli([*args, "--prompt-tokens", "16"]) == 0
    assert capsys.readouterr().out.startswith("feasible: 2 of 4 GPUs")
    assert cli([*args, "--batch-size", "64", "--prompt-tokens", "8192"]) == 1
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "largest GPU has" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--cluster", "/no/such.yaml"], "cluster: cannot read"),
    (["--cluster", "BAD"], "is not valid YAML"),
    (["--nvidia-smi-topo", "TOPO"], "gpu-memory-gb"),
    (["--nvidia-smi-topo", "/no/such.txt", "--gpu-memory-gb", "8", "--gpu-tflops", "1"],
     "nvidia-smi-topo: cannot read"),
    ([], "cluster: give --cluster"),
    (["--cluster", "CLUSTER", "--weight", "3"], "weight"),
])
def test_cli_bad_input_exits_2(files: dict[str, str], capsys: Any, args: list[str],
                               message: str) -> None:
    args = [{"BAD": files["bad"], "TOPO": files["topo"], "CLUSTER": files["cluster"]}.get(a, a)
            for a in args]
    assert cli(["--model", files["model"], *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_cli_missing_model_exits_2(files: dict[str, str], capsys: Any) -> None:
    assert cli(["--model", "/no/such/model", "--cluster", files["cluster"]]) == 2
    assert "model: cannot read /no/such/model" in capsys.readouterr().err


def test_workload_kv_reserve_and_workspace() -> None:
    work = Workload(batch_size=4, prompt_tokens=100, output_tokens=28)
    assert work.reserved_tokens == 4 * 128
    assert math.isclose(work.decode_context, 114.0)
    costs = model_costs(ModelShape.from_config(SMALL_CONFIG))
    width_bytes = (4 * 1024 + 2 * 4096) * 2
    assert work.activation_bytes(costs) == 400 * width_bytes
    long = Workload(batch_size=64, prompt_tokens=8192, prefill_chunk_tokens=4096)
    assert long.activation_bytes(costs) == 4096 * width_bytes  # one chunk, not the batch
    with pytest.raises(ValueError, match="^prefill_chunk_tokens"):
        Workload(prefill_chunk_tokens=0)
