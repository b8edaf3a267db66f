"""HELR layer placement, pure: no HTTP, no printing, nothing of aiohttp or the sidecar.

- ``costs``: per-layer weight bytes, KV bytes per token and FLOPs from a HF ``config.json``.
- ``topology``: GPUs and links, from the cluster YAML or ``nvidia-smi topo -m`` text.
- ``helr``: the placement DP (``solve``), a brute-force reference, infeasibility diagnosis.
- ``placement``: a request -> ``Plan`` -> SGLang launch command (``plan_placement``,
  ``plan_from_json``).

Who uses them: the operators' sidecar (``router/sidecar``: ``POST /v1/plan/placement`` and
``python -m router.sidecar plan-placement``), the simulator (``scripts/sim/placement.py``) and
the solver benchmark (``scripts/bench/helr_solve.py``). See docs/helr.md.
"""
