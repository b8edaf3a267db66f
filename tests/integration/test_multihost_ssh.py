"""A real multi-host cluster on one machine: the SSH launcher across network-namespace hosts.

Three hosts (``tests/integration/netns_hosts.py``: network namespaces on a private bridge, an SSH
server each). ``python -m scripts.launch_cluster up`` reads one cluster file and, over SSH, starts
the Mooncake master and the router on h1, a Mooncake-backed kvstore server and a CPU SGLang
worker (tiny model) on each of h2 and h3. Then:

- a chat completion is answered through the router on h1 (from the launch machine's namespace);
- a prompt computed on h2's worker is loaded by h3's worker from the KV store, layer by layer
  (``kvstore.layerwise``): the pages crossed from h2 to h3 through Mooncake Store (SGLang's
  ``cached_tokens_details`` shows the storage hit, the greedy output is identical, h2's server
  counts the puts and h3's the hits);
- ``up`` again starts nothing (every unit already running); ``status`` says all ready;
- ``down`` stops every unit, and no process but sshd is left in any namespace;
- a second cluster file puts one replica across h2 and h3 (SGLang ``--nnodes 2``, two pipeline
  ranks, gloo between the hosts): same greedy output as a single-host replica on h1.

Skips with the reason where namespaces cannot be made (not root, no ``ip``, no sshd).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.netns_hosts import NetnsHosts, skip_reason

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND = os.environ.get("BANASERVE_TEST_MULTIHOST_KVSTORE", "mooncake")

_why = skip_reason()
if _why:
    pytest.skip(f"multi-host test needs network namespaces: {_why}", allow_module_level=True)


def _nodes(hosts: NetnsHosts, gloo_interface: bool = False) -> str:
    """The cluster file's ``nodes:`` entries for the namespace hosts."""
    return "\n".join(
        f"  - {{name: {h.node}, address: {h.address}, ssh_key: {hosts.key}, user: root,\n"
        f"     ssh_options: [UserKnownHostsFile=/dev/null, StrictHostKeyChecking=no]"
        + (f",\n     env: {{GLOO_SOCKET_IFNAME: {h.interface}}}" if gloo_interface else "")
        + "}" for h in hosts.hosts)


def _cluster_file(hosts: NetnsHosts, log_dir: str) -> str:
    nodes = _nodes(hosts)
    text = f"""
name: netns-test
model: tiny
workdir: {ROOT}
python: {sys.executable}
log_dir: {log_dir}
nodes:
{nodes}
router: {{node: h1, port: 30000, args: [--health-interval, "1"]}}
kvstore:
  node: h1
  backend: {BACKEND}
  port: 30500
  layerwise: true
  mooncake: {{master_port: 50051, metadata_port: 8080, segment_gb: 0.25}}
workers:
  - name: w
    nodes: [h2, h3]
    port: 31000
sglang_args:
  all: [--page-size, "16", --enable-cache-report, --hicache-storage-prefetch-policy,
        wait_complete, --max-total-tokens, "2048"]
"""
    path = os.path.join(log_dir, "cluster.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scripts.launch_cluster", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsHosts]:
    subprocess.run([sys.executable, "-m", "runtime_patches.models", "prepare", "tiny"],
                   check=True, cwd=ROOT, capture_output=True)
    with NetnsHosts(3) as made:
        yield made


def _up(path: str) -> Iterator[str]:
    up = _cli("up", path)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        yield path
    finally:
        down = _cli("down", path, timeout=300)
        print(down.stdout, down.stderr)


@pytest.fixture(scope="module")
def cluster(hosts: NetnsHosts) -> Iterator[tuple[NetnsHosts, str]]:
    log_dir = os.path.join(ROOT, "logs", "multihost")
    os.makedirs(log_dir, exist_ok=True)
    for path in _up(_cluster_file(hosts, log_dir)):
        yield hosts, path


def test_the_launcher_brought_up_every_unit_on_its_host(cluster: tuple[NetnsHosts, str]) -> None:
    hosts, path = cluster
    status = _cli("status", path, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    lines = {ln.split()[0]: ln.split()[1:] for ln in status.stdout.splitlines()}
    expected = {"router": "h1", "w-0": "h2", "w-1": "h3"}
    if BACKEND == "mooncake":
        expected.update({"mooncake-master": "h1", "kvstore-h2": "h2", "kvstore-h3": "h3"})
    else:
        expected["kvstore"] = "h1"
    assert set(lines) == set(expected)
    for unit, node in expected.items():
        assert lines[unit][0] == node and lines[unit][1] == "ready", status.stdout
    # each unit's process really lives in its host's namespace
    h2 = hosts.hosts[1]
    w0_pid = int(lines["w-0"][2])
    assert w0_pid in hosts.pids(h2)


def test_chat_completion_through_the_router(cluster: tuple[NetnsHosts, str]) -> None:
    router = "http://10.213.0.11:30000"
    workers = _get(router + "/workers")["workers"]
    assert sorted(w["url"] for w in workers) == ["http://10.213.0.12:31000",
                                                 "http://10.213.0.13:31001"]
    model = _get(router + "/v1/models")["data"][0]["id"]
    out = _post(router + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8, "temperature": 0})
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"]
    assert out["usage"]["completion_tokens"] > 0


def test_a_prefix_computed_on_h2_is_loaded_on_h3_from_the_store(
        cluster: tuple[NetnsHosts, str]) -> None:
    prompt = "def area(r):\n    return 3.14159 * r * r\n" * 30
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    first = _post("http://10.213.0.12:31000/generate", body)
    assert (first["meta_info"].get("cached_tokens_details") or {}).get("storage", 0) == 0
    stats_url = ("http://10.213.0.11:30501/stats" if BACKEND == "tiered" else None)
    deadline = time.monotonic() + 30
    second: dict[str, Any] = {}
    while time.monotonic() < deadline:  # h2 writes its pages behind the request
        time.sleep(1.0)
        second = _post("http://10.213.0.13:31001/generate", body)
        if (second["meta_info"].get("cached_tokens_details") or {}).get("storage", 0) > 0:
            break
        # a miss computed the prompt on h3 and cached it there; drop it before asking again
        _post("http://10.213.0.13:31001/flush_cache?timeout=30", {})
    storage = (second["meta_info"].get("cached_tokens_details") or {}).get("storage", 0)
    assert storage > 0, (second["meta_info"], stats_url)
    assert second["output_ids"] == first["output_ids"]
    if BACKEND == "mooncake":  # h2's server stored the pages, h3's server read them: Mooncake
        h2 = _get("http://10.213.0.12:30501/stats")["tiers"][0]
        h3 = _get("http://10.213.0.13:30501/stats")["tiers"][0]
        assert h2["name"] == h3["name"] == "mooncake"
        assert h2["puts"] > 0 and h3["hits"] > 0, (h2, h3)


def test_up_again_starts_nothing(cluster: tuple[NetnsHosts, str]) -> None:
    _, path = cluster
    again = _cli("up", path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "started" not in again.stdout, again.stdout
    assert again.stdout.count(": running ") >= 4, again.stdout


def test_logs_show_each_units_output(cluster: tuple[NetnsHosts, str]) -> None:
    _, path = cluster
    logs = _cli("logs", path, "router", "w-0", "-n", "20", timeout=120)
    assert logs.returncode == 0, logs.stderr
    assert "==> router on h1 <==" in logs.stdout and "==> w-0 on h2 <==" in logs.stdout
    assert "worker ready" in logs.stdout


def test_down_stops_everything(cluster: tuple[NetnsHosts, str]) -> None:
    hosts, path = cluster
    down = _cli("down", path, timeout=300)
    assert down.returncode == 0, down.stderr
    status = _cli("status", path, timeout=120)
    assert status.returncode == 3
    assert all(ln.split()[2] == "down" for ln in status.stdout.splitlines()), status.stdout
    for h in hosts.hosts:  # only sshd is left in each namespace
        names = [open(f"/proc/{p}/comm").read().strip() for p in hosts.pids(h)
                 if os.path.exists(f"/proc/{p}/comm")]
        assert set(names) <= {"sshd"}, (h.node, names)
    again = _cli("down", path, timeout=120)  # idempotent
    assert again.returncode == 0 and "not running" in again.stdout


# -- a replica spanning two hosts ---------------------------------------------------------------

def _pp_cluster_file(hosts: NetnsHosts, log_dir: str) -> str:
    nodes = _nodes(hosts, gloo_interface=True)
    text = f"""
name: netns-pp
model: tiny
workdir: {ROOT}
python: {sys.executable}
log_dir: {log_dir}
nodes:
{nodes}
router: {{node: h1, port: 30000}}
workers:
  - {{name: one, nodes: [h1], port: 31000}}
  - {{name: pp, nodes: [h2, h3], nodes_per_replica: 2, pp_size: 2, port: 31100}}
"""
    path = os.path.join(log_dir, "cluster-pp.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def pp_cluster(hosts: NetnsHosts, cluster: tuple[NetnsHosts, str]) -> Iterator[str]:
    _cli("down", cluster[1], timeout=300)  # the first cluster's ports are free again
    log_dir = os.path.join(ROOT, "logs", "multihost-pp")
    os.makedirs(log_dir, exist_ok=True)
    yield from _up(_pp_cluster_file(hosts, log_dir))


def test_a_replica_spanning_two_hosts_serves_what_one_host_serves(pp_cluster: str) -> None:
    """SGLang's --nnodes 2 --node-rank 0/1 with two pipeline ranks, one on h2 and one on h3
    (torch.distributed over gloo between the namespaces): the same greedy output as the
    single-host replica on h1, and the router serves both."""
    status = _cli("status", pp_cluster, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    nodes = {ln.split()[0]: ln.split()[1] for ln in status.stdout.splitlines()}
    assert nodes["pp-0-rank0"] == "h2" and nodes["pp-0-rank1"] == "h3"
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 12,
                                                                    "temperature": 0}}
    one = _post("http://10.213.0.11:31000/generate", body)
    spanning = _post("http://10.213.0.12:31100/generate", body)
    assert spanning["output_ids"] == one["output_ids"]
    router = "http://10.213.0.11:30000"
    assert sorted(w["url"] for w in _get(router + "/workers")["workers"]) == [
        "http://10.213.0.11:31000", "http://10.213.0.12:31100"]
    model = _get(router + "/v1/models")["data"][0]["id"]
    for _ in range(4):  # both replicas answer through the router
        out = _post(router + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4, "temperature": 0})
        assert out["usage"]["completion_tokens"] > 0



def test_a_unit_that_fails_stops_what_up_started(hosts: NetnsHosts,
                                                 pp_cluster: str) -> None:
    """A worker whose model folder is missing on h2: ``up`` exits 1 with its log's tail and
    stops the KV store it had started on h1; nothing is left running."""
    _cli("down", pp_cluster, timeout=300)
    log_dir = os.path.join(ROOT, "logs", "multihost-fail")
    os.makedirs(log_dir, exist_ok=True)
    path = _cluster_file(hosts, log_dir).replace("cluster.yaml", "cluster-fail.yaml")
    with open(os.path.join(log_dir, "cluster.yaml")) as f:
        text = f.read()
    text = text.replace("model: tiny", "model: /nonexistent/model-folder")
    text = text.replace(f"backend: {BACKEND}", "backend: tiered")
    with open(path, "w") as f:
        f.write(text)
    up = _cli("up", path, timeout=300)
    assert up.returncode == 1
    err = up.stderr.strip().splitlines()
    assert err[0].startswith("launch_cluster: w-") and "exited:" in err[0], up.stderr
    assert "neither a prepared-model name" in up.stderr  # the log's tail, from h2 or h3
    assert "kvstore on h1: started" in up.stdout and "stopping the" in up.stdout
    status = _cli("status", path, timeout=120)
    assert all(ln.split()[2] == "down" for ln in status.stdout.splitlines()), status.stdout
