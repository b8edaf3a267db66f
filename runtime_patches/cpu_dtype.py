"""The dtype a CPU worker computes in: the one this CPU multiplies fastest (pure, no SGLang import).

PyTorch runs a bfloat16 matmul on the CPU through oneDNN, which is fast only where the CPU has
native bf16 instructions (``avx512_bf16`` or Intel AMX's ``amx_bf16``). Without them it emulates
bf16 and runs far slower than float32: measured on a 2-vCPU AMD EPYC VM (AVX2, FMA, no AVX-512),
a 256x576 @ 576x1536 matmul on one core ran at 60 GFLOP/s in float32 and 1.0 GFLOP/s in bfloat16,
and a SmolLM2 worker prefilled 7-8x slower in bfloat16 (``shared/notes/measured-here.md``). On an
Intel Xeon with AMX the ranking flips (``docs/benchmarks.md``, "Worker speed").

So on CPU the launcher picks ``bfloat16`` where the CPU has native bf16 and ``float32``
otherwise, unless the operator names a dtype. On GPU it passes nothing (SGLang's own default).
The model's weights are stored in bfloat16; SGLang casts them to the served dtype at load, and
the KV cache takes the same dtype, so every byte count downstream (store pages, migration and
head-offload transfers, capacity) follows the dtype the worker actually serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags that mean the CPU computes bf16 natively (x86)."""
CHOICES = ("auto", "bfloat16", "float32", "float16")
"""Values ``WorkerConfig.dtype`` / ``--dtype`` accept; ``auto`` applies :func:`choose_cpu_dtype`."""
REASON_ENV = "BANASERVE_DTYPE_REASON"
"""Environment variable the launcher sets on the worker: why it serves in its dtype (shown in
``GET /banaserve/status`` under ``model.dtype_reason``)."""


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype for the worker and why."""

    dtype: str | None
    """SGLang ``--dtype`` value, or None: pass no ``--dtype`` (SGLang's default, the GPU case)."""
    reason: str
    """One line for the log and the status endpoint."""


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first processor in ``cpuinfo_path`` (empty if unreadable)."""
    try:
        with open(cpuinfo_path) as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def choose_cpu_dtype(flags: Iterable[str]) -> DtypeChoice:
    """``bfloat16`` where ``flags`` has native bf16, else ``float32``, with the reason."""
    native = sorted(set(flags) & set(NATIVE_BF16_FLAGS))
    if native:
        return DtypeChoice("bfloat16", f"auto: CPU has native bf16 ({', '.join(native)})")
    return DtypeChoice("float32", "auto: CPU has no native bf16 (no amx_bf16 or avx512_bf16 "
                                  "flag), where bfloat16 matmuls are emulated and far slower")


def resolve(requested: str, device: str, passthrough_dtype: str | None,
            flags: Iterable[str] | None = None) -> DtypeChoice:
    """The dtype a worker on ``device`` (``cpu`` or ``cuda``) gets.

    ``requested`` is ``WorkerConfig.dtype``; ``passthrough_dtype`` is a ``--dtype`` found among
    the SGLang arguments after ``--`` (it wins over ``auto``; naming both is a ValueError).
    ``flags`` defaults to this machine's ``/proc/cpuinfo``.
    """
    if requested not in CHOICES:
        raise ValueError(f"dtype: {requested!r} is not one of {', '.join(CHOICES)}")
    if passthrough_dtype is not None:
        if requested != "auto":
            raise ValueError(f"dtype: given twice (dtype {requested!r} and --dtype "
                             f"{passthrough_dtype!r} among the SGLang arguments); give one")
        return DtypeChoice(None, f"set by --dtype {passthrough_dtype} in the SGLang arguments")
    if requested != "auto":
        return DtypeChoice(requested, "set by the operator (--dtype)")
    if device != "cpu":
        return DtypeChoice(None, "auto on GPU: SGLang's default (the model's own dtype)")
    return choose_cpu_dtype(cpu_flags() if flags is None else flags)
