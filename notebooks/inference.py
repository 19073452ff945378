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
# # Inference: latency, memory and energy against a fair Transformer
#
# A recurrent model's promise at inference is a decoding step whose cost does not grow with the
# context: a fixed state to read and write, where attention reads a KV cache that grows with every token.
# This chapter measures that promise on whole models with random weights: prefill throughput, decode
# latency after contexts of growing length, memory, and energy. Every measurement sits beside its
# roofline prediction from the cost models of the mixers chapter, so each number says both what a model
# costs and how close the implementation comes to what its arithmetic and memory traffic allow. The
# Transformer is decoded the way the recurrent models are (a static KV cache and the whole step in one
# CUDA graph), because a fast recurrence against a slow Transformer would prove nothing. What was found
# comes first, read from the records; how, after.

# %% tags=["parameters"]
experiment = "inference"  # lmscale bench inference, GPU and CPU records
cpu_experiment = "inference-live"  # the live CPU runs of the last section

# %% tags=["hide-input"]
import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.bench import inference
from lmscale.mixers import available
from lmscale.paths import results_dir
from lmscale.profile.energy import TABLES
from lmscale.results import iter_records

plots.setup()
torch.set_num_threads(min(2, torch.get_num_threads()))

all_rows = inference.frame(iter_records(experiment))
ok = all_rows[all_rows["status"] == "ok"] if not all_rows.empty else all_rows
gpu = ok[ok["device"].astype(str).str.startswith("cuda")] if not ok.empty else ok
cpu = ok[ok["device"].astype(str) == "cpu"] if not ok.empty else ok
# `lmscale bench flops`: analytic against counted FLOPs of a batch-1 prefill, counted on the meta device
flop_checks = pd.DataFrame([
    {"mixer": r["config"]["mixer"], "preset": r["config"]["preset"], "T": r["config"]["length"],
     "ratio": r["metrics"]["flops_analytic_over_counted"], "git_commit": r["provenance"].get("git_commit")}
    for r in iter_records(experiment) if r.get("kind") == "flop-count" and r.get("status") == "ok"])
# each energy table's (low, high) estimate columns, and the short name the tables below give them
estimates = {table.name.split(",")[1].strip(): tuple(f"estimated_joules_per_token_{b}[{table.citation}]"
                                                     for b in ("low", "high")) for table in TABLES}


# %% tags=["hide-input"]
def ms(frame: pd.DataFrame, mixer: str, preset: str, length: int, batch: int = 1, dtype: str | None = None) -> float | None:
    rows = frame[(frame["mixer"] == mixer) & (frame["preset"] == preset) & (frame["length"] == length)
                 & (frame["batch_size"] == batch) & (frame["phase"] == "decode")]
    if dtype is not None:
        rows = rows[rows["dtype"] == dtype]
    return None if rows.empty else float(rows["ms"].iloc[0])


def findings() -> str:
    """The findings paragraph, every number read from the records."""
    parts = []
    if gpu.empty:
        parts.append("**GPU: not yet measured.** No GPU inference records are committed (`data/results/inference/` "
                     "holds none from a CUDA device), so the targets below are unchecked.")
    else:
        preset = max(gpu["preset"].unique(), key=lambda p: gpu.loc[gpu["preset"] == p, "params"].iloc[0])
        rows = gpu[(gpu["preset"] == preset) & (gpu["phase"] == "decode") & (gpu["batch_size"] == 1)]
        longest = rows["length"].max()
        at = rows[rows["length"] == longest].sort_values("ms")
        parts.append(f"**GPU ({gpu['hardware'].iloc[0]}), {preset}, batch 1, after {longest:,} tokens:** " + "; ".join(
            f"{r['mixer']} {r['ms']:.2f} ms per token ({r['ms'] / r['weights_floor_ms']:.1f}× its weights' floor, "
            + (f"{r['joules_per_token']:.2f} J per token net of idle)" if pd.notna(r["joules_per_token"]) else "no energy)")
            for _, r in at.iterrows()) + ".")
        prefill = gpu[(gpu["preset"] == preset) & (gpu["phase"] == "prefill")]
        if not prefill.empty:
            T = prefill["length"].max()
            fastest = prefill[prefill["length"] == T].sort_values("tokens_per_second", ascending=False)
            parts.append(f"Prefill of {T:,} tokens at {preset}: " + "; ".join(
                f"{r['mixer']} {r['tokens_per_second'] / 1e3:,.1f} K tokens/s" for _, r in fastest.iterrows()) + ".")
    if not cpu.empty:
        preset = max(cpu["preset"].unique(), key=lambda p: cpu.loc[cpu["preset"] == p, "params"].iloc[0])
        rows = cpu[(cpu["preset"] == preset) & (cpu["phase"] == "decode") & (cpu["batch_size"] == 1)
                   & (cpu["dtype"] == "float32")]
        if not rows.empty:
            longest = rows["length"].max()
            at = rows[rows["length"] == longest].sort_values("ms")
            parts.append(f"**CPU ({cpu['hardware'].iloc[0]}), {preset}, float32, batch 1, after {longest:,} tokens:** "
                         + "; ".join(f"{r['mixer']} {r['ms']:.1f} ms" for _, r in at.iterrows()) + ".")
        batched = cpu[(cpu["preset"] == preset) & (cpu["phase"] == "decode") & (cpu["batch_size"] == 16)
                      & (cpu["dtype"] == "float32")]
        if not batched.empty and (batched["mixer"] == "attention").any():
            at = batched[batched["length"] == batched["length"].max()].sort_values("ms")
            others, attn = at[at["mixer"] != "attention"], at[at["mixer"] == "attention"].iloc[0]
            parts.append(f"At batch 16 after {attn['length']:,} tokens, attention takes {attn['ms']:.1f} ms per step "
                         f"and the other {len(others)} mixers {others['ms'].min():.1f}–{others['ms'].max():.1f} ms "
                         f"({others['mixer'].iloc[0]} fastest): by the cost model attention's step moves "
                         f"{attn['bytes'] / 1e9:.2f} GB (the weights once, sixteen KV caches), the others "
                         f"{others['bytes'].min() / 1e9:.2f}–{others['bytes'].max() / 1e9:.2f} GB.")
        cross = inference.crossover(cpu)
        if not cross.empty:
            never = cross[cross["faster_from"].isna()]
            parts.append(f"On the CPU, {int(cross['faster_from'].notna().sum())} of {len(cross)} (mixer, size, batch, "
                         f"dtype) cases decode faster than attention at some measured context; {len(never)} never do "
                         "in the contexts measured (table below).")
    return "\n\n".join(parts)


def target_rows() -> pd.DataFrame:
    """The issue's targets, each checked from GPU records where they exist."""
    def status(value: bool | None) -> str:
        return "not yet measured" if value is None else ("met" if value else "not met")

    gla = gpu[(gpu["mixer"] == "gla") & (gpu["preset"] == "1.3B") & (gpu["phase"] == "decode") & (gpu["batch_size"] == 1)]
    gla_ms = None if gla.empty else float(gla["ms"].min())
    gla_floor = None if gla.empty else float(gla["weights_floor_ms"].iloc[0])
    gla_j = None if gla.empty or gla["joules_per_token"].isna().all() else float(gla["joules_per_token"].min())
    recurrent = gpu[(gpu["preset"] == "1.3B") & (gpu["phase"] == "decode") & (gpu["mixer"] != "attention")]
    over_floor = (recurrent["ms"] / recurrent["weights_floor_ms"]).groupby(recurrent["mixer"]).max()
    missing = sorted(set(available()) - {"attention"} - set(over_floor.index))
    # not met as soon as one mixer is over 2×; met only once every recurrent mixer is measured within it
    within = False if (over_floor > 2).any() else (None if missing else bool(len(over_floor)))
    within_text = ("—" if over_floor.empty else "; ".join(f"{m} {x:.2f}×" for m, x in over_floor.sort_values().items())
                   + (f" ({len(missing)} not yet measured)" if missing else ""))
    cross = inference.crossover(gpu) if not gpu.empty else pd.DataFrame()
    early = None if cross.empty else bool((cross["faster_from"].fillna(10**9) <= 2048).all())
    counted = flop_checks["ratio"] if not flop_checks.empty else pd.Series(dtype=float)
    outside = sorted(flop_checks.loc[(counted - 1).abs() > 0.05, "mixer"].unique()) if not counted.empty else []
    return pd.DataFrame([
        {"target (H100)": "GLA 1.3B decode, batch 1: ≤ 1.15 ms per token (≤ 1.3× the weights' floor)",
         "measured": "—" if gla_ms is None else f"{gla_ms:.2f} ms ({gla_ms / gla_floor:.2f}× floor)",
         "status": status(None if gla_ms is None else gla_ms <= 1.15)},
        {"target (H100)": "every recurrent mixer at 1.3B within 2× of its floor (its slowest decode point)",
         "measured": within_text,
         "status": status(within)},
        {"target (H100)": "each recurrent decode beats the fair Transformer by a context of 2K",
         "measured": "—" if cross.empty else f"{int((cross['faster_from'].fillna(10**9) <= 2048).sum())} of "
                                            f"{len(cross)} (mixer, size, batch) cases faster by 2K",
         "status": status(early)},
        {"target (H100)": "GLA 1.3B decode energy ≤ 0.3 J per token",
         "measured": "—" if gla_j is None else f"{gla_j:.3f} J", "status": status(None if gla_j is None else gla_j <= 0.3)},
        {"target (H100)": "analytic FLOPs within 5 % of the counted ones (counted on the meta device: no card needed)",
         "measured": "—" if counted.empty else f"ratios {counted.min():.3f}–{counted.max():.3f}"
                     + (f"; outside ±5 %: {', '.join(outside)}" if outside else ""),
         "status": status(None if counted.empty else bool(((counted - 1).abs() <= 0.05).all()))},
    ])


display(Markdown(findings()))
plots.table(target_rows(), "inference-targets")

# %% [markdown]
# ## How it is measured
#
# `lmscale bench inference` builds each model from its preset with random weights in the dtype measured,
# one point at a time:
#
# - **Prefill**: a forward pass over B prompts of T tokens that keeps the final state and only the
#   last position's logits, the median of several repeats, as tokens per second.
# - **Decode**: the context (random tokens) is prefilled chunk by chunk, then one token per sequence per
#   step, timed over repeats of several steps. On a GPU the whole model's step is one CUDA graph where
#   every layer's state has a fixed layout (`lmscale.decode.GraphedStep`); attention gets it through its
#   static KV cache, preallocated to the context and written in place. A mixer whose state still changes
#   shape (JRT's prefix, LEAP's growing window) decodes with `model.step` in a loop, and its record says so.
# - **Prediction**: max(FLOPs / peak, bytes / bandwidth), with FLOPs and bytes from the mixers' cost models
#   plus the MLPs and the head, and both ceilings measured on the device at the start of the run (a large
#   matmul, a large copy). The weights' floor is the weights' bytes over the measured bandwidth.
# - **Energy**: measured with NVML's board energy counter over windows of at least a second, minus the
#   idle power measured first; estimated as FLOPs and DRAM bytes priced twice: by Horowitz's 45 nm
#   energies {cite:p}`horowitz2014energy`, and by Jouppi et al.'s update of the same table to 7 nm with
#   HBM2 {cite:p}`jouppi2021tenlessons` (whose memory rows count only the I/O energy). The estimate leaves
#   out on-chip traffic, control and static power, so it is a lower bound on what a chip spends.
# - Points that cannot fit are recorded as skipped with the arithmetic that says so.

# %% tags=["hide-input"]
# each figure below is drawn for the GPU's records and for the CPU's, where a device has any
sources = [(frame, where) for frame, where in ((gpu, "GPU"), (cpu, "CPU")) if not frame.empty]
if not sources:
    display(Markdown("*Not yet measured: the figures appear when `data/results/inference/` holds records.*"))


def dtype_of(frame: pd.DataFrame) -> str:
    """The dtype a figure shows: bfloat16 where the device has it (every GPU record), else its first."""
    return "bfloat16" if "bfloat16" in set(frame["dtype"]) else frame["dtype"].iloc[0]

# %% [markdown]
# ## Decode latency against context
#
# Milliseconds per decoding step against the context already read, per mixer; one panel per size and
# batch. A flat line is a fixed-size state; attention's rises with the KV cache it reads every step.

# %% tags=["hide-input"]
def latency_chart(frame: pd.DataFrame, dtype: str) -> alt.FacetChart:
    decode = frame[(frame["phase"] == "decode") & (frame["dtype"] == dtype)].copy()
    decode["panel"] = decode["preset"] + ", batch " + decode["batch_size"].astype(str)
    return alt.Chart(decode).mark_line(point=True).encode(
        x=alt.X("length:Q", scale=alt.Scale(type="log", base=2), title="context (tokens)",
                axis=plots.tokens_axis(decode["length"])),
        y=alt.Y("ms:Q", scale=alt.Scale(type="log"), title="ms per step"),
        color=alt.Color("mixer:N"), tooltip=["mixer", "preset", "batch_size", "length", "ms", "predicted_ms", "decode_path"],
    ).properties(width=230, height=190).facet(facet=alt.Facet("panel:N", title=None), columns=2)


for shown, where in sources:
    dtype = dtype_of(shown)
    records = all_rows.loc[shown[(shown["phase"] == "decode") & (shown["dtype"] == dtype)].index]
    if records.empty:
        display(Markdown(f"*{where}: no decode measured yet.*"))
        continue
    display(latency_chart(shown, dtype))
    display(Markdown(f"*{where}: decode latency, {dtype}. {len(records)} records on "
                     f"{', '.join(sorted(set(records['hardware'])))}, commit "
                     f"{', '.join(sorted({str(c)[:10] for c in records['commit']}))}.*"))

# %% [markdown]
# ## The crossover: from which context a recurrent model decodes faster
#
# For each size, batch and dtype, the shortest measured context at which the mixer's step is faster than
# attention's at the same context ("—": not faster at any context measured).

# %% tags=["hide-input"]
for shown, where in sources:
    cross = inference.crossover(shown)
    if cross.empty:
        display(Markdown(f"*{where}: no size has both attention's decode and another mixer's measured yet.*"))
        continue
    wide = cross.pivot_table(index="mixer", columns=["preset", "batch_size", "dtype"], values="faster_from",
                             aggfunc="first", dropna=False)
    wide.columns = [f"{p}, B={b}, {d}" for p, b, d in wide.columns]
    display(Markdown(f"**{where}**"))
    display(plots.table(wide.reset_index(), f"inference-crossover-{where.lower()}",
                        formats={c: "{:,.0f}" for c in wide.columns}))

# %% [markdown]
# ## Memory against context
#
# The decoding state of one batch: counted by each mixer's `state_bytes` (what decoding needs) and
# allocated (what the implementation holds; a static KV cache holds its whole context from the start).

# %% tags=["hide-input"]
for shown, where in sources:
    dtype = dtype_of(shown)
    decode = shown[shown["phase"] == "decode"].copy()
    if decode.empty:
        continue
    memory = decode.melt(id_vars=["mixer", "preset", "batch_size", "length", "dtype"],
                         value_vars=["state_bytes_analytic", "state_bytes_allocated"], var_name="counted", value_name="state")
    memory["counted"] = memory["counted"].map({"state_bytes_analytic": "needed (analytic)",
                                               "state_bytes_allocated": "allocated"})
    memory = memory[(memory["batch_size"] == 1) & (memory["dtype"] == dtype)]
    display(alt.Chart(memory).mark_line(point=True).encode(
        x=alt.X("length:Q", scale=alt.Scale(type="log", base=2), title="context (tokens)",
                axis=plots.tokens_axis(memory["length"])),
        y=alt.Y("state:Q", scale=alt.Scale(type="log"), title="state bytes, batch 1", axis=alt.Axis(format="~s")),
        color="mixer:N", strokeDash="counted:N", tooltip=["mixer", "preset", "length", "counted", "state"],
    ).properties(width=300, height=220).facet(column=alt.Column("preset:N", title=None)))
    display(Markdown(f"*{where}: decoding state, batch 1, {dtype}: {len(decode)} records, commit "
                     f"{', '.join(sorted({str(c)[:10] for c in decode['commit']}))}.*"))

# %% [markdown]
# ## Against the roofline
#
# Measured time over predicted time, per point: 1 is the roofline; the number says how many times slower
# than its arithmetic and memory traffic allow each model runs.

# %% tags=["hide-input"]
for shown, where in sources:
    ratios = shown.pivot_table(index=["mixer"], columns=["phase", "preset", "dtype"], values="ratio", aggfunc="median")
    ratios.columns = [f"{ph} {p} {d}" for ph, p, d in ratios.columns]
    display(Markdown(f"**{where}**"))
    display(plots.table(ratios.reset_index(), f"inference-roofline-{where.lower()}",
                        formats={c: "{:.1f}×" for c in ratios.columns}))
    display(Markdown(f"*{where}: median ratio over the contexts and batch sizes of each phase, size and dtype.*"))

# %% [markdown]
# ## Analytic FLOPs against counted ones
#
# Every prediction above rests on the mixers' cost models. `lmscale bench flops` checks them: it runs one
# batch-1 prefill of each mixer's PyTorch forms on the meta device, where every operation is dispatched and
# counted by `torch.utils.flop_counter` but nothing computes, so every size and length is counted on any
# machine in seconds. Causal softmax attention is counted over the pairs it attends, as the cost models
# count it; a call with an explicit mask is counted as its whole square, since a dense kernel computes the
# square and masks it afterwards. So a ratio below 1 marks a PyTorch form that computes more than the
# mixer needs (a masked square, or the upper triangle of each chunk), not an error of the cost model; the
# analytic count is what a kernel that skips the masked part does.

# %% tags=["hide-input"]
if flop_checks.empty:
    display(Markdown("*No FLOP-count records yet: run `lmscale bench flops`.*"))
else:
    spread = flop_checks.groupby("mixer")["ratio"].agg(["min", "max"])
    lowest = flop_checks.loc[flop_checks.groupby("mixer")["ratio"].idxmin()].set_index("mixer")
    spread["lowest at"] = lowest["preset"] + ", T = " + lowest["T"].map("{:,}".format)
    display(plots.table(spread.reset_index().rename(columns={"min": "analytic / counted, min", "max": "max"}),
                        "inference-flop-check", formats={"analytic / counted, min": "{:.3f}", "max": "{:.3f}"}))
    display(Markdown(f"*{len(flop_checks)} records of `lmscale bench flops` (commit "
                     f"{', '.join(sorted(flop_checks['git_commit'].dropna().str[:7].unique()))}), presets "
                     f"{', '.join(flop_checks['preset'].unique())}, T = "
                     f"{', '.join(f'{t:,}' for t in sorted(flop_checks['T'].unique()))}; counted on the meta device.*"))
    # where a PyTorch form computes more than its mixer needs: facts about the forms, the numbers from the records
    masked = {"based": "its sliding-window layers are the attention mixer with a window, which calls SDPA with "
                       "a boolean mask on every device, so the whole T×T square is computed to use a band",
              "transformer_xl": "each segment's queries attend through a masked square over two segments"}
    low = spread[spread["min"] < 0.95]
    if not low.empty:
        display(Markdown("Below 0.95: " + "; ".join(
            f"**{m}** down to {r['min']:.2f} at {r['lowest at']}" + (f" ({masked[m]})" if m in masked else "")
            for m, r in low.iterrows()) + ". That is work the forms do, on the GPU too, and a windowed kernel "
            "would not."))

# %% [markdown]
# ## Energy per token
#
# Joules per generated token (decode) or per prompt token (prefill): the estimates from FLOPs and DRAM
# bytes, at 45 nm (Horowitz) and at 7 nm with HBM2 (Jouppi et al.), each from the low to the high end of
# its source's DRAM range, beside NVML's measurement net of idle power where there is one. No measured
# energy exists off NVIDIA GPUs; the column then says so. Each table's rows, as its source gives them:

# %% tags=["hide-input"]
if sources:
    display(Markdown("\n".join(f"- **{table.name}** {{cite:p}}`{table.citation}`: {'; '.join(table.rows)}"
                               f" (applied to {' and '.join(d.upper() for d in table.devices)} records)."
                               for table in TABLES)))
for shown, where in sources:
    dtype = dtype_of(shown)
    energy = shown[["mixer", "preset", "phase", "length", "batch_size", "dtype"]].copy()
    for node, (low, high) in estimates.items():
        if low in shown:  # a table whose memory row is not this device's has no column
            energy[f"estimate {node} (J/token)"] = [f"{a:.2e}–{b:.2e}" if pd.notna(a) else "—"
                                                    for a, b in zip(shown[low], shown[high])]
    energy["measured (J/token)"] = shown["joules_per_token"]
    energy = energy[(energy["batch_size"] == 1) & (energy["dtype"] == dtype)].sort_values(["preset", "phase", "length", "mixer"])
    display(Markdown(f"**{where}**"))
    display(plots.table(energy, f"inference-energy-{where.lower()}", formats={"measured (J/token)": "{:.2e}"}))
    if energy["measured (J/token)"].isna().all():
        display(Markdown(f"*Measured energy: {shown['energy_not_measured'].dropna().iloc[0] if shown['energy_not_measured'].notna().any() else 'not measured'}.*"))

# %% [markdown]
# ## The benchmark, live on this machine
#
# The same benchmark at the tiny preset, on this CPU now, into its own records: it proves the
# pipeline; the numbers say nothing about the mixers at scale.

# %% tags=["hide-input", "nbval-ignore-output"]
live_grid = inference.points(["attention", "gla"], ["tiny"], ["float32"], [128], [256], [1],
                             decode_tokens=4, repeats=2)
live_records, _ = inference.run_points(live_grid, "cpu", results_dir() / cpu_experiment, force=True, progress=False)

# %% tags=["hide-input", "nbval-ignore-output"]
live = inference.frame(live_records)
display(plots.table(live[["mixer", "phase", "length", "batch_size", "ms", "predicted_ms", "ratio", "bound"]],
                    "inference-live", formats={"ms": "{:.2f}", "predicted_ms": "{:.3f}", "ratio": "{:.1f}×"}))
