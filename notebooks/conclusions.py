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
# # Conclusions: which model for which use
#
# This chapter gathers what the other chapters measured into one recommendation per use case, each with
# the records behind it. It is regenerated from the records at every build: where a chapter has no
# records yet, its use case says "not yet measured" rather than guess, and the last section lists what
# this report has not measured and why.

# %% tags=["hide-input"]
import pandas as pd
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.bench import inference
from lmscale.bench.step_code import current_code_flags
from lmscale.data import load_manifest
from lmscale.results import iter_records, load_records

plots.setup()


def device_records(experiment: str, gpu: bool) -> pd.DataFrame:
    """An experiment's ok records made on a GPU (or off one)."""
    frame = load_records(experiment)
    if frame.empty:
        return frame
    on_gpu = frame["device"].astype(str).str.startswith("cuda")
    return frame[(frame["status"] == "ok") & (on_gpu if gpu else ~on_gpu)]


throughput = device_records("throughput", gpu=True)
if not throughput.empty:  # the current code's numbers only, as in the kernels chapter
    throughput = throughput[throughput["kind"] == "train-bench"]
    throughput = throughput[[flag is True for flag in current_code_flags(throughput)]]
inference_rows = inference.frame(iter_records("inference"))
inference_ok = inference_rows[inference_rows["status"] == "ok"] if not inference_rows.empty else inference_rows
inference_gpu = inference_ok[inference_ok["device"].astype(str).str.startswith("cuda")] if not inference_ok.empty else inference_ok
inference_cpu = inference_ok[inference_ok["device"].astype(str) == "cpu"] if not inference_ok.empty else inference_ok
chapters = {"scaling ladder": "scaling", "context length": "context", "recall": "recall", "inference": "inference",
            "neuromorphic": "neuromorphic"}
gpu_counts = {name: len(device_records(exp, gpu=True)) for name, exp in chapters.items()}

NOT_YET = "**Not yet measured.**"


# %% tags=["hide-input"]
def training_case() -> str:
    if throughput.empty:
        return f"{NOT_YET} No current training-throughput records from a GPU."
    at = throughput[throughput["config.preset"] == "350M"]
    at = at[~at.get("config.activation_checkpointing", pd.Series(False, index=at.index)).fillna(False).astype(bool)]
    if at.empty or "attention" not in set(at["config.mixer"]):
        return f"{NOT_YET} No 350M attention step to compare against."
    at = at.sort_values("date").drop_duplicates("config.mixer", keep="last").set_index("config.mixer")
    base = at.loc["attention", "metrics.tokens_per_second"]
    ranked = (at["metrics.tokens_per_second"] / base).sort_values(ascending=False)
    faster = [m for m, r in ranked.items() if r > 1 and m != "attention"]
    hw = at["hardware"].iloc[0]
    text = (f"**Speed, measured** ({hw}, 350M, T = 2048, 32K tokens a step): attention trains at "
            f"{base / 1e3:.0f}K tokens/s; relative to it, " +
            ", ".join(f"{m} {r:.2f}×" for m, r in ranked.items() if m != "attention") + ". ")
    text += ("No recurrent mixer trains faster than attention at this context in this implementation. "
             if not faster else f"{', '.join(faster)} train faster than attention here. ")
    text += ("**Quality: not yet measured** (the scaling ladder has no GPU records). Recommendation so far: at "
             "short contexts the Transformer is the cheaper model to train per token; whether a recurrent model "
             "repays its slower step with quality awaits the ladder." if gpu_counts["scaling ladder"] == 0 else
             "Quality: see the scaling chapter's fits.")
    return text


def decode_case() -> str:
    parts = []
    if inference_gpu.empty:
        parts.append("**Not yet measured on a GPU** (no GPU inference records): the H100 targets of the inference "
                     "chapter are unchecked.")
    if not inference_cpu.empty:
        cross = inference.crossover(inference_cpu)
        if not cross.empty:
            found = cross.dropna(subset=["faster_from"])
            parts.append(f"**On this CPU** ({inference_cpu['hardware'].iloc[0]}), {len(found)} of {len(cross)} "
                         "(recurrent mixer, size, batch, dtype) cases decode faster than attention's static-cache "
                         f"step from a context of {int(found['faster_from'].min()):,}–{int(found['faster_from'].max()):,} "
                         "tokens on, the shortest measured." if not found.empty else
                         "**On this CPU** no recurrent mixer decodes faster than attention in the contexts measured.")
    return " ".join(parts) if parts else f"{NOT_YET}"


def edge_case() -> str:
    if inference_cpu.empty:
        return f"{NOT_YET} No CPU inference records."
    decode = inference_cpu[(inference_cpu["phase"] == "decode") & (inference_cpu["batch_size"] == 1)
                           & (inference_cpu["dtype"] == "float32")]
    if decode.empty:
        return f"{NOT_YET} No batch-1 float32 decode records."
    preset = max(decode["preset"].unique(), key=lambda p: decode.loc[decode["preset"] == p, "params"].iloc[0])
    rows = decode[(decode["preset"] == preset) & (decode["length"] == decode["length"].max())]
    rows = rows.sort_values("state_bytes_analytic")
    attention = rows[rows["mixer"] == "attention"]
    fastest = rows.sort_values("ms").iloc[0]
    text = (f"**Batch 1 on this CPU, {preset}, float32, after {int(rows['length'].iloc[0]):,} tokens** (state per "
            "sequence, ms per token): " + "; ".join(
                f"{r['mixer']} {r['state_bytes_analytic'] / 2**20:.2f} MiB, {r['ms']:.0f} ms" for _, r in rows.iterrows())
            + f". Fastest: {fastest['mixer']}.")
    if not attention.empty:
        text += (f" Attention's KV cache is {attention['state_bytes_analytic'].iloc[0] / rows['state_bytes_analytic'].min():,.0f}× "
                 "the smallest recurrent state here, and grows with the context; a recurrent state does not.")
    return text


def recall_case() -> str:
    if gpu_counts["recall"] == 0:
        return (f"{NOT_YET} The recall chapter has no GPU records. The literature's finding, unchecked here: at "
                "equal state size, recall favours mixers that write selectively (Based, DeltaNet) over plain linear "
                "attention, and attention recalls at every width (Arora et al. 2023, the recall chapter).")
    return "See the recall chapter's accuracy against state size."


def neuromorphic_case() -> str:
    return (f"{NOT_YET} The operation mix and the on-chip fit are computed from the code in the neuromorphic "
            "chapter; precision and sparsity of trained models have no records yet, so no recommendation."
            if gpu_counts["neuromorphic"] == 0 and load_records("neuromorphic").empty else
            "See the neuromorphic chapter.")


cases = pd.DataFrame([
    {"use case": "short-context training", "evidence so far": training_case()},
    {"use case": "long-context decode", "evidence so far": decode_case()},
    {"use case": "memory-bound edge decode", "evidence so far": edge_case()},
    {"use case": "recall-heavy tasks", "evidence so far": recall_case()},
    {"use case": "neuromorphic targets", "evidence so far": neuromorphic_case()},
])
for _, row in cases.iterrows():
    display(Markdown(f"### {row['use case'].capitalize()}\n\n{row['evidence so far']}"))

# %% [markdown]
# ## What this report has not measured, and why

# %% tags=["hide-input"]
manifest = load_manifest()
train_tokens = manifest["splits"]["train"]["tokens"]
largest_trained = (throughput["config.preset"].unique().tolist() if not throughput.empty else [])
display(Markdown("\n".join([
    (f"- **Data.** The training split holds {train_tokens / 1e6:.2f}M tokens (the corpus chapter), so every "
    "ladder run repeats its data (four epochs) and the scaling fits describe a data-constrained regime, not "
    "Chinchilla-optimal training."),
    ("- **One GPU, 30 minutes a session.** Each stage's runs are resumable sweeps spread over sessions; a "
    "chapter shows \"not yet measured\" until its records exist."),
    (f"- **Sizes.** Training steps are timed at {', '.join(largest_trained) or 'no size yet'}; no model beyond "
    "the ladder's largest preset is trained; inference sizes up to 1.3B use random weights (speed, memory and "
    "energy do not depend on the weights' values)."),
])))
status = pd.DataFrame([{"chapter": name, "GPU records": n, "CPU records": len(device_records(chapters[name], gpu=False)),
                        "GPU results": "measured" if n else "not yet measured"} for name, n in gpu_counts.items()])
display(plots.table(status, "conclusions-status"))
