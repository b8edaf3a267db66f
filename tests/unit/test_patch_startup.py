"""A patch written for another SGLang version stops start-up with one clear line."""

from __future__ import annotations

import sys
import types

import pytest

from runtime_patches import __main__ as cli
from runtime_patches import launch, plugin
from runtime_patches.registry import Patch, PatchRegistry


def _stale_registry() -> PatchRegistry:
    registry = PatchRegistry()
    registry.add(Patch(name="test.stale", target="json:dumps", kind="wrap", new=lambda f: f,
                       package="sglang", version="0.4.0", rationale="written for an old SGLang"))
    return registry


def test_launcher_refuses_to_start_on_version_mismatch(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(launch, "REGISTRY", _stale_registry())
    started = []
    monkeypatch.setattr(launch.WorkerProcess, "start", lambda self: started.append(self))
    assert launch.main(["--model", "tiny", "--port", "31999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "sglang==0.4.0" in err[0] and "sglang==0.5.23 is installed" in err[0]
    assert started == []


def test_doctor_fails_on_version_mismatch(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "REGISTRY", _stale_registry())
    assert cli.main(["doctor", "--fast"]) == 1
    assert "test.stale" in capsys.readouterr().err


def test_plugin_stops_the_process_when_a_loaded_target_was_not_patched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = PatchRegistry()
    module = types.ModuleType("banaserve_fake_target")
    module.value = 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "banaserve_fake_target", module)
    registry.add(Patch(name="test.unapplied", target="banaserve_fake_target:value", kind="set",
                       new=2, package="sglang", version="0.5.23", rationale="test"))
    monkeypatch.setattr(plugin, "REGISTRY", registry)
    with pytest.raises(SystemExit, match="test.unapplied"):
        plugin.load()
    registry.on_import(module)
    plugin.load()  # applied now: passes
    assert module.value == 2  # type: ignore[attr-defined]
