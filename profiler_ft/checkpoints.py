"""Training checkpoints: the one owner of ``<out>/checkpoints/`` and ``<out>/best/``.

Who calls what: `train.train` calls `resume` once before the first step, `save` every
``checkpoint_every`` steps and at each epoch's end, `save_best` when validation accuracy improves,
and `clear` when the run has finished. A checkpoint is written into a temporary folder and renamed
into place, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from profiler_ft.errors import ProfilerError

_DIR = "checkpoints"
_BEST = "best"
_KEEP = 2


@dataclass
class State:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _root(out_dir: str) -> str:
    return os.path.join(out_dir, _DIR)


def latest(out_dir: str) -> str | None:
    root = _root(out_dir)
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root)
                  if d.startswith("step-") and not d.endswith(".tmp")  # .tmp: being written
                  and os.path.isfile(os.path.join(root, d, "state.pt")))
    return os.path.join(root, done[-1]) if done else None


def save(out_dir: str, step: int, identity: dict[str, Any], model: Any, optimizer: Any,
         scheduler: Any, history: list[dict[str, Any]]) -> str:
    import torch
    from peft import get_peft_model_state_dict

    root = _root(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"step": step, "identity": identity, "history": history,
                "adapter": get_peft_model_state_dict(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
    for old in done[:-_KEEP]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def resume(out_dir: str, identity: dict[str, Any], model: Any, optimizer: Any,
           scheduler: Any) -> State:
    """Restore the latest checkpoint into the given objects; State() when there is none."""
    import torch
    from peft import set_peft_model_state_dict

    path = latest(out_dir)
    if path is None:
        return State()
    try:
        saved = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ProfilerError(f"{path}/state.pt: unreadable checkpoint ({exc}); delete that "
                            "folder to resume from the one before, or pass --restart") from None
    if saved["identity"] != identity:
        changed = sorted(k for k in set(identity) | set(saved["identity"])
                         if identity.get(k) != saved["identity"].get(k))
        raise ProfilerError(f"{out_dir}: has a checkpoint of a run with other settings "
                            f"({', '.join(changed)}); pass --restart to discard it or use "
                            "another --out")
    set_peft_model_state_dict(model, saved["adapter"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return State(step=int(saved["step"]), history=list(saved["history"]))


def best_dir(out_dir: str) -> str:
    return os.path.join(out_dir, _BEST)


def save_best(out_dir: str, model: Any) -> None:
    final = best_dir(out_dir)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def clear(out_dir: str) -> None:
    shutil.rmtree(_root(out_dir), ignore_errors=True)
    shutil.rmtree(best_dir(out_dir), ignore_errors=True)
