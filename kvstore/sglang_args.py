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


def worker_args(address: str, prefetch_threshold: int = 64, timeout_s: float = 2.0,
                prefetch_policy: str = "timeout") -> list[str]:
    """``sglang.launch_server`` arguments that make a worker use the kvstore at ``address``.

    ``prefetch_threshold``: shortest uncached prompt suffix, in tokens, worth asking the store
    for; ``timeout_s``: longest wait on one store call; ``prefetch_policy``: SGLang's
    ``--hicache-storage-prefetch-policy`` (``best_effort``, ``wait_complete``, ``timeout``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"kvstore address must be host:port, got {address!r}")
    extra = {"backend_name": "banaserve_kvstore", "module_path": "kvstore.sglang_backend",
             "class_name": "KVStoreHiCache", "interface_v1": 1, "kvstore_address": address,
             "kvstore_timeout_s": timeout_s, "prefetch_threshold": prefetch_threshold}
    return ["--enable-hierarchical-cache", "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", json.dumps(extra),
            "--hicache-storage-prefetch-policy", prefetch_policy]
