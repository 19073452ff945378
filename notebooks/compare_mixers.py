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
# # Attention and GLA on a laptop CPU
#
# A first, deliberately tiny comparison that runs live every time the book is built: a two-layer
# Transformer with causal softmax attention {cite:p}`vaswani2017attention` and the same model with Gated
# Linear Attention {cite:p}`yang2024gla` in place of attention, trained with identical data order,
# optimiser and schedule on the corpus of the previous chapter. It exercises the whole chain —
# data, model, trainer, result records, this notebook — and shows what the plots of later chapters will
# look like. Models this small and this briefly trained say nothing about scaling; the point here is the
# machinery, and that every number below comes from a record written by the run above it.

# %% tags=["parameters"]
experiment = "tiny-compare"
mixers = ["attention", "gla"]
seeds = [0]
d_model = 64
n_layers = 2
n_heads = 2
seq_len = 64
batch_size = 16
steps = 100  # ≈ 0.6 s a step on two cores (the 50K-token head dominates): the live part stays near a minute

# %%
import altair as alt
import torch
from IPython.display import Markdown

from lmscale import plots
from lmscale.config import ModelConfig, TrainConfig
from lmscale.results import load_curves, load_records
from lmscale.train import TokenData, train_and_record

plots.setup()
torch.set_num_threads(min(2, torch.get_num_threads()))
data = TokenData.from_corpus()

# %% [markdown]
# ## The runs
# Each run writes `data/results/tiny-compare/<run_id>.jsonl`. Runs made elsewhere with the training
# template and the same `experiment` name (see the README) are picked up below as well.

# %%
for mixer in mixers:
    for seed in seeds:
        model_cfg = ModelConfig(mixer=mixer, d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=seq_len)
        train_cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=3e-3, warmup_steps=10,
                                eval_interval=20, eval_batches=8, log_interval=5, seed=seed)
        run_id = f"{mixer}-d{d_model}-l{n_layers}-h{n_heads}-t{seq_len}-s{steps}-seed{seed}"
        path, result = train_and_record(experiment, model_cfg, train_cfg, data, data_name="corpus", run_id=run_id)
        print(f"{run_id}: validation loss {result.metrics['val_loss']:.4f}")

# %%
records = load_records(experiment)
records = records[records["status"] == "ok"].sort_values("run_id")  # a failed sweep run leaves an error record
table = records[["run_id", "config.model.mixer", "seed", "metrics.params", "metrics.params_non_embedding",
                 "metrics.tokens", "metrics.val_loss", "metrics.val_perplexity", "metrics.val_bits_per_byte"]]
table.columns = ["run", "mixer", "seed", "parameters", "non-embedding", "tokens", "val loss", "val ppl", "bits/byte"]
plots.table(table, "runs", code=("run",), formats={"val loss": "{:.4f}", "val ppl": "{:.1f}", "bits/byte": "{:.4f}",
            "parameters": "{:,}", "non-embedding": "{:,}", "tokens": "{:,}"})

# %% [markdown]
# Throughput depends on the machine that builds the book, so it is shown apart from the losses:

# %% tags=["nbval-ignore-output"]
speed = records[["run_id", "metrics.tokens_per_second", "metrics.wall_seconds", "hardware"]]
speed.columns = ["run", "tokens/s", "seconds", "hardware"]
plots.table(speed, "speed", code=("run",), formats={"tokens/s": "{:,.0f}", "seconds": "{:.1f}"})

# %% [markdown]
# ## Loss curves
# Training loss (thin) is logged every five steps on the training batch; validation loss (points) is
# measured on the same fixed, evenly spaced windows of the validation split for every run.

# %%
train_curves = load_curves(experiment, "train")
eval_curves = load_curves(experiment, "eval")
color = alt.Color("run_id:N", title="run")
chart = alt.layer(
    alt.Chart(train_curves).mark_line(opacity=0.6, strokeWidth=1.5).encode(
        x=alt.X("tokens:Q", title="training tokens"), y=alt.Y("loss:Q", title="loss (nats/token)",
        scale=alt.Scale(zero=False)), color=color),
    alt.Chart(eval_curves).mark_point(filled=True, size=50).encode(x="tokens:Q", y="loss:Q", color=color),
).properties(title="Tiny attention vs GLA on the lmscale corpus", width=520, height=300)
chart

# %% tags=["nbval-ignore-output"]
Markdown(f"*Source: records in `data/results/{experiment}/`: {plots.provenance_caption(records)}*")
