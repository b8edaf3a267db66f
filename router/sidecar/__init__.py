"""The operators' sidecar: UELLM's SLO-ODBS batching and HELR placement, and length prediction.

Pure algorithms live in their own modules (``slo_odbs.py``, ``helr.py`` and its inputs); the HTTP
service (``app.py``) and the CLI (``__main__.py``) only parse, validate and call them.
"""
