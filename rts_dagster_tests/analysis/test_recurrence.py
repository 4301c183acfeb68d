"""analysis.recurrence.first_order against a sequential loop (the definition)."""

import numpy as np
import pytest

from rts_dagster.analysis.recurrence import first_order


def sequential(x: np.ndarray, pole: float) -> np.ndarray:
    y = np.zeros_like(x, dtype=np.float64)
    acc = 0.0
    for i, value in enumerate(x):
        acc = value + pole * acc
        y[i] = acc
    return y


@pytest.mark.parametrize("pole", [0.0, 0.2, 0.5, 0.9, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 5000])
def test_matches_the_sequential_definition(pole: float, n: int) -> None:
    x = np.random.default_rng(n).normal(2.0, 1.0, size=n)
    expected = sequential(x, pole)
    scale = np.maximum(np.abs(expected), np.cumsum(np.abs(x)) * 1e-3)
    np.testing.assert_array_less(np.abs(first_order(x, pole) - expected), 1e-13 * scale + 1e-300)


def test_along_an_axis_each_row_or_column_is_its_own_series() -> None:
    x = np.random.default_rng(0).uniform(size=(4, 300))
    by_row = first_order(x, 0.95, axis=1)
    by_col = first_order(x.T, 0.95, axis=0)
    for row in range(4):
        np.testing.assert_allclose(by_row[row], sequential(x[row], 0.95), rtol=1e-13)
    np.testing.assert_array_equal(by_col, by_row.T)


def test_known_values_and_the_input_untouched() -> None:
    x = np.array([1.0, 0.0, 0.0, 0.0])
    kept = x.copy()
    np.testing.assert_allclose(first_order(x, 0.5), [1.0, 0.5, 0.25, 0.125], rtol=0, atol=0)
    np.testing.assert_array_equal(x, kept)
    np.testing.assert_array_equal(first_order(np.ones(5), 1.0), [1, 2, 3, 4, 5])  # pole 1: cumsum
    assert first_order(np.array([], dtype=float), 0.5).shape == (0,)


def test_rejects_a_pole_outside_zero_one_and_a_scalar() -> None:
    with pytest.raises(ValueError, match="pole must be in"):
        first_order(np.ones(3), 1.5)
    with pytest.raises(ValueError, match="at least one axis"):
        first_order(np.float64(1.0), 0.5)


@pytest.mark.skipif(
    np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps, reason="no extended precision here"
)
@pytest.mark.parametrize("pole", [0.5, 0.99, 0.999, 0.9999])
def test_at_least_as_accurate_as_the_sequential_loop(pole: float) -> None:
    """Against the recurrence in extended precision: within 1e-14 relative even for a pole
    near 1, and no further off than a float64 loop, whose rounding grows there."""
    x = np.random.default_rng(1).uniform(size=20_000)
    reference = np.empty(x.size, dtype=np.longdouble)
    acc, p = np.longdouble(0), np.longdouble(pole)
    for i, value in enumerate(x):
        acc = np.longdouble(value) + p * acc
        reference[i] = acc
    relative = np.abs((first_order(x, pole) - reference) / reference).max()
    loop = np.abs((sequential(x, pole) - reference) / reference).max()
    assert float(relative) < 1e-14
    assert relative <= max(loop, 5e-16)
