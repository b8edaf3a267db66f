"""Layer-level migration: run a contiguous range of a worker's decoder layers on a layer host.

Modules, by who owns what:
- ``wire``: frames (msgpack header + raw tensors); no state.
- ``transport``: the worker->host seam (``LayerTransport``) and its TCP reference.
- ``host_runtime`` / ``host``: the layer host process (SGLang layers + KV pool per session).
- ``remote``: the stand-in modules that replace migrated layers in the worker's model.
- ``manager``: the worker's migrated ranges, migrate / restore / host loss.
- ``control``: the ``/banaserve/*`` HTTP endpoints in SGLang's server, sent over SGLang's RPC.
- ``patches``: the four SGLang wraps that wire the above in.

See docs/layer_migration.md.
"""

TARGETS_ENV = "BANASERVE_LAYER_HOSTS"
"""``NAME=HOST:PORT[,NAME=HOST:PORT...]``: the layer hosts a worker may migrate to (set by the
launcher from ``--layer-host``; read by the worker's ``MigrationManager``)."""
