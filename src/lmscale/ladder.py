"""A scaling ladder's records as tables: one row per run, the fits per model, and the gaps to attention.

The chapters read ladders through these functions, so that what a row means (which parameters count,
which loss, which data regime) is decided once and tested, not in each notebook.

* N is the **non-embedding** parameter count (Kaplan et al. 2020): at these sizes the 50,257-row
  embedding is most of the model, and it scales with width alone, not with what the mixer does.
  The total is kept beside it.
* The data regime of a run compares its tokens with the corpus (epochs) and with Chinchilla's 20
  tokens per parameter (counting every parameter, as Hoffmann et al. do).
* Training compute is the trainer's analytic count: ``flops_per_token`` (forward and backward, the
  mixer's own sequence terms included) times the tokens seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmscale.scaling import CHINCHILLA_TOKENS_PER_PARAM, REPETITION_DECAY, fit_power_law, format_count

LOSSES = ("val_loss", "test_loss", "test_ood_loss")  # sampled validation during training; whole test splits


def model_label(model: dict[str, Any]) -> str:
    """A model's name in tables: its mixer, or the hybrid's pattern (e.g. ``gla+attention/4``)."""
    if model.get("layers"):
        names = list(dict.fromkeys(model["layers"]))
        return "+".join(names) if len(names) > 1 else names[0]
    if model.get("attention_every"):
        return f"{model['mixer']}+attention/{int(model['attention_every'])}"
    return model["mixer"]


def variant_label(model: dict[str, Any]) -> str:
    """The model's label plus the mixer options that tell two runs of one mixer apart (LEAP's window)."""
    label = model_label(model)
    options = model.get("mixer_options") or {}
    return label + ("" if not options else " (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")")


def model_fields(row) -> dict[str, Any]:
    """A run's model config from its ``load_records`` row: the ``config.model.*`` columns, nested
    ``mixer_options.*`` gathered back into a dict, and fields the run lacks (NaN in a frame) left out."""
    import pandas as pd

    model: dict[str, Any] = {"mixer_options": {}}
    for key, value in row.items():
        if not key.startswith("config.model.") or not (isinstance(value, (list, dict)) or not pd.isna(value)):
            continue
        name = key.removeprefix("config.model.")
        if name.startswith("mixer_options."):
            model["mixer_options"][name.removeprefix("mixer_options.")] = value
        elif not (name == "mixer_options" and not value):
            model[name] = value
    return model


def regime(tokens: float, params: float, unique_tokens: float) -> str:
    """Where a run sits: under Chinchilla's 20 tokens per parameter or over it, and how often it repeats
    the data against Muennighoff et al.'s horizons (≈ 4 epochs nearly free, ≈ R* + 1 = 16.4 worthless)."""
    epochs = tokens / unique_tokens
    ratio = tokens / params
    chinchilla = "below" if ratio < CHINCHILLA_TOKENS_PER_PARAM else "at or above"
    if epochs <= 1:
        repeats = "no repetition"
    elif epochs <= 4:
        repeats = "repetition nearly as good as fresh data"
    elif epochs <= 1 + REPETITION_DECAY:
        repeats = "repetition losing value"
    else:
        repeats = "repetition past its worth"
    return f"{ratio:.1f} tokens/param ({chinchilla} 20), {epochs:.1f} epochs: {repeats}"


def ladder_table(records, unique_tokens: float, label: Callable[[dict[str, Any]], str] = model_label):
    """One row per finished run of ``records`` (``lmscale.results.load_records``): model (named by
    ``label``), size, data, compute, training length, learning rate, seed and the three losses, plus the
    run's provenance."""
    import pandas as pd

    ok = records[records["status"] == "ok"]
    rows = []
    for _, r in ok.iterrows():
        model = model_fields(r)
        final = r.get("metrics.final_eval")
        final = final if isinstance(final, dict) else {}
        tokens, params = float(r["metrics.tokens"]), float(r["metrics.params"])
        rows.append({
            "model": label(model),
            "d_model": int(model["d_model"]),
            "n_layers": int(model["n_layers"]),
            "params": params,
            "params_non_embedding": float(r["metrics.params_non_embedding"]),
            "tokens": tokens,
            "epochs": tokens / unique_tokens,
            "train_flops": float(r["metrics.flops_per_token"]) * tokens,
            "seq_len": int(r["config.train.seq_len"]),
            "lr": float(r["config.train.lr"]),
            "seed": int(r["seed"]),
            "val_loss": float(r["metrics.val_loss"]),
            "test_loss": final.get("test", {}).get("loss"),
            "test_ood_loss": final.get("test_ood", {}).get("loss"),
            "regime": regime(tokens, params, unique_tokens),
            "run_id": r["run_id"],
            "git_commit": r["git_commit"],
            "git_dirty": r["git_dirty"],
            "hardware": r["hardware"],
            "torch": r["torch"],
            "date": r["date"],
        })
    columns = ["model", "d_model", "n_layers", "params", "params_non_embedding", "tokens", "epochs", "train_flops",
               "seq_len", "lr", "seed", *LOSSES, "regime", "run_id", "git_commit", "git_dirty", "hardware", "torch", "date"]
    return pd.DataFrame(rows, columns=columns).sort_values(["model", "params_non_embedding", "lr", "seed"],
                                                          ignore_index=True)


def best_lr(table, loss: str = "val_loss"):
    """Per (model, size): the learning rate with the lowest mean ``loss`` over seeds, and that loss."""
    means = table.groupby(["model", "d_model", "lr"], as_index=False)[loss].mean()
    return means.loc[means.groupby(["model", "d_model"])[loss].idxmin()].reset_index(drop=True)


def ladder_lr(table, loss: str = "val_loss") -> float:
    """The one learning rate of the whole ladder, by the rule fixed before the grid ran: among the rates
    that finished at every (model, size) point of ``table``, the one with the lowest mean ``loss``.
    A rate that diverged anywhere (no finished run, or a non-finite loss) is not eligible."""
    import numpy as np

    grid = table.pivot_table(index=["model", "d_model"], columns="lr", values=loss, aggfunc="mean")
    finished = grid.loc[:, grid.notna().all() & np.isfinite(grid).all()]
    if finished.empty:
        raise ValueError(f"no learning rate finished at every point of the grid ({len(table)} runs): "
                         "rerun the learning-rate sweep before choosing the ladder's rate")
    return float(finished.mean().idxmin())


def fit_ladders(table, loss: str = "test_loss", *, n_boot: int = 1000, level: float = 0.95):
    """Per model, L(N) = E + A·N^(−α) over its sizes (seeds averaged), with bootstrap intervals.

    A model with fewer than 4 sizes, or whose fit fails, gets a row saying why instead of numbers.
    """
    import pandas as pd

    rows = []
    for model, group in table.dropna(subset=[loss]).groupby("model"):
        points = group.groupby("params_non_embedding", as_index=False)[loss].mean()
        row: dict[str, Any] = {"model": model, "sizes": len(points),
                               "N range": f"{format_count(points['params_non_embedding'].min())}–"
                                          f"{format_count(points['params_non_embedding'].max())}"}
        try:
            fit = fit_power_law(points["params_non_embedding"], points[loss], n_boot=n_boot, level=level)
        except ValueError as e:
            row["note"] = str(e)
        else:
            row.update({"E": fit.E, "E low": fit.intervals["E"][0], "E high": fit.intervals["E"][1],
                        "alpha": fit.alpha, "alpha low": fit.intervals["alpha"][0],
                        "alpha high": fit.intervals["alpha"][1], "A": fit.A, "note": ""})
        rows.append(row)
    columns = ["model", "sizes", "N range", "E", "E low", "E high", "alpha", "alpha low", "alpha high", "A", "note"]
    return pd.DataFrame(rows, columns=columns)


def gaps_to_reference(table, loss: str = "test_loss", reference: str = "attention"):
    """Per (model, width): mean ``loss`` minus the reference model's at the same width (seeds averaged);
    negative means better than the reference. Widths the reference lacks are left out."""
    means = table.dropna(subset=[loss]).groupby(["model", "d_model"], as_index=False).agg(
        loss=(loss, "mean"), params_non_embedding=("params_non_embedding", "mean"), seeds=("seed", "nunique"))
    ref = means[means["model"] == reference].set_index("d_model")["loss"]
    means = means[means["d_model"].isin(ref.index)].copy()
    means["gap"] = means["loss"] - means["d_model"].map(ref)
    return means[means["model"] != reference].reset_index(drop=True)


def seed_spread(table, loss: str = "test_loss"):
    """Per (model, width) with several seeds: the standard deviation of ``loss``, the ladder's noise floor."""
    counted = table.dropna(subset=[loss]).groupby(["model", "d_model"])
    spread = counted[loss].agg(["std", "count"]).reset_index()
    return spread[spread["count"] > 1].rename(columns={"std": "std over seeds", "count": "seeds"})
