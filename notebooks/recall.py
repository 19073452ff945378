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
# # Recall against state size
#
# A recurrent model must decide what to keep in a state of fixed size before it knows what it will be
# asked; attention keeps everything and pays with a cache that grows with the context. Multi-query
# associative recall (MQAR) {cite:p}`arora2023zoology` isolates that trade-off: a sequence lists
# key–value pairs, then asks for the keys again, and the model must answer each with its value. This
# chapter trains every mixer on it at four widths and plots test accuracy against the bytes of state
# each model carries, with what reading the prompt twice buys {cite:p}`arora2024jrt`. What it found
# comes first, read from the records; how, after.

# %% tags=["parameters"]
experiment = "recall"  # data/sweeps/recall.yaml and recall-jrt.yaml
cpu_experiment = "recall-cpu"  # the live CPU runs of the last section
cpu_mixers = ["attention", "gla"]
cpu_steps = 60

# %% tags=["hide-input"]
import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.paths import repo_root
from lmscale.recall import RecallConfig, best_per_point, pareto_front, recall_and_record, recall_table
from lmscale.results import load_records
from lmscale.sweep import expand, load_spec

plots.setup()
torch.set_num_threads(min(2, torch.get_num_threads()))

records = load_records(experiment)
gpu = records[records["device"].astype(str).str.startswith("cuda")] if not records.empty else records
best = best_per_point(recall_table(gpu)) if not gpu.empty else recall_table(pd.DataFrame(columns=["status", "kind"]))

# %% tags=["hide-input"]
def claim(ok: bool | None) -> str:
    return "not yet measured" if ok is None else ("reproduced" if ok else "not reproduced")


def findings() -> tuple[str, pd.DataFrame]:
    """The findings paragraph and the literature's claims, each marked from the records."""
    def acc(model: str, width_at_least: int = 0) -> pd.Series:
        return best.loc[(best["model"] == model) & (best["d_model"] >= width_at_least), "accuracy"]

    attention = acc("attention", 128)
    at_equal_state = None
    if not best.empty and {"based", "deltanet", "linear_attention"} <= set(best["model"]):
        merged = best[best["model"].isin(["based", "deltanet", "linear_attention"])]
        pivot = merged.pivot_table(index=["task", "d_model"], columns="model", values="accuracy")
        at_equal_state = bool(((pivot["based"] >= pivot["linear_attention"]) &
                               (pivot["deltanet"] >= pivot["linear_attention"])).mean() >= 0.5)
    jrt = best[best["model"].str.endswith("+ JRT-Prompt")]
    helps = None
    if not jrt.empty:
        plain = best.set_index(["model", "d_model", "task"])["accuracy"]
        gains = [row["accuracy"] - plain.get((row["mixer"], row["d_model"], row["task"]), float("nan"))
                 for _, row in jrt.iterrows()]
        gains = pd.Series(gains).dropna()
        helps = bool((gains > 0).mean() > 0.5) if len(gains) else None
    claims = pd.DataFrame([
        {"claim (literature)": "attention solves MQAR at every width (≥ 0.99 at d_model ≥ 128)",
         "source": "Arora et al. 2023 (Zoology)",
         "here": claim(None if attention.empty else bool((attention >= 0.99).all()))},
        {"claim (literature)": "Based and DeltaNet recall more than linear attention at equal width",
         "source": "Arora et al. 2024 (Based); Yang et al. 2024 (DeltaNet)", "here": claim(at_equal_state)},
        {"claim (literature)": "JRT-Prompt raises the recurrent models' accuracy",
         "source": "Arora et al. 2024 (JRT)", "here": claim(helps)},
    ])
    if best.empty:
        text = ("**Not yet measured.** No GPU recall records are committed (`data/results/recall/` holds none from "
                "a CUDA device), so this chapter has no finding yet; the claims below are the literature's, "
                "unchecked. The last section runs the whole pipeline live on a CPU at a size that says nothing.")
    else:
        hardest = best[best["num_pairs"] == best["num_pairs"].max()]
        top = hardest.sort_values("accuracy", ascending=False).groupby("model").head(1).head(5)
        text = ("**Hardest task, best width per model:** " + "; ".join(
            f"{r['model']} {r['accuracy']:.3f} at {r['state_bytes'] / 1024:,.0f} KiB of state (d_model {r['d_model']})"
            for _, r in top.iterrows()) + ".")
    return text, claims


text, claims = findings()
display(Markdown(text))
plots.table(claims, "recall-claims")

# %% [markdown]
# ## The task and the runs
#
# `lmscale.tasks.mqar` generates Zoology's MQAR: keys from the lower half of the vocabulary, values from
# the upper half, distinct within an example; each key is asked once, at a place drawn from Zoology's
# power law (most queries soon after the context, some far); the loss is on the answers only, and a
# test example identical to a training example is dropped. A model's **state** is what its layers must
# keep to go on decoding after reading the whole prompt, counted by each mixer's own `state_bytes` in
# bf16: a recurrence's fixed state, or attention's KV cache at that length.

# %% tags=["hide-input"]
runs = [*expand(load_spec(repo_root() / "data" / "sweeps" / "recall.yaml")),
        *expand(load_spec(repo_root() / "data" / "sweeps" / "recall-jrt.yaml"))]
first = runs[0].params
tasks = sorted({(r.params["seq_len"], r.params["num_pairs"]) for r in runs})
Markdown(
    f"{len(runs)} runs: {len({r.params['mixer'] for r in runs})} mixers, {first['n_layers']} layers, widths "
    f"{', '.join(map(str, sorted({r.params['d_model'] for r in runs})))}, tasks "
    f"{'; '.join(f'T = {t} with {p} pairs' for t, p in tasks)} (vocabulary {first['vocab_size']:,}), learning rates "
    f"{', '.join(f'{lr:g}' for lr in sorted({r.params['lr'] for r in runs}))} (the best kept per point), "
    f"{first['steps']:,} steps of {first['batch_size']} examples from {first['n_train']:,}, tested on "
    f"{first['n_test']:,} held-out examples."
)

# %% [markdown]
# ## Accuracy against state size
#
# One point per model, width and task (its best learning rate); the line joins the Pareto front, the
# models that no other model beats with less state.

# %% tags=["hide-input"]
def recall_chart(points: pd.DataFrame) -> alt.FacetChart:
    front = pareto_front(points)
    x = alt.X("state_bytes:Q", scale=alt.Scale(type="log"), title="state (bytes, bf16)", axis=alt.Axis(format="~s"))
    y = alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="test accuracy")
    dots = alt.Chart(points).mark_point(filled=True, size=60).encode(
        x=x, y=y, color="model:N", tooltip=["model", "d_model", "lr", "accuracy", "state_bytes"])
    line = alt.Chart(front).mark_line(color="gray", strokeDash=[3, 3]).encode(x=x, y=y)
    return alt.layer(line, dots, data=points).properties(width=320, height=260).facet(
        column=alt.Column("task:N", title=None, header=alt.Header(labelFontSize=13)))


if best.empty:
    display(Markdown("*Not yet measured: the figure appears when `data/results/recall/` holds GPU records.*"))
else:
    display(recall_chart(best))
    display(Markdown(f"*Accuracy against state. {plots.provenance_caption(gpu)}*"))
    for task, g in best.groupby("task"):
        wide = g.pivot_table(index="model", columns="d_model", values="accuracy").reset_index()
        wide.columns = [str(c) if c == "model" else f"d_model {c}" for c in wide.columns]
        display(Markdown(f"**{task}**: test accuracy at the best learning rate"))
        display(plots.table(wide, f"recall-{g['seq_len'].iloc[0]}", formats={c: "{:.3f}" for c in wide.columns[1:]}))

# %% [markdown]
# ## What it means for the scaling chapter
#
# Perplexity on prose rewards a model for predicting the common continuations, which a small state
# does well; recall asks for one specific earlier token, which a small state may have overwritten. A
# recurrent model can therefore match attention's loss on the ladder and still fall short here: the two
# chapters together say which. Where the recall gap closes with width, the state grows with it and so
# does the cost of each decoding step, measured in the inference chapter.

# %% [markdown]
# ## The pipeline, live on this machine
#
# The same run, tiny, on the CPU now: through the same records and the same tables. It proves the
# machinery; the accuracies say nothing about these mixers.

# %% tags=["hide-input", "nbval-ignore-output"]
cpu_runs = [f"{mixer}-d32-t16-p2-s{cpu_steps}" for mixer in cpu_mixers]
for mixer, run_id in zip(cpu_mixers, cpu_runs, strict=True):
    cfg = RecallConfig(mixer=mixer, d_model=32, vocab_size=32, seq_len=16, num_pairs=2, steps=cpu_steps,
                       warmup_steps=10, batch_size=32, n_train=2000, n_test=100, lr=3e-3)
    recall_and_record(cfg, experiment=cpu_experiment, run_id=run_id)

# %% tags=["hide-input"]
cpu_records = load_records(cpu_experiment)
cpu = recall_table(cpu_records)
cpu = cpu[cpu["run_id"].isin(cpu_runs)]  # this build's runs, not older ones with other settings
display(plots.table(cpu[["model", "d_model", "task", "lr", "accuracy", "state_bytes"]], "recall-cpu",
                    formats={"accuracy": "{:.3f}", "state_bytes": "{:,}"}))
display(Markdown(f"*The live CPU runs. {plots.provenance_caption(cpu_records[cpu_records['run_id'].isin(cpu['run_id'])])}*"))
