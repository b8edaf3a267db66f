"""The operators' sidecar: UELLM's SLO-ODBS batching and HELR placement, and length prediction.

Only the operators' face lives here: the HTTP service (``app.py``), the CLI (``__main__.py``) and
its ``plan-placement`` command (``cli_placement.py``). They parse, validate and call the pure
algorithms in ``router.batching`` (SLO-ODBS) and ``router.placement`` (HELR and its inputs).
"""
