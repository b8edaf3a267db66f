"""The CPU worker's dtype: ``runtime_patches.cpu_dtype`` and how the launcher applies it."""

from __future__ import annotations

import pytest

from runtime_patches import cpu_dtype
from runtime_patches.launch import WorkerConfig, build_command

AMD_EPYC = "fpu vme sse4_2 avx avx2 fma bmi2"  # the AVX2-only development VM
XEON_AMX = "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile"
XEON_AVX512_ONLY = "avx2 fma avx512f avx512bw avx512vl"  # oneDNN emulates bf16 there


def dtype_arg(argv: list[str]) -> str | None:
    return argv[argv.index("--dtype") + 1] if "--dtype" in argv else None


@pytest.mark.parametrize(("flags", "want"), [
    (AMD_EPYC, "float32"), (XEON_AVX512_ONLY, "float32"), (XEON_AMX, "bfloat16"),
    ("avx2 avx512_bf16", "bfloat16"), ("", "float32")])
def test_bfloat16_only_where_the_cpu_has_native_bf16(flags: str, want: str) -> None:
    choice = cpu_dtype.choose_cpu_dtype(flags.split())
    assert choice.dtype == want
    assert choice.reason.startswith("auto:")


def test_cpu_flags_reads_the_first_processor(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {AMD_EPYC}\n\n"
                    f"processor\t: 1\nflags\t\t: {XEON_AMX}\n")
    assert cpu_dtype.cpu_flags(str(info)) == frozenset(AMD_EPYC.split())
    assert cpu_dtype.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_resolve_operator_choice_wins_and_gpu_keeps_sglang_default() -> None:
    amx = XEON_AMX.split()
    assert cpu_dtype.resolve("float32", "cpu", None, amx).dtype == "float32"
    assert cpu_dtype.resolve("auto", "cuda", None, amx).dtype is None
    passthrough = cpu_dtype.resolve("auto", "cpu", "float16", AMD_EPYC.split())
    assert passthrough.dtype is None and "float16" in passthrough.reason
    with pytest.raises(ValueError, match="given twice"):
        cpu_dtype.resolve("bfloat16", "cpu", "float32", amx)
    with pytest.raises(ValueError, match="not one of"):
        cpu_dtype.resolve("fp8", "cpu", None, amx)


def test_launcher_passes_the_choice_and_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, want in ((AMD_EPYC, "float32"), (XEON_AMX, "bfloat16")):
        monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda flags=flags: frozenset(flags.split()))
        argv, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu"))
        assert dtype_arg(argv) == want
        assert env[cpu_dtype.REASON_ENV].startswith("auto: CPU has")
    argv, env = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                           dtype="bfloat16"))
    assert dtype_arg(argv) == "bfloat16" and "operator" in env[cpu_dtype.REASON_ENV]
    argv, _ = build_command(WorkerConfig(model_path="/m", port=12345, device="cuda"))
    assert dtype_arg(argv) is None
    # A --dtype among the SGLang arguments is passed once, as given.
    argv, _ = build_command(WorkerConfig(model_path="/m", port=12345, device="cpu",
                                         extra_args=("--dtype", "float16")))
    assert argv.count("--dtype") == 1 and dtype_arg(argv) == "float16"


def test_worker_config_refuses_a_bad_or_doubled_dtype() -> None:
    with pytest.raises(ValueError, match="WorkerConfig.dtype"):
        WorkerConfig(model_path="/m", port=12345, dtype="int4")
    with pytest.raises(ValueError, match="give one"):
        WorkerConfig(model_path="/m", port=12345, dtype="float32",
                      extra_args=("--dtype=bfloat16",))
