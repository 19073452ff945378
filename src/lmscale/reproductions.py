"""Published claims rerun at small scale: each marked reproduced, not reproduced or inconclusive from
the records, with the gap and its interval (issue 14).

A claim compares two models' test loss at equal size (the ladder) or at equal training length (the
context study). The gap is the model's mean loss minus the reference's; its 95 % interval is
``t · σ · √(1/n_model + 1/n_reference)``, where σ is the noise floor: the standard deviation over seeds,
pooled over every (model, size) that has several. Without several seeds anywhere there is no σ, and
every verdict is "inconclusive": one seed cannot tell a gap from noise.

Verdicts per relation, with the interval [lo, hi] and the equivalence margin m (nats):

- ``better`` (lower loss): reproduced if hi < 0; not reproduced if lo ≥ 0.
- ``worse``: reproduced if lo > 0; not reproduced if hi ≤ 0.
- ``matches``: reproduced if −m ≤ lo and hi ≤ m; not reproduced if lo > m or hi < −m.
- ``at least as good``: reproduced if hi ≤ m; not reproduced if lo > m.

Anything else is inconclusive. A claim tested at several sizes (or lengths) gets the verdict they all
give, else "inconclusive" with the verdict at each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RELATIONS = ("better", "worse", "matches", "at least as good")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass(frozen=True)
class Claim:
    """``model`` stands in ``relation`` to ``reference`` in test loss, at equal ``axis`` (``d_model``: equal
    size in the ladder; ``seq_len``: equal training length in the context study)."""

    claim: str
    cite: str  # key in book/references.bib
    model: str
    reference: str
    relation: str
    axis: str = "d_model"

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} is unknown; choose one of {', '.join(RELATIONS)}")


LADDER_CLAIMS = (
    Claim("GLA matches a Transformer++ at equal parameters", "yang2024gla", "gla", "attention", "matches"),
    Claim("Mamba matches or beats a Transformer++ at equal parameters", "gu2023mamba", "mamba", "attention",
          "at least as good"),
    Claim("Linear attention without gating or decay trails a Transformer++", "yang2024gla", "linear_attention",
          "attention", "worse"),
)
CONTEXT_CLAIMS = (
    Claim("LEAP with windows beats LEAP with every layer global", "hu2022leap", "leap", "leap (window=global)",
          "better", axis="seq_len"),
    Claim("LEAP with windows competes with GPT-2-style attention", "hu2022leap", "leap", "attention", "matches",
          axis="seq_len"),
)


def noise_floor(table, loss: str = "test_loss") -> tuple[float | None, int]:
    """(σ, degrees of freedom): the seeds' standard deviation of ``loss`` pooled over every (model, size,
    length) with several seeds; (None, 0) where none has."""
    groups = table.dropna(subset=[loss]).groupby(["model", "d_model", "seq_len"])[loss]
    squares = dof = 0.0
    for _, values in groups:
        if len(values) > 1:
            squares += float(((values - values.mean()) ** 2).sum())
            dof += len(values) - 1
    return (math.sqrt(squares / dof), int(dof)) if dof else (None, 0)


def verdict(lo: float, hi: float, relation: str, margin: float) -> str:
    """The verdict of one comparison whose gap (model − reference) lies in [lo, hi]; see the module docstring."""
    if relation == "better":
        return REPRODUCED if hi < 0 else NOT_REPRODUCED if lo >= 0 else INCONCLUSIVE
    if relation == "worse":
        return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi <= 0 else INCONCLUSIVE
    if relation == "matches":
        return REPRODUCED if -margin <= lo and hi <= margin else \
            NOT_REPRODUCED if lo > margin or hi < -margin else INCONCLUSIVE
    if relation == "at least as good":
        return REPRODUCED if hi <= margin else NOT_REPRODUCED if lo > margin else INCONCLUSIVE
    raise ValueError(f"relation {relation!r} is unknown; choose one of {', '.join(RELATIONS)}")


def assess(claims, table, *, loss: str = "test_loss", margin: float = 0.05, level: float = 0.95,
           noise: tuple[float | None, int] | None = None):
    """One row per claim: the comparisons made (per size or length), the gaps with their intervals, and
    the verdict. ``table`` is a ``lmscale.ladder.ladder_table`` (with the labels the claims use);
    ``noise`` overrides the noise floor measured in ``table`` (e.g. the ladder's, for the context study)."""
    import pandas as pd
    from scipy.stats import t as student_t

    sigma, dof = noise or noise_floor(table, loss)
    quantile = float(student_t.ppf(0.5 + level / 2, dof)) if dof else math.nan
    means = table.dropna(subset=[loss]).groupby(["model", "d_model", "seq_len"], as_index=False).agg(
        loss=(loss, "mean"), seeds=("seed", "nunique"), params=("params_non_embedding", "mean"))
    rows = []
    for c in claims:
        mine, ref = means[means["model"] == c.model], means[means["model"] == c.reference]
        paired = mine.merge(ref, on=c.axis, suffixes=("", "_ref")).sort_values(c.axis)
        compared, verdicts = [], []
        for _, p in paired.iterrows():
            gap = p["loss"] - p["loss_ref"]
            half = quantile * sigma * math.sqrt(1 / p["seeds"] + 1 / p["seeds_ref"]) if sigma is not None else math.nan
            found = verdict(gap - half, gap + half, c.relation, margin) if sigma is not None else INCONCLUSIVE
            where = f"N={p['params'] / 1e6:.3g}M" if c.axis == "d_model" else f"T={int(p[c.axis])}"
            compared.append(f"{where}: {gap:+.3f}" + (f" ± {half:.3f}" if sigma is not None else ""))
            verdicts.append(found)
        if not verdicts:
            outcome, why = INCONCLUSIVE, f"not run yet: no {c.axis} has records of both {c.model} and {c.reference}"
        elif sigma is None:
            outcome, why = INCONCLUSIVE, "one seed only: the noise floor is not measured yet"
        elif len(set(verdicts)) == 1:
            outcome, why = verdicts[0], ""
        else:
            outcome, why = INCONCLUSIVE, "differs with " + ("size" if c.axis == "d_model" else "length") + ": " + \
                ", ".join(verdicts)
        rows.append({"claim": c.claim, "cite": c.cite, "relation": c.relation,
                     "gap (nats) ± 95 %": "; ".join(compared) or "—", "verdict": outcome, "why": why})
    return pd.DataFrame(rows, columns=["claim", "cite", "relation", "gap (nats) ± 95 %", "verdict", "why"])
