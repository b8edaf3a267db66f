"""The one error type the predictor raises for anything input, files or config can cause.

The CLI (`profiler_ft/__main__.py`) turns it into one readable line and exit status 2; the
router turns it into a start-up failure.
"""

from __future__ import annotations


class ProfilerError(Exception):
    """Bad input, a missing or mismatched file, an unknown backbone: the message says which."""
