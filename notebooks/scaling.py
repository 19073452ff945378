# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Scaling with parameters
#
# Do recurrent-state models improve with size as fast as a Transformer does? This chapter trains a
# ladder of nine models — Transformer++ attention, GLA {cite:p}`yang2024gla`, RetNet
# {cite:p}`sun2023retnet`, Mamba {cite:p}`gu2023mamba`, Gated DeltaNet {cite:p}`yang2024gateddeltanet`,
# LEAP {cite:p}`hu2022leap`, Based {cite:p}`arora2024based`, a GLA–attention hybrid with attention in
# every fourth layer, and linear attention with neither gate nor decay {cite:p}`katharopoulos2020transformers`
# — at six sizes, on the same data, fits $L(N) = E + A\,N^{-\alpha}$ to each, with bootstrap intervals,
# and marks published claims reproduced or not. What it found comes first, read from the records; how, after.

# %% tags=["parameters"]
experiment = "scaling"  # the GPU ladder (data/sweeps/scaling.yaml and scaling-seeds.yaml)
lr_experiment = "scaling-lr"  # its learning-rate grid (data/sweeps/scaling-lr.yaml)
context_experiment = "context"  # the context-length study, for the LEAP claims (data/sweeps/context.yaml)
equivalence_margin = 0.05  # nats: how close "matches" must be, for the reproduced claims
cpu_experiment = "scaling-cpu"  # the live CPU ladder of the last section
cpu_widths = [32, 48, 64, 96]
cpu_mixers = ["attention"]
cpu_steps = 20
n_boot = 1000

# %% tags=["hide-input"]
import altair as alt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.config import ModelConfig, TrainConfig
from lmscale.data.prepare import load_manifest
from lmscale.ladder import best_lr, fit_ladders, gaps_to_reference, ladder_table, seed_spread, variant_label
from lmscale.paths import repo_root
from lmscale.presets import preset_table
from lmscale.reproductions import CONTEXT_CLAIMS, LADDER_CLAIMS, assess, noise_floor
from lmscale.results import load_records
from lmscale.scaling import HOFFMANN_2022, format_count
from lmscale.sweep import expand, load_spec
from lmscale.train import TokenData, train_and_record

plots.setup()
torch.set_num_threads(min(2, torch.get_num_threads()))
data = TokenData.from_corpus()
unique = len(data.train)


def gpu_ladder(name: str, label=None) -> pd.DataFrame:
    """The ladder rows of an experiment's GPU records (none: an empty table with the columns); ``label``
    names the models (default: mixer or hybrid pattern)."""
    records = load_records(name)
    kwargs = {"label": label} if label else {}
    if records.empty:
        return ladder_table(records.assign(status=[]), unique, **kwargs)
    return ladder_table(records[records["device"].astype(str).str.startswith("cuda")], unique, **kwargs)


def sig(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


ladder, grid = gpu_ladder(experiment), gpu_ladder(lr_experiment)
fits = fit_ladders(ladder, "test_loss", n_boot=n_boot) if not ladder.empty else pd.DataFrame()
# the context study has one seed: it borrows the ladder's noise floor
claims = pd.concat([assess(LADDER_CLAIMS, ladder, margin=equivalence_margin),
                    assess(CONTEXT_CLAIMS, gpu_ladder(context_experiment, variant_label), margin=equivalence_margin,
                           noise=noise_floor(ladder))], ignore_index=True)

# %% tags=["hide-input"]
def findings() -> str:
    if ladder.empty:
        return ("**Not yet measured.** No GPU ladder records are committed (`data/results/scaling/` holds none "
                "from a CUDA device), so this chapter has no finding about scaling yet. The sections below "
                "show the design, and the whole pipeline — sweep, records, fits, figures — run live on a "
                "CPU ladder too small to say anything about scaling.")
    planned = len(expand(load_spec(repo_root() / "data" / "sweeps" / "scaling.yaml")))
    sizes = ", ".join(f"N = {format_count(n)}" for n in ladder.groupby("d_model")["params_non_embedding"].min())
    status = (f"**Status.** {len(ladder)} GPU runs recorded of the {planned} the ladder plans, at {sizes}; "
              "the sentences below cover only those.")
    lines = []
    fitted = fits[fits["note"] == ""].set_index("model")
    for model, row in fitted.iterrows():
        lines.append(f"{model}: α = {sig(row['alpha'])} [{sig(row['alpha low'])}, {sig(row['alpha high'])}], "
                     f"E = {sig(row['E'])} [{sig(row['E low'])}, {sig(row['E high'])}] nats")
    fit_text = ("**Fits of the test loss** (95 % bootstrap intervals): " + "; ".join(lines) + "." if lines else
                "**No fit yet**: a fit of E, A and α needs at least four sizes of a model.")
    gaps = gaps_to_reference(ladder)
    trend = []
    for model, g in gaps.groupby("model"):
        g = g.sort_values("params_non_embedding")
        first, last = g.iloc[0], g.iloc[-1]
        at = lambda row: f"{row['gap']:+.3f} at {format_count(row['params_non_embedding'])}"
        trend.append(f"{model} {at(first)}" + (f" → {at(last)}" if len(g) > 1 else ""))
    spread = seed_spread(ladder)
    noise = (f"; the spread over seeds is {spread['std over seeds'].max():.3f} nats at most" if not spread.empty else
             "; one seed per point so far, so the noise floor is not yet measured")
    unrun = claims["why"].str.startswith("not run yet")
    tally = claims[~unrun]["verdict"].value_counts()
    claim_text = (f"**Published claims** (the section below): {len(claims)}, of which {int(unrun.sum())} not run yet"
                  + "".join(f"; {n} {v}" for v, n in tally.items()) + ".")
    return (status + "\n\n" + fit_text + "\n\n" + claim_text + "\n\n"
            "**Gap to attention at equal size** (test loss, nats; negative is better), per model from its "
            "smallest size to its largest: "
            + "; ".join(trend) + noise + ".")

Markdown(findings())

# %% [markdown]
# ## The design
#
# **Sizes.** Six presets from `lmscale.presets` share one shape per size (width, depth, heads of 64
# channels) across models; each mixer's MLP width is solved so its non-embedding parameters are within
# ±5 % of attention's. $N$ below counts non-embedding parameters {cite:p}`kaplan2020scaling`: the
# 50,257-row embedding is a large part of every model here (most of it at the smallest sizes), and it
# grows with width whatever the mixer does.

# %% tags=["hide-input"]
spec = load_spec(repo_root() / "data" / "sweeps" / "scaling.yaml")
runs = expand(spec)
sizes = list(dict.fromkeys(r.params["preset"] for r in runs))
models = list(dict.fromkeys(r.params["mixer"] + (f"+attention/{r.params['attention_every']}"
                                                  if r.params["attention_every"] else "") for r in runs))
presets = preset_table(sorted({r.params["mixer"] for r in runs}), presets=sizes)
shape = presets[presets["mixer"] == "attention"][["preset", "d_model", "n_layers", "n_heads", "params",
                                                  "non_embedding_params"]]
spread_by_size = presets.groupby("preset")["non_embedding_params"].agg(["min", "max"]).reindex(sizes)
shape = shape.assign(**{"N over mixers": [f"{format_count(lo)}–{format_count(hi)}" for lo, hi in spread_by_size.values]})
shape["params"], shape["non_embedding_params"] = shape["params"].map(format_count), shape["non_embedding_params"].map(format_count)
shape.columns = ["preset", "width", "layers", "heads", "parameters", "N (attention)", "N over mixers"]
plots.table(shape, "ladder-shapes")

# %% tags=["hide-input"]
first = runs[0].params
tokens = first["steps"] * first["batch_size"] * first["seq_len"]
totals = presets[presets["mixer"] == "attention"].set_index("preset")["params"]
smallest, largest = totals[sizes[0]], totals[sizes[-1]]
Markdown(
    f"**Data.** Every run sees {format_count(tokens)} tokens ({first['steps']} steps of {first['batch_size']} × "
    f"{first['seq_len']}), {tokens / unique:.1f} epochs of the {format_count(unique)}-token training split. "
    "Repeating data up to about four epochs costs almost nothing against fresh tokens, and past about sixteen "
    "it is nearly worthless {cite:p}`muennighoff2023datalimited`; so one budget for all sizes keeps every run "
    "where repetition is nearly free. It is a fixed-data ladder: Chinchilla's 20 tokens per parameter "
    f"{{cite:p}}`hoffmann2022chinchilla` (of all parameters, as Chinchilla counts them) would ask for "
    f"{format_count(20 * smallest)} tokens at the smallest "
    f"size and {format_count(20 * largest)} at the largest, so every run is data-limited, more so as it "
    "grows; the fitted $E$ therefore includes the loss that more data would remove, and α is the exponent at "
    f"this fixed data. {len(runs)} runs ({len(models)} models × {len(sizes)} sizes), one seed, plus two more "
    "seeds at two sizes (`scaling-seeds.yaml`) for the noise floor. Schedule: warmup, then cosine decay to a "
    f"tenth; AdamW; learning rate {first['lr']:g} for all"
    + (", from the grid below." if not grid.empty else ": provisional, until the grid below has run on a GPU.")
)

# %% [markdown]
# ## The learning rate
#
# Tuned once, on a grid at the two smallest sizes for attention and GLA
# (`data/sweeps/scaling-lr.yaml`), with the same data budget as the ladder. The table gives the
# validation loss of each and each row's best rate. The ladder uses one rate for every model and size:
# among the rates that finished at all four points, the one with the lowest mean validation loss
# (`lmscale.ladder.ladder_lr`), so a model whose own best differs pays that difference.

# %% tags=["hide-input"]
if grid.empty:
    display(Markdown("*Not yet measured: `data/results/scaling-lr/` holds no finished GPU run.*"))
else:
    pivot = grid.pivot_table(index=["model", "d_model"], columns="lr", values="val_loss").reset_index()
    pivot.columns = [c if isinstance(c, str) else f"lr {c:g}" for c in pivot.columns]
    best = best_lr(grid)
    pivot["best lr"] = [f"{v:g}" for v in best.set_index(["model", "d_model"]).loc[list(zip(pivot["model"],
                                                                                            pivot["d_model"])), "lr"]]
    display(plots.table(pivot, "lr-grid", formats={c: "{:.4f}" for c in pivot.columns if c.startswith("lr ")}))
    display(Markdown(f"*{plots.provenance_caption(load_records(lr_experiment))}*"))


def largest_document(split: str) -> tuple[dict, float]:
    """The split's largest document and its share of the split's tokens (from the corpus manifest)."""
    documents = [d for d in load_manifest()["documents"] if d["split"] == split]
    biggest = max(documents, key=lambda d: d["tokens"])
    return biggest, biggest["tokens"] / sum(d["tokens"] for d in documents)


both = ladder.dropna(subset=["val_loss", "test_loss"]) if not ladder.empty else ladder
if len(both):
    gap = both["val_loss"] - both["test_loss"]
    (val_doc, val_share), (test_doc, test_share) = largest_document("validation"), largest_document("test")
    display(Markdown(
        "These are validation losses; the ladder below reports test losses, and the two are not comparable: the "
        "splits hold different whole documents. On the ladder's runs, validation loss "
        + ("exceeds test loss by " if gap.min() > 0 else "differs from test loss by ")
        + (f"{gap.mean():.2f}" if gap.min() > 0 else f"{gap.mean():+.2f}")
        + f" nats on average ({gap.min():.2f} to {gap.max():.2f} over {len(both)} runs). The "
        f"corpus manifest suggests why: the validation split's largest document is *{val_doc['title']}* "
        f"(`{val_doc['id']}`, {val_share:.0%} of its tokens), the test split's is *{test_doc['title']}* "
        f"(`{test_doc['id']}`, {test_share:.0%}). Loss per document was not recorded, so that cause is "
        "read from the composition, not measured."))

# %% [markdown]
# ## Loss against size
#
# Test loss over the whole test split (305K tokens, held-out documents of the training sources)
# against $N$, with each model's fit. The table below the figure gives the fits' constants for the test
# loss and for the out-of-distribution loss (the Brown corpus), one row per model and loss.

# %% tags=["hide-input"]
def fit_curves(fits: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, f in fits[fits["note"] == ""].iterrows():
        ns = table.loc[table["model"] == f["model"], "params_non_embedding"]
        for n in np.geomspace(ns.min(), ns.max(), 40):
            rows.append({"model": f["model"], "N": n, "loss": f["E"] + f["A"] * n ** -f["alpha"]})
    return pd.DataFrame(rows, columns=["model", "N", "loss"])


def ladder_chart(table: pd.DataFrame, fits: pd.DataFrame, loss: str, title: str) -> alt.LayerChart:
    points = table.groupby(["model", "params_non_embedding"], as_index=False)[loss].mean().rename(
        columns={"params_non_embedding": "N", loss: "loss"})
    x = alt.X("N:Q", scale=alt.Scale(type="log"), title="non-embedding parameters N", axis=alt.Axis(format="~s"))
    y = alt.Y("loss:Q", scale=alt.Scale(zero=False), title=title)
    dots = alt.Chart(points).mark_point(filled=True, size=60).encode(x=x, y=y, color="model:N",
                                                                    tooltip=["model", "N", "loss"])
    lines = alt.Chart(fit_curves(fits, table)).mark_line().encode(x=x, y=y, color="model:N")
    return (dots + lines).properties(width=520, height=320)


if ladder.empty:
    display(Markdown("*Not yet measured: the figure appears when `data/results/scaling/` holds GPU records.*"))
else:
    display(ladder_chart(ladder, fits, "test_loss", "test loss (nats)"))
    display(Markdown(f"*Test loss by size, each model's fit drawn over its sizes. "
                     f"{plots.provenance_caption(load_records(experiment))}*"))

# %% tags=["hide-input"]
def fits_table(fits: pd.DataFrame) -> pd.DataFrame:
    out = fits[["model", "sizes", "N range"]].copy()
    for name in ("E", "alpha"):
        out[name] = [f"{sig(v)} [{sig(lo)}, {sig(hi)}]" if pd.notna(v) else "—"
                     for v, lo, hi in zip(fits[name], fits[f"{name} low"], fits[f"{name} high"])]
    out["note"] = fits["note"]
    return out.rename(columns={"alpha": "α [95 %]", "E": "E [95 %]"})


if not ladder.empty:
    ood = fit_ladders(ladder, "test_ood_loss", n_boot=n_boot)
    display(plots.table(pd.concat([fits_table(fits).assign(**{"fitted loss": "test"}), fits_table(ood).assign(**{"fitted loss": "Brown (OOD)"})]),
                        "ladder-fits"))

# %% [markdown]
# ## The gap to attention, and the noise floor
#
# At each size, each model's test loss minus attention's (seeds averaged). A gap is only a gap where it
# is larger than the spread between seeds of one model at one size.

# %% tags=["hide-input"]
if not ladder.empty:
    gaps = gaps_to_reference(ladder)
    gaps["N"] = gaps["params_non_embedding"].map(format_count)
    display(plots.table(gaps[["model", "N", "seeds", "loss", "gap"]], "ladder-gaps",
                        formats={"loss": "{:.4f}", "gap": "{:+.4f}"}))
    spread = seed_spread(ladder)
    if not spread.empty:
        display(plots.table(spread, "ladder-seeds", formats={"std over seeds": "{:.4f}"}))

# %% [markdown]
# ## Published claims, rerun at this scale
#
# Each claim compares two models' test loss: at equal size in the ladder, or at equal training length
# in the context study (`context_length`). The interval is 95 % from the noise floor, the spread over
# seeds pooled over every point that has several (the context study has one seed and borrows the
# ladder's); with one seed there is no interval and no verdict. "Matches" means the interval lies within
# ± the equivalence margin (`equivalence_margin`, in the caption); the rules are those of
# `lmscale.reproductions`. The LEAP claims are judged in the context study, where LEAP runs with its
# windows and with every layer global, beside attention, at each training length. A claim made at 125M–1.3B parameters and 15–300B tokens
# that does or does not hold at 2–85M and 26M tokens says what it says at this scale, no more.

# %% tags=["hide-input"]
display(plots.table(claims.drop(columns="cite"), "ladder-claims"))
display(Markdown("*Sources of the claims: " + "; ".join(
    f"{c.claim}: {{cite:t}}`{c.cite}`" for c in LADDER_CLAIMS + CONTEXT_CLAIMS) + f". Margin ±{equivalence_margin} nats.*"))

# %% [markdown]
# ## Loss against compute
#
# The same runs against their training FLOPs (the trainer's analytic count: forward and backward,
# the mixer's own sequence terms included, times tokens). At equal data, a model that costs more per
# token sits to the right of one of the same size that costs less; the lower envelope over all models is
# the compute frontier of this ladder.

# %% tags=["hide-input"]
if not ladder.empty:
    points = ladder.groupby(["model", "params_non_embedding"], as_index=False)[["train_flops", "test_loss"]].mean()
    chart = alt.Chart(points).mark_line(point=True).encode(
        x=alt.X("train_flops:Q", scale=alt.Scale(type="log"), title="training FLOPs", axis=alt.Axis(format="~e")),
        y=alt.Y("test_loss:Q", scale=alt.Scale(zero=False), title="test loss (nats)"),
        color="model:N", tooltip=["model", "params_non_embedding", "train_flops", "test_loss"],
    ).properties(width=520, height=320)
    display(chart)
    display(Markdown(f"*Test loss against training compute. {plots.provenance_caption(load_records(experiment))}*"))

# %% [markdown]
# ## Beside the literature
#
# Published fits were made on other data, tokenizers and token budgets, so their constants are not
# comparable with ours one for one; their exponents are the part worth setting side by side.
# **Literature:** Hoffmann et al.'s parametric fit $L = E + A/N^\alpha + B/D^\beta$
# {cite:p}`hoffmann2022chinchilla` has the parameter exponent printed below; Shen et al.
# {cite:p}`shen2024linearscaling` fit loss against size for linear-attention and linear-RNN models
# (TNL, HGRN2, cosFormer2) beside LLaMA from 70M to 7B parameters on 300B tokens and report that they
# scale like the Transformer; the GLA {cite:p}`yang2024gla` and Mamba {cite:p}`gu2023mamba` papers show
# their models level with or ahead of Transformer++ from 125M to 1.3B (Mamba to 2.8B) parameters.

# %% tags=["hide-input"]
Markdown(f"**Literature** (Hoffmann et al. 2022, approach 3): α = {HOFFMANN_2022.alpha}, "
         f"E = {HOFFMANN_2022.E} nats, on MassiveText with their tokenizer.")

# %% [markdown]
# ## The pipeline, live on this machine
#
# The GPU ladder above is committed data. So that every build proves the machinery end to end, this
# section trains a tiny ladder on the CPU now and passes its records through
# the same table, fit and figure. These models see a few thousand tokens; their losses say nothing
# about scaling.

# %% tags=["hide-input", "nbval-ignore-output"]
cpu_runs = []
for mixer in cpu_mixers:
    for width in cpu_widths:
        model_cfg = ModelConfig(mixer=mixer, d_model=width, n_layers=2, n_heads=2, max_seq_len=64)
        train_cfg = TrainConfig(steps=cpu_steps, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=4,
                                eval_interval=cpu_steps, eval_batches=4, log_interval=10,
                                final_eval=["test", "test_ood"], final_eval_tokens=2048)
        run_id = f"{mixer}-d{width}-l2-h2-t64-s{cpu_steps}-seed0"
        train_and_record(cpu_experiment, model_cfg, train_cfg, data, data_name="corpus", run_id=run_id)
        cpu_runs.append(run_id)

# %% tags=["hide-input"]
cpu_records = load_records(cpu_experiment)
cpu = ladder_table(cpu_records, unique)
cpu = cpu[cpu["run_id"].isin(cpu_runs)]  # this build's runs, not older ones with other settings
cpu_fits = fit_ladders(cpu, "test_loss", n_boot=200)
display(plots.table(fits_table(cpu_fits), "cpu-fits"))
display(ladder_chart(cpu, cpu_fits, "test_loss", "test loss (nats)"))
cpu_caption = plots.provenance_caption(cpu_records[cpu_records["run_id"].isin(cpu["run_id"])])
display(Markdown(f"*The live CPU ladder: {len(cpu)} runs of {cpu_steps} steps, {len(cpu_widths)} widths. {cpu_caption}*"))
