"""The ``sglang.launch_server`` flags that make a worker use the kvstore (no SGLang import here).

``runtime_patches.launch`` calls ``worker_args`` for ``--kvstore HOST:PORT``; the flags select
SGLang's ``dynamic`` storage backend with ``kvstore.sglang_backend.KVStoreHiCache``.
"""

from __future__ import annotations

import json

ENV_ADDRESS = "BANASERVE_KVSTORE"
"""``host:port`` of the kvstore server, when the extra config does not name one."""
CPU_HICACHE_ARGS = ("--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first",
                    "--hicache-size", "1")
"""HiCache settings that work on the CPU engine (the kernel IO backend needs CUDA)."""
WRITE_POLICY = "write_through"
"""SGLang's ``--hicache-write-policy`` for a store-attached worker: ``write_through`` (SGLang's
default) copies every prefill to the host tier and the store, so a prefix computed once on
worker A can be loaded by worker B. ``write_through_selective`` copies a prefix only once it is
reused (its second insertion on one worker): cheaper for one-off prompts, but the first request
for a prefix on another worker recomputes it. With 16-token pages (the launcher's default since
``scripts/bench/store_overhead.py``) the two cost the same on unique prompts within this VM's
run-to-run noise; with 64-token pages ``write_through`` produced a 7-13 s TTFT tail
(``docs/benchmarks.md``, "What the store costs when it serves nothing")."""
WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")


def worker_args(address: str, prefetch_threshold: int = 64, timeout_s: float = 2.0,
                prefetch_policy: str = "timeout", write_policy: str = WRITE_POLICY) -> list[str]:
    """``sglang.launch_server`` arguments that make a worker use the kvstore at ``address``.

    ``prefetch_threshold``: shortest uncached prompt suffix, in tokens, worth asking the store
    for; ``timeout_s``: longest wait on one store call; ``prefetch_policy``: SGLang's
    ``--hicache-storage-prefetch-policy`` (``best_effort``, ``wait_complete``, ``timeout``);
    ``write_policy``: SGLang's ``--hicache-write-policy`` (see ``WRITE_POLICY``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"kvstore address must be host:port, got {address!r}")
    if write_policy not in WRITE_POLICIES:
        raise ValueError(f"write policy must be one of {', '.join(WRITE_POLICIES)}, got "
                         f"{write_policy!r}")
    extra = {"backend_name": "banaserve_kvstore", "module_path": "kvstore.sglang_backend",
             "class_name": "KVStoreHiCache", "interface_v1": 1, "kvstore_address": address,
             "kvstore_timeout_s": timeout_s, "prefetch_threshold": prefetch_threshold}
    return ["--enable-hierarchical-cache", "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", json.dumps(extra),
            "--hicache-storage-prefetch-policy", prefetch_policy,
            "--hicache-write-policy", write_policy]
