"""The back-off function is pure: attempt and randomness in, seconds out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soniq.core.retry import Backoff


def test_exponential_without_jitter() -> None:
    backoff = Backoff(base=2.0, factor=3.0, cap=100.0, jitter=0.0)
    assert [backoff.delay(n, lambda: 0.5) for n in (1, 2, 3, 4, 5)] == [2, 6, 18, 54, 100]


@given(
    st.integers(min_value=1, max_value=10_000),
    st.floats(min_value=0.0, max_value=0.999999),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_jitter_stays_within_its_band_and_the_cap(attempt: int, r: float, jitter: float) -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=600.0, jitter=jitter)
    raw = min(600.0, 2.0 ** min(attempt - 1, 64))
    delay = backoff.delay(attempt, lambda: r)
    assert 0.0 <= delay <= 600.0
    assert raw * (1 - jitter) - 1e-9 <= delay <= raw * (1 + jitter) + 1e-9


def test_bad_configuration_and_attempt() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(base=-1)
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(0, lambda: 0.0)
