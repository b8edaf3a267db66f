"""The test suite's own scheduling rules (``tests/conftest.py``) and shared-cluster lifetimes
(``tests/integration/shared.py``): pure logic, no processes."""

from __future__ import annotations

from tests.conftest import GROUPS, SHARED_FIXTURES, unit_of
from tests.integration.shared import SharedClusters


def test_a_shared_cluster_starts_once_and_stops_when_the_next_module_does_not_use_it() -> None:
    events: list[str] = []
    shared = SharedClusters()
    shared.note_users("workers", ["a.py", "b.py"])
    shared.note_users("router", ["a.py"])

    def start(name: str) -> str:
        events.append(f"start {name}")
        return name

    def stop(value: str) -> None:
        events.append(f"stop {value}")

    assert shared.get("workers", lambda: start("workers"), stop) == "workers"
    shared.get("router", lambda: start("router"), stop)
    shared.get("workers", lambda: start("workers"), stop)  # already up: not started again
    shared.release_for("a.py")  # the next test is in a module that uses both
    assert events == ["start workers", "start router"]
    shared.release_for("b.py")  # uses the workers only
    assert events[-1] == "stop router"
    shared.release_for("c.py")
    shared.get("workers", lambda: start("workers"), stop)  # a later user starts it afresh
    shared.stop_all()
    assert events == ["start workers", "start router", "stop router", "stop workers",
                      "start workers", "stop workers"]


def test_clusters_stop_in_the_reverse_order_they_started() -> None:
    stopped: list[str] = []
    shared = SharedClusters()
    for name in ("workers", "router"):
        shared.get(name, lambda name=name: name, stopped.append)
    shared.release_for(None)
    assert stopped == ["router", "workers"]


def test_every_module_of_a_group_is_one_unit_and_others_are_their_own() -> None:
    for group, modules in GROUPS.items():
        assert {unit_of(m + "::test_x") for m in modules} == {group}
    assert unit_of("tests/unit/test_policy.py::test_y[1]") == "tests/unit/test_policy.py"
    assert set(SHARED_FIXTURES.values()) <= set(GROUPS)
