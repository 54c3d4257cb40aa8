"""The learning-rate curve: hand-computed values at the warmup, the decay and the ends."""

from __future__ import annotations

import math

import pytest

from factory.train.schedule import LRSchedule


def test_linear_warmup_then_linear_decay():
    s = LRSchedule(lr=1e-3, total_steps=110, warmup_steps=10, decay="linear", min_lr=1e-4)
    assert s(1) == pytest.approx(1e-4)          # 1/10 of the peak
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)         # the peak, at the end of warmup
    assert s(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)   # half way through the decay
    assert s(110) == pytest.approx(1e-4)        # min_lr at the last step
    assert s(500) == pytest.approx(1e-4)        # past the end: stays at min_lr


def test_cosine_decay():
    s = LRSchedule(lr=2.0, total_steps=104, warmup_steps=4, decay="cosine", min_lr=0.0)
    assert s(2) == pytest.approx(1.0)
    assert s(4) == pytest.approx(2.0)
    assert s(54) == pytest.approx(1.0)          # cos(pi/2): half the peak
    assert s(29) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert s(104) == pytest.approx(0.0, abs=1e-12)


def test_constant_after_warmup_and_no_warmup():
    s = LRSchedule(lr=3e-4, total_steps=50, warmup_steps=0, decay="constant")
    assert [s(i) for i in (1, 25, 50)] == [3e-4, 3e-4, 3e-4]
    s = LRSchedule(lr=1.0, total_steps=10, warmup_steps=0, decay="linear")
    assert s(1) == pytest.approx(0.9)           # decay starts at once
    assert s(10) == 0.0


def test_warmup_stable_decay():
    s = LRSchedule(lr=1.0, total_steps=100, warmup_steps=10, decay="wsd", decay_fraction=0.2,
                   min_lr=0.1)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == s(50) == s(82) == 1.0       # stable until the last 18 steps
    assert s(91) == pytest.approx(0.1 + 0.9 * (1 - 9 / 18))
    assert s(100) == pytest.approx(0.1)


def test_monotone_pieces():
    s = LRSchedule(lr=1.0, total_steps=200, warmup_steps=20, decay="cosine", min_lr=0.05)
    values = [s(i) for i in range(1, 201)]
    assert all(a < b for a, b in zip(values[:19], values[1:20]))
    assert all(a >= b for a, b in zip(values[19:], values[20:]))
    assert min(values) == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs", [dict(total_steps=0), dict(warmup_steps=20),
                                    dict(min_lr=2.0), dict(decay_fraction=0.0)])
def test_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        LRSchedule(**{"lr": 1.0, "total_steps": 10, **kwargs})
