"""Token budgets from the literature: how many training tokens a model of N parameters should see.

Unlimited data, three answers (20 to ≈50 tokens per parameter from 50M to 1.3B parameters):
  * the rule of thumb D = 20·N of Hoffmann et al. (2022), read off their approaches 1 and 2 and
    Chinchilla itself (70B parameters, 1.4T tokens);
  * the D at which N is compute-optimal under their parametric fit (approach 3)
    L(N, D) = E + A/N^α + B/D^β, with the constants printed in the paper (E=1.69, A=406.4,
    B=410.7, α=0.34, β=0.28; the TeX source carries E=1.6934, α=0.3392, β=0.2849);
  * the same under Epoch AI's refit of that data (Besiroglu et al. 2024, arXiv 2404.10102):
    E=1.8172, A=482.01, B=2085.43, α=0.3478, β=0.3658. Only the paper's abstract was readable
    when this was written; the values were checked against several independent public code bases
    that quote its table, which agree to every digit (the 1.82 often quoted is E rounded).
The printed approach-3 constants ask for ever more tokens per parameter as N grows (α > β): at
Chinchilla's own compute they put N* ≈ 32B, not 70B. Besiroglu et al. trace this to rounding and an
unconverged fit; their refit gives ≈20 tokens per parameter again, so it is the one to trust.
A fixed corpus of U unique tokens adds the data-constrained rule of Muennighoff et al. (2023,
arXiv 2305.16264): R_D = D/U − 1 repetitions are worth D' = U + U·R*·(1 − exp(−R_D/R*)) fresh
tokens, with R* = R*_D = 15.387756 from the authors' fit (≈15.4 in the paper; value from their
repository's README, huggingface/datablations). Each repetition is worth exp(−R_D/R*) of a fresh
token, so the effective data saturates at U·(1 + R*).

N counts every parameter, embeddings included, as Hoffmann et al. do. Compute is C ≈ 6·N·D FLOPs:
2N per token forward, 4N backward (Kaplan et al. 2020).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lmscale.config import ConfigError

CHINCHILLA_TOKENS_PER_PARAM = 20.0
FLOPS_PER_PARAM_TOKEN = 6  # forward 2N + backward 4N per token
REPETITION_DECAY = 15.387756  # R*_D of Muennighoff et al. (2023): repetitions at which one is worth 1/e


@dataclass(frozen=True)
class LossFit:
    """A published parametric loss L(N, D) = E + A/N^α + B/D^β (nats per token, their corpus)."""

    name: str
    citation: str  # bibliography key (book/references.bib)
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal_tokens(self, params: float) -> float:
        """The D that makes N compute-optimal: the first-order condition of min L subject to 6ND = C.

        Along 6ND = C, d log D = −d log N, so the optimum has ∂L/∂log N = ∂L/∂log D, i.e.
        α·A/N^α = β·B/D^β, which gives D = (β·B·N^α / (α·A))^(1/β).
        """
        return (self.beta * self.B * params**self.alpha / (self.alpha * self.A)) ** (1 / self.beta)

    def compute_optimal(self, compute: float) -> tuple[float, float]:
        """(N*, D*) minimising L at C = 6ND FLOPs (Hoffmann et al. eq. 4):
        N* = G·(C/6)^(β/(α+β)), D* = (C/6)/N*, G = (α·A / (β·B))^(1/(α+β))."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / FLOPS_PER_PARAM_TOKEN) ** (self.beta / (self.alpha + self.beta))
        return n, compute / FLOPS_PER_PARAM_TOKEN / n


HOFFMANN_2022 = LossFit("Hoffmann et al. 2022, approach 3", "hoffmann2022chinchilla",
                        E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU_2024 = LossFit("Besiroglu et al. 2024 (Epoch AI refit)", "besiroglu2024chinchilla",
                         E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def effective_tokens(tokens: float, unique_tokens: float, decay: float = REPETITION_DECAY) -> float:
    """What ``tokens`` drawn from ``unique_tokens`` are worth in fresh tokens (Muennighoff et al. 2023).

    D' = U + U·R*·(1 − exp(−R_D/R*)), R_D = D/U − 1 repetitions; D' = D while nothing repeats.
    """
    repetitions = tokens / unique_tokens - 1
    if repetitions <= 0:
        return tokens
    return unique_tokens * (1 + decay * -math.expm1(-repetitions / decay))


@dataclass(frozen=True)
class Budget:
    """One rule's token budget for a model: the tokens, their compute, how it follows, whom to cite."""

    rule: str
    tokens: float
    compute: float  # 6·N·D FLOPs
    derivation: str
    citation: str


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, value, "must be a positive, finite number")
    return float(value)


def _fit_budget(rule: str, fit: LossFit, n: float) -> Budget:
    d = fit.optimal_tokens(n)
    derivation = (f"N is compute-optimal under L = {fit.E} + {fit.A}/N^{fit.alpha} + {fit.B}/D^{fit.beta} "
                  f"where αA/N^α = βB/D^β: D = (βB·N^α/(αA))^(1/β) = {d / n:.1f}·N")
    return Budget(rule, d, FLOPS_PER_PARAM_TOKEN * n * d, derivation, fit.citation)


def _data_constrained_budget(n: float, unique: float, target: float) -> Budget:
    """Tokens that give ``target`` effective tokens from ``unique``, at most R* repetitions."""
    decay = REPETITION_DECAY
    if target <= unique:
        d = target
        derivation = f"U ≥ 20·N: the 20·N tokens fit in {d / unique:.2f} epochs of unique data, none repeated"
    elif target < unique * (1 + decay * -math.expm1(-1)):  # reachable within R* repetitions
        repetitions = -decay * math.log1p(-(target / unique - 1) / decay)
        d = unique * (1 + repetitions)
        derivation = (f"D' = U + U·R*·(1 − e^(−R_D/R*)) = 20·N needs R_D = −R*·ln(1 − (20N/U − 1)/R*) = "
                      f"{repetitions:.2f} repetitions (R* = {decay:.1f}): D = U·(1 + R_D), "
                      f"{d / unique:.1f} epochs")
    else:
        d = unique * (1 + decay)
        derivation = (f"20·N effective tokens need more than R* = {decay:.1f} repetitions (D' → U·(1 + R*) = "
                      f"{format_count(unique * (1 + decay))} only as epochs → ∞): stop at R_D = R*, "
                      f"{1 + decay:.1f} epochs, where one more is worth 1/e of a fresh token; "
                      f"D' = {format_count(effective_tokens(d, unique))}")
    return Budget("data-constrained", d, FLOPS_PER_PARAM_TOKEN * n * d, derivation,
                  "muennighoff2023datalimited")


def token_budgets(params: float, unique_tokens: float | None = None) -> list[Budget]:
    """Every rule's training tokens for a model of ``params`` parameters (embeddings included).

    With ``unique_tokens`` (the corpus size) the data-constrained rule is added: the tokens, repeats
    included, whose effective value reaches the 20·N rule, trained for at most R* repetitions.
    """
    n = _positive("params", params)
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n
    budgets = [
        Budget("chinchilla-20x", chinchilla, FLOPS_PER_PARAM_TOKEN * n * chinchilla,
               "D = 20·N, the compute-optimal ratio of approaches 1 and 2 (Chinchilla: 70B on 1.4T tokens)",
               "hoffmann2022chinchilla"),
        _fit_budget("hoffmann-fit", HOFFMANN_2022, n),
        _fit_budget("epoch-refit", BESIROGLU_2024, n),
    ]
    if unique_tokens is not None:
        budgets.append(_data_constrained_budget(n, _positive("unique_tokens", unique_tokens), chinchilla))
    return budgets


_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_COUNT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_count(text: str, field_name: str) -> float:
    """'125M', '1.3B', '6.5e6', '50k' -> the number; a bad count raises ConfigError naming ``field_name``."""
    match = _COUNT.fullmatch(text)
    if match is None:
        raise ConfigError(field_name, text, "is not a count; write a number with an optional K, M, B or "
                                            "T suffix, e.g. 125M, 1.3B or 6.5e6")
    number, suffix = match.groups()
    if suffix.upper() not in _SUFFIXES:
        raise ConfigError(field_name, text, f"unknown suffix {suffix!r}; use K (10^3), M (10^6), B (10^9) "
                                            "or T (10^12), e.g. 125M, 1.3B or 6.5e6")
    value = float(number) * _SUFFIXES[suffix.upper()]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(field_name, text, "must be a positive, finite count")
    return value


def format_count(value: float) -> str:
    """125e6 -> '125M', 1.31e9 -> '1.31B': three significant digits and the largest suffix that fits."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def format_budgets(params: float, unique_tokens: float | None = None) -> str:
    """``token_budgets`` as text: one line per rule, its derivation and citation beneath."""
    header = f"N = {format_count(params)} parameters"
    if unique_tokens is not None:
        header += f", U = {format_count(unique_tokens)} unique tokens"
    lines = [header + "; compute C = 6·N·D FLOPs"]
    for b in token_budgets(params, unique_tokens):
        epochs = f", {b.tokens / unique_tokens:.1f} epochs" if unique_tokens is not None else ""
        lines.append(f"{b.rule:<17} D = {format_count(b.tokens):>6} tokens ({b.tokens / params:.1f}/param"
                     f"{epochs}), C = {b.compute:.2e} FLOPs  [{b.citation}]")
        lines.append(f"{'':<17} {b.derivation}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PowerLawFit:
    """L(N) = E + A·N^(−α) fitted to a ladder of (N, L), with bootstrap percentile intervals.

    ``intervals`` maps "E", "A" and "alpha" to (low, high) at ``level``. The bootstrap resamples the
    residuals onto the fitted curve (the sizes are a fixed design: a ladder of five or six sizes
    resampled case by case would often lose the sizes that pin α down).
    """

    E: float
    A: float
    alpha: float
    intervals: dict[str, tuple[float, float]]
    level: float
    n_points: int
    n_boot: int  # bootstrap fits that converged, of those asked for

    def loss(self, params: float) -> float:
        return self.E + self.A * params ** (-self.alpha)


def _grid_starts(log_n, losses):
    """Starting points (E, log A, α) on a grid: Hoffmann et al. start L-BFGS from a grid too, because the
    loss surface has long flat valleys."""
    import numpy as np

    top = float(losses.min())
    return [(e0, float(np.log(max(float(losses.mean()) - e0, 1e-6)) + alpha0 * log_n.mean()), alpha0)
            for alpha0 in (0.05, 0.2, 0.5, 1.0) for e0 in (0.0, 0.5 * top, 0.9 * top)]


def _fit_once(log_n, losses, starts):
    """Least squares for (E, log A, α), the best over ``starts``; E ≥ 0 and below every loss, 0 < α ≤ 3."""
    import numpy as np
    from scipy.optimize import least_squares

    def residuals(theta):
        e, log_a, alpha = theta
        return e + np.exp(log_a - alpha * log_n) - losses

    top = max(float(losses.min()) - 1e-9, 1e-9)
    best = None
    for e0, log_a0, alpha0 in starts:
        start = (min(max(e0, 0.0), top), log_a0, min(max(alpha0, 1e-4), 3.0))
        result = least_squares(residuals, start, bounds=((0.0, -np.inf, 1e-4), (top, np.inf, 3.0)))
        if result.success and (best is None or result.cost < best.cost):
            best = result
    return None if best is None else best.x


def fit_power_law(params, losses, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> PowerLawFit:
    """Fit L(N) = E + A·N^(−α) to parameter counts ``params`` and losses ``losses`` (nats), with
    ``level`` bootstrap intervals from ``n_boot`` residual resamples (seeded: the same data give the same
    intervals)."""
    import numpy as np

    n = np.asarray(params, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError(f"params and losses must be two lists of one length, got shapes {n.shape} and {loss.shape}")
    if not (np.isfinite(n).all() and np.isfinite(loss).all() and (n > 0).all()):
        raise ValueError("every parameter count must be positive and every loss finite; drop the runs that diverged")
    if len(np.unique(n)) < 4:
        raise ValueError(f"a fit of E, A and α needs at least 4 distinct sizes, got {len(np.unique(n))}: "
                         "train more sizes of the ladder")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be positive, got {level} and {n_boot}")
    log_n = np.log(n)
    theta = _fit_once(log_n, loss, _grid_starts(log_n, loss))
    if theta is None:
        raise ValueError("the power-law fit did not converge from any starting point")
    fitted = theta[0] + np.exp(theta[1] - theta[2] * log_n)
    residuals = loss - fitted
    rng = np.random.default_rng(seed)  # each resample starts from the estimate: it lies near the optimum
    samples = [s for s in (_fit_once(log_n, fitted + rng.choice(residuals, size=len(residuals)), [tuple(theta)])
                           for _ in range(n_boot)) if s is not None]
    draws = np.array([[s[0], np.exp(s[1]), s[2]] for s in samples])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    intervals = {name: (float(lo), float(hi)) for name, lo, hi in zip(("E", "A", "alpha"), low, high, strict=True)}
    return PowerLawFit(E=float(theta[0]), A=float(np.exp(theta[1])), alpha=float(theta[2]), intervals=intervals,
                       level=level, n_points=len(n), n_boot=len(samples))
