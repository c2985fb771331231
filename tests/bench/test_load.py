"""Arrival schedules: Poisson mean and spread, gamma burstiness, rate inf, determinism per seed."""

import math

import numpy as np
import pytest

from bench.sharegpt.load import WORKLOADS, LoadShape, arrival_offsets


def _gaps(shape: LoadShape, n: int = 4000, seed: int = 1) -> np.ndarray:
    return np.diff(arrival_offsets(n, shape, seed))


def test_infinite_rate_sends_all_at_once():
    assert arrival_offsets(5, LoadShape(math.inf), 0) == [0.0] * 5


def test_poisson_mean_and_cv():
    g = _gaps(LoadShape(10.0))
    assert g.mean() == pytest.approx(0.1, rel=0.06)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.08)  # exponential gaps: CV 1


def test_burstiness_keeps_the_rate_and_changes_the_spread():
    smooth = _gaps(LoadShape(10.0, burstiness=4.0))
    assert smooth.mean() == pytest.approx(0.1, rel=0.06)
    assert smooth.std() / smooth.mean() == pytest.approx(0.5, rel=0.1)  # gamma shape k: CV 1/sqrt(k)


def test_schedule_is_seeded_and_starts_at_zero():
    a, b = arrival_offsets(50, LoadShape(5.0), 3), arrival_offsets(50, LoadShape(5.0), 3)
    assert a == b and a[0] == 0.0 and a != arrival_offsets(50, LoadShape(5.0), 4)
    assert all(x <= y for x, y in zip(a, a[1:]))


def test_seed_workloads():
    assert WORKLOADS["burst"] == LoadShape(math.inf, None)
    assert WORKLOADS["high-conc"].max_concurrency == 512
    assert (WORKLOADS["moderate"].request_rate, WORKLOADS["steady"].request_rate) == (10.0, 5.0)
