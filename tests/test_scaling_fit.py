"""The ladder's power-law fit recovers known constants, its bootstrap intervals cover them, and bad
ladders are refused with the reason."""

import numpy as np
import pytest

from lmscale.scaling import fit_power_law

LADDER = np.array([2e6, 5e6, 12e6, 30e6, 70e6, 125e6])
TRUE = {"E": 2.1, "A": 480.0, "alpha": 0.35}


def _losses(noise=0.0, seed=1):
    clean = TRUE["E"] + TRUE["A"] * LADDER ** -TRUE["alpha"]
    return clean + np.random.default_rng(seed).normal(0, noise, size=len(LADDER))


def test_exact_points_give_the_constants_back():
    fit = fit_power_law(LADDER, _losses(), n_boot=20)
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((TRUE["E"], TRUE["A"], TRUE["alpha"]), rel=1e-4)
    assert fit.loss(1e9) == pytest.approx(TRUE["E"] + TRUE["A"] * 1e9 ** -TRUE["alpha"], rel=1e-6)


def test_noisy_points_have_intervals_that_cover_the_truth_and_widen_with_the_noise():
    narrow = fit_power_law(LADDER, _losses(noise=0.005), n_boot=300, seed=3)
    wide = fit_power_law(LADDER, _losses(noise=0.03), n_boot=300, seed=3)
    for name in ("E", "alpha"):
        low, high = narrow.intervals[name]
        assert low <= TRUE[name] <= high, (name, narrow.intervals[name])
        assert wide.intervals[name][1] - wide.intervals[name][0] > high - low
    assert narrow.n_boot > 250 and narrow.level == 0.95
    again = fit_power_law(LADDER, _losses(noise=0.005), n_boot=300, seed=3)
    assert again.intervals == narrow.intervals  # seeded: the same data give the same intervals


@pytest.mark.parametrize(("params", "losses", "message"), [
    (LADDER[:3], _losses()[:3], "needs at least 4 distinct sizes, got 3"),
    (np.r_[LADDER[:3], LADDER[:3]], np.r_[_losses()[:3], _losses()[:3]], "at least 4 distinct sizes"),
    (LADDER, np.r_[_losses()[:-1], np.nan], "every loss finite; drop the runs that diverged"),
    (np.r_[0, LADDER[1:]], _losses(), "parameter count must be positive"),
    (LADDER, _losses()[:-1], "two lists of one length"),
])
def test_bad_ladders_are_refused_with_the_reason(params, losses, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(params, losses, n_boot=5)
