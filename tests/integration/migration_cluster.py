"""One layer-migration / head-offload cluster, shared by ``test_layer_migration`` and
``test_head_offload`` (session fixtures ``migration_tiny`` and ``migration_smollm2`` in
``conftest.py``): a worker on core 0 with two layer hosts on core 1 ("b" and "victim") and a
target nobody listens on ("dead"). Each test gets it back as it found it: no migrated range, no
offloaded head, both hosts up, an empty radix cache (:meth:`Cluster.reset`)."""

from __future__ import annotations

import json
import os
from typing import Any

from runtime_patches import models
from runtime_patches.launch import WorkerConfig, WorkerProcess
from runtime_patches.migration.host_process import LayerHostConfig, LayerHostProcess
from tests.integration.cluster import LOG_DIR, free_port, http_json
from tests.integration.sse import SSEStream

PROMPTS = ("def hello(name):", "import os\nimport sys\n", "class Foo:\n    def __init__(self")
FRESH = ("for i in range(10):", "while True:\n    x = ")
HOST_CPU = [1 % (os.cpu_count() or 1)]
TINY_POOL = 1024
"""KV pool of the tiny worker, small enough that a test can fill it past the original size."""


class Cluster:
    def __init__(self, model: str, tag: str, max_total_tokens: int = 4096) -> None:
        path = models.prepare(model)
        self.served = models.recipe(model).served_name
        self.hosts = {name: LayerHostProcess(LayerHostConfig(port=free_port(), cpus=HOST_CPU,
                                                             warm_model=path),
                                             log_path=os.path.join(LOG_DIR, f"{tag}-{name}.log"))
                      for name in ("b", "victim")}
        targets = tuple((name, h.address) for name, h in self.hosts.items())
        targets += (("dead", f"127.0.0.1:{free_port()}"),)  # nothing listens there
        self.worker = WorkerProcess(
            WorkerConfig(model_path=path, port=free_port(), served_model_name=self.served,
                         device="cpu", cpus="0", layer_hosts=targets,
                         max_total_tokens=max_total_tokens),
            log_path=os.path.join(LOG_DIR, f"{tag}-worker.log"))

    def start(self) -> None:
        for h in self.hosts.values():
            h.start()
        self.worker.start()
        for h in self.hosts.values():
            h.wait_ready()
        self.worker.wait_ready(600)

    def reset(self) -> None:
        """Back to the state every test starts from: a host killed by an earlier test is
        restarted, migrated layers restored, offloaded heads recalled, the cache flushed."""
        for h in self.hosts.values():
            if not h.is_running():
                h.start()
                h.wait_ready()
        status = self.status()
        if status["heads"]["offloads"]:
            code, out = self.control("POST", "/banaserve/recall_heads", {})
            assert code == 200, out
        if status["ranges"]:
            self.restore()
        self.flush()

    def stop(self) -> None:
        self.worker.stop()
        for h in self.hosts.values():
            h.stop()

    # -- API ----------------------------------------------------------------------------------
    def control(self, method: str, path: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        status, out, _ = http_json(method, self.worker.url + path, body, raw=raw, timeout=600)
        return status, out

    def migrate(self, start: int, end: int, target: str = "b") -> dict[str, Any]:
        status, out = self.control("POST", "/banaserve/migrate_layers",
                                   {"layers": [start, end], "target": target})
        assert status == 200, out
        return out

    def restore(self) -> dict[str, Any]:
        status, out = self.control("POST", "/banaserve/restore_layers", {})
        assert status == 200, out
        return out

    def flush(self) -> None:
        # SGLang flushes only when idle; ?timeout waits for the last step to be cleared.
        status, out = self.control("POST", "/flush_cache?timeout=30")
        assert status == 200, out

    def status(self) -> dict[str, Any]:
        status, out = self.control("GET", "/banaserve/status")
        assert status == 200, out
        return out

    def complete(self, prompt: str, max_tokens: int) -> str:
        status, out, _ = http_json("POST", self.worker.url + "/v1/completions", self._body(
            prompt, max_tokens, stream=False))
        assert status == 200, out
        assert out["usage"]["completion_tokens"] == max_tokens, out
        return str(out["choices"][0]["text"])

    def stream(self, prompt: str, max_tokens: int) -> SSEStream:
        return SSEStream(self.worker.url, "/v1/completions",
                         self._body(prompt, max_tokens, stream=True))

    def _body(self, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
        return {"model": self.served, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": stream}


def read_stream(stream: SSEStream, on_chunk: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """(text received, error events) of a completions stream; ``on_chunk(i)`` after chunk i."""
    text, errors, i = [], [], 0
    for data in stream.events():
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event or event.get("object") == "error":
            errors.append(event)
            continue
        text.append(event["choices"][0]["text"])
        i += 1
        if on_chunk is not None:
            on_chunk(i)
    return "".join(text), errors
