import math

import pytest

from molm_ds.train.schedule import lr_factor


def _brute(step, warmup, total, floor):
    if step <= warmup:
        return step / warmup
    p = (step - warmup) / (total - warmup)
    return floor + (1 - floor) * (1 + math.cos(math.pi * min(p, 1.0))) / 2


@pytest.mark.parametrize("warmup, total, floor", [(0, 10, 0.0), (3, 10, 0.1), (1, 2, 0.5), (5, 5, 0.1)])
def test_matches_the_formula(warmup, total, floor):
    for step in range(1, total + 3):
        want = 1.0 if warmup == total and step > warmup else _brute(step, warmup, total, floor)
        assert lr_factor(step, warmup_steps=warmup, total_steps=total, min_ratio=floor) == pytest.approx(want)


def test_hand_values():
    f = lambda s: lr_factor(s, warmup_steps=2, total_steps=6, min_ratio=0.0)  # noqa: E731
    assert [f(1), f(2), f(4), f(6), f(7)] == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError):
        f(0)
