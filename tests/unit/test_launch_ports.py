"""``runtime_patches.launch.free_port`` keeps clear of the ports SGLang picks for itself."""

from __future__ import annotations

import inspect
from pathlib import Path

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


def test_two_processes_never_get_the_same_port(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """A two-port slice: a second process (its own empty hand-out set) gets the other port,
    and a third gets none of the claimed two until the claims go stale (negative control:
    without the claims, 20 pairs of processes pick the same port at least once)."""
    monkeypatch.setattr(launch, "PORT_CLAIMS_DIR", str(tmp_path))
    monkeypatch.setenv(launch.PORTS_ENV, "18990-18991")
    with monkeypatch.context() as unclaimed:
        unclaimed.setattr(launch, "_claim", lambda port: True)
        pairs = []
        for _ in range(20):
            unclaimed.setattr(launch, "_HANDED_OUT", set())
            first = launch.free_port("127.0.0.1")
            unclaimed.setattr(launch, "_HANDED_OUT", set())
            pairs.append((first, launch.free_port("127.0.0.1")))
        assert any(a == b for a, b in pairs)
    firsts = set()
    for _ in range(20):
        for child in tmp_path.iterdir():
            child.unlink()
        monkeypatch.setattr(launch, "_HANDED_OUT", set())
        first = launch.free_port("127.0.0.1")
        monkeypatch.setattr(launch, "_HANDED_OUT", set())  # another process
        assert launch.free_port("127.0.0.1") == ({18990, 18991} - {first}).pop()
        firsts.add(first)
    assert firsts == {18990, 18991}  # the pick is random: the control below can collide
    monkeypatch.setattr(launch, "_HANDED_OUT", set())
    third = launch.free_port("127.0.0.1")  # both claimed: the kernel's pick, outside the slice
    assert third not in (18990, 18991)
    monkeypatch.setattr(launch, "PORT_CLAIM_S", 0.0)  # stale claims are taken over
    monkeypatch.setattr(launch, "_HANDED_OUT", set())
    assert launch.free_port("127.0.0.1") in (18990, 18991)
