"""Published claims marked from records: the verdict rules, the pooled noise floor, and what a table
that cannot decide a claim says about it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lmscale.reproductions import (
    CONTEXT_CLAIMS,
    INCONCLUSIVE,
    LADDER_CLAIMS,
    NOT_REPRODUCED,
    REPRODUCED,
    Claim,
    assess,
    noise_floor,
    verdict,
)


@pytest.mark.parametrize("lo, hi, relation, expected", [
    (-0.3, -0.1, "better", REPRODUCED), (0.0, 0.2, "better", NOT_REPRODUCED), (-0.1, 0.1, "better", INCONCLUSIVE),
    (0.1, 0.3, "worse", REPRODUCED), (-0.2, 0.0, "worse", NOT_REPRODUCED), (-0.1, 0.1, "worse", INCONCLUSIVE),
    (-0.04, 0.04, "matches", REPRODUCED), (0.06, 0.2, "matches", NOT_REPRODUCED),
    (-0.2, -0.06, "matches", NOT_REPRODUCED), (0.0, 0.1, "matches", INCONCLUSIVE),
    (-0.5, 0.05, "at least as good", REPRODUCED), (0.06, 0.1, "at least as good", NOT_REPRODUCED),
    (0.0, 0.1, "at least as good", INCONCLUSIVE),
])
def test_verdicts_follow_the_interval(lo, hi, relation, expected):
    assert verdict(lo, hi, relation, margin=0.05) == expected


def test_an_unknown_relation_is_refused():
    with pytest.raises(ValueError, match="relation 'beats' is unknown"):
        Claim("x", "key", "a", "b", "beats")


def _table(losses: dict[tuple[str, int], list[float]]) -> pd.DataFrame:
    rows = [{"model": model, "d_model": width, "seq_len": 1024, "seed": seed, "test_loss": loss,
             "params_non_embedding": width * 1e4}
            for (model, width), values in losses.items() for seed, loss in enumerate(values)]
    return pd.DataFrame(rows)


def test_the_noise_floor_pools_the_seeds_variances():
    table = _table({("attention", 64): [4.0, 4.2], ("gla", 64): [4.1, 4.1, 4.4], ("gla", 128): [3.9]})
    sigma, dof = noise_floor(table)
    expected = (np.var([4.0, 4.2]) * 2 + np.var([4.1, 4.1, 4.4]) * 3) / 3
    assert dof == 3 and sigma == pytest.approx(math.sqrt(expected))
    assert noise_floor(_table({("gla", 64): [4.1]})) == (None, 0)


def test_claims_are_judged_at_every_size_both_models_have():
    rng = np.random.default_rng(0)
    seeds = lambda mean: list(mean + 0.005 * rng.standard_normal(3))
    table = _table({("attention", 64): seeds(4.5), ("attention", 128): seeds(4.2),
                    ("gla", 64): seeds(4.51), ("gla", 128): seeds(4.21),  # matches
                    ("mamba", 64): seeds(4.3), ("mamba", 128): seeds(4.1),  # better: at least as good
                    ("linear_attention", 64): seeds(4.9), ("linear_attention", 128): seeds(4.15)})  # differs
    out = assess(LADDER_CLAIMS, table).set_index("claim")
    gla, mamba, linear = (out.loc[c.claim] for c in LADDER_CLAIMS)
    assert gla["verdict"] == REPRODUCED and gla["gap (nats) ± 95 %"].count("±") == 2
    assert mamba["verdict"] == REPRODUCED
    assert linear["verdict"] == INCONCLUSIVE and linear["why"] == "differs with size: reproduced, not reproduced"


def test_one_seed_or_a_missing_model_is_inconclusive_and_says_why():
    table = _table({("attention", 64): [4.5], ("gla", 64): [4.4]})
    out = assess(LADDER_CLAIMS + CONTEXT_CLAIMS, table).set_index("claim")
    assert out.loc[LADDER_CLAIMS[0].claim, "why"] == "one seed only: the noise floor is not measured yet"
    assert out.loc[LADDER_CLAIMS[0].claim, "gap (nats) ± 95 %"] == "N=0.64M: -0.100"
    assert out.loc[LADDER_CLAIMS[1].claim, "why"].startswith("not run yet: no d_model has records of both mamba")
    assert set(out["verdict"]) == {INCONCLUSIVE}
    # the ladder's noise floor may be lent to a study without seeds of its own
    lent = assess(LADDER_CLAIMS[:1], table, noise=(0.01, 10)).iloc[0]
    assert lent["verdict"] == NOT_REPRODUCED
