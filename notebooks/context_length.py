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
# # Scaling with context
#
# A recurrent model's state has a fixed size whatever the context, so two questions follow: does it
# gain from training on longer sequences as attention does, and what does it do with positions it
# never saw in training? This chapter trains six models at one size (34M parameters) at three training
# lengths on equal tokens, then scores every position of windows four times the training length
# inside single test documents. What it found comes first, read from the records; how, after.

# %% tags=["parameters"]
experiment = "context"  # data/sweeps/context.yaml
cpu_experiment = "context-cpu"  # the live CPU run of the last section
cpu_mixers = ["attention", "gla"]
cpu_seq_len = 32
cpu_steps = 20

# %% tags=["hide-input"]
import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.config import ModelConfig, TrainConfig
from lmscale.context import extrapolation, position_frame
from lmscale.ladder import ladder_table
from lmscale.paths import repo_root
from lmscale.results import load_records
from lmscale.sweep import expand, load_spec
from lmscale.train import POSITION_BINS, TokenData, train_and_record

plots.setup()
torch.set_num_threads(min(2, torch.get_num_threads()))
data = TokenData.from_corpus()

records = load_records(experiment)
gpu = records[records["device"].astype(str).str.startswith("cuda")] if not records.empty else records
positions = position_frame(gpu) if not gpu.empty else position_frame(pd.DataFrame(columns=["status"]))
changes = extrapolation(positions)

# %% tags=["hide-input"]
def findings() -> str:
    if positions.empty:
        return ("**Not yet measured.** No GPU records of the context study are committed "
                "(`data/results/context/` holds none from a CUDA device), so this chapter has no finding yet. "
                "The sections below show the design and run the whole pipeline live on a tiny CPU model.")
    losses = ladder_table(gpu, len(data.train)).assign(train_len=gpu["config.train.seq_len"].values)
    best = losses.groupby("model")["test_loss"].idxmin()
    gains = "; ".join(f"{losses.loc[i, 'model']} best at T = {losses.loc[i, 'train_len']}" for i in best)
    breaks = changes.sort_values("change past T", ascending=False)
    worst, steadiest = breaks.iloc[0], breaks.iloc[-1]
    return (f"**Training length.** Lowest test loss: {gains}.\n\n"
            f"**Past the trained length** (mean loss over positions (T, 4T] minus that over (T/2, T]): the largest "
            f"rise is {worst['model']} trained at T = {worst['train_len']} ({worst['change past T']:+.3f} nats); the "
            f"smallest is {steadiest['model']} at T = {steadiest['train_len']} ({steadiest['change past T']:+.3f}).")


Markdown(findings())

# %% [markdown]
# ## The design

# %% tags=["hide-input"]
spec = load_spec(repo_root() / "data" / "sweeps" / "context.yaml")
runs = expand(spec)
lengths = sorted({r.params["seq_len"] for r in runs})
first = runs[0].params
tokens_per_step = first["batch_size"] * first["seq_len"]
Markdown(
    f"{len(runs)} runs at the `{first['preset']}` preset: "
    f"{len({(r.params['mixer'], str(r.params['mixer_options'])) for r in runs})} models × training lengths "
    f"{', '.join(map(str, lengths))}, each on {tokens_per_step:,} tokens a step for {first['steps']} steps "
    f"({tokens_per_step * first['steps'] / 1e6:.1f}M tokens), so a longer context means fewer, longer sequences, "
    "not more data. After training, each run scores windows of 4 × T tokens that lie inside one test "
    f"document (no separator inside), and records the mean loss in {POSITION_BINS} equal bins of positions. LEAP runs "
    "twice: with LEAP's windows (k = 4·2^l per layer, the last layer global) and with every layer global "
    "{cite:p}`hu2022leap`. Attention uses RoPE {cite:p}`su2021roformer` and is asked about positions past "
    "its training length as they are; no interpolation or rescaling is applied."
)

# %% [markdown]
# ## Loss by position
#
# One panel per training length; the dashed rule marks it. Left of the rule the model is in
# distribution; right of it, it meets positions it never trained on.

# %% tags=["hide-input"]
def position_chart(frame: pd.DataFrame) -> alt.FacetChart:
    base = alt.Chart(frame).mark_line().encode(
        x=alt.X("position:Q", scale=alt.Scale(type="log"), title="position in the window",
                axis=plots.tokens_axis()),
        y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="mean loss (nats)"),
        color="model:N", tooltip=["model", "train_len", "start", "end", "loss"])
    rule = alt.Chart(frame).mark_rule(strokeDash=[4, 4], color="gray").encode(x="train_len:Q")
    return alt.layer(base, rule).properties(width=300, height=240).facet(
        column=alt.Column("train_len:O", title="trained at T =", header=alt.Header(labelFontSize=13, titleFontSize=13)))


if positions.empty:
    display(Markdown("*Not yet measured: the figure appears when `data/results/context/` holds GPU records.*"))
else:
    display(position_chart(positions))
    display(Markdown(f"*Loss by position. {plots.provenance_caption(gpu)}*"))
    display(plots.table(changes, "context-changes", formats={c: "{:.3f}" for c in changes.columns if "loss" in c}
                        | {"change past T": "{:+.3f}"}))

# %% [markdown]
# ## The pipeline, live on this machine
#
# A tiny model per mixer, trained here and now at T = 32 and scored to 128 positions, through the
# same records and tables. It proves the machinery; it says nothing about these mixers at scale.

# %% tags=["hide-input", "nbval-ignore-output"]
cpu_runs = []
for mixer in cpu_mixers:
    model_cfg = ModelConfig(mixer=mixer, d_model=64, n_layers=2, n_heads=2, max_seq_len=4 * cpu_seq_len)
    train_cfg = TrainConfig(steps=cpu_steps, batch_size=8, seq_len=cpu_seq_len, lr=3e-3, warmup_steps=4,
                            eval_interval=cpu_steps, eval_batches=4, log_interval=10,
                            position_eval_lengths=[4 * cpu_seq_len], final_eval_tokens=4096)
    run_id = f"{mixer}-d64-l2-h2-t{cpu_seq_len}-s{cpu_steps}-seed0"
    train_and_record(cpu_experiment, model_cfg, train_cfg, data, data_name="corpus", run_id=run_id)
    cpu_runs.append(run_id)

# %% tags=["hide-input"]
cpu_records = load_records(cpu_experiment)
cpu_records = cpu_records[cpu_records["run_id"].isin(cpu_runs)]  # this build's runs, not older ones
cpu_positions = position_frame(cpu_records)
display(position_chart(cpu_positions))
display(Markdown(f"*The live CPU run. {plots.provenance_caption(cpu_records)}*"))
cpu_changes = extrapolation(cpu_positions)
plots.table(cpu_changes, "cpu-changes", formats={c: "{:.3f}" for c in cpu_changes.columns if "loss" in c}
            | {"change past T": "{:+.3f}"})
