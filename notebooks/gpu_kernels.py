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
# # GPU kernels: chunked recurrences and O(1) decoding
#
# A recurrent mixer is only worth its constant-size state if it is also fast: in training, where its
# chunked form competes with FlashAttention, and in decoding, where one step reads a state of fixed
# size while attention reads a KV cache that grows with every token. This chapter measures the
# Triton kernels of `lmscale.ops.triton` against the PyTorch forms of the literature-review chapter,
# against flash-linear-attention (fla) {cite:p}`yang2024gla`, and against PyTorch's scaled-dot-product
# attention with its FlashAttention backend:
#
# - the **chunked recurrence** $S_t = \mathrm{diag}(g_t) S_{t-1} + k_t v_t^\top$, $o_t = S_t^\top q_t$
#   with a gate per key channel (GLA), one per head (simple GLA, RetNet, Mamba-2-style
#   {cite:p}`dao2024mamba2`) and none (linear attention {cite:p}`katharopoulos2020transformers`),
#   forward and forward+backward, $H = 16$ heads of $D = 128$, 32K tokens per batch;
# - the **delta rule** of DeltaNet and Gated DeltaNet {cite:p}`yang2024deltanet`, chunked through the
#   WY transform, against fla's kernels, and **LEAP's cumulative softmax**, global and windowed;
# - the **diagonal scans** of the LRU {cite:p}`orvieto2023lru` and Mamba {cite:p}`gu2023mamba`;
# - **one decoding step** of one layer, eager and captured in a CUDA graph, against attention over a
#   KV cache of 1K to 256K tokens, and the step of a whole 24-layer GLA model.
#
# Every number comes from `lmscale bench kernels` (`lmscale.bench.kernels`), run on a GPU machine; its
# records are committed under `data/results/kernels/`. Before an implementation is timed at a size, it
# runs once at that size on fresh random inputs, and its output and every input gradient are compared
# with a higher-precision PyTorch reference on the same inputs (float32 for bf16 inputs); above a
# relative error of $2\cdot10^{-2}$ (bf16) it is not timed at all and its record says `wrong`. Peers
# face the same check.

# %% tags=["parameters"]
experiment = "kernels"

# %%
import re

import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.bench.kernel_costs import attention_counts, crossover_context, delta_counts, recurrence_counts
from lmscale.bench.kernels import FULL, GATES, OUT_OF_TIME, TOLERANCES
from lmscale.results import iter_records, load_records

plots.setup()

# the columns a chart needs, under plain names (altair reads "config.T" as a nested field)
COLUMNS = {"config.op": "op", "config.impl": "impl", "config.mode": "mode", "config.B": "B", "config.T": "T",
           "config.context": "context", "config.graphed": "graphed", "config.gate": "gate",
           "config.n_layers": "n_layers", "config.mixer": "mixer", "metrics.ms_median": "ms", "metrics.ms_p10": "p10",
           "metrics.ms_p90": "p90", "metrics.max_rel_err": "max_rel_err", "metrics.tflops": "tflops",
           "metrics.gbps": "gbps", "metrics.flops": "flops", "metrics.bytes": "bytes"}


def gpu_records(frame: pd.DataFrame) -> pd.DataFrame:
    """Timed GPU measurements, the newest of each configuration (a rerun replaces an older run; one
    skipped because its run's time ran out measured nothing, and replaces nothing)."""
    if frame.empty or "kind" not in frame:
        return pd.DataFrame(columns=[*COLUMNS.values(), "status", "hardware", "date"])
    frame = frame[(frame["kind"] == "kernel-bench") & frame["device"].astype(str).str.startswith("cuda")]
    config = [c for c in frame.columns if c.startswith("config.") and c != "config.seed"]
    error = frame["error"] if "error" in frame else pd.Series("", index=frame.index)
    frame = frame.assign(measured=~error.astype(str).str.startswith(OUT_OF_TIME)).sort_values(["measured", "date"])
    frame = frame.drop_duplicates(subset=config, keep="last")
    frame = frame.rename(columns=COLUMNS).reindex(columns=[*COLUMNS.values(), *frame.columns.difference(COLUMNS)])
    for column in ("B", "T", "context", "n_layers"):  # counts, None where an op has none
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    frame["graphed"] = frame["graphed"].fillna(False).astype(bool)
    return frame


raw = load_records(experiment)
runs = gpu_records(raw)
ok = runs[runs["status"] == "ok"].copy()
have = not ok.empty
if have:
    gpu = ", ".join(sorted(ok["hardware"].astype(str).unique()))
    versions = sorted({(r["provenance"]["versions"].get("torch"), r["provenance"]["versions"].get("triton"))
                       for r in iter_records(experiment) if r["run_id"] in set(ok["run_id"])})
    label = f"{gpu}; " + "; ".join(f"torch {t}, triton {tr}" for t, tr in versions)
    ok["us"] = ok["ms"] * 1e3


def caption(text: str) -> Markdown:
    """A table's title, naming the hardware and versions its numbers were measured with."""
    return Markdown(f"**{text}** — {label}")

# %%
Markdown(
    f"Measurements below: **{label}** ({len(ok)} timed records in `data/results/{experiment}/`)."
    if have else
    f"*No GPU records are committed yet (`data/results/{experiment}/` holds none from a CUDA device), so "
    "this chapter shows only the analysis that needs no measurement. To make them, run "
    "`PYTHONPATH=src python -m lmscale bench kernels --out OUT` on a GPU machine and commit "
    "`OUT/*.jsonl` under `data/results/kernels/`.*"
)

# %% [markdown]
# ## Two numbers first: how fast could each op be?
#
# Each op must do some floating-point work and move some bytes. Dividing the first by the GPU's
# matrix-multiply rate and the second by its memory bandwidth gives two times; the larger is a floor
# no implementation beats by much, and which one it is says whether the op is compute- or
# memory-bound. The two rates are measured by the suite itself (op `ceiling`: an 8192³ bf16 matmul
# and a 2 GiB device-to-device copy, read plus write); without them the table gives the counts alone.
#
# The counts (`recurrence_counts`, `delta_counts`, `attention_counts` in `lmscale.bench.kernel_costs`): matmul
# FLOPs of the chunked form, causal pairs only, and each tensor read or written once (the delta rule
# adds the products that form and apply its WY transform, the same with or without gates); forward+backward as 3×
# the forward's FLOPs for the recurrence (the backward's products are twice the forward's) and 3.5×
# for attention (FlashAttention's five backward products against two), plus the gradients' traffic.

# %%
ceilings = ok[ok["op"] == "ceiling"].set_index("mode") if have else pd.DataFrame()
measured_ceilings = {"matmul", "copy"} <= set(ceilings.index)
peak_tflops = ceilings.loc["matmul", "tflops"] if measured_ceilings else None
peak_gbps = ceilings.loc["copy", "gbps"] if measured_ceilings else None
rows = []
for T in FULL.seq_lens:
    B = FULL.tokens // T
    for mode in ("fwd", "fwdbwd"):
        for op in [*GATES, "delta_rule", "attention"]:
            if op == "attention":
                flops, nbytes = attention_counts(B, T, FULL.heads, FULL.head_dim, mode, 2)
            elif op == "delta_rule":
                flops, nbytes = delta_counts(B, T, FULL.heads, FULL.head_dim, mode, 2)
            else:
                flops, nbytes = recurrence_counts(B, T, FULL.heads, FULL.head_dim, GATES[op], mode, 2)
            row = {"op": op, "mode": mode, "T": T, "GFLOP": flops / 1e9, "MB moved": nbytes / 1e6}
            if measured_ceilings:
                compute_ms, memory_ms = flops / peak_tflops / 1e9, nbytes / peak_gbps / 1e6
                row.update({"compute ms": compute_ms, "memory ms": memory_ms, "floor ms": max(compute_ms, memory_ms),
                            "bound by": "compute" if compute_ms > memory_ms else "memory"})
            rows.append(row)
floors = pd.DataFrame(rows)
display(Markdown(f"Ceilings: {peak_tflops:.0f} TFLOP/s (bf16 matmul) and {peak_gbps / 1e3:.2f} TB/s (copy), measured "
                 f"on {label}. Batch of 32K tokens, H = {FULL.heads}, D = {FULL.head_dim}, bf16." if measured_ceilings
                 else "*Ceilings not measured (no `ceiling` records on a GPU), so the table gives the counts "
                      "alone; the times appear with the first GPU run of `lmscale bench kernels`.*"))
plots.table(floors, "floors", formats={"GFLOP": "{:,.1f}", "MB moved": "{:,.0f}", "compute ms": "{:.3f}",
                                       "memory ms": "{:.3f}", "floor ms": "{:.3f}"})

# %% [markdown]
# At a fixed number of tokens per batch, attention's work grows with $T$ (each token attends to $T/2$
# others on average) while the chunked recurrence's does not: its FLOPs and bytes are the same at every
# $T$. What bounds each:

# %%
bounds = floors.groupby(["op", "mode"])["bound by"].agg(lambda b: "/".join(sorted(set(b)))) if measured_ceilings else None
longest = floors[floors["T"] == max(FULL.seq_lens)].set_index(["op", "mode"])["floor ms"] if measured_ceilings else None
Markdown("*Not measured.*" if not measured_ceilings else "\n".join(
    f"- **{op}**: {bounds[op, 'fwd']}-bound forward, {bounds[op, 'fwdbwd']}-bound forward+backward; floor "
    f"{longest[op, 'fwd']:.2f} / {longest[op, 'fwdbwd']:.2f} ms at T = {max(FULL.seq_lens) // 1024}K"
    for op in [*GATES, "delta_rule", "attention"])
    + "\n\nThe recurrences' bytes are about half activations (q, k, v, gates, o) and half chunk states "
    "(a D × D matrix per head and chunk of 64 tokens, written by one pass and read by the next)."
)

# %%
if have and measured_ceilings:
    timed = ok[ok["op"].isin([*GATES, "delta_rule", "gated_delta_rule"])].copy()
    timed["counted op"] = timed["op"].replace({"gated_delta_rule": "delta_rule"}).where(timed["impl"] != "sdpa",
                                                                                         "attention")
    gap = timed.merge(floors.rename(columns={"op": "counted op"}), on=["counted op", "mode", "T"])
    gap["× floor"] = gap["ms"] / gap["floor ms"]
    table = gap.pivot_table(index=["op", "mode", "T"], columns="impl", values="× floor").reset_index()
    display(caption("Measured time over the floor (1 would be perfect)"))
    display(plots.table(table, "gap", formats={c: "{:.1f}" for c in table.columns if c not in ("op", "mode", "T")}))

# %% [markdown]
# ## Training: forward and forward+backward
#
# Time per batch of 32K tokens against the sequence length, for each gate and implementation (bars:
# 10th–90th percentile of the repeats). SDPA is the same softmax attention in every panel — the
# reference to beat, measured once per panel, so the three copies also show the run-to-run spread.
# `torch` is the PyTorch chunk form the kernels are tested against.

# %%
if have:
    train = ok[ok["op"].isin([*GATES])]
    base = alt.Chart(train).encode(
        x=alt.X("T:Q", scale=alt.Scale(type="log", base=2), title="sequence length T", axis=plots.tokens_axis()),
        color=alt.Color("impl:N", title="implementation"),
    )
    lines = base.mark_line(point=True).encode(
        y=alt.Y("ms:Q", scale=alt.Scale(type="log"), title="ms per batch"),
        tooltip=["op", "impl", "mode", "T", "B", "ms", "tflops", "max_rel_err"])
    spread = base.mark_rule().encode(y="p10:Q", y2="p90:Q")
    display(alt.layer(lines, spread).properties(width=230, height=200)
            .facet(column=alt.Column("op:N", sort=list(GATES), title=None), row=alt.Row("mode:N", title=None))
            .properties(title=f"Chunked recurrences vs SDPA (FlashAttention), bf16 — {gpu}"))
    display(Markdown(f"*Source: {plots.provenance_caption(train)}*"))

# %% [markdown]
# ## The delta rule: DeltaNet and Gated DeltaNet
#
# On the PyTorch path, DeltaNet's and Gated DeltaNet's layers take 8× GLA's or more (the `torch` column
# of the layer profile at the end of this chapter), nearly all of it in the chunk form's loop over
# chunks. The delta rule $S_t = \alpha_t (I - \beta_t k_t k_t^\top)
# S_{t-1} + \beta_t k_t v_t^\top$ {cite:p}`yang2024deltanet` is chunked through the WY / UT transform:
# per chunk a unit lower-triangular $C \times C$ system $T = (I + A)^{-1}$, $A = \mathrm{tril}(\mathrm{diag}
# (\beta)(K K^\top \odot \Gamma), -1)$, gives $W = T\,\mathrm{diag}(\beta\gamma) K$ and $U = T\,
# \mathrm{diag}(\beta) V$; a pass along the sequence forms the pseudo-values $U' = U - W S_n$ and the
# states, and the output is the gated recurrence's with $U'$ as values. Our kernels invert $I + A$ in
# 16-row blocks (forward substitution inside the four diagonal blocks, six block products for the
# rest) and compute every gradient of a chunk (through $T$, $W$, $U$, the decays and $\beta$) in one
# parallel kernel after one sequential pass for the state gradients (gated: preceded by a parallel pass
# for the pseudo-values' intra-chunk gradient, which kept the sequential pass from spilling registers). Same sizes as above: H = 16, D = 128,
# 32K tokens per batch; q, k L2-normalised and β = sigmoid(·) as the mixers make them; Gated DeltaNet's
# per-head log α spans $[-1.6, -10^{-3}]$, its initialisation's range. fla's peers are `chunk_delta_rule`
# and `chunk_gated_delta_rule`.

# %%
delta_ops = ["delta_rule", "gated_delta_rule"]
delta = ok[ok["op"].isin(delta_ops)] if have else ok
if len(delta):
    display(alt.Chart(delta).mark_line(point=True).encode(
        x=alt.X("T:Q", scale=alt.Scale(type="log", base=2), title="sequence length T", axis=plots.tokens_axis()),
        y=alt.Y("ms:Q", scale=alt.Scale(type="log"), title="ms per batch"),
        color=alt.Color("impl:N", title="implementation"),
        tooltip=["op", "impl", "mode", "T", "B", "ms", "tflops", "max_rel_err"],
    ).properties(width=230, height=200)
        .facet(column=alt.Column("op:N", sort=delta_ops, title=None), row=alt.Row("mode:N", title=None))
        .properties(title=f"Chunked delta rule vs SDPA (FlashAttention), bf16 — {gpu}"))
    display(Markdown(f"*Source: {plots.provenance_caption(delta)}*"))
    table = delta.pivot_table(index=["op", "mode", "T"], columns="impl", values="ms").reset_index()
    for peer in ("fla", "torch", "sdpa"):
        if peer in table and "ours" in table:
            table[f"ours / {peer}"] = table["ours"] / table[peer]
    display(caption("Chunked delta rule, ms per batch of 32K tokens, and our time over each peer's"))
    display(plots.table(table, "delta_rule", formats={c: "{:.3f}" if c in ("ours", "fla", "torch", "sdpa") else "{:.2f}"
                                                      for c in table.columns if c not in ("op", "mode", "T")}))
    layers = ok[(ok["op"] == "mixer_layer") & ok["mixer"].isin(["deltanet", "gated_deltanet"])
                & (ok["mode"] == "fwdbwd")].pivot_table(index="mixer", columns="impl", values="ms")
    if {"ours", "torch"} <= set(layers.columns):
        display(Markdown("Whole layers at the 350M width, forward+backward: " + ", ".join(
            f"{m} {r['ours']:.2f} ms on the kernels against {r['torch']:.1f} ms on PyTorch"
            for m, r in layers.iterrows()) + "."))
else:
    display(Markdown("*No delta-rule records are committed yet: `python -m lmscale bench kernels --device cuda "
                     "--ops delta_rule,gated_delta_rule` makes them.*"))

# %% [markdown]
# ## LEAP's cumulative softmax
#
# Every LEAP layer computes two causal softmax-weighted means, $o_t = \sum_{s \in W_t} e^{l_s} v_s /
# \sum_{s \in W_t} e^{l_s}$, over all of the past (global layers: the last one, and every layer whose
# window $k = 4 \cdot 2^l$ reaches the context) or over the last $k$ tokens. The global kernel walks the
# sequence in chunks, each row referred to its own running maximum, so every weight is $e^{l_s - m_t}
# \le 1$; the windowed kernel treats the window as a band, flash-attention style (a scalar logit per
# key, so a pair costs one multiply-add per channel). Neither subtracts anything. The PyTorch chunk form
# folds chunks in a Python loop. Op `windowed_softmax` uses $k = 64$ (layer 4's).

# %%
leap = ok[ok["op"].isin(["cumulative_softmax", "windowed_softmax"])] if have else ok
if len(leap):
    table = leap.pivot_table(index=["op", "mode", "T"], columns="impl", values="ms").reset_index()
    if {"ours", "torch"} <= set(table.columns):
        table["torch / ours"] = table["torch"] / table["ours"]
    display(caption("LEAP's cumulative softmax, ms per batch of 32K tokens"))
    display(plots.table(table, "cumulative_softmax", formats={c: "{:.3f}" for c in table.columns
                                                              if c not in ("op", "mode", "T")}))
else:
    display(Markdown("*No records of the cumulative-softmax kernels yet: they were written and checked in Triton's "
                     "interpreter after the session's GPU time was spent; `python -m lmscale bench kernels "
                     "--device cuda --ops cumulative_softmax,windowed_softmax` makes them.*"))

# %% [markdown]
# ## Decoding: one step of one layer
#
# A recurrent layer decodes with a fixed amount of work: read the state ($H \cdot D_k \cdot D_v$
# float32 numbers, 1 MiB per sequence here), update it, read it out. Attention reads its whole KV cache
# once per token, $2 \cdot L \cdot H \cdot D$ numbers for a context of $L$ tokens. The recurrent step's
# time is therefore a horizontal line and attention's a line rising with the context; where they
# cross is the context from which the recurrent layer decodes faster. Eager PyTorch pays the host's
# launch overhead on every kernel, which for a 1 MiB state dwarfs the work; a CUDA graph replays the
# step's kernels with one launch.

# %%
if have:
    decode = ok[ok["op"] == "step"].copy()
    decode["variant"] = decode["impl"] + decode["graphed"].map({True: " (graph)", False: " (eager)"})
    attention = alt.Chart().transform_filter("datum.impl == 'sdpa'").mark_line(point=True).encode(
        x=alt.X("context:Q", scale=alt.Scale(type="log", base=2), title="KV-cache length L (tokens)",
                  axis=plots.tokens_axis()),
        y=alt.Y("us:Q", scale=alt.Scale(type="log"), title="µs per step"),
        color=alt.Color("variant:N", title="step"), tooltip=["variant", "B", "context", "us"])
    recurrent = alt.Chart().transform_filter("datum.impl != 'sdpa'").mark_rule(strokeDash=[5, 3]).encode(
        y="us:Q", color="variant:N", tooltip=["variant", "B", "us"])
    display(alt.layer(attention, recurrent, data=decode).properties(width=300, height=240)
            .facet(column=alt.Column("B:O", title="batch size"))
            .properties(title=f"One layer's decoding step (H = {FULL.heads}, D = {FULL.head_dim}) — {gpu}"))
    display(Markdown(f"*Source: {plots.provenance_caption(decode)}*"))

# %% [markdown]
# The crossover, read off the measurements (interpolated between the two measured cache lengths
# around it on log–log axes), comparing like with like — a graphed recurrent step with graphed
# attention, an eager one with eager attention:

# %%
if have:
    rows = []
    for (B, graphed), group in decode.groupby(["B", "graphed"]):
        sdpa = group[group["impl"] == "sdpa"].sort_values("context")
        for _, step in group[group["impl"] != "sdpa"].iterrows():
            cross = crossover_context(list(sdpa["context"]), list(sdpa["ms"]), step["ms"]) if len(sdpa) else None
            rows.append({"batch": B, "step": step["variant"], "µs per step": step["us"],
                         "attention from": "—" if cross is None else str(cross)})
    crossovers = pd.DataFrame(rows)
    skipped = runs[(runs["op"] == "step") & (runs["status"] == "skipped") & runs["context"].notna()
                   & ~runs["graphed"]]
    display(caption("Context from which attention decodes slower than the recurrent step"))
    display(plots.table(crossovers, "crossover", formats={"µs per step": "{:.1f}"}))
    if len(skipped):
        display(Markdown("Not measured (KV cache too large for the memory budget): " + ", ".join(
            f"B = {b}, L = {c // 1024}K" for b, c in zip(skipped["B"], skipped["context"])) + "."))

# %% [markdown]
# ## Decoding the whole model
#
# One token through a 24-layer GLA model at batch 1 (`lmscale.decode.GraphedStep` captures the whole
# `LanguageModel.step` as one CUDA graph). The floor is reading every weight once per token at the
# measured copy bandwidth.

# %%
if have and measured_ceilings:
    model = ok[ok["op"] == "model_step"].copy()
    if len(model):
        model["launch"] = model["graphed"].map({True: "one CUDA graph", False: "eager"})
        model["µs per layer"] = model["us"] / model["n_layers"]
        model["weights floor µs"] = model["bytes"] / peak_gbps / 1e3
        model["× floor"] = model["us"] / model["weights floor µs"]
        display(caption(f"One token through the {int(model['n_layers'].iloc[0])}-layer GLA model, batch 1"))
        display(plots.table(model[["launch", "n_layers", "us", "µs per layer", "weights floor µs", "× floor"]]
                            .rename(columns={"us": "µs per token", "n_layers": "layers"}), "model_step",
                            formats={"µs per token": "{:,.0f}", "µs per layer": "{:.1f}",
                                     "weights floor µs": "{:,.0f}", "× floor": "{:.2f}"}))

# %% [markdown]
# ## Diagonal scans: LRU and Mamba
#
# The scans have no matrix product: each state channel is an independent first-order recurrence, so
# they are memory-bound, and the question is how many bytes an implementation moves. The PyTorch
# chunk forms materialise pairwise decays inside each chunk (for Mamba a `[B, T, chunk, D, N]`
# tensor); the kernels keep the state in registers and walk the sequence. Mamba's scan is measured at
# 8K tokens per batch: its PyTorch form would not fit at 32K.

# %%
if have:
    scans = ok[ok["op"].isin(["lru_scan", "selective_scan"])]
    if len(scans):
        display(alt.Chart(scans).mark_point(filled=True, size=90).encode(
            x=alt.X("T:O", title="sequence length T"),
            y=alt.Y("ms:Q", scale=alt.Scale(type="log"), title="ms per batch"),
            color=alt.Color("impl:N", title="implementation"), tooltip=["op", "impl", "mode", "T", "B", "ms", "gbps"],
        ).properties(width=160, height=180).facet(column=alt.Column("op:N", title=None), row=alt.Row("mode:N", title=None))
            .properties(title=f"Diagonal scans, ours vs the PyTorch chunk form — {gpu}"))
        display(Markdown(f"*Source: {plots.provenance_caption(scans)}*"))
        display(caption("Achieved bandwidth of the scans, GB/s (bytes a fused scan must move)"))
        display(plots.table(scans.pivot_table(index=["op", "mode", "T"], columns="impl", values="gbps").reset_index(),
                            "scan_gbps", formats={"ours": "{:,.0f}", "torch": "{:,.0f}"}))

# %% [markdown]
# ## Where a layer's time goes
#
# The issue behind these kernels asks to measure before writing the next one: every mixer's layer
# (projections, gates, norms and its op) at the 350M width, forward and forward+backward, as a model
# runs it on the GPU (`ours`: our kernels where the mixer has them) and, for mixers with kernels, on
# the PyTorch path (op `mixer_layer` of the suite). Each mixer's layer 0 is built: for Based that is
# its gated short convolution (no kernel of ours), so Based's linear-attention layers are measured as
# JRT's, the same layer with a prefix encoder. Based's and JRT's Taylor features are float32 on the
# PyTorch path; a bf16 model hands them to the kernel in bf16, so its products run on tensor cores (in
# float32 JRT's layer took 26.2 ms forward+backward, no faster than on PyTorch). Simple GLA's bf16
# layer misses the check on both paths alike (its op passes at every size above): the deviation sits
# at the first positions, where $o_t$ sums one or two terms $(q_t \cdot k_s)\, v_s$ whose products
# can be near zero (random queries and keys are nearly orthogonal), and the per-head RMSNorm divides
# by that small norm, magnifying bf16's rounding of the products. It is the layer's conditioning in
# bf16, not a kernel's error, and the record says `wrong` all the same.

# %%
layer_times = ok[ok["op"] == "mixer_layer"] if have else ok
if len(layer_times):
    display(caption("One mixer layer, ms per batch"))
    display(plots.table(layer_times.pivot_table(index="mixer", columns=["mode", "impl"], values="ms").reset_index(),
                        "mixer_layers"))
    as_run = layer_times[(layer_times["impl"] == "ours") & (layer_times["mode"] == "fwdbwd")].set_index("mixer")["ms"]
    if "gla" in as_run:
        slowest = (as_run / as_run["gla"]).sort_values(ascending=False)
        display(Markdown("Forward+backward as a model runs each layer, relative to GLA's: " + ", ".join(
            f"{name} {ratio:.1f}×" for name, ratio in slowest.items()) + "."))
    as_run_records = layer_times[(layer_times["impl"] == "ours") & (layer_times["mode"] == "fwdbwd")]
    breakdown = as_run_records.get("metrics.top_kernels", pd.Series(dtype=object)).dropna()
    if len(breakdown) and "gla" in as_run:
        heavy = [m for m in slowest.index if slowest[m] >= 2]
        rows = [{"mixer": mixer, "kernel": name, "ms": ms, "launches": launches}
                for mixer, top in zip(as_run_records["mixer"], as_run_records["metrics.top_kernels"])
                if mixer in heavy and isinstance(top, list) for name, ms, launches in top[:5]]
        display(caption("The layers at 2× GLA's time or more: their five most expensive kernels, forward+backward"))
        display(plots.table(pd.DataFrame(rows), "layer_kernels", formats={"ms": "{:.3f}"}))
    else:
        display(Markdown("*These layer records predate the per-kernel breakdown (`top_kernels`); the next "
                         "GPU run of `--ops mixer_layer` adds, for each layer, its most expensive kernels.*"))
    not_timed = runs[(runs["op"] == "mixer_layer") & (runs["status"] != "ok")]
    for (mixer, status), rows in not_timed.groupby(["mixer", "status"]):
        display(Markdown(f"*{mixer}: {', '.join(sorted(set(rows['mode'])))} {status} "
                         f"({', '.join(sorted(set(rows['impl'])))}); the reason is in the last table.*"))
else:
    display(Markdown("*No `mixer_layer` records are committed yet: `python -m lmscale bench kernels --device cuda "
                     "--ops mixer_layer` makes them.*"))

# %% [markdown]
# ## Targets
#
# What the kernels were written to achieve, each checked against the records (a target whose
# measurement is missing says so rather than passing).

# %%
def ms(op, impl, mode="fwdbwd", **where):
    """The median ms of one timed configuration, or None."""
    rows = ok[(ok["op"] == op) & (ok["impl"] == impl) & (ok["mode"] == mode)]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    return None if rows.empty else float(rows["ms"].min())


def target(text, measured, goal, met):
    return {"target": text, "measured": measured, "goal": goal,
            "met": "—" if met is None else ("yes" if met else "NO")}


def ratio_text(values):
    return f"worst ratio {max(values):.2f}" if values else "missing"


if have:
    ours = runs[runs["impl"] == "ours"]
    longest, shortest = max(FULL.seq_lens), min(FULL.seq_lens)
    kernels = ours[ours["op"] != "mixer_layer"]  # whole layers are profiled, not targets
    rows = [target("every kernel of ours passes its correctness gate at full size",
                   f"{(kernels['status'] == 'wrong').sum()} wrong of {len(kernels)}", "0 wrong",
                   None if kernels.empty else bool((kernels["status"] != "wrong").all()))]
    gla = [ms("gla", "ours", T=T) / ms("gla", "fla", T=T) for T in FULL.seq_lens
           if ms("gla", "ours", T=T) and ms("gla", "fla", T=T)]
    rows.append(target("per-channel gate (GLA) forward+backward no slower than fla's chunk_gla at every T",
                       ratio_text(gla), "ratio ≤ 1 at each T",
                       max(gla) <= 1 if len(gla) == len(FULL.seq_lens) else None))
    ours_short, sdpa_short = ms("gla", "ours", T=shortest), ms("gla", "sdpa", T=shortest)
    rows.append(target(f"stretch: GLA forward+backward no slower than SDPA at T = {shortest // 1024}K",
                       f"{ours_short:.2f} vs {sdpa_short:.2f} ms" if ours_short and sdpa_short else "missing",
                       "ratio ≤ 1", ours_short <= sdpa_short if ours_short and sdpa_short else None))
    scalar = ours[(ours["op"] == "simple_gla") & (ours["mode"] == "fwdbwd")]
    scalar_ok = len(scalar) == len(FULL.seq_lens) and bool((scalar["status"] == "ok").all())
    rows.append(target("scalar gate forward+backward correct on this GPU with this Triton (fla refuses it)",
                       f"{(scalar['status'] == 'ok').sum()} of {len(FULL.seq_lens)} sizes checked and timed",
                       "all", scalar_ok if len(scalar) else None))
    ours_long, sdpa_long = ms("simple_gla", "ours", T=longest), ms("simple_gla", "sdpa", T=longest)
    rows.append(target(f"scalar gate forward+backward at T = {longest // 1024}K at least 3× faster than SDPA",
                       f"{sdpa_long / ours_long:.1f}× ({ours_long:.2f} vs {sdpa_long:.2f} ms)"
                       if ours_long and sdpa_long else "missing", "≥ 3×",
                       sdpa_long >= 3 * ours_long if ours_long and sdpa_long else None))
    step, fla_step = ms("step", "ours", "step", B=1, graphed=True), ms("step", "fla", "step", B=1, graphed=True)
    rows.append(target("one GLA layer's step at B = 1 in a CUDA graph ≤ 5 µs",
                       f"{step * 1e3:.1f} µs (fla {fla_step * 1e3:.1f} µs)" if step and fla_step
                       else (f"{step * 1e3:.1f} µs" if step else "missing"), "≤ 5 µs",
                       step * 1e3 <= 5 if step else None))
    model_graphed = ms("model_step", "ours", "step", graphed=True)
    rows.append(target("a whole 24-layer recurrent model's step captured as one CUDA graph",
                       f"{model_graphed * 1e3:,.0f} µs per token" if model_graphed else "missing",
                       "captured, checked and timed", model_graphed is not None if have else None))
    graphed_sdpa = decode[(decode["impl"] == "sdpa") & (decode["B"] == 1) & decode["graphed"]].sort_values("context")
    cross = crossover_context(list(graphed_sdpa["context"]), list(graphed_sdpa["ms"]), step) \
        if step and len(graphed_sdpa) else None
    rows.append(target("crossover context where recurrent decoding beats attention (both graphed, B = 1)",
                       "missing" if cross is None else (f"from {cross}" if cross.context else str(cross)), "≤ 2K",
                       None if cross is None else (cross.context or cross.high or float("inf")) <= 2048))
    delta_ratios = [ms("delta_rule", "ours", T=T) / ms("delta_rule", "fla", T=T) for T in FULL.seq_lens
                    if ms("delta_rule", "ours", T=T) and ms("delta_rule", "fla", T=T)]
    rows.append(target("item 4, DeltaNet's chunk: forward+backward no slower than fla's chunk_delta_rule at every T",
                       ratio_text(delta_ratios), "ratio ≤ 1 (our goal; the issue sets none)",
                       max(delta_ratios) <= 1 if len(delta_ratios) == len(FULL.seq_lens) else None))
    gated_delta = ours[(ours["op"] == "gated_delta_rule") & (ours["mode"] == "fwdbwd")]
    rows.append(target("item 4, Gated DeltaNet's chunk: forward+backward correct on this GPU with this Triton "
                       "(fla refuses it)", f"{(gated_delta['status'] == 'ok').sum()} of {len(FULL.seq_lens)} sizes "
                       "checked and timed", "all",
                       bool((gated_delta["status"] == "ok").all()) and len(gated_delta) == len(FULL.seq_lens)
                       if len(gated_delta) else None))
    display(caption("Targets"))
    display(plots.table(pd.DataFrame(rows), "targets"))

# %% [markdown]
# **A gate per key channel.** With one decay per head, the intra-chunk decays form a $C\times C$ matrix
# and the chunk is three matrix products; with one decay per key channel they do not factor. The
# kernels split the chunk into 16-row sub-chunks and pair each with every key up to its end through one
# reference row (the cumulative decay just before it): queries scaled by $e^{b-r} \le 1$, keys by
# $e^{r-b}$, one tensor-core product per sub-chunk. Keys before the sub-chunk get factors $\le 1$; keys
# inside it get at most $e^{\Delta}$, where $\Delta$ is the sub-chunk's own decay. Where $\Delta$
# exceeds 40 (a decay of $e^{-40}$ within 16 tokens: with GLA's gate temperature of 16, gate
# pre-activations near $-40$ on every one of them), the sub-chunk is flagged and redone by an exact
# launch of the same kernel whose every exponent is $\le 0$, one $(t, s, \text{channel})$ cube at a time;
# the tests put both kinds in one input. The in-chunk cumulative
# gates are written once per forward (as fla does) instead of re-summed in every kernel, the score
# matrix is kept from the forward, and the stored chunk states are bf16 (the recurrence itself runs in
# float32). The stretch target stays out of reach: the passes that run along the sequence (the states,
# twice, and their gradients) take about a third of the per-channel forward+backward by themselves, and
# the float32 gates, their in-chunk sums and their gradient are 0.8 GB of traffic. `docs/NOTES.md`
# keeps every version's time, prediction and per-kernel profile.

# %% [markdown]
# ## What a training step costs
#
# A kernel that is fast alone can still leave a training step slow: the step also runs the
# projections, the MLPs, the norms, the head's loss over 50,257 classes and the optimiser. `lmscale bench
# train` (`lmscale.bench.training`) times the trainer's own step (`lmscale.train.training_step`) for
# every mixer at the 125M and 350M presets: T = 2048, 32K tokens per optimiser step, bf16 autocast,
# each block compiled, the loss computed with the head chunk by chunk so the `[tokens, vocab]` logits
# never exist (`lmscale.loss`: Liger-Kernel's fused kernel on CUDA), and fused AdamW. Each point runs in
# its own process; warm-up steps pay for compilation and the median of the timed steps is reported.
# MFU is the analytic training FLOPs (three times the forward's matmuls, causal pairs only) over the
# card's dense bf16 peak; the counted MFU uses what `torch.utils.flop_counter` sees in one eager step of
# the PyTorch forms instead (it cannot see Triton kernels).

# %%
from lmscale.bench.step_code import current_code_flags
from lmscale.bench.training import EXPERIMENT as THROUGHPUT
from lmscale.bench.training import variant
from lmscale.mixers import available

# attention first: cuDNN's flash kernels carry "sm90_" in their names too
KERNEL_KINDS = (("attention (flash)", ("flash", "fmha", "attention")),
                ("matmul (cuBLAS)", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "splitkreduce")),
                ("fused elementwise (inductor)", ("triton_poi", "triton_red", "triton_per", "triton_tem")),
                ("loss (Liger)", ("cross_entropy", "element_mul")),
                ("optimiser", ("adam", "multi_tensor", "foreach")))


def kernel_kind(name: str) -> str:
    """A kernel's family, by its name; lmscale's own Triton kernels are what remains of the Triton ones."""
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other (incl. lmscale's Triton kernels)"


steps = load_records(THROUGHPUT)
if not steps.empty:
    steps = steps[steps["device"].astype(str).str.startswith("cuda")]
# numbers of library code that has changed since are withheld: they describe code that no longer runs. Which
# code counts is the mixer's own (lmscale.bench.step_code): a change to one mixer's scan withholds its records only
if not steps.empty:
    stale = pd.Series([flag is False for flag in current_code_flags(steps)], index=steps.index)
    if stale.any():
        mixer_of = steps["config.mixer"] if "config.mixer" in steps else pd.Series(None, index=steps.index)
        withheld = sorted({f"{m if isinstance(m, str) else 'the loss head'} at {str(c)[:7]}"
                           for c, m in zip(steps.loc[stale, "git_commit"], mixer_of[stale])})
        steps = steps[~stale]
        display(Markdown(f"*{int(stale.sum())} throughput record(s) are not shown ({', '.join(withheld)}): the code "
                         "their training step runs has changed since they were measured. `docs/NOTES.md` keeps what "
                         "they found and what was changed because of it; rerunning the benchmarks replaces them.*"))
train_bench = steps[steps["kind"] == "train-bench"] if not steps.empty else steps
if len(train_bench):
    def step_variant(r) -> str:
        """The record's way of fitting its step (recomputed blocks, micro-batches, eager), "" for the plain step."""
        micro, recompute = r.get("config.micro_batches"), r.get("config.activation_checkpointing")
        return variant({"activation_checkpointing": bool(recompute) if pd.notna(recompute) else False,
                        "micro_batches": int(micro) if pd.notna(micro) else 1,
                        "compile": bool(r.get("config.compile", True))})

    train_bench = train_bench.assign(variant=[step_variant(r) for _, r in train_bench.iterrows()])
    train_bench = train_bench.assign(label=train_bench["config.mixer"] + train_bench["variant"].map(
        lambda v: f" ({v})" if v else ""))
    point_key = ["config.mixer", "config.preset", "variant"]
    repeated = (train_bench[train_bench["status"] == "ok"].sort_values("date").groupby(point_key)
                .filter(lambda d: len(d) > 1))
    train_bench = train_bench.sort_values("date").drop_duplicates(point_key, keep="last")
    table_rows = []
    for _, r in train_bench.sort_values(["config.preset", "config.mixer", "variant"]).iterrows():
        okay = r["status"] == "ok"
        table_rows.append({
            "preset": r["config.preset"], "mixer": r["label"],
            "K tokens/s": r["metrics.tokens_per_second"] / 1e3 if okay else None,
            "MFU": r["metrics.mfu"] if okay else None,
            "MFU, counted FLOPs": r.get("metrics.mfu_counted") if okay else None,
            "step ms": r["metrics.step_ms_median"] if okay else None,
            "peak GB": r["metrics.peak_memory_bytes"] / 1e9 if okay else None,
            "commit": str(r["git_commit"])[:7],
            "note": "" if okay else f"{r['status']}: {str(r.get('error', ''))[:120]}"})
    display(Markdown(f"**One training step per mixer and size** — "
                     f"{', '.join(sorted(train_bench['hardware'].astype(str).unique()))}"))
    def shown(spec: str):
        return lambda value: "—" if value is None or pd.isna(value) else spec.format(value)

    display(plots.table(pd.DataFrame(table_rows), "train_steps",
                        formats={"K tokens/s": shown("{:,.1f}"), "MFU": shown("{:.1%}"),
                                 "MFU, counted FLOPs": shown("{:.1%}"), "step ms": shown("{:.1f}"),
                                 "peak GB": shown("{:.1f}")}, code=("commit",)))
    display(Markdown(f"*Source: {plots.provenance_caption(train_bench)} Each row is the newest record of its "
                     "mixer, size and way of running the step (in brackets: blocks recomputed in the backward, "
                     "the step's sequences split into micro-batches whose gradients accumulate, or blocks not "
                     "compiled); the commit column says which code it measured.*"))
    if len(repeated):
        def in_turn(values, spec: str) -> str:
            return " → ".join(spec.format(v) for v in values)

        again = []
        for (mixer, preset, _), d in repeated.groupby(point_key, sort=True):
            kernel, step = d["metrics.profiled_kernel_ms"], d["metrics.step_ms_median"]
            profiled = bool(kernel.notna().all())
            again.append({"preset": preset, "mixer": d["label"].iloc[-1],
                          "K tokens/s": in_turn(d["metrics.tokens_per_second"] / 1e3, "{:.1f}"),
                          "step change": step.iloc[-1] / step.iloc[0] - 1,
                          "kernel ms": in_turn(kernel, "{:.1f}") if profiled else "not profiled",
                          "not kernel ms": in_turn(step - kernel, "{:.0f}") if profiled else "not profiled",
                          "kernel change": kernel.iloc[-1] / kernel.iloc[0] - 1 if profiled else None,
                          "commits": in_turn((c[:7] for c in d["git_commit"]), "{}")})
        again = pd.DataFrame(again)
        moved, profiled = again[again["step change"].abs() > 0.05], again[again["kernel change"].notna()]
        text = (f"**The same point measured again.** {len(again)} points were measured more than once at the same "
                "training-step code, in different sessions (each may get another machine of the same kind). ")
        if len(moved):
            text += (f"In {len(moved)} of them the median step moved by more than 5 % (up to "
                     f"{moved['step change'].abs().max():.0%}), so a single number carries that much uncertainty. ")
        else:
            text += "No median step moved by more than 5 %. "
        if len(profiled):
            text += (f"Where both runs profiled their step ({len(profiled)} points), the kernels' own time moved by at "
                     f"most {profiled['kernel change'].abs().max():.1%}: what moves is the time outside the kernels "
                     "(launches and host work), which depends on the machine's host, so those steps are partly "
                     "bound by the host.")
        display(Markdown(text))
        display(plots.table(again, "train_steps_again", formats={"step change": "{:+.1%}", "kernel change": "{:+.1%}"},
                            code=("commits",)))
    measured = train_bench[train_bench["status"] == "ok"]
    chart_data = measured.assign(mixer=measured["label"])
    chart_data = chart_data.rename(columns={"config.preset": "preset", "metrics.mfu": "MFU"})
    display(alt.Chart(chart_data[["mixer", "preset", "MFU"]]).mark_bar().encode(
        x=alt.X("MFU:Q", axis=alt.Axis(format="%"), title="model FLOPs utilisation (analytic FLOPs)"),
        y=alt.Y("mixer:N", sort="-x", title=None), color=alt.Color("preset:N", title="preset"),
        yOffset="preset:N").properties(height=22 * len(chart_data), title="Training step, 32K tokens, T = 2048"))
    kinds = [{"preset": r["config.preset"], "mixer": r["label"],
              "kind": kernel_kind(k["name"]),
              "share": k["share"]}
             for _, r in measured.iterrows() if isinstance(r.get("metrics.top_kernels"), list)
             for k in r["metrics.top_kernels"]]
    if kinds:
        where = pd.DataFrame(kinds).groupby(["preset", "mixer", "kind"], as_index=False)["share"].sum()
        display(alt.Chart(where).mark_bar().encode(
            x=alt.X("share:Q", axis=alt.Axis(format="%"), title="share of the profiled step's kernel time "
                                                               f"(its {len(measured['metrics.top_kernels'].iloc[0])} "
                                                               "largest kernels)"),
            y=alt.Y("mixer:N", title=None), color=alt.Color("kind:N", title="kernel family"),
            row=alt.Row("preset:N", title=None)).properties(width=440, title="Where a training step's time goes"))
else:
    display(Markdown("*No `lmscale bench train` records from a GPU are committed yet: `PYTHONPATH=src python -m "
                     "lmscale bench train --device cuda` makes them, in `data/results/throughput/`.*"))

# %% [markdown]
# The head's loss alone, forward and backward at 32K tokens in bf16 (`lmscale bench loss`): the plain
# head with `F.cross_entropy` over every logit, the chunked PyTorch form that the CPU runs, Liger-Kernel's
# fused kernel that the GPU runs, and Apple's Cut Cross-Entropy as a peer (at its default, which skips
# gradient entries below a threshold). Memory is what the call allocates beyond its inputs; the errors
# are relative to a float32 reference on the same bf16 inputs.

# %%
loss_bench = steps[(steps["kind"] == "loss-bench") & (steps["status"] == "ok")] if not steps.empty else steps
if len(loss_bench):
    loss_bench = loss_bench.sort_values("date").drop_duplicates(["config.impl", "config.preset"], keep="last")
    display(plots.table(loss_bench.rename(columns={
        "config.preset": "preset", "config.impl": "implementation", "metrics.ms_median": "ms",
        "metrics.extra_memory_bytes": "extra bytes", "metrics.grad_hidden_rel_error": "grad error (hidden)",
        "metrics.grad_weight_rel_error": "grad error (weight)"})[
        ["preset", "implementation", "ms", "extra bytes", "grad error (hidden)", "grad error (weight)"]],
        "loss_bench", formats={"ms": "{:.2f}", "extra bytes": lambda b: f"{b / 2**30:.2f} GiB",
                               "grad error (hidden)": "{:.1e}", "grad error (weight)": "{:.1e}"}))
    display(Markdown(f"*Source: {plots.provenance_caption(loss_bench)}*"))
else:
    display(Markdown("*No `lmscale bench loss` records from a GPU are committed yet.*"))

# %% [markdown]
# ### Targets for the training step
#
# On an H100: attention at 350M at least 45 % MFU; the gated linear recurrences (GLA, simple GLA,
# RetNet) and the delta rules (DeltaNet, Gated DeltaNet) at least 40 %; every mixer's 350M step with
# 32K tokens in at most 40 GB. Each row is read from the records; a missing measurement says so.

# %%
def step_target(mixer: str, goal: float):
    rows = train_bench[(train_bench["config.mixer"] == mixer) & (train_bench["config.preset"] == "350M")
                       & (train_bench["status"] == "ok") & (train_bench["variant"] == "")] if len(train_bench) else train_bench
    if rows.empty:
        return target(f"{mixer} 350M: MFU ≥ {goal:.0%}", "missing", f"≥ {goal:.0%}", None)
    mfu = float(rows["metrics.mfu"].iloc[-1])
    return target(f"{mixer} 350M: MFU ≥ {goal:.0%}", f"{mfu:.1%} on {rows['hardware'].iloc[-1]}", f"≥ {goal:.0%}",
                  mfu >= goal)


step_rows = [step_target("attention", 0.45)] + [step_target(m, 0.40) for m in
                                                 ("gla", "simple_gla", "retnet", "deltanet", "gated_deltanet")]
at_350 = train_bench[train_bench["config.preset"] == "350M"] if len(train_bench) else train_bench
fitting = at_350[(at_350["status"] == "ok") & (at_350["metrics.peak_memory_bytes"] <= 40e9)] if len(at_350) \
    else at_350
fits = set(fitting[fitting["variant"] == ""]["config.mixer"]) if len(fitting) else set()
fits_any_way = set(fitting["config.mixer"]) if len(fitting) else set()
largest = at_350[at_350["variant"] == ""]["metrics.peak_memory_bytes"].max() if len(at_350) else None
step_rows.append(target("every mixer's 350M step (32K tokens) in ≤ 40 GB, activations stored",
                        f"{len(fits)} of {len(available())} mixers" + (f"; largest {largest / 1e9:.1f} GB"
                                                                      if pd.notna(largest) else ""),
                        "all", len(fits) == len(available()) if len(at_350) else None))
step_rows.append(target("every mixer's 350M step in ≤ 40 GB, blocks recomputed or the step split into micro-batches "
                        "where it does not fit otherwise",
                        f"{len(fits_any_way)} of {len(available())} mixers"
                        + (f"; not yet: {', '.join(sorted(set(available()) - fits_any_way))}"
                           if len(at_350) and set(available()) - fits_any_way else ""),
                        "all", len(fits_any_way) == len(available()) if len(at_350) else None))
display(plots.table(pd.DataFrame(step_rows), "step_targets"))


def in_the_way(r, goal: float | None) -> str:
    """What one record's profiled step spends its time on, against the step time ``goal`` MFU would need."""
    m = r["metrics.top_kernels"]
    families: dict[str, float] = {}
    for k in m:
        families[kernel_kind(k["name"])] = families.get(kernel_kind(k["name"]), 0.0) + k["ms"]
    kernel_ms, step_ms = r["metrics.profiled_kernel_ms"], r["metrics.step_ms_median"]
    rest = kernel_ms - sum(families.values())
    parts = [f"{kind} {ms:.0f} ms" for kind, ms in sorted(families.items(), key=lambda kv: -kv[1])]
    parts.append(f"{rest:.0f} ms in kernels outside the {len(m)} largest")
    slowest = max((k for k in m if kernel_kind(k["name"]) != "matmul (cuBLAS)"), key=lambda k: k["ms"])
    head = f"**{r['config.mixer']}**: {step_ms:.0f} ms a step"
    if goal is not None:
        needed = r["metrics.flops_per_token"] * r["config.tokens_per_step"] / r["metrics.peak_flops"] / goal
        head += f" where {goal:.0%} MFU needs {1e3 * needed:.0f} ms"
    idle = step_ms - kernel_ms
    return (f"{head}; the profiled step's {kernel_ms:.0f} ms of kernels: {', '.join(parts)}"
            + (f"; {idle:.0f} ms of the median step is not kernel time (launches, host work)" if idle >= 1 else "")
            + f". Its largest kernel that is not a matrix product: `{slowest['name'][:60]}`, {slowest['ms']:.0f} ms"
            + f" in {slowest['calls']} launches; peak memory {r['metrics.peak_memory_bytes'] / 1e9:.1f} GB.")


goals = {"attention": 0.45, **dict.fromkeys(("gla", "simple_gla", "retnet", "deltanet", "gated_deltanet"), 0.40)}
missed = at_350[(at_350["status"] == "ok") & (at_350["variant"] == "")] if len(at_350) else at_350
if len(missed):
    missed = missed[[(r["config.mixer"] in goals and r["metrics.mfu"] < goals[r["config.mixer"]])
                     or r["metrics.peak_memory_bytes"] > 40e9 for _, r in missed.iterrows()]]
if len(missed):
    display(Markdown("**What stands in the way**, read from each missed target's profiled step at 350M (its "
                     f"{len(missed.iloc[0]['metrics.top_kernels'])} most expensive kernels by family):\n\n"
                     + "\n".join(f"- {in_the_way(r, goals.get(r['config.mixer']))}"
                                  for _, r in missed.sort_values("metrics.mfu", ascending=False).iterrows())))


def one_line(error: str, limit: int = 110) -> str:
    """A failure's reason in one line, cut at ``limit`` characters (the record keeps it whole)."""
    first = " ".join(str(error).split())
    if "CUDA out of memory" in first:
        size = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", first)
        first = "CUDA out of memory" + (f" (a {size.group(1)} allocation)" if size else "")
    return first if len(first) <= limit else first[: limit - 1] + "…"


# %% [markdown]
# ## The kernel tests on a GPU
#
# On the CPU the tests run the Triton kernels in Triton's interpreter and skip the bf16 paths and the
# CUDA graphs; `make test-gpu` runs the same test files on a GPU and writes a pass/fail record
# (`data/results/gpu-tests/`). The newest record, per test file, with the commit it tested:

# %%
gpu_tests = load_records("gpu-tests")
if gpu_tests.empty:
    display(Markdown("*No `make test-gpu` record is committed yet.*"))
else:
    newest = gpu_tests.sort_values("date").iloc[-1]
    per_file = pd.DataFrame([{"test file": name, **counts, "commit": str(newest["git_commit"])[:10]}
                             for name, counts in newest["metrics.by_file"].items()])
    display(plots.table(per_file[["test file", "passed", "failed", "skipped", "commit"]], "gpu_tests", code=("commit",)))
    failed = newest.get("failed_tests") or []
    display(Markdown(f"*{newest['hardware']}, {newest['date'][:10]}; "
                     + (f"failed: {', '.join(f'`{t}`' for t in failed)}.*" if failed else "no test failed.*")))


# %% [markdown]
# ## Correctness of every timed number
#
# The largest relative error any implementation showed against the float32 reference at any size (the
# gate refuses to time above the tolerance), and every measurement that was not timed, with the reason.

# %%
if have:
    checked = ok[ok["max_rel_err"].notna()]
    errors = checked.pivot_table(index=["op", "mode"], columns="impl", values="max_rel_err", aggfunc="max")
    display(Markdown(f"Tolerance: {TOLERANCES[FULL.dtype]:g} for bf16 inputs, {TOLERANCES[torch.float32]:g} "
                     "for the float32 and complex64 scans (their arithmetic is float32 throughout)."))
    display(caption("Largest relative error against the reference"))
    display(plots.table(errors.reset_index(), "errors",
                        formats={c: "{:.1e}" for c in errors.columns}))
    failed = [{"op": r["config"]["op"], "mixer": r["config"].get("mixer"), "impl": r["config"]["impl"],
               "mode": r["config"]["mode"], "B": r["config"].get("B"),
               "T or L": r["config"].get("context") or r["config"].get("T"), "graphed": r["config"].get("graphed"),
               "status": r["status"], "why": one_line(r.get("error", ""))}
              for r in iter_records(experiment) if r["run_id"] in set(runs["run_id"]) and r["status"] != "ok"]
    display(plots.table(pd.DataFrame(failed), "not_timed") if failed else Markdown("Every measurement was timed."))

# %% tags=["nbval-ignore-output"]
Markdown(f"*Source: records in `data/results/{experiment}/`: {plots.provenance_caption(runs)}*") if have else None
