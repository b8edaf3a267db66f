"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``banaserve``).

Who calls it: SGLang's ``load_plugins()``, once at the start of every scheduler, detokenizer,
data-parallel controller and engine process. It verifies, inside that process, that BanaServe's
import hook is active and that every patch whose target module is loaded was applied, and stops
the process with one line otherwise. SGLang logs and swallows ``Exception`` from plugins, so a
failed check raises ``SystemExit``, which it does not catch.

Later hooks that only patch class attributes (looked up at call time) can be added here.
"""

from __future__ import annotations

import logging
import os
import sys

from runtime_patches import SGLANG_VERSION, boot
from runtime_patches.cpu import cpu_engine_enabled
from runtime_patches.registry import REGISTRY, PatchError

logger = logging.getLogger(__name__)


def verify_process() -> list[str]:
    """Return the names of the patches applied in this process; raise PatchError on a gap."""
    if not boot.is_installed():
        raise PatchError(
            "runtime_patches: the import hook is not active in this process; run "
            "`python -m runtime_patches install-pth` (scripts/setup.sh does) and restart"
        )
    if cpu_engine_enabled() and not boot.standin_active():
        raise PatchError("runtime_patches: CPU engine enabled after the hook was installed; "
                         "set SGLANG_USE_CPU_ENGINE=1 before starting Python")
    REGISTRY.check_versions()
    missing = [p.name for p in REGISTRY.active()
               if p.module in sys.modules and not REGISTRY.is_applied(p.name)]
    if missing:
        raise PatchError(f"runtime_patches: patches not applied in this process: {missing}")
    return [p.name for p in REGISTRY.active() if REGISTRY.is_applied(p.name)]


def _ensure_visible_logging() -> None:
    """SGLang configures logging only after plugins load; give our logger its own handler
    so the verification line reaches the worker's log whatever the root logger's state."""
    package_logger = logging.getLogger("runtime_patches")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s banaserve] %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False


def load() -> None:
    _ensure_visible_logging()
    try:
        applied = verify_process()
    except PatchError as exc:
        logger.error("%s", exc)
        raise SystemExit(str(exc)) from None
    logger.info("runtime patches verified in pid %d: hook active, sglang==%s, %d applied so far",
                os.getpid(), SGLANG_VERSION, len(applied))
