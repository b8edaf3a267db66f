"""``runtime_patches.launch.free_port`` keeps clear of the ports SGLang picks for itself."""

from __future__ import annotations

import inspect

import pytest

from runtime_patches import launch


def test_the_range_sglang_picks_from_is_the_one_we_avoid() -> None:
    from sglang.srt.utils.network import get_free_port_below_ephemeral
    params = inspect.signature(get_free_port_below_ephemeral).parameters
    assert (params["low"].default, params["high"].default) == launch.SGLANG_PORT_PICKS


def test_free_port_never_hands_out_a_port_sglang_may_pick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the allowed slice straddling SGLang's range, every port handed out lies outside it
    (negative control: the slice holds 2,000 of SGLang's ports against 1,000 others)."""
    lo, _ = launch.SGLANG_PORT_PICKS
    monkeypatch.setenv(launch.PORTS_ENV, f"{lo - 1000}-{lo + 1999}")
    monkeypatch.setattr(launch, "_HANDED_OUT", set())
    ports = [launch.free_port("127.0.0.1") for _ in range(200)]
    assert len(set(ports)) == 200
    assert all(lo - 1000 <= p < lo for p in ports), sorted(p for p in ports if p >= lo)[:5]
