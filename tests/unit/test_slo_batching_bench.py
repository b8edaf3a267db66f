"""The SLO-ODBS benchmark's SLO rule: FCFS misses the stated share of tight requests."""

from __future__ import annotations

import pytest

from scripts.bench.slo_batching import set_slos, slos_from_pilot


def test_tight_slo_is_the_quantile_fcfs_misses() -> None:
    e2e = [float(i) for i in range(1, 101)]  # a FCFS pilot's latencies, 1..100 s
    tight, loose = slos_from_pilot(e2e, 0.4, 4.0)
    assert sum(t > tight for t in e2e) / len(e2e) == pytest.approx(0.39, abs=0.011)
    assert loose == 4 * tight
    with pytest.raises(RuntimeError, match="no request"):
        slos_from_pilot([], 0.4, 4.0)


def test_set_slos_by_class() -> None:
    work = [{"class": "tight"}, {"class": "loose"}]
    set_slos(work, 1.5, 6.0)
    assert [w["slo_ms"] for w in work] == [1500, 6000]
