"""Token budgets: Chinchilla's 20×, its parametric fit and Epoch's refit, and the data-constrained rule."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lmscale.cli import main
from lmscale.config import ConfigError
from lmscale.scaling import (
    BESIROGLU_2024,
    HOFFMANN_2022,
    REPETITION_DECAY,
    effective_tokens,
    parse_count,
    token_budgets,
)

FITS = (HOFFMANN_2022, BESIROGLU_2024)
RNG = random.Random(20261207)  # seeded: a failure names inputs that the next run draws again
CITATIONS = {"hoffmann2022chinchilla", "besiroglu2024chinchilla", "muennighoff2023datalimited"}


def _by_rule(params, unique_tokens=None):
    return {b.rule: b for b in token_budgets(params, unique_tokens)}


def test_chinchilla_rule_is_twenty_tokens_per_parameter():
    n = RNG.uniform(1e6, 1e10)
    budget = _by_rule(n)["chinchilla-20x"]
    assert budget.tokens == pytest.approx(20 * n)
    assert budget.compute == pytest.approx(6 * n * 20 * n)
    assert budget.citation == "hoffmann2022chinchilla"


@pytest.mark.parametrize("fit", FITS, ids=lambda f: f.citation)
def test_fit_optimum_satisfies_its_first_order_condition(fit):
    compute = 10 ** RNG.uniform(17, 24)
    n, d = fit.compute_optimal(compute)
    assert 6 * n * d == pytest.approx(compute)
    assert fit.alpha * fit.A / n**fit.alpha == pytest.approx(fit.beta * fit.B / d**fit.beta)
    assert fit.optimal_tokens(n) == pytest.approx(d)
    for step in (0.9, 1.1):  # any other split of the same compute loses
        assert fit.loss(n * step, d / step) > fit.loss(n, d)


def test_epoch_refit_puts_chinchilla_near_twenty_tokens_per_parameter():
    chinchilla_compute = 6 * 70e9 * 1.4e12
    n, d = BESIROGLU_2024.compute_optimal(chinchilla_compute)
    assert 50e9 < n < 100e9 and 15 < d / n < 25
    n, d = HOFFMANN_2022.compute_optimal(chinchilla_compute)
    assert n < 40e9  # the rounded approach-3 constants the refit corrects


def test_budgets_are_positive_and_grow_with_the_model():
    sizes = sorted(10 ** RNG.uniform(5, 10) for _ in range(8))
    unique = 10 ** RNG.uniform(6, 10)
    rows = [_by_rule(n, unique) for n in sizes]
    for rule in rows[0]:
        tokens = [row[rule].tokens for row in rows]
        assert all(t > 0 for t in tokens)
        if rule == "data-constrained":  # flat once the corpus caps it
            assert all(a <= b for a, b in itertools.pairwise(tokens))
        else:
            assert all(a < b for a, b in itertools.pairwise(tokens))
    for n, row in zip(sizes, rows):
        for budget in row.values():
            assert budget.compute == pytest.approx(6 * n * budget.tokens)
            assert budget.citation in CITATIONS and budget.derivation


def test_effective_tokens_are_the_tokens_for_one_epoch_and_saturate_with_many():
    unique = RNG.uniform(1e6, 1e9)
    assert effective_tokens(unique, unique) == pytest.approx(unique)
    assert effective_tokens(0.3 * unique, unique) == pytest.approx(0.3 * unique)
    assert effective_tokens(2 * unique, unique) == pytest.approx(2 * unique, rel=0.02)  # repeats almost fresh
    limit = unique * (1 + REPETITION_DECAY)
    values = [effective_tokens(epochs * unique, unique) for epochs in (4, 16, 64, 256)]
    assert all(a < b < limit for a, b in itertools.pairwise(values))  # each repeat adds less, never 0
    assert effective_tokens(10_000 * unique, unique) == pytest.approx(limit)


def test_data_constrained_budget_reaches_twenty_n_effective_tokens():
    n = RNG.uniform(1e6, 1e8)
    ample = _by_rule(n, unique_tokens=100 * n)["data-constrained"]
    assert ample.tokens == pytest.approx(20 * n)  # nothing needs repeating
    repeated = _by_rule(n, unique_tokens=4 * n)["data-constrained"]
    assert effective_tokens(repeated.tokens, 4 * n) == pytest.approx(20 * n)
    assert repeated.tokens > 20 * n
    scarce = _by_rule(n, unique_tokens=0.1 * n)["data-constrained"]
    assert scarce.tokens == pytest.approx(0.1 * n * (1 + REPETITION_DECAY))  # stops at R* repetitions
    assert "data-constrained" not in _by_rule(n)


@pytest.mark.parametrize("text, value", [("125M", 125e6), ("1.3B", 1.3e9), ("6.5e6", 6.5e6),
                                         ("50k", 5e4), ("2T", 2e12), ("7", 7.0)])
def test_parse_count(text, value):
    assert parse_count(text, "params") == pytest.approx(value)


@pytest.mark.parametrize("text, problem", [("12Q", "unknown suffix 'Q'"), ("abc", "not a count"),
                                           ("", "not a count"), ("0M", "positive")])
def test_parse_count_names_the_problem(text, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        parse_count(text, "params")
    assert info.value.field == "params"


@pytest.mark.parametrize("params, unique", [(-1.0, None), (math.nan, None), (1e8, 0.0)])
def test_budgets_refuse_impossible_sizes(params, unique):
    with pytest.raises(ConfigError, match="positive"):
        token_budgets(params, unique)


def test_cli_prints_every_budget_with_its_citation(capsys):
    assert main(["budget", "--params", "125M", "--unique-tokens", "6.5M"]) == 0
    out = capsys.readouterr().out
    assert "N = 125M" in out and "U = 6.5M" in out and "2.5B" in out
    for word in ("chinchilla-20x", "hoffmann-fit", "epoch-refit", "data-constrained", *CITATIONS):
        assert word in out


def test_cli_rejects_a_bad_count(capsys):
    assert main(["budget", "--params", "12Q"]) == 2
    err = capsys.readouterr().err
    assert "params" in err and "'Q'" in err
