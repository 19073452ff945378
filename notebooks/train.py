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
# # Train one model (papermill template)
#
# Trains one language model on the prepared corpus and writes a result record to
# `data/results/<experiment>/<run_id>.jsonl`. Every value in the `parameters` cell can be overridden:
#
# ```bash
# jupytext --to ipynb notebooks/train.py -o - | papermill - runs/gla.ipynb -p mixer gla -p steps 50
# ```
#
# The run id is derived from the configuration and seed, so rerunning the same configuration replaces
# its record instead of piling up copies.

# %% tags=["parameters"]
experiment = "tiny-compare"
mixer = "attention"
preset = None  # e.g. "tiny": a size preset (lmscale presets) instead of d_model, n_layers, n_heads
d_model = 64
n_layers = 2
n_heads = 2
seq_len = 64
batch_size = 16
steps = 150
lr = 3e-3
warmup_steps = 15
eval_interval = 25
eval_batches = 8
seed = 0
device = "cpu"
mixer_options = {}

# %%
import torch

from lmscale.config import ModelConfig, TrainConfig
from lmscale.presets import preset as size_preset
from lmscale.train import TokenData, train_and_record

torch.set_num_threads(min(2, torch.get_num_threads()))
if preset:
    model_cfg = size_preset(preset, mixer, max_seq_len=seq_len, mixer_options=dict(mixer_options))
    d_model, n_layers, n_heads = model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads
else:
    model_cfg = ModelConfig(
        mixer=mixer, d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=seq_len,
        mixer_options=dict(mixer_options),
    )
train_cfg = TrainConfig(
    steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
    eval_interval=eval_interval, eval_batches=eval_batches, log_interval=5, seed=seed, device=device,
)
run_id = f"{mixer}-d{d_model}-l{n_layers}-h{n_heads}-t{seq_len}-s{steps}-seed{seed}"
path, result = train_and_record(
    experiment, model_cfg, train_cfg, TokenData.from_corpus(), data_name="corpus", run_id=run_id
)

# %%
print(f"record: {path.name}")
print(f"parameters: {result.metrics['params']:,} ({result.metrics['params_non_embedding']:,} non-embedding)")
print(f"validation loss {result.metrics['val_loss']:.4f} nats/token, "
      f"{result.metrics['val_bits_per_byte']:.4f} bits/byte after {result.metrics['tokens']:,} tokens")
