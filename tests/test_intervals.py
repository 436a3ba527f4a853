"""The percentile bootstrap behind every CE figure's interval, and the claims read from intervals."""

from __future__ import annotations

import numpy as np
import pytest

from harness.method.metrics import bootstrap_interval, interval_above, interval_below, median_difference


def test_the_interval_covers_a_known_rate_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    rate, n, trials = 0.7, 128, 200
    covered = 0
    for trial in range(trials):
        sample = (rng.random(n) < rate).astype(float)  # 128 CEs, each valid with probability 0.7
        low, high = bootstrap_interval(sample, resamples=400, seed=trial)
        covered += low <= rate <= high
    assert 0.88 <= covered / trials <= 0.99  # nominal 0.95; the percentile bootstrap runs a little narrow


def test_the_median_interval_covers_a_normal_median_and_narrows_with_more_images() -> None:
    rng = np.random.default_rng(3)
    small = bootstrap_interval(rng.normal(2.0, 1.0, 64), statistic="median")
    large = bootstrap_interval(rng.normal(2.0, 1.0, 1024), statistic="median")
    assert small[0] < 2.0 < small[1] and large[0] < 2.0 < large[1]
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])


def test_the_interval_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    values = np.random.default_rng(0).normal(size=128)
    assert bootstrap_interval(values, seed=5) == bootstrap_interval(values, seed=5)
    assert bootstrap_interval(values, seed=5) != bootstrap_interval(values, seed=6)


def test_paired_resampling_sees_a_shift_that_unpaired_noise_would_hide() -> None:
    rng = np.random.default_rng(1)
    input_error = rng.lognormal(0.0, 1.0, 128)  # images vary far more than the CE improves on them
    ce_error = input_error * 0.9
    gap = bootstrap_interval(ce_error, input_error, statistic=median_difference)
    assert gap[1] < 0 and interval_below(gap, 0.0)
    worse = bootstrap_interval(input_error * 1.1, input_error, statistic=median_difference)
    assert not interval_below(worse, 0.0) and interval_above(worse, 0.0)


def test_degenerate_and_bad_inputs() -> None:
    assert bootstrap_interval(np.ones(64)) == (1.0, 1.0)  # every resample the same
    low, high = bootstrap_interval([0.5])
    assert np.isnan(low) and np.isnan(high) and not interval_below((low, high), 1.0)
    assert bootstrap_interval([np.nan, 1.0, 0.0, 1.0], resamples=50) != (np.nan, np.nan)  # NaN images dropped
    with pytest.raises(ValueError, match="one length"):
        bootstrap_interval(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.ones(3), level=1.5)
