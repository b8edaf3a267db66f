"""Layer-level migration (a contiguous range of a worker's decoder layers runs on a layer host)
and attention offload (some KV heads of some layers live and are attended on a head host, which
is the same host process).

Modules, by who owns what:
- ``wire``: frames (msgpack header + raw tensors); no state.
- ``transport``: the worker->host seam (``LayerTransport``) and its TCP reference.
- ``host_runtime`` / ``head_host`` / ``host``: the host process (SGLang layers + KV pool, or
  some heads' KV + their attention, per session).
- ``remote``: the stand-in modules that replace migrated layers in the worker's model.
- ``heads``: ``SplitAttention``, the stand-in for an offloaded layer's attention.
- ``ranges``: the worker's migrated layer ranges, their stand-ins and parked layers.
- ``offloads``: the worker's head offloads, their narrowed KV buffers.
- ``manager``: control requests, pending restore / recall; ``errors``: its error.
- ``failure``: a lost host: local again, requests aborted, cache flushed.
- ``capacity``: the worker's KV pool size against its memory budget.
- ``control``: the ``/banaserve/*`` HTTP endpoints in SGLang's server, sent over SGLang's RPC.
- ``patches``: the four SGLang wraps that wire the above in.

See docs/layer_migration.md.
"""

TARGETS_ENV = "BANASERVE_LAYER_HOSTS"
"""``NAME=HOST:PORT[,NAME=HOST:PORT...]``: the layer hosts a worker may migrate to (set by the
launcher from ``--layer-host``; read by the worker's ``MigrationManager``)."""

OWN_HOST_ENV = "BANASERVE_OWN_LAYER_HOST"
"""``HOST:PORT`` of the layer host running beside this worker (set by the launcher with
``--layer-host-port``), reported in ``GET /banaserve/status`` so a rebalancer can tell which of
another worker's targets is this worker."""
