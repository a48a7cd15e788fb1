"""Cubic remaining-fraction schedule."""

import pytest

from pipeline.apt.schedule import remaining_fraction


def test_endpoints_and_outside_the_window():
    window = dict(start=10, end=110, final=0.4)
    assert remaining_fraction(0, **window) == 1.0
    assert remaining_fraction(10, **window) == 1.0
    assert remaining_fraction(110, **window) == 0.4
    assert remaining_fraction(500, **window) == 0.4


def test_cubic_in_the_window():
    assert remaining_fraction(60, start=10, end=110, final=0.4) == pytest.approx(0.4 + 0.6 * 0.5**3)
    assert remaining_fraction(35, start=10, end=110, final=0.2) == pytest.approx(0.2 + 0.8 * 0.75**3)


def test_monotone_non_increasing_from_one_to_final():
    values = [remaining_fraction(step, start=5, end=50, final=0.3) for step in range(60)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:], strict=False))
    assert values[0] == 1.0 and values[-1] == 0.3


@pytest.mark.parametrize(
    "window, message",
    [
        (dict(start=10, end=10, final=0.5), "start < end"),
        (dict(start=-1, end=10, final=0.5), "start < end"),
        (dict(start=0, end=10, final=0.0), "final"),
        (dict(start=0, end=10, final=1.5), "final"),
    ],
)
def test_refuses_bad_arguments(window, message):
    with pytest.raises(ValueError, match=message):
        remaining_fraction(3, **window)
