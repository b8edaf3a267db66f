"""PatchRegistry: each kind applies; any mismatch is a one-line PatchError."""

from __future__ import annotations

import types
from typing import Any

import pytest

from runtime_patches import SGLANG_VERSION
from runtime_patches.registry import Patch, PatchError, PatchRegistry, installed_version


def module() -> types.ModuleType:
    mod = types.ModuleType("fake_target")

    class Thing:
        flag = True

        def method(self) -> str:
            return "original"

    mod.Thing = Thing  # type: ignore[attr-defined]
    mod.func = lambda: "original"  # type: ignore[attr-defined]
    return mod


def patch(kind: str, target: str, new: Any, version: str = SGLANG_VERSION,
          name: str = "p") -> Patch:
    return Patch(name=name, target=target, kind=kind, new=new,  # type: ignore[arg-type]
                 package="sglang", version=version, rationale="test")


def apply(p: Patch, mod: types.ModuleType) -> PatchRegistry:
    registry = PatchRegistry()
    registry.add(p)
    registry.on_import(mod)
    return registry


def test_installed_sglang_is_the_pinned_version() -> None:
    assert installed_version("sglang") == SGLANG_VERSION


def test_replace() -> None:
    mod = module()
    registry = apply(patch("replace", "fake_target:func", lambda: "new"), mod)
    assert mod.func() == "new" and registry.is_applied("p")


def test_wrap_method() -> None:
    mod = module()

    def wrapper(original: Any) -> Any:
        return lambda self: "wrapped " + original(self)

    apply(patch("wrap", "fake_target:Thing.method", wrapper), mod)
    assert mod.Thing().method() == "wrapped original"


def test_provide_and_set_and_call() -> None:
    mod = module()
    apply(patch("provide", "fake_target:extra", 42), mod)
    apply(patch("set", "fake_target:Thing.flag", False), mod)
    seen = []
    apply(patch("call", "fake_target", seen.append), mod)
    assert mod.extra == 42 and mod.Thing.flag is False and seen == [mod]


def test_provide_refuses_an_existing_attribute() -> None:
    with pytest.raises(PatchError, match="already defines it"):
        apply(patch("provide", "fake_target:func", 1), module())


@pytest.mark.parametrize(("kind", "target"), [
    ("replace", "fake_target:missing"), ("wrap", "fake_target:Thing.missing"),
    ("set", "fake_target:Missing.flag"), ("call", "fake_target:missing"),
])
def test_missing_target_is_a_one_line_error(kind: str, target: str) -> None:
    with pytest.raises(PatchError) as excinfo:
        apply(patch(kind, target, lambda *a: None), module())
    message = str(excinfo.value)
    assert "\n" not in message and "refusing to start" in message


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(PatchError) as excinfo:
        apply(patch("replace", "fake_target:func", None, version="0.0.1"), module())
    message = str(excinfo.value)
    assert "sglang==0.0.1" in message and f"sglang=={SGLANG_VERSION} is installed" in message


def test_inactive_patches_are_not_applied() -> None:
    registry = PatchRegistry()
    registry.add(Patch(name="off", target="fake_target:func", kind="replace", new=None,
                       package="sglang", version=SGLANG_VERSION, rationale="x",
                       when=lambda: False))
    mod = module()
    registry.on_import(mod)
    assert mod.func() == "original" and registry.target_modules() == set()


def test_duplicate_names_and_bad_kinds_are_rejected() -> None:
    registry = PatchRegistry()
    registry.add(patch("replace", "fake_target:func", None))
    with pytest.raises(ValueError, match="duplicate"):
        registry.add(patch("replace", "fake_target:func", None))
    with pytest.raises(ValueError, match="kind"):
        patch("monkey", "fake_target:func", None)
    with pytest.raises(ValueError, match="target"):
        patch("replace", ":func", None)


def test_cpu_fixes_are_registered_with_pins_and_rationale() -> None:
    from runtime_patches import boot
    from runtime_patches.registry import REGISTRY

    boot.install()
    names = {p.name for p in REGISTRY.patches()}
    assert {"cpu.no_cuda_host_register", "cpu.transfer_kv_direct", "cpu.host_pool_no_pin",
            "cpu.mooncake_no_host_index_staging", "cpu.stream_noops",
            "cpu.torchvision_schemas", "cpu.transfer_kv_per_layer_direct_pf_lf",
            "cpu.transfer_kv_all_layer_direct_lf_pf"} <= names
    for p in REGISTRY.patches():
        assert p.rationale and p.version
