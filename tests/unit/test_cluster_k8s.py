"""scripts.cluster.k8s: Kubernetes manifests from a cluster file.

Every object is validated offline against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` bundles (strict: unknown fields are errors). LeaderWorkerSet is a CRD
those schemas do not know: its two pod templates are validated as the PodTemplateSpec of a
Deployment, and its own top-level fields are checked by hand against the LWS v1 API
(``leaderworkerset.x-k8s.io/v1``: spec.replicas, spec.startupPolicy, spec.leaderWorkerTemplate
with size, restartPolicy, leaderTemplate, workerTemplate).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from scripts.cluster.k8s import (
    BOOTSTRAP_PORT_ANNOTATION,
    K8sError,
    dump_k8s,
    render_k8s,
)
from scripts.cluster.load import load_spec, parse_spec
from scripts.cluster.plan import build_plan
from scripts.cluster.slurm import render_slurm
from scripts.cluster.spec import SpecError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "scripts" / "cluster" / "examples"
K8S_VERSION = "1.30"
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def _raw(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "demo", "model": "smollm2", "namespace": "serving", "image": "bs:1",
        "nodes": [{"name": f"h{i}", "address": f"10.0.0.{i}"} for i in range(1, 5)],
        "router": {"node": "h1", "port": 30000},
        "kvstore": {"node": "h1", "backend": "tiered", "port": 30500},
        "workers": [{"name": "w", "nodes": ["h2", "h3"], "port": 31000}],
    }
    raw.update(overrides)
    return raw


def _pd(**decode: Any) -> dict[str, Any]:
    return _raw(workers=[
        {"name": "pre", "role": "prefill", "nodes": ["h1"], "port": 31000, "gpus": 2,
         "bootstrap_port": 9000},
        {"name": "dec", "role": "decode", "nodes": ["h2", "h3"], "nodes_per_replica": 2,
         "port": 31000, "gpus": 4, "dist_init_port": 32600, **decode}])


def _by(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def _templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        return [lwt["leaderTemplate"], lwt["workerTemplate"]]
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    return []


def _validate(obj: dict[str, Any]) -> None:
    if obj["kind"] != "LeaderWorkerSet":
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy",
                         "startupPolicy", "networkConfig"}
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
    assert spec["startupPolicy"] in ("LeaderCreated", "LeaderReady")
    lwt = spec["leaderWorkerTemplate"]
    assert set(lwt) <= {"leaderTemplate", "workerTemplate", "size", "restartPolicy",
                        "subGroupPolicy", "volumeClaimTemplates"}
    assert isinstance(lwt["size"], int) and lwt["size"] >= 1
    assert lwt["restartPolicy"] in ("RecreateGroupOnPodRestart", "RecreateGroupAfterStart",
                                    "None")
    for template in _templates(obj):
        wrapper = {"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": obj["metadata"]["name"]},
                   "spec": {"selector": {"matchLabels": template["metadata"]["labels"]},
                            "template": template}}
        kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)


# -- examples and determinism -----------------------------------------------------------------

@pytest.mark.parametrize("example", [
    "gpu-pd.yaml", "local-3node.yaml"])
def test_examples_load_and_render_in_every_form(example: str) -> None:
    spec = load_spec(str(EXAMPLES / example))
    units = build_plan(spec)  # ssh
    assert units and units[-1].name == "router"
    assert render_slurm(spec, units).startswith("#!/bin/bash\n")
    objs = list(yaml.safe_load_all(dump_k8s(spec)))
    assert objs == render_k8s(spec)
    for obj in objs:
        _validate(obj)


def test_example_gpu_pd_shape() -> None:
    objs = render_k8s(load_spec(str(EXAMPLES / "gpu-pd.yaml")))
    lws = _by(objs, "LeaderWorkerSet", "gpu-pd-decode")
    assert lws["spec"]["replicas"] == 2 and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert _by(objs, "Deployment", "gpu-pd-prefill")["spec"]["replicas"] == 2
    for obj in (lws, _by(objs, "Deployment", "gpu-pd-prefill")):
        for t in _templates(obj):
            sglang = t["spec"]["containers"][0]
            assert sglang["resources"]["limits"] == {"nvidia.com/gpu": "8"}
            assert sglang["resources"]["requests"] == {"nvidia.com/gpu": "8"}


def test_rendering_is_deterministic_across_processes() -> None:
    spec = parse_spec(_pd())
    text = dump_k8s(spec)
    assert dump_k8s(parse_spec(_pd())) == text
    code = ("import sys; from scripts.cluster.k8s import dump_k8s; "
            "from scripts.cluster.load import load_spec; "
            "sys.stdout.write(dump_k8s(load_spec(sys.argv[1])))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code, str(EXAMPLES / "gpu-pd.yaml")],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert other.stdout == dump_k8s(load_spec(str(EXAMPLES / "gpu-pd.yaml")))


def test_key_order_is_fixed() -> None:
    objs = render_k8s(parse_spec(_pd()))
    for obj in objs:
        keys = list(obj)
        assert keys[:3] == ["apiVersion", "kind", "metadata"]
        assert list(obj["metadata"])[:2] == ["name", "namespace"]
    text = dump_k8s(parse_spec(_pd()))
    first = text.split("\n---\n")[0].splitlines()
    assert first[1:3] == ["apiVersion: v1", "kind: ServiceAccount"]


# -- schema validity, names, namespace --------------------------------------------------------

@pytest.mark.parametrize("raw", [
    _raw(), _raw(kvstore=None), _pd(),
    _raw(kvstore={"node": "h1", "port": 30500, "ssd_dir": "/mnt/kv", "ssd_gb": 2.5,
                  "memory_gb": 0.5}),
    _raw(workers=[{"name": "w", "nodes": ["h2"], "cpus": "0-3,6", "gpus": 1}]),
], ids=["tiered", "no-kvstore", "pd-lws", "tiered-ssd", "cpus-gpus"])
def test_every_object_validates_against_the_schemas(raw: dict[str, Any]) -> None:
    for obj in render_k8s(parse_spec(raw)):
        _validate(obj)


def test_the_validation_catches_mistakes() -> None:
    """Guards the guard: strict validation rejects an unknown field and a wrong type."""
    deployment = _by(render_k8s(parse_spec(_raw())), "Deployment", "demo-w")
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    lws = _by(render_k8s(parse_spec(_pd())), "LeaderWorkerSet", "demo-dec")
    lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0][
        "ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(lws)


def test_names_namespace_and_labels() -> None:
    objs = render_k8s(parse_spec(_pd()))
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert names == {("ServiceAccount", "demo-router"), ("Role", "demo-router"),
                     ("RoleBinding", "demo-router"), ("Deployment", "demo-router"),
                     ("Service", "demo-router"), ("Deployment", "demo-kvstore"),
                     ("Service", "demo-kvstore"), ("Deployment", "demo-pre"),
                     ("LeaderWorkerSet", "demo-dec")}
    for obj in objs:
        assert DNS_LABEL.match(obj["metadata"]["name"])
        assert obj["metadata"]["namespace"] == "serving"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "banaserve"
        assert obj["metadata"]["labels"]["banaserve.io/cluster"] == "demo"
        for t in _templates(obj):
            assert all(c["image"] == "bs:1" for c in t["spec"]["containers"])


def test_long_names_are_refused() -> None:
    name = "c" * 42
    raw = {**_pd(), "name": name}
    raw["workers"][1]["name"] = "decode"  # LWS: 49 characters leave no room for its suffixes
    with pytest.raises(K8sError, match=r"^workers\[1\]\.name"):
        render_k8s(parse_spec(raw))
    raw = {**_raw(), "name": name}
    raw["workers"][0]["name"] = "w" * 21  # a Deployment: up to 63
    with pytest.raises(K8sError, match=r"^workers\[0\]\.name"):
        render_k8s(parse_spec(raw))
    raw["workers"][0]["name"] = "w" * 20
    render_k8s(parse_spec(raw))


# -- router -----------------------------------------------------------------------------------

def _router_argv(objs: list[dict[str, Any]], cluster: str = "demo") -> list[str]:
    deployment = _by(objs, "Deployment", f"{cluster}-router")
    return deployment["spec"]["template"]["spec"]["containers"][0]["command"]


def _selects(selector: list[str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (pair.split("=", 1) for pair in selector))


def _flag_values(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


def test_router_discovers_regular_workers_by_label() -> None:
    objs = render_k8s(parse_spec(_raw()))
    argv = _router_argv(objs)
    assert argv[:4] == ["python", "-m", "router", "--service-discovery"]
    selector = _flag_values(argv, "--selector")
    assert selector == ["app.kubernetes.io/name=banaserve", "banaserve.io/cluster=demo",
                        "banaserve.io/role=worker"]
    assert _flag_values(argv, "--service-discovery-namespace") == ["serving"]
    assert _flag_values(argv, "--service-discovery-port") == ["31000"]
    assert _flag_values(argv, "--port") == ["30000"]
    assert _flag_values(argv, "--policy") == ["cost_aware"]
    # one tiered store for every worker: the router prices what it holds
    assert _flag_values(argv, "--kvstore") == ["demo-kvstore:30500"]
    assert "--kvstore" not in _router_argv(render_k8s(parse_spec(_raw(kvstore=None))))
    labels = _by(objs, "Deployment", "demo-w")["spec"]["template"]["metadata"]["labels"]
    assert _selects(selector, labels)
    assert not _selects(selector, _by(objs, "Deployment", "demo-kvstore")["spec"]["template"]
                        ["metadata"]["labels"])


def test_router_pd_selectors_pick_exactly_the_serving_pods() -> None:
    objs = render_k8s(parse_spec(_pd()))
    argv = _router_argv(objs)
    assert "--selector" not in argv
    prefill = _flag_values(argv, "--prefill-selector")
    decode = _flag_values(argv, "--decode-selector")
    pre = _by(objs, "Deployment", "demo-pre")["spec"]["template"]
    leader, rank = _templates(_by(objs, "LeaderWorkerSet", "demo-dec"))
    assert _selects(prefill, pre["metadata"]["labels"])
    assert not _selects(decode, pre["metadata"]["labels"])
    assert _selects(decode, leader["metadata"]["labels"])
    # ranks 1.. of a multi-node replica serve no API: the router must not see them
    assert not _selects(decode, rank["metadata"]["labels"])
    assert not _selects(prefill, rank["metadata"]["labels"])
    assert pre["metadata"]["annotations"][BOOTSTRAP_PORT_ANNOTATION] == "9000"


def test_router_command_parses_with_the_router_cli() -> None:
    router_main = pytest.importorskip("router.__main__")
    try:
        from router.config import DiscoveryConfig  # noqa: F401
    except ImportError:
        pytest.skip("the router has no service discovery yet")
    for raw, pd in ((_raw(), False), (_pd(), True)):
        cfg = router_main.parse_args(_router_argv(render_k8s(parse_spec(raw)))[3:])
        assert cfg.discovery is not None and cfg.discovery.pd_mode is pd
        assert cfg.discovery.namespace == "serving" and cfg.discovery.port == 31000


def test_router_deployment_rbac_probes_and_service() -> None:
    objs = render_k8s(parse_spec(_raw(router={"node": "h1", "port": 30100,
                                              "args": ["--max-retries", "3"]})))
    role = _by(objs, "Role", "demo-router")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    binding = _by(objs, "RoleBinding", "demo-router")
    assert binding["subjects"][0]["name"] == "demo-router"
    assert binding["roleRef"]["name"] == "demo-router"
    template = _by(objs, "Deployment", "demo-router")["spec"]["template"]
    assert template["spec"]["serviceAccountName"] == "demo-router"
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "30100",
        "prometheus.io/path": "/metrics"}
    container = template["spec"]["containers"][0]
    assert container["command"][-2:] == ["--max-retries", "3"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # /health fails while no worker is up; liveness must not restart the router for that
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert container["ports"] == [{"name": "http", "containerPort": 30100, "protocol": "TCP"}]
    service = _by(objs, "Service", "demo-router")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == 30100
    assert service["spec"]["selector"] == template["metadata"]["labels"]


# -- workers ----------------------------------------------------------------------------------

def _sglang(template: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in template["spec"]["containers"] if c["name"] == "sglang")


def test_worker_deployment() -> None:
    raw = _raw(sglang_args={"all": ["--page-size", "32"]},
               workers=[{"name": "w", "nodes": ["h2", "h3"], "replicas": 3, "port": 31000,
                         "args": ["--chunked-prefill-size", "512"]}])
    deployment = _by(render_k8s(parse_spec(raw)), "Deployment", "demo-w")
    assert deployment["spec"]["replicas"] == 3
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    assert template["metadata"]["labels"]["banaserve.io/worker-role"] == "regular"
    assert template["metadata"]["labels"]["banaserve.io/group"] == "w"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "31000"
    assert BOOTSTRAP_PORT_ANNOTATION not in template["metadata"]["annotations"]
    c = _sglang(template)
    assert c["command"] == [
        "python", "-m", "runtime_patches.launch", "--model", "smollm2", "--host", "0.0.0.0",
        "--port", "31000", "--ready-timeout", "1800", "--kvstore", "demo-kvstore:30500",
        "--", "--page-size", "32", "--chunked-prefill-size", "512"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # model load
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] > (
        c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"])
    assert "resources" not in c  # CPU, no cpus: nothing to request
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in template["spec"]["volumes"]


def test_worker_command_parses_with_the_launcher() -> None:
    from runtime_patches.launch import _parse

    objs = render_k8s(parse_spec(_pd(args=["--tp-size", "8"])))
    leader, rank = _templates(_by(objs, "LeaderWorkerSet", "demo-dec"))
    args, extra = _parse(_sglang(leader)["command"][3:])
    assert (args.host, args.port, args.kvstore) == ("0.0.0.0", 31000, "demo-kvstore:30500")
    assert extra == ["--tp-size", "8", "--disaggregation-mode", "decode", "--nnodes", "2",
                     "--node-rank", "0", "--dist-init-addr", "$(LWS_LEADER_ADDRESS):32600"]
    _, extra = _parse(_sglang(rank)["command"][3:])
    assert extra[-4:] == ["--node-rank", "$(LWS_WORKER_INDEX)",
                          "--dist-init-addr", "$(LWS_LEADER_ADDRESS):32600"]
    pre = _by(objs, "Deployment", "demo-pre")["spec"]["template"]
    _, extra = _parse(_sglang(pre)["command"][3:])
    assert extra == ["--disaggregation-mode", "prefill",
                     "--disaggregation-bootstrap-port", "9000"]


def test_multi_node_group_is_a_leader_worker_set() -> None:
    lws = _by(render_k8s(parse_spec(_pd(replicas=3))), "LeaderWorkerSet", "demo-dec")
    spec = lws["spec"]
    assert spec["replicas"] == 3
    assert spec["startupPolicy"] == "LeaderCreated"  # LeaderReady would never be ready
    lwt = spec["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    leader, rank = lwt["leaderTemplate"], lwt["workerTemplate"]
    assert leader["metadata"]["labels"]["banaserve.io/role"] == "worker"
    assert rank["metadata"]["labels"]["banaserve.io/role"] == "worker-rank"
    assert {p["name"] for p in _sglang(leader)["ports"]} == {"http", "dist-init"}
    assert {p["name"] for p in _sglang(rank)["ports"]} == {"http"}
    for t in (leader, rank):
        c = _sglang(t)
        assert c["resources"]["limits"] == {"nvidia.com/gpu": "4"}
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # ranks 1.. serve it too


def test_prefill_pods_carry_their_bootstrap_port() -> None:
    pre = _by(render_k8s(parse_spec(_pd())), "Deployment", "demo-pre")["spec"]["template"]
    assert pre["metadata"]["annotations"][BOOTSTRAP_PORT_ANNOTATION] == "9000"
    assert {"name": "bootstrap", "containerPort": 9000, "protocol": "TCP"} in (
        _sglang(pre)["ports"])


def test_bootstrap_annotation_is_the_one_the_router_reads() -> None:
    config = pytest.importorskip("router.config")
    if not hasattr(config, "BOOTSTRAP_PORT_ANNOTATION"):
        pytest.skip("the router has no service discovery yet")
    assert config.BOOTSTRAP_PORT_ANNOTATION == BOOTSTRAP_PORT_ANNOTATION


def test_cpus_become_a_cpu_request() -> None:
    raw = _raw(workers=[{"name": "w", "nodes": ["h2"], "cpus": "0-3,6"}])
    c = _sglang(_by(render_k8s(parse_spec(raw)), "Deployment", "demo-w")["spec"]["template"])
    assert c["resources"] == {"requests": {"cpu": "5"}, "limits": {"cpu": "5"}}
    assert "--cpus" not in c["command"]


# -- KV store ---------------------------------------------------------------------------------

def test_tiered_store() -> None:
    raw = _raw(kvstore={"node": "h1", "port": 30500, "memory_gb": 2, "ssd_dir": "/mnt/kv",
                        "ssd_gb": 8, "layerwise": True})
    objs = render_k8s(parse_spec(raw))
    template = _by(objs, "Deployment", "demo-kvstore")["spec"]["template"]
    c = template["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "kvstore", "--host", "0.0.0.0", "--port", "30500",
                            "--http-port", "30501", "--memory-gb", "2", "--ssd-dir", "/mnt/kv",
                            "--ssd-gb", "8"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/stats", "port": "http"}
    assert {"name": "http", "containerPort": 30501, "protocol": "TCP"} in c["ports"]
    assert c["volumeMounts"] == [{"name": "ssd", "mountPath": "/mnt/kv"}]
    assert template["spec"]["volumes"] == [{"name": "ssd", "emptyDir": {"sizeLimit": "8Gi"}}]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "30501"
    service = _by(objs, "Service", "demo-kvstore")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("kv", 30500), ("http", 30501)]
    worker = _by(objs, "Deployment", "demo-w")["spec"]["template"]
    assert _sglang(worker)["command"][11:14] == ["--kvstore", "demo-kvstore:30500",
                                                 "--kvstore-layerwise"]
    (wait,) = worker["spec"]["initContainers"]
    assert wait["name"] == "wait-kvstore" and "http://demo-kvstore:30501/stats" in (
        wait["command"][-1])


def test_tiered_store_command_parses_with_the_kvstore_cli() -> None:
    from kvstore.__main__ import parse_args

    raw = _raw(kvstore={"node": "h1", "port": 30500, "memory_gb": 0.5, "ssd_dir": "/mnt/kv",
                        "ssd_gb": 2.5})
    c = _by(render_k8s(parse_spec(raw)), "Deployment", "demo-kvstore")["spec"]["template"][
        "spec"]["containers"][0]
    store, server, _ = parse_args(c["command"][3:])
    assert (server.host, server.port, server.http_port) == ("0.0.0.0", 30500, 30501)
    assert store.memory_bytes == 1 << 29 and store.ssd_dir == "/mnt/kv"


def test_no_store_no_store_objects() -> None:
    objs = render_k8s(parse_spec(_raw(kvstore=None)))
    assert not [o for o in objs if "kvstore" in o["metadata"]["name"]]
    worker = _by(objs, "Deployment", "demo-w")["spec"]["template"]
    assert "initContainers" not in worker["spec"]
    assert "--kvstore" not in _sglang(worker)["command"]


def test_mooncake_store_master_and_sidecars() -> None:
    from kvstore.backends.mooncake import mooncake_master_command

    raw = _pd()
    raw["kvstore"] = {"node": "h1", "backend": "mooncake", "port": 30500,
                      "mooncake": {"master_port": 50051, "metadata_port": 8080,
                                   "segment_gb": 0.5}}
    objs = render_k8s(parse_spec(raw))
    master = _by(objs, "Deployment", "demo-mooncake-master")["spec"]["template"]
    assert master["spec"]["containers"][0]["command"] == mooncake_master_command(
        rpc_port=50051, metadata_port=8080, metrics_port=9003, host="0.0.0.0",
        binary="mooncake_master")
    assert master["metadata"]["annotations"]["prometheus.io/port"] == "9003"
    service = _by(objs, "Service", "demo-mooncake-master")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("rpc", 50051), ("metadata", 8080), ("metrics", 9003)]
    assert not [o for o in objs if o["metadata"]["name"] == "demo-kvstore"]
    pods = (_templates(_by(objs, "Deployment", "demo-pre"))
            + _templates(_by(objs, "LeaderWorkerSet", "demo-dec")))
    for t in pods:
        (sidecar,) = t["spec"]["initContainers"]
        assert sidecar["restartPolicy"] == "Always"  # a native sidecar, ready before sglang
        cmd = sidecar["command"]
        assert cmd[cmd.index("--mooncake-master") + 1] == "demo-mooncake-master:50051"
        assert cmd[cmd.index("--mooncake-local-host") + 1] == "$(POD_IP)"
        assert cmd[cmd.index("--mooncake-segment-bytes") + 1] == str(1 << 29)
        assert cmd[cmd.index("--mooncake-master-metrics") + 1] == \
            "http://demo-mooncake-master:9003/metrics"
        assert sidecar["startupProbe"]["httpGet"] == {"path": "/stats", "port": "kv-http"}
        c = _sglang(t)
        assert c["command"][c["command"].index("--kvstore") + 1] == "127.0.0.1:30500"
    for obj in objs:
        _validate(obj)


# -- what cannot be expressed -----------------------------------------------------------------

def test_groups_on_different_ports_are_refused() -> None:
    raw = _pd()
    raw["workers"][1]["port"] = 31500
    with pytest.raises(K8sError, match=r"^workers\[1\]\.port: 31500 differs"):
        render_k8s(parse_spec(raw))


def test_layer_hosts_are_refused() -> None:
    raw = _raw(workers=[{"name": "w", "nodes": ["h2"], "layer_host_port": 33000}])
    with pytest.raises(K8sError, match=r"^workers\[0\]\.layer_host_port"):
        render_k8s(parse_spec(raw))


def test_a_spec_without_nodes_needs_replicas() -> None:
    raw = _raw(nodes=[], kvstore=None, workers=[{"name": "w", "nodes": [], "port": 31000}])
    with pytest.raises(K8sError, match=r"^workers\[0\]\.replicas"):
        render_k8s(parse_spec(raw))
    raw["workers"][0]["replicas"] = 2
    assert _by(render_k8s(parse_spec(raw)), "Deployment", "demo-w")["spec"]["replicas"] == 2


def test_k8s_errors_are_spec_errors() -> None:
    """The cluster CLI prints a SpecError as one line; K8sError must be one."""
    assert issubclass(K8sError, SpecError)
