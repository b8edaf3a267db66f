"""``runtime_patches.registry``: every patch kind against a throwaway module, every refusal, and
the CPU fixes registered in the global ``REGISTRY``.

The target is a ``types.ModuleType`` built per test; patches pin the installed SGLang version
(read with ``importlib.metadata``) unless the test is about a version mismatch.
"""

from __future__ import annotations

import importlib.metadata
import types
from typing import Any

import pytest

from runtime_patches import SGLANG_VERSION
from runtime_patches.registry import Patch, PatchError, PatchRegistry, installed_version

MODULE = "banaserve_fake_target"
SGLANG = importlib.metadata.version("sglang")


def original(x: int) -> int:
    return x + 1


class Engine:
    flag = True

    def step(self) -> str:
        return "original step"


@pytest.fixture
def module() -> types.ModuleType:
    mod = types.ModuleType(MODULE)
    mod.func = original  # type: ignore[attr-defined]
    mod.LIMIT = 10  # type: ignore[attr-defined]
    mod.Engine = type("Engine", (Engine,), {})  # type: ignore[attr-defined]
    return mod


def patch(kind: str, target: str, new: Any, name: str = "p", version: str = SGLANG,
          **extra: Any) -> Patch:
    return Patch(name=name, target=target, kind=kind, new=new,  # type: ignore[arg-type]
                 package="sglang", version=version, rationale="test", **extra)


def applied(p: Patch, module: types.ModuleType) -> PatchRegistry:
    registry = PatchRegistry()
    registry.add(p)
    registry.apply(p, module)
    assert registry.is_applied(p.name)
    return registry


# -- each kind ----------------------------------------------------------------------------------
def test_replace_swaps_the_attribute(module: types.ModuleType) -> None:
    applied(patch("replace", f"{MODULE}:func", lambda x: x * 100), module)
    assert module.func(2) == 200


def test_wrap_receives_the_original(module: types.ModuleType) -> None:
    seen: list[Any] = []

    def wrapper(inner: Any) -> Any:
        seen.append(inner)
        return lambda x: inner(x) * 10

    applied(patch("wrap", f"{MODULE}:func", wrapper), module)
    assert seen == [original]
    assert module.func(1) == 20


def test_wrap_reaches_a_nested_attribute(module: types.ModuleType) -> None:
    applied(patch("wrap", f"{MODULE}:Engine.step",
                  lambda inner: lambda self: "wrapped " + inner(self)), module)
    assert module.Engine().step() == "wrapped original step"


def test_provide_installs_a_missing_attribute(module: types.ModuleType) -> None:
    applied(patch("provide", f"{MODULE}:cpu_kernel", "kernel"), module)
    assert module.cpu_kernel == "kernel"


def test_set_changes_a_value(module: types.ModuleType) -> None:
    applied(patch("set", f"{MODULE}:LIMIT", 99), module)
    applied(patch("set", f"{MODULE}:Engine.flag", False, name="nested"), module)
    assert module.LIMIT == 99 and module.Engine.flag is False


def test_call_runs_with_the_module(module: types.ModuleType) -> None:
    calls: list[types.ModuleType] = []
    applied(patch("call", MODULE, calls.append), module)
    assert calls == [module]


def test_call_with_an_attribute_checks_it_exists(module: types.ModuleType) -> None:
    calls: list[types.ModuleType] = []
    applied(patch("call", f"{MODULE}:Engine.step", calls.append), module)
    assert calls == [module]
    with pytest.raises(PatchError, match="'gone'"):
        applied(patch("call", f"{MODULE}:gone", calls.append, name="q"), module)
    assert calls == [module]


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "attrs", "missing"), [
    ("replace", "renamed_func", "renamed_func"), ("wrap", "renamed_func", "renamed_func"),
    ("set", "renamed_func", "renamed_func"), ("call", "renamed_func", "renamed_func"),
    ("wrap", "Engine.renamed", "renamed"),  # the last attribute is missing
    ("replace", "Scheduler.step", "Scheduler"), ("set", "Missing.flag", "Missing"),  # a parent
])
def test_missing_attribute_raises_a_one_line_patch_error(module: types.ModuleType, kind: str,
                                                         attrs: str, missing: str) -> None:
    registry = PatchRegistry()
    p = registry.add(patch(kind, f"{MODULE}:{attrs}", lambda *a: None, name="gone"))
    with pytest.raises(PatchError) as caught:
        registry.apply(p, module)
    message = str(caught.value)
    assert "\n" not in message and "refusing to start" in message
    assert "'gone'" in message and f"{missing!r}" in message and f"sglang=={SGLANG}" in message
    assert not registry.is_applied("gone")


def test_provide_on_an_existing_attribute_raises(module: types.ModuleType) -> None:
    with pytest.raises(PatchError, match="already defines it"):
        applied(patch("provide", f"{MODULE}:func", lambda x: x), module)
    assert module.func is original


def test_attribute_kind_without_an_attribute_raises(module: types.ModuleType) -> None:
    with pytest.raises(PatchError, match="needs an attribute"):
        applied(patch("replace", MODULE, lambda x: x), module)


def test_installed_sglang_is_the_pinned_version() -> None:
    assert installed_version("sglang") == SGLANG == SGLANG_VERSION == "0.5.23"


def test_version_mismatch_names_both_versions(module: types.ModuleType) -> None:
    registry = PatchRegistry()
    p = registry.add(patch("replace", f"{MODULE}:func", lambda x: x, version="0.0.0-wrong"))
    with pytest.raises(PatchError) as caught:
        registry.apply(p, module)
    message = str(caught.value)
    assert "sglang==0.0.0-wrong" in message and f"sglang=={SGLANG} is installed" in message
    assert "\n" not in message
    assert module.func is original and not registry.is_applied(p.name)
    with pytest.raises(PatchError, match="0.0.0-wrong"):
        registry.check_versions()


def test_check_versions_passes_when_versions_match() -> None:
    registry = PatchRegistry()
    registry.add(patch("set", f"{MODULE}:LIMIT", 1))
    registry.check_versions()


def test_uninstalled_package_is_a_version_mismatch(module: types.ModuleType) -> None:
    p = Patch(name="p", target=f"{MODULE}:LIMIT", kind="set", new=1,
              package="banaserve-not-installed", version="1.0", rationale="test")
    with pytest.raises(PatchError, match="banaserve-not-installed==None"):
        applied(p, module)


def test_duplicate_names_are_rejected() -> None:
    registry = PatchRegistry()
    registry.add(patch("set", f"{MODULE}:LIMIT", 1, name="same"))
    with pytest.raises(ValueError, match=r"Patch\.name: duplicate patch name 'same'"):
        registry.add(patch("set", f"{MODULE}:func", 2, name="same"))
    assert len(registry.patches()) == 1


def test_bad_kind_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"Patch\.kind: unknown kind 'monkey'"):
        patch("monkey", f"{MODULE}:func", None)


@pytest.mark.parametrize("target", ["", ":func"])
def test_target_without_a_module_raises_value_error(target: str) -> None:
    with pytest.raises(ValueError, match=r"Patch\.target: .* names no module"):
        patch("set", target, None)


# -- on_import ----------------------------------------------------------------------------------
def test_on_import_applies_matching_patches_once(module: types.ModuleType) -> None:
    registry = PatchRegistry()
    registry.add(patch("wrap", f"{MODULE}:func", lambda inner: lambda x: inner(x) * 2))
    registry.add(patch("set", "some.other.module:LIMIT", 0, name="other"))
    registry.on_import(module)
    registry.on_import(module)  # a second import must not wrap twice
    assert module.func(1) == 4
    assert registry.is_applied("p") and not registry.is_applied("other")


def test_inactive_patches_are_neither_applied_nor_checked(module: types.ModuleType) -> None:
    registry = PatchRegistry()
    registry.add(patch("set", f"{MODULE}:LIMIT", 0, version="0.0.0-wrong", when=lambda: False))
    registry.on_import(module)
    registry.check_versions()
    assert module.LIMIT == 10 and registry.active() == []
    assert registry.target_modules() == set()


def test_patch_splits_its_target() -> None:
    p = patch("replace", "pkg.mod:Cls.method", None)
    assert p.module == "pkg.mod" and p.attr_path == ["Cls", "method"]
    assert patch("call", "pkg.mod", None).attr_path == []


# -- the global registry ------------------------------------------------------------------------
def test_cpu_fixes_are_registered_with_pins_and_rationale() -> None:
    from runtime_patches import boot
    from runtime_patches.registry import REGISTRY

    boot.install()
    names = {p.name for p in REGISTRY.patches()}
    assert {"cpu.no_cuda_host_register", "cpu.transfer_kv_direct", "cpu.host_pool_no_pin",
            "cpu.mooncake_no_host_index_staging", "cpu.stream_noops",
            "cpu.torchvision_schemas", "cpu.transfer_kv_per_layer_direct_pf_lf",
            "cpu.transfer_kv_all_layer_direct_lf_pf", "cpu.hicache_host_reserve",
            "cpu.extend_attention_new_rows"} <= names
    for p in REGISTRY.patches():
        assert p.rationale and p.version
