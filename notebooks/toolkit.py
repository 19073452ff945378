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
# # The toolkit: train, sweep, scale
#
# Every number in this report is produced by the same few functions, whether they run inside a
# notebook on a laptop or under `torchrun` on a GPU node. This chapter shows them: the size presets
# that make models comparable, the token budgets that say how long to train them, the trainer and
# what its logs and records hold, sweeps, and the Hugging Face face of the models. The example at the
# end runs live when the book is built.

# %%
import json
import tempfile
from pathlib import Path

import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.config import TrainConfig
from lmscale.presets import PRESETS, preset, preset_table
from lmscale.results import load_records
from lmscale.scaleout import scale_out_table
from lmscale.scaling import token_budgets
from lmscale.train import TokenData, train_and_record

plots.setup()
torch.set_num_threads(min(2, torch.get_num_threads()))

# %% [markdown]
# ## Comparable models: size presets
#
# A comparison between mixers is only fair at equal parameter count. The presets follow the shapes of
# GPT-3 {cite:p}`brown2020gpt3` and Pythia {cite:p}`biderman2023pythia` (width, depth and heads of
# the attention model) and, for every other mixer, solve for the width of the SwiGLU feed-forward layer
# so that the **non-embedding** parameter count matches the attention model's within ±5 % — depth and
# width stay the same, so only how parameters are spent differs. Counting uses shape-only models on
# PyTorch's meta device; nothing is allocated.

# %%
table = preset_table()
wide = table.pivot(index="mixer", columns="preset", values="ratio_to_attention")[list(PRESETS)]
plots.table(wide.reset_index(), "presets", formats={p: "{:.3f}" for p in PRESETS})

# %%
assert ((table["ratio_to_attention"] - 1).abs() <= 0.05).all()
shapes = table[table["mixer"] == "attention"][["preset", "d_model", "n_layers", "n_heads", "params",
                                               "non_embedding_params"]]
plots.table(shapes, "shapes", formats={"params": "{:,}", "non_embedding_params": "{:,}"})

# %% [markdown]
# A mixture of experts {cite:p}`shazeer2017moe,lepikhin2021gshard,fedus2022switch` replaces a block's
# MLP by many SwiGLU experts, of which a router picks `moe_top_k` per token (`ModelConfig.moe_*`,
# `lmscale.mlp.MoE`, under any mixer): top-k of a softmax over experts, renormalised as in Mixtral
# {cite:p}`jiang2024mixtral`, Switch's load-balancing loss, and an optional capacity past which
# assignments are dropped. Such a model holds far more parameters than a token uses, so the presets
# match it on its **active** parameters (the experts a token passes through). The `jamba` architecture
# {cite:p}`lieber2024jamba` is Mamba with one attention layer in eight and a 16-expert, top-2 MoE in
# every other layer; its 1:7 pattern tiles only the presets whose depth is a multiple of eight.

# %%
moe = preset_table(["attention", "jamba"], ["34M", "50M", "350M", "1.3B"])
moe = moe[["preset", "mixer", "d_hidden", "params", "total_params", "ratio_to_attention"]].rename(
    columns={"params": "active params", "total_params": "all params", "ratio_to_attention": "active / attention"})
plots.table(moe, "moe-presets", formats={"active params": "{:,}", "all params": "{:,}",
                                         "active / attention": "{:.3f}"})

# %% [markdown]
# ## How long to train: token budgets
#
# Hoffmann et al. {cite:p}`hoffmann2022chinchilla` found compute-optimal training uses about 20 tokens
# per parameter, and fitted $L(N, D) = E + A/N^\alpha + B/D^\beta$; the Epoch AI replication
# {cite:p}`besiroglu2024chinchilla` re-fitted the same data with different constants. When the unique
# data is smaller than the budget, repeated epochs are worth less than fresh tokens; Muennighoff et
# al. {cite:p}`muennighoff2023datalimited` model the effective data after $R$ repetitions as
# $D' = U\,(1 + R^{*}(1 - e^{-R/R^{*}}))$ with $R^{*} \approx 15.4$. `lmscale budget --params 125M`
# prints the same numbers as this table, computed by the same function. These are literature rules,
# labelled with their sources; the report's own scaling fits come later.

# %%
unique = TokenData.from_corpus().train.shape[0]
rows = []
for name in PRESETS[2:]:
    n = float(table[(table["preset"] == name) & (table["mixer"] == "attention")]["params"].iloc[0])
    for budget in token_budgets(n, unique_tokens=unique):
        rows.append({"preset": name, "rule": budget.rule, "tokens (B)": budget.tokens / 1e9,
                     "tokens/param": budget.tokens / n, "compute (FLOPs)": budget.compute,
                     "source": budget.citation})
budgets = pd.DataFrame(rows)
plots.table(budgets, "budgets", formats={"tokens (B)": "{:.2f}", "tokens/param": "{:.1f}",
                                         "compute (FLOPs)": "{:.2e}"})

# %%
Markdown(
    f"With the {unique / 1e6:.2f}M training tokens of this report's corpus, every budget above repeats the "
    "data many times: the data-constrained rule says where repetition stops paying. Larger runs therefore "
    "need more data than the offline corpus holds (see the corpus chapter)."
)

# %% [markdown]
# ## Training
#
# `lmscale train` (or `lmscale.train.train_and_record` from Python) trains one model: AdamW with
# decoupled weight decay on matrices only {cite:p}`loshchilov2019adamw`, linear warmup then cosine
# or warmup-stable-decay, gradient clipping, gradient accumulation, bf16 autocast on GPUs, optional
# `torch.compile`, periodic evaluation (loss, perplexity, bits per byte) and early stopping. It writes
#
# - `OUT_DIR/log.jsonl`: one line per logged step (`kind: "train"`: step, tokens, loss, learning
#   rate, gradient norm, tokens per second, and model FLOPs utilisation where the device's peak is
#   known) and per evaluation (`kind: "eval"`); TensorBoard event files too when `tensorboard` is
#   installed;
# - `OUT_DIR/checkpoint.pt`: model, optimiser and step, every `checkpoint_interval` steps, at the end,
#   and when the process receives SIGTERM; `--resume` continues from it and reproduces the
#   uninterrupted run exactly, because every batch is a function of the seed and the step only;
# - `data/results/<experiment>/<run_id>.jsonl`: the **result record** the book reads.
#
# The same trainer runs data-parallel under `torchrun` (DDP, or FSDP2 with `fully_shard`): the same
# config is the same run on 1 or N processes, because `batch_size` counts the sequences of one
# micro-step across all processes (the README has the multi-GPU and multi-node commands); sweeps expand a YAML grid into runs (`lmscale sweep SPEC.yaml`), run several
# at once and skip runs whose record exists, so an interrupted sweep resumes.
#
# A live example: the tiny preset, GLA, 60 steps on the corpus.

# %%
results = Path(tempfile.mkdtemp())
out_dir = Path(tempfile.mkdtemp())
model_cfg = preset("tiny", "gla", max_seq_len=64)
train_cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=6, eval_interval=20,
                        eval_batches=4, log_interval=5, seed=0, tensorboard=False)
path, result = train_and_record("toolkit-example", model_cfg, train_cfg, TokenData.from_corpus(),
                                data_name="corpus", out_dir=out_dir, results_root=results, run_id="tiny-gla")
record = json.loads(path.read_text())
print(f"record keys: {sorted(record)}")
print(f"metrics: {sorted(record['metrics'])}")
print(f"provenance: {sorted(record['provenance'])}")

# %%
log = pd.read_json(out_dir / "log.jsonl", lines=True)
alt.Chart(log).mark_line(point=True).encode(
    x=alt.X("step:Q"), y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="loss (nats/token)"),
    color=alt.Color("kind:N", title="log line"),
).properties(title="log.jsonl of the live example: training and evaluation loss", width=520, height=260)

# %% tags=["nbval-ignore-output"]
Markdown(f"*The record above was written on {record['provenance']['hardware']['cpu']} "
         f"({record['provenance']['hardware']['device']}), torch {record['provenance']['versions']['torch']}, "
         f"commit {str(record['provenance']['git_commit'])[:10]}, {record['provenance']['date']}; "
         f"{result.metrics['tokens_per_second']:,.0f} tokens/s.*")

# %% [markdown]
# ## More than one GPU
#
# Under `torchrun` the trainer takes `parallel="ddp"` or `"fsdp"` (FSDP2's `fully_shard`, one unit per
# block). Checkpoints hold full, unsharded tensors, so a run moves between layouts: the test suite
# trains every family of mixer (gated linear attention, retention, Mamba, Gated DeltaNet, LRU, LEAP,
# Based, Infini-attention, a hybrid and a mixture of experts) on CPU processes talking over gloo, cuts
# it at a checkpoint written by one process and resumes it on four under FSDP2, cuts it on four and
# resumes it on one, and on two started as two simulated nodes with the multi-node command of the
# README (`--nnodes 2 --rdzv-backend c10d`); each resumed run logs the losses of the uninterrupted one.
# A mixture of experts is the exception that proves the rule: its balance loss is taken over each
# process's tokens, so its objective shifts with the layout, by about 1e-3 of the loss.
#
# How well it scales on GPUs is an experiment, `data/sweeps/multi-gpu.yaml`: the 350M and 1.3B presets
# of attention, GLA and Mamba on 1, 2, 4 and 8 GPUs of one node under DDP and FSDP2, with the global
# batch fixed so every layout trains on the same tokens (`nproc` in a sweep starts the run under
# torchrun). `lmscale.scaleout.scale_out_table` turns its records into throughput, MFU, memory per GPU,
# efficiency against one GPU and the largest gap between the loss curves.

# %% tags=["nbval-ignore-output"]
multi = load_records("multi-gpu")
if multi.empty:
    display(Markdown("*No multi-GPU records yet: the machines lent to this project so far have one GPU, "
                     "so `data/results/multi-gpu/` is empty and this table will fill when "
                     "`lmscale sweep data/sweeps/multi-gpu.yaml` runs on an 8-GPU node.*"))
else:
    scale_out = scale_out_table(multi).drop(columns="mfu")
    commits = sorted({str(c)[:10] for c in multi["git_commit"]})
    display(plots.table(scale_out, "scale-out", formats={"tokens_per_second": "{:,.0f}", "peak_memory_gib": "{:.1f}",
                                                         "efficiency": "{:.1%}", "max_loss_gap": "{:.2g}"}))
    display(Markdown(f"*{len(multi)} records of `data/results/multi-gpu/`, commit {', '.join(commits)}, "
                     f"{', '.join(sorted(set(map(str, multi['hardware']))))}.*"))

# %% [markdown]
# ## Fine-tuning with LoRA
#
# `lmscale.finetune` loads a saved model (`LmscaleForCausalLM.save_pretrained`) and puts low-rank
# adapters {cite:p}`hu2022lora` on every mixer and MLP projection through peft; only the adapters train,
# save alone, reload onto the same base and merge into it. QLoRA {cite:p}`dettmers2023qlora` holds the
# frozen base in 4 bits through bitsandbytes, on CUDA only; elsewhere it is refused with the reason. Live:
# the model just trained, saved, given rank-4 adapters, fine-tuned for a few steps on the Brown corpus (a
# source it never saw), its adapter saved, and the merged weights checked against base + (α/r)·B·A. The
# steps are too few to say anything about quality; the tests check that the loss falls.

# %% tags=["hide-input", "nbval-ignore-output"]
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's, when peft is imported in a kernel
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft 0.21 on transformers 5
import transformers
from peft import PeftModel

from lmscale.finetune import finetune, lora_model
from lmscale.hf import LmscaleConfig, LmscaleForCausalLM
from lmscale.train import load_checkpoint

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
trained = LmscaleForCausalLM(LmscaleConfig.from_model_config(model_cfg))
trained.lm.load_state_dict(load_checkpoint(out_dir / "checkpoint.pt")["model"])
trained.save_pretrained(out_dir / "hf")
adapted = lora_model(out_dir / "hf", r=4, alpha=8)
n_trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
n_total = sum(p.numel() for p in adapted.parameters())
finetune(adapted, TokenData.from_corpus().split("test_ood"), steps=5, batch_size=4, seq_len=64, lr=1e-2)
adapted.save_pretrained(out_dir / "adapter")
adapter_bytes = sum(f.stat().st_size for f in (out_dir / "adapter").iterdir())
reloaded = PeftModel.from_pretrained(LmscaleForCausalLM.from_pretrained(out_dir / "hf"), out_dir / "adapter")
deltas = {n.removeprefix("base_model.model.") + ".weight": m.scaling["default"] * (m.lora_B["default"].weight
                                                                                   @ m.lora_A["default"].weight)
          for n, m in reloaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
base = LmscaleForCausalLM.from_pretrained(out_dir / "hf").state_dict()
merged = reloaded.merge_and_unload().state_dict()
gap = max((merged[k] - base[k] - d).abs().max().item() for k, d in deltas.items())
Markdown(f"{n_trainable:,} of {n_total:,} parameters train ({n_trainable / n_total:.1%}), in {len(deltas)} adapted "
         f"layers; the adapter file takes {adapter_bytes / 1024:,.0f} KiB. Merged weights against base + (α/r)·B·A: "
         f"largest difference {gap:.1e}.")


# %% [markdown]
# ## Reliability: what a crash costs
#
# Long runs and sweeps are where a report loses data, so `make test-slow` kills real processes with
# SIGKILL at random moments — a training run twenty times, a sweep eight times — resumes or re-runs
# them, and checks that nothing was lost or damaged: the resumed run's weights must equal an
# uninterrupted run's bit for bit, every checkpoint and record on disk must load after every kill, and
# every run must end with exactly one record. Checkpoints and records are written to a temporary file
# and renamed into place; each sweep run holds a lock that its child inherits, so two sweeps of one spec
# share its runs and a killed sweep's runs finish in their own processes. The suite's last counts, from
# its records in `data/results/reliability/`:

# %% tags=["hide-input"]
reliability = load_records("reliability")
if reliability.empty:
    display(Markdown("*Not yet run: `make test-slow` writes these records.*"))
else:
    latest = reliability.sort_values("date").groupby("config.suite").tail(1)
    rows = [{"suite": f"lmscale {s}", "kills": int(k), "exact weights after resume": {True: "yes", False: "no"}.get(e, "—"),
             "corrupt files": int(c), "commit": str(g)[:10], "date": str(d)[:10]}
            for s, k, e, c, g, d in zip(latest["config.suite"], latest["metrics.kills"],
                                        latest.get("metrics.exact_weights", pd.Series(index=latest.index, dtype=object)),
                                        latest["metrics.corrupt_files"], latest["git_commit"], latest["date"])]
    display(plots.table(pd.DataFrame(rows), "reliability"))
