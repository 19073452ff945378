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
# # Neuromorphic suitability: state, operations, precision and sparsity
#
# Neuromorphic chips (Loihi 2, SpiNNaker 2) and dataflow chips built on the same ideas (NorthPole) keep
# weights and state in memory beside their cores, compute in integers, and spend energy per event rather
# than per clock. Whether a language model suits them comes down to four questions, each answered here
# with numbers:
#
# 1. Do its weights and decode state fit on one chip, or on how many?
# 2. Which operations does a token need: multiply–accumulates, element-wise products and additions, which
#    such chips do in hardware, or exponentials, divisions and normalisations, which they do slowly?
# 3. Does it survive low precision: int8 and int4 weights, ternary weights, a state held in 8 or 4 bits?
# 4. How sparse are its activations and its state updates, the events an event-driven chip would send?
#
# Questions 1 and 2 are answered from the code itself: the models are built on PyTorch's meta device
# (shapes without memory) and one decoding step is traced operation by operation, so this chapter
# computes them live at every size. Questions 3 and 4 need trained models and come from result records
# (`lmscale precision`). What was found comes first; how, after.

# %% tags=["parameters"]
experiment = "neuromorphic"  # lmscale precision records
op_mix_preset = "125M"  # the size of the operation-mix table
context_len = 2048  # tokens of context before the traced decoding step
fit_presets = ["11M", "50M", "125M", "350M", "1.3B"]
weight_bits = 8  # weights on chip (NorthPole and Loihi 2 compute in 8 bits or fewer)
state_bits = 16  # the state on chip; the precision section measures what 8 and 4 bits cost

# %% tags=["hide-input"]
import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.bench.inference import frame as inference_frame
from lmscale.model import LanguageModel
from lmscale.presets import preset
from lmscale.profile.chips import CHIPS, fit_table
from lmscale.profile.energy import HOROWITZ_45NM_INT8, JOUPPI_7NM_INT8, chip_energy
from lmscale.profile.opmix import KIND_MEANING, KINDS, op_mix_table
from lmscale.results import iter_records, load_records

plots.setup()
ops = op_mix_table(op_mix_preset, context_len)
sizes = pd.concat([op_mix_table(p, context_len, trace=False) for p in fit_presets], ignore_index=True)
fit = fit_table(sizes, weight_bits=weight_bits, state_bits=state_bits)
records = load_records(experiment)
precision = records[records["status"] == "ok"] if not records.empty else records


# %% tags=["hide-input"]
def per_token(frame: pd.DataFrame) -> pd.DataFrame:
    """The traced operation mix of the whole model, per token, with the nonlinear share of the mixers'."""
    out = pd.DataFrame({"mixer": frame["mixer"]})
    for kind in KINDS:
        out[kind] = frame[f"model_{kind}"]
    out["mixer nonlinear share"] = frame["mixer_nonlinear_share"]
    out["state (MiB)"] = frame["state_bytes"] / 2**20
    return out


def one_chip_sizes() -> pd.DataFrame:
    """For each mixer and chip, the largest of the sizes shown that fits on one chip."""
    rows = []
    for (mixer, chip), group in fit.groupby(["mixer", "chip"], sort=True):
        fitting = group[group["chips_needed"] <= 1]
        largest = fitting.loc[fitting["chips_needed"].idxmax(), "preset"] if not fitting.empty else "none shown"
        rows.append({"mixer": mixer, "chip": chip, "largest on one chip": largest})
    return pd.DataFrame(rows).pivot(index="mixer", columns="chip", values="largest on one chip").reset_index()


def findings() -> str:
    mix = per_token(ops).set_index("mixer")
    worst = mix["mixer nonlinear share"].idxmax()
    least = mix["mixer nonlinear share"].idxmin()
    at = fit[(fit["preset"] == op_mix_preset)].set_index(["mixer", "chip"])["chips_needed"]
    loihi = at.xs("Loihi 2", level="chip")
    parts = [
        (f"**Operations ({op_mix_preset}, one token after {context_len:,} of context, traced).** Multiply–accumulates "
         f"dominate every model ({mix['mac'].min() / 1e6:.0f}–{mix['mac'].max() / 1e6:.0f} M per token, mostly the "
         f"MLPs and the head). Inside the mixers, nonlinear operations (exp, division, square roots, sigmoids) are "
         f"{mix.loc[least, 'mixer nonlinear share']:.2%} of the work for {least} and "
         f"{mix.loc[worst, 'mixer nonlinear share']:.2%} for {worst}, the most."),
        f"**On-chip fit ({op_mix_preset}, weights in {weight_bits} bits, state in {state_bits} bits).** "
        + "; ".join(f"{chip}: attention needs {at[('attention', chip)]:.1f} chips, gla {at[('gla', chip)]:.1f}"
                    for chip in [c.name for c in CHIPS])
        + f". On Loihi 2 every state value takes a neuron: with attention's {context_len:,}-token KV cache the model "
          f"needs {loihi['attention']:.1f} chips, the others {loihi.drop('attention').min():.1f} "
          f"({', '.join(loihi.drop('attention').pipe(lambda x: x[x.round(1) == round(x.min(), 1)]).index)}) to "
          f"{loihi.drop('attention').max():.1f} ({loihi.drop('attention').idxmax()}).",
    ]
    if precision.empty:
        parts.append("**Precision and sparsity: not yet measured.** `data/results/neuromorphic/` holds no "
                     "`lmscale precision` records of trained models.")
    else:
        parts += precision_findings(precision_table(), sparsity_table())
    return "\n\n".join(parts)


def variant(r: pd.Series) -> str:
    """How a model was trained: float or its QAT scheme, and a ReLU-gated MLP where it has one."""
    trained = r.get("config.train.quantize") or "float"
    return trained + (", ReLU MLP" if r.get("config.model.mlp_activation") == "relu" else "")


def precision_table() -> pd.DataFrame:
    """Change in validation loss (nats) under each scheme, per trained model. A model trained with
    quantisation is scored as trained, so the schemes applied after training are left empty for it; its
    cost is its loss against its float twin (same mixer, SiLU MLP, float training)."""
    def delta(r: pd.Series, key: str) -> float | None:
        value = r.get(f"metrics.{key}")
        return value.get("delta") if isinstance(value, dict) and not r.get("config.train.quantize") else None

    frame = pd.DataFrame([
        {"mixer": r["config.model.mixer"], "d_model": r["config.model.d_model"], "trained": variant(r),
         "float loss": r["metrics.float"]["loss"], "int8": delta(r, "int8"), "w4": delta(r, "w4"),
         "ternary": delta(r, "ternary"), "decode loss": r["metrics.decode_float"]["loss"],
         "state8": r["metrics.decode_state8"].get("delta"), "state4": r["metrics.decode_state4"].get("delta")}
        for _, r in precision.iterrows()])
    twin = frame[frame["trained"] == "float"].set_index(["mixer", "d_model"])["float loss"]
    frame.insert(4, "vs float twin", [
        loss - twin.get((m, d), float("nan")) if trained != "float" else None
        for m, d, trained, loss in frame[["mixer", "d_model", "trained", "float loss"]].itertuples(index=False)])
    return frame.sort_values(["mixer", "trained"], ignore_index=True)


def sparsity_table() -> pd.DataFrame:
    """Share of exact and near zeros per model and site, averaged over the layers."""
    rows = []
    for _, r in precision.iterrows():
        for s in r["metrics.sparsity"]:
            rows.append({"mixer": r["config.model.mixer"], "trained": variant(r), **s})
    frame = pd.DataFrame(rows)
    return frame.groupby(["mixer", "trained", "site"], as_index=False)[["zero", "near_zero"]].mean()


def signed(value: float) -> str:
    """A change in nats to three decimals, with no sign where it rounds to zero (no "-0.000")."""
    return "0.000" if abs(value) < 5e-4 else f"{value:+.3f}"


def span(values: pd.Series, fmt: str = "{:+.3f}") -> str:
    return fmt.format(values.min()) if values.min() == values.max() else \
        f"{fmt.format(values.min())} to {fmt.format(values.max())}"


def precision_findings(table: pd.DataFrame, sparse: pd.DataFrame) -> list[str]:
    """The precision and sparsity paragraphs of the findings, read from the records."""
    floats = table[table["trained"] == "float"].set_index("mixer")
    ternary = table[table["trained"] == "ternary"].set_index("mixer")["vs float twin"].dropna()
    relu = table[table["trained"] == "float, ReLU MLP"].set_index("mixer")["vs float twin"].dropna()
    sizes = ", ".join(f"d={d}" for d in sorted(table["d_model"].unique()))
    parts = [
        f"**Precision (measured on {len(table)} trained models, {sizes}; change in validation loss, nats).** "
        f"For the {len(floats)} models trained in float with SiLU MLPs: applied after training, int8 weights and "
        f"activations change the loss by at most "
        f"{floats['int8'].abs().max():.3f}, "
        f"4-bit weights by {span(floats['w4'])}. Ternary weights applied after training cost "
        f"{span(floats['ternary'], '{:+.2f}')}"
        + (f"; trained with BitNet b1.58 from the start, the models end {span(ternary)} above their float "
           f"twins (least: {ternary.idxmin()}, most: {ternary.idxmax()})" if len(ternary) else "")
        + f". Decoding with the state rounded to 8 bits after every step changes the loss by at most "
          f"{table['state8'].abs().max():.3f} in any of the {len(table)} models; to 4 bits, by "
          f"{span(floats['state4'])} in the float models ({floats['state4'].idxmin()} least, "
          f"{floats['state4'].idxmax()} most) and {span(table['state4'])} over all."]
    mlp = sparse[sparse["site"] == "mlp hidden"].set_index(["mixer", "trained"])
    updates = sparse[(sparse["site"] == "state update") & (sparse["trained"] == "float")]
    if len(relu):
        relu_zero = mlp.xs("float, ReLU MLP", level="trained")["zero"]
        silu_zero = mlp.xs("float", level="trained")["zero"]
        parts.append(
            f"**Sparsity (measured).** With SwiGLU's SiLU gate, {span(silu_zero, '{:.0%}')} of the MLP's hidden "
            f"entries are exactly zero; with a ReLU gate, {span(relu_zero, '{:.0%}')} are, at a change in "
            f"validation loss of {span(relu)} against SiLU. State updates are dense: in the float models "
            f"{span(updates['near_zero'], '{:.1%}')} of their entries are below 1 % of their row's maximum.")
    return parts


display(Markdown(findings()))

# %% [markdown]
# ## Operations per token
#
# One decoding step of each model at the size above, traced through PyTorch's dispatcher
# (`lmscale.profile.opmix`): every operation is put in one kind with its element count. The kinds:

# %% tags=["hide-input"]
display(Markdown("\n".join(f"- **{kind}**: {meaning}" for kind, meaning in KIND_MEANING.items())))
shown = per_token(ops)
shown[list(KINDS)] = shown[list(KINDS)] / 1e3
display(plots.table(shown.rename(columns={k: f"{k} (K)" for k in KINDS}), "neuromorphic-opmix",
                    formats={**{f"{k} (K)": "{:,.0f}" for k in KINDS}, "mixer nonlinear share": "{:.2%}",
                             "state (MiB)": "{:.2f}"}))
check = ops[["mixer", "mixer_mac", "mixer_mac_analytic"]].assign(
    ratio=lambda f: f["mixer_mac"] / f["mixer_mac_analytic"])
display(Markdown(
    f"*Operations of one decoding step per token (thousands), batch 1, {op_mix_preset} after {context_len:,} tokens, counted from "
    f"the code at this build. The mixers' traced multiply–accumulates are {check['ratio'].min():.2f}–"
    f"{check['ratio'].max():.2f} of their cost models' (a state update k vᵀ, which the cost models count as a product, "
    f"is traced as element-wise multiplies and adds). Operations not classified: "
    f"{', '.join(u for u in ops['uncounted'] if u) or 'none'}.*"))

# %% [markdown]
# ## Does it fit on one chip?
#
# Weights and the decode state after the context above, against each chip's published capacity: bytes of
# on-chip SRAM for SpiNNaker 2 {cite:p}`spinnaker2datasheet` and NorthPole {cite:p}`modha2023northpole`;
# synapses (one per weight) and neurons (one per state value) for Loihi 2 {cite:p}`intel2021loihi2`.
# A real mapping loses capacity to code, routing tables and fragmentation, so these are lower bounds on
# the chips needed.

# %% tags=["hide-input"]
fit["size"] = pd.Categorical(fit["preset"], categories=fit_presets, ordered=True)
display(alt.Chart(fit).mark_line(point=True).encode(
    x=alt.X("size:O", sort=fit_presets, title="preset"),
    y=alt.Y("chips_needed:Q", scale=alt.Scale(type="log"), title="chips needed"),
    color=alt.Color("mixer:N"), tooltip=["mixer", "preset", "chip", "chips_needed"],
).properties(width=220, height=200).facet(facet=alt.Facet("chip:N", title=None), columns=3))
display(Markdown(f"*Chips needed for the whole model (log scale), weights in {weight_bits} bits, state in "
                 f"{state_bits} bits after {context_len:,} tokens; computed from the presets at this build.*"))
display(Markdown("The largest of the sizes above that fits on one chip, per mixer and chip (\"none shown\": not even "
                 f"the smallest, {fit_presets[0]}):"))
display(plots.table(one_chip_sizes(), "neuromorphic-one-chip"))

# %% [markdown]
# ## Precision
#
# Each trained model is scored on fixed validation windows in float, then with its blocks' linear layers
# quantised after training (int8 weights and activations; int4 weights; BitNet b1.58's ternary weights
# {cite:p}`ma2024bitnet`), and decoded token by token with its state rounded to 8 and 4 bits after every
# step (`lmscale.quantize`). Numbers are changes in loss against float, in nats; a model trained with
# ternary weights (`--quantize ternary`) is scored as trained, and its cost is its loss against its float
# twin (same mixer and size, SiLU MLP, trained in float); so is the ReLU-gated variant's. Columns: *float
# loss*, the validation loss of the parallel forward on windows of the trained length; *vs float twin*,
# that loss minus the twin's; *int8*, *w4* (4-bit weights) and *ternary*, the change when the scheme is
# applied after training (— for a model trained with quantisation, which is scored only as trained);
# *decode loss*, the loss of token-by-token decoding of shorter windows (their length is in the caption;
# less context per token, so a higher loss); *state8* and *state4*, its change with the state rounded to 8 and 4 bits.

# %% tags=["hide-input"]
if precision.empty:
    display(Markdown("*Not yet measured: train the models and run `lmscale precision CHECKPOINT --device cuda` "
                     "(commands below); the table appears when `data/results/neuromorphic/` holds records.*"))
else:
    display(plots.table(precision_table(), "neuromorphic-precision",
                        formats={c: signed for c in ("vs float twin", "int8", "w4", "ternary", "state8", "state4")}
                        | {"float loss": "{:.3f}", "decode loss": "{:.3f}"}))
    lengths = sorted({int(n) for n in precision["config.precision.decode_len"]})
    display(Markdown(f"*Decoded windows of {' or '.join(map(str, lengths))} tokens. "
                     f"{plots.provenance_caption(precision)}*"))

# %% [markdown]
# ## Sparsity
#
# From the float decoding pass of each trained model: per layer, the share of exact zeros and of entries
# below 1 % of their row's absolute maximum, in the mixer's output, in the MLP's hidden activation (the
# input of its down projection) and in the state's update (after − before; for attention the key and
# value written). An event-driven chip sends an event only for an entry that is not (near) zero.

# %% tags=["hide-input"]
if precision.empty:
    display(Markdown("*Not yet measured (see the precision section).*"))
else:
    display(plots.table(sparsity_table(), "neuromorphic-sparsity", formats={"zero": "{:.1%}", "near_zero": "{:.1%}"}))

# %% [markdown]
# ## Energy on a chip that computes in int8 from SRAM
#
# A token's operations priced at Horowitz's 45 nm energies {cite:p}`horowitz2014energy` for 8-bit integer
# operands, and again at Jouppi et al.'s 7 nm energies for the same operations {cite:p}`jouppi2021tenlessons`
# (a 7 nm column: the node of today's accelerators): an 8-bit multiply and a 32-bit accumulate per
# multiply–accumulate, one SRAM read per weight byte and per state byte read and written. Exp, division
# and the like have no row in either table and are not priced, so the estimate is a lower bound, most of all for the mixers with the largest nonlinear
# share. An event-driven chip does no work for a zero: for each exactly-zero MLP hidden entry it skips
# that entry's column of the down projection, its multiply–accumulates and its weight reads. The last
# two columns apply the share of exact zeros measured in each mixer's ReLU-gated model (trained at the
# size in the precision table) to this size's down projections: an estimate that assumes the share
# holds at this size; "—" where no ReLU-gated model of the mixer was trained. Entries that are merely
# small are not skipped: that would change the output. The arithmetic share is the part of the dense
# energy spent on arithmetic rather than SRAM reads.

# %% tags=["hide-input"]
def down_projection_macs(mixer: str) -> int:
    """Multiply–accumulates of the MLPs' down projections per token: the ones a zero hidden entry skips."""
    with torch.device("meta"):
        model = LanguageModel(preset(op_mix_preset, mixer))
    return sum(b.mlp.down_proj.weight.numel() for b in model.blocks)


def relu_zero_share() -> pd.Series:
    """Per mixer, the measured share of exact zeros in the MLP hidden entries of its ReLU-gated model."""
    if precision.empty:
        return pd.Series(dtype=float)
    sparse = sparsity_table()
    chosen = sparse[(sparse["site"] == "mlp hidden") & (sparse["trained"] == "float, ReLU MLP")]
    return chosen.set_index("mixer")["zero"]


def energy_table() -> pd.DataFrame:
    rows, zeros = [], relu_zero_share()
    for _, r in ops.iterrows():
        sram = r["weight_bytes"] / 2 * weight_bits / 8 + r["state_traffic_bytes"] / 2 * state_bits / 8
        dense = chip_energy(r["model_mac"], r["model_multiply"], r["model_add"], sram)
        row = {"mixer": r["mixer"], "µJ per token (dense)": 1e6 * dense,
               "µJ per token (dense, 7 nm)": 1e6 * chip_energy(r["model_mac"], r["model_multiply"], r["model_add"],
                                                              sram, JOUPPI_7NM_INT8),
               "arithmetic share": chip_energy(r["model_mac"], r["model_multiply"], r["model_add"], 0) / dense,
               "nonlinear ops (not priced)": r["model_nonlinear"]}
        if r["mixer"] in zeros.index:  # an event-driven chip skips a zero's column of weights: its MACs and reads
            skipped = down_projection_macs(r["mixer"]) * zeros[r["mixer"]]
            event = chip_energy(r["model_mac"] - skipped, r["model_multiply"], r["model_add"],
                                sram - skipped * weight_bits / 8)
            row |= {"MLP zeros (ReLU, measured)": zeros[r["mixer"]], "µJ per token (ReLU, zeros skipped)": 1e6 * event}
        rows.append(row)
    return pd.DataFrame(rows)


display(plots.table(energy_table(), "neuromorphic-energy",
                    formats={"µJ per token (dense)": "{:.1f}", "µJ per token (dense, 7 nm)": "{:.1f}",
                             "arithmetic share": "{:.0%}",
                             "MLP zeros (ReLU, measured)": "{:.0%}", "µJ per token (ReLU, zeros skipped)": "{:.1f}",
                             "nonlinear ops (not priced)": "{:,.0f}"}))
display(Markdown("*" + " ".join(f"{t.name}: " + "; ".join(t.rows) + "." for t in (HOROWITZ_45NM_INT8, JOUPPI_7NM_INT8))
                 + " The other energy columns are at 45 nm." + f" {op_mix_preset}, one token "
                 f"after {context_len:,} of context, weights in {weight_bits} bits, state in {state_bits} bits.*"))

# %% [markdown]
# ### Beside the GPU's measured energy
#
# The same chip model, at the size and context of each decoding step that `lmscale bench inference` measured
# on a GPU (batch 1, bfloat16, NVML's board energy net of idle power; the inference chapter has them all).
# The two are not the same kind of number: the GPU's is measured for the whole board, in bf16, with every
# weight streamed from HBM each step; the chip's is a lower bound for int8 arithmetic and SRAM reads only
# (no exp or division, no static power, no chip-to-chip traffic), on as many chips as the fit chart says
# the model needs. The ratio says how much room the chip's physics leaves, not what a chip achieves.

# %% tags=["hide-input"]
measured = inference_frame(iter_records("inference"))
if not measured.empty:
    measured = measured[(measured["status"] == "ok") & measured["device"].astype(str).str.startswith("cuda")
                        & (measured["phase"] == "decode") & (measured["batch_size"] == 1)
                        & measured["joules_per_token"].notna()]
if measured.empty:
    display(Markdown("*No GPU decode with measured energy is committed yet (`lmscale bench inference --device "
                     "cuda` writes them to `data/results/inference/`).*"))
else:
    against = []
    for (mixer, size, context), d in measured.groupby(["mixer", "preset", "length"]):
        r = op_mix_table(size, int(context), mixers=[mixer]).iloc[0]
        sram = r["weight_bytes"] / 2 * weight_bits / 8 + r["state_traffic_bytes"] / 2 * state_bits / 8
        chip = {name: chip_energy(r["model_mac"], r["model_multiply"], r["model_add"], sram, table)
                for name, table in (("45 nm", HOROWITZ_45NM_INT8), ("7 nm", JOUPPI_7NM_INT8))}
        gpu_j = float(d["joules_per_token"].median())
        against.append({"mixer": mixer, "preset": size, "context": int(context),
                        "GPU, measured (mJ/token)": 1e3 * gpu_j, "GPU": d["hardware"].iloc[0],
                        "chip model, 45 nm (mJ/token)": 1e3 * chip["45 nm"],
                        "chip model, 7 nm (mJ/token)": 1e3 * chip["7 nm"],
                        "GPU / chip at 7 nm": gpu_j / chip["7 nm"]})
    against = pd.DataFrame(against)
    display(plots.table(against, "neuromorphic-vs-gpu",
                        formats={"GPU, measured (mJ/token)": "{:.0f}", "chip model, 45 nm (mJ/token)": "{:.2f}",
                                 "chip model, 7 nm (mJ/token)": "{:.2f}", "GPU / chip at 7 nm": "{:,.0f}×"}))
    display(Markdown(f"*Source: {len(measured)} GPU decode records (commit "
                     f"{', '.join(sorted({str(c)[:7] for c in measured['commit']}))}); chip model with weights in "
                     f"{weight_bits} bits and the state in {state_bits} bits, as above.*"))

# %% [markdown]
# ## Ranking
#
# Each mixer is ranked on what this chapter measured, in the order a chip designer would ask: the chips
# its state and weights need on Loihi 2 (the chip with the least memory per value), the share of its
# mixer's work that is nonlinear, and, once trained models of every mixer have records, what holding its
# state in 4 bits costs. The rank is the mean of those ranks; the reason lists the numbers behind it,
# the 4-bit cost included wherever it is measured.

# %% tags=["hide-input"]
def ranking() -> pd.DataFrame:
    loihi = fit[(fit["preset"] == op_mix_preset) & (fit["chip"] == "Loihi 2")].set_index("mixer")["chips_needed"]
    mix = ops.set_index("mixer")
    frame = pd.DataFrame({"Loihi 2 chips": loihi, "nonlinear share": mix["mixer_nonlinear_share"],
                          "state (MiB)": mix["state_bytes"] / 2**20})
    criteria = ["Loihi 2 chips", "nonlinear share"]
    if not precision.empty:
        state4 = {r["config.model.mixer"]: r["metrics.decode_state4"].get("delta")
                  for _, r in precision.iterrows() if variant(r) == "float"}
        frame["state in 4 bits (Δ nats)"] = pd.Series(state4)
        if frame["state in 4 bits (Δ nats)"].notna().all():  # a rank over some mixers only would not compare
            criteria.append("state in 4 bits (Δ nats)")
    frame["score"] = frame[criteria].rank(method="min").mean(axis=1)
    frame = frame.sort_values(["score", "Loihi 2 chips"]).reset_index(names="mixer")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    frame["reason"] = [
        f"{r['state (MiB)']:.2f} MiB of state after {context_len:,} tokens; {r['Loihi 2 chips']:.1f} Loihi 2 chips; "
        f"{r['nonlinear share']:.2%} of its mixer's operations nonlinear"
        + (f"; 4-bit state {r['state in 4 bits (Δ nats)']:+.3f} nats"
           if "state in 4 bits (Δ nats)" in r and pd.notna(r["state in 4 bits (Δ nats)"]) else "")
        for _, r in frame.iterrows()]
    return frame[["rank", "mixer", "reason"]]


display(plots.table(ranking(), "neuromorphic-ranking"))

# %% [markdown]
# **What the numbers point to.** The state, not the weights, decides whether a model fits a chip that
# gives every state value a neuron: a fixed state of a few MiB fits where a KV cache of tens of MiB does
# not, and LEAP's growing windows and JRT's prefix state sit between the two. The nonlinear operations
# sit in few places — normalisations, the gates' sigmoids, softmax, Mamba's exponentials of its step
# sizes — and those are the places to simplify first: a fixed decay instead of a data-dependent gate, as
# in RetNet, removes the gate's sigmoids (RetNet's mixer has the smallest nonlinear share above), and one
# gate per head, as in simple GLA, needs far fewer of them than one per channel, as in GLA.

# %% tags=["hide-input"]
def what_precision_points_to() -> str:
    """The optimisations the precision and sparsity records point to, read from them."""
    table = precision_table()
    floats = table[table["trained"] == "float"].set_index("mixer")
    ternary = table[table["trained"] == "ternary"].set_index("mixer")["vs float twin"].dropna()
    relu = table[table["trained"] == "float, ReLU MLP"].set_index("mixer")["vs float twin"].dropna()
    needs = "; ".join(f"{m} {floats.loc[m, 'state4']:+.3f}" for m in floats["state4"].sort_values().index)
    text = (f"**What the precision records point to.** Every state tried keeps its quality in 8 bits "
            f"(|Δ| ≤ {table['state8'].abs().max():.3f} nats in all {len(table)} models); in 4 bits the float models "
            f"lose, per mixer: {needs} nats (a "
            "recurrence carries each step's rounding into every later step). Weights need no more than int8 "
            f"after training, and 4 bits cost at most {floats['w4'].max():+.3f} nats.")
    if len(ternary):
        text += (f" Ternary weights must be trained as such: applied after training they cost "
                 f"{span(floats['ternary'], '{:+.2f}')} nats, trained from the start {span(ternary)}.")
    if len(relu):
        text += (" A ReLU gate in the MLP changes the loss against SiLU by "
                 + "; ".join(f"{m} {d:+.3f}" for m, d in relu.sort_values().items())
                 + " nats at this size, and gives an event-driven chip the MLP's exact zeros (the sparsity table).")
    return text


if not precision.empty:
    display(Markdown(what_precision_points_to()))

# %% [markdown]
# **Literature, for orientation (not measured here).** Abreu et al. {cite:p}`abreu2025loihi` ran a 370M-parameter
# MatMul-free language model (ternary weights, a gated recurrent token mixer) on Loihi 2 and report up to 3×
# the throughput at half the energy of Transformer-based models on an edge GPU (Jetson Orin Nano).
# SpikeGPT {cite:p}`zhu2023spikegpt`, an RWKV-style recurrent model with binary spiking activations at 46M and
# 216M parameters, reports 20× fewer operations when run on hardware that exploits its sparse, event-driven
# activations. Both are recurrent-state models: the kind this report studies. On a dataflow chip with its
# weights in on-chip SRAM, Appuswamy et al. {cite:p}`appuswamy2024northpole` served a 3B-parameter language
# model (a Transformer) from 16 NorthPole cards at 28,356 tokens per second of system throughput and under
# 1 ms per token per user, drawing 672 W: about 24 mJ per token for the whole appliance, at the batch of
# many users that such throughput implies (our arithmetic from their figures).

# %% [markdown]
# ## How to reproduce
#
# The tables above are computed from the code when the book builds. The records of the precision and
# sparsity sections come from trained models:
#
# ```bash
# lmscale train --preset 11M --mixer gla --steps 800 --batch-size 32 --seq-len 1024 --device cuda \
#     --compile true --out-dir runs/gla                        # add --quantize ternary for BitNet QAT
# lmscale precision runs/gla/checkpoint.pt --device cuda      # writes data/results/neuromorphic/
# ```
