"""The cluster description (scripts/cluster/spec.py), its plan (plan.py) and SSH scripts."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import yaml

from scripts.cluster.load import load_spec, parse_spec
from scripts.cluster.plan import build_plan, endpoints, router_args
from scripts.cluster.spec import SpecError
from scripts.cluster.ssh import SSHOptions, probe_script, ssh_argv, start_script, stop_script

BASE: dict[str, Any] = {
    "name": "demo", "model": "tiny", "workdir": "/opt/bana", "log_dir": "/var/log/bana",
    "nodes": [{"name": "h1", "address": "10.0.0.1"}, {"name": "h2", "address": "10.0.0.2"},
              {"name": "h3", "address": "10.0.0.3", "user": "ops", "port": 2222,
               "ssh_key": "/k", "ssh_options": ["ProxyJump=bastion"]}],
    "router": {"node": "h1", "port": 30000},
    "kvstore": {"node": "h1", "backend": "tiered", "port": 30500},
    "workers": [{"name": "w", "nodes": ["h2", "h3"], "port": 31000}],
}


def spec_with(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def error(raw: Any) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    return str(e.value)


def test_a_valid_file_parses_with_defaults() -> None:
    spec = parse_spec(BASE)
    assert spec.router.policy == "cost_aware"
    assert spec.kvstore is not None and spec.kvstore.memory_gb == 1.0
    assert spec.workers[0].num_replicas == 2 and spec.workers[0].role == "regular"
    assert spec.node("h3").ssh_options == ("ProxyJump=bastion",)


@pytest.mark.parametrize(("change", "field"), [
    ({"name": "Bad_Name"}, "name:"),
    ({"model": 3}, "model: must be str"),
    ({"router": {"node": "h9"}}, "router.node: unknown node 'h9'"),
    ({"router": {"node": "h1", "port": 70000}}, "router.port: must be a TCP port"),
    ({"router": {"node": "h1", "colour": 1}}, "router.colour: unknown field"),
    ({"kvstore": {"node": "h1", "backend": "redis"}}, "kvstore.backend: 'redis'"),
    ({"kvstore": {"node": "h1", "backend": "mooncake", "ssd_dir": "/x"}}, "kvstore.ssd_dir"),
    ({"kvstore": {"node": "h1", "mooncake": {"segment_gb": "big"}}},
     "kvstore.mooncake.segment_gb: must be float"),
    ({"workers": []}, "workers: needs at least one"),
    ({"workers": [{"name": "w", "nodes": ["h2", "h7"]}]}, "workers[0].nodes[1]: unknown node"),
    ({"workers": [{"name": "w", "nodes": ["h2", "h3", "h1"], "nodes_per_replica": 2}]},
     "workers[0].nodes: 3 nodes is not a multiple"),
    ({"workers": [{"name": "w", "nodes": ["h2"], "role": "prefill"}]},
     "workers: prefill/decode disaggregation needs both"),
    ({"workers": [{"name": "w", "nodes": ["h2"], "args": ["--port", "1"]}]},
     "workers[0].args[0]: --port is set by the launcher"),
    ({"workers": [{"name": "w", "nodes": ["h2"], "args": "--foo"}]},
     "workers[0].args: must be a list"),
    ({"workers": [{"name": "w", "nodes": ["h1"], "port": 30000}]},
     "workers[0].port (replica 0): port 30000 on node 'h1' is also router.port"),
    ({"workers": [{"name": "w", "nodes": ["h2"]}, {"name": "w", "nodes": ["h3"]}]},
     "workers[1].name: duplicate"),
    ({"sglang_args": {"decoder": []}}, "sglang_args.decoder: unknown role"),
    ({"nodes": [{"name": "h1"}]}, "nodes[0].address: is required"),
    ({"routr": {}}, "routr: unknown field"),
    ({"nodes": [{"name": "h1", "address": "a", "env": {"BAD-NAME": "x"}}]},
     "nodes[0].env.BAD-NAME: is not an environment variable name"),
    ({"nodes": [{"name": "h1", "address": "a", "env": {"X": [1]}}]}, "nodes[0].env.X: must be"),
    ({"workers": [{"name": "w", "nodes": ["h2", "h3"], "nodes_per_replica": 2, "pp_size": 3}]},
     "workers[0].pp_size: must be 1 or a multiple of nodes_per_replica=2"),
])
def test_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    assert field in error(spec_with(**change))


def test_load_spec_reports_bad_yaml_and_missing_files(tmp_path: Any) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(bad))
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="cluster: must be a mapping"):
        load_spec(str(bad))


def test_the_plan_is_deterministic_and_in_stage_order() -> None:
    a, b = build_plan(parse_spec(BASE)), build_plan(parse_spec(copy.deepcopy(BASE)))
    assert a == b
    assert [u.name for u in a] == ["kvstore", "w-0", "w-1", "router"]
    assert [u.stage for u in a] == sorted(u.stage for u in a)
    w1 = a[2]
    assert w1.node == "h3" and "--port" in w1.argv and w1.argv[w1.argv.index("--port") + 1] \
        == "31001"
    assert w1.argv[w1.argv.index("--kvstore") + 1] == "10.0.0.1:30500"
    assert w1.ready_url == "http://10.0.0.3:31001/health"
    assert a[-1].argv[3:6] == ("--workers", "http://10.0.0.2:31000", "http://10.0.0.3:31001")
    router = a[-1].argv
    assert router[router.index("--kvstore") + 1] == "10.0.0.1:30500"  # priced by the router


def test_mooncake_puts_a_store_on_every_worker_node_behind_one_master() -> None:
    spec = parse_spec(spec_with(kvstore={"node": "h1", "backend": "mooncake"}))
    units = {u.name: u for u in build_plan(spec)}
    assert units["mooncake-master"].node == "h1" and units["mooncake-master"].stage == 0
    for node in ("h2", "h3"):
        store = units[f"kvstore-{node}"]
        assert store.node == node and "--mooncake-master" in store.argv
        assert store.argv[store.argv.index("--mooncake-master") + 1] == "10.0.0.1:50051"
    w0 = units["w-0"]
    assert w0.argv[w0.argv.index("--kvstore") + 1] == "127.0.0.1:30500"
    assert "--kvstore" not in units["router"].argv  # a server per node: none to ask


def test_multi_node_replicas_and_disaggregation() -> None:
    spec = parse_spec(spec_with(
        nodes=[{"name": f"h{i}", "address": f"10.0.0.{i}"} for i in range(1, 6)],
        kvstore=None,
        workers=[{"name": "pre", "role": "prefill", "nodes": ["h1"], "port": 31000},
                 {"name": "dec", "role": "decode", "nodes": ["h2", "h3", "h4", "h5"],
                  "nodes_per_replica": 2, "port": 31100}],
        sglang_args={"all": ["--mem-fraction-static", "0.8"], "decode": ["--cuda-graph-max-bs",
                                                                         "64"]}))
    units = {u.name: u for u in build_plan(spec)}
    assert set(units) == {"pre-0", "dec-0-rank0", "dec-0-rank1", "dec-1-rank0", "dec-1-rank1",
                          "router"}
    r1 = units["dec-1-rank1"].argv
    extra = r1[r1.index("--") + 1:]
    assert extra == ("--mem-fraction-static", "0.8", "--cuda-graph-max-bs", "64",
                     "--disaggregation-mode", "decode", "--nnodes", "2", "--node-rank", "1",
                     "--dist-init-addr", "10.0.0.4:32501")
    assert units["dec-1-rank1"].ready_url is None and units["dec-1-rank1"].node == "h5"
    assert "--disaggregation-bootstrap-port" in units["pre-0"].argv
    assert [e.url for e in endpoints(spec)] == ["http://10.0.0.1:31000", "http://10.0.0.2:31100",
                                                "http://10.0.0.4:31101"]
    assert router_args(spec) == ["--prefill", "http://10.0.0.1:31000", "8998",
                                 "--decode", "http://10.0.0.2:31100",
                                 "--decode", "http://10.0.0.4:31101"]


def test_layer_hosts_name_every_other_replica() -> None:
    spec = parse_spec(spec_with(workers=[{"name": "w", "nodes": ["h2", "h3"],
                                          "layer_host_port": 32000}]))
    w0 = next(u for u in build_plan(spec) if u.name == "w-0").argv
    assert w0[w0.index("--layer-host-port") + 1] == "32000"
    assert w0[w0.index("--layer-host") + 1] == "w-1=10.0.0.3:32001"
    assert w0.count("--layer-host") == 1


def test_ssh_command_puts_the_nodes_options_first() -> None:
    spec = parse_spec(BASE)
    argv = ssh_argv(spec.node("h3"), SSHOptions())
    assert argv[:3] == ["ssh", "-o", "ProxyJump=bastion"]
    assert argv[-4:] == ["-l", "ops", "10.0.0.3", "bash", "-s"] or argv[-3:] == [
        "10.0.0.3", "bash", "-s"]
    assert "2222" in argv and "/k" in argv


def test_remote_scripts_are_valid_bash_and_tag_the_process() -> None:
    spec = parse_spec(BASE)
    for unit in build_plan(spec):
        for script in (start_script(spec, unit), probe_script(spec, unit),
                       stop_script(spec, unit, 5)):
            done = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
            assert done.returncode == 0, (script, done.stderr)
        assert f"BANASERVE_UNIT=demo/{unit.name}" in start_script(spec, unit)


def test_the_cli_prints_one_line_for_a_bad_file(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec_with(router={"node": "h9"})))
    done = subprocess.run([sys.executable, "-m", "scripts.launch_cluster", "plan", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "launch_cluster: router.node: unknown node 'h9'; nodes: h1, h2, h3"]


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    done = subprocess.run([sys.executable, "-m", "scripts.launch_cluster", "up", str(path),
                           "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name, node in (("kvstore", "h1"), ("w-0", "h2"), ("w-1", "h3"), ("router", "h1")):
        assert f"{name} on {node}: would start" in done.stdout
    assert done.stdout.count("ssh -o") == 4


def test_launch_knows_the_node_rank_of_a_multi_node_replica() -> None:
    from runtime_patches.launch import node_rank

    assert node_rank([]) == 0
    assert node_rank(["--nnodes", "2", "--node-rank", "1"]) == 1
    assert node_rank(["--node-rank=3"]) == 3


def test_a_nodes_env_reaches_every_unit_on_it_and_pp_size_the_launcher() -> None:
    raw = spec_with(workers=[{"name": "w", "nodes": ["h2", "h3"], "nodes_per_replica": 2,
                              "pp_size": 2}])
    raw["nodes"][1]["env"] = {"GLOO_SOCKET_IFNAME": "eth1", "OMP_NUM_THREADS": 4}
    units = {u.name: u for u in build_plan(parse_spec(raw))}
    assert units["w-0-rank0"].env == (("GLOO_SOCKET_IFNAME", "eth1"), ("OMP_NUM_THREADS", "4"))
    assert units["w-0-rank1"].env == () and units["router"].env == ()
    argv = units["w-0-rank1"].argv
    assert argv[argv.index("--pp-size") + 1] == "2"
    assert "GLOO_SOCKET_IFNAME=eth1" in start_script(parse_spec(raw), units["w-0-rank0"])

