"""SLO-aware batching, pure: no I/O, no clock, nothing of aiohttp or asyncio.

- ``slo_odbs``: SLO-ODBS and its baselines (FCFS, shortest-predicted-first, S3), forming batches
  from SLOs and predicted output lengths.
- ``config``: ``BatcherConfig``, the router's ``--batching`` knobs.

Who uses them: the router's asyncio batcher (``router/batcher.py``), the worker's queue order
(``runtime_patches/slo_queue.py``), the operators' sidecar (``router/sidecar``) and the simulator
(``scripts/sim``).
"""
