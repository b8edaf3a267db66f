"""CPU enablement for SGLang 0.5.23: a kernel-package stand-in and post-import fixes.

Active only in processes that run SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``, which the
launcher sets); on GPU machines nothing here is imported into SGLang.
"""

from __future__ import annotations

import os


def cpu_engine_enabled() -> bool:
    """True in processes that run SGLang's CPU engine."""
    return os.environ.get("SGLANG_USE_CPU_ENGINE") == "1"
