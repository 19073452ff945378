"""Recall against state size: train a small model on MQAR (``lmscale.tasks.mqar``) and record its
test accuracy beside the bytes of decoding state its mixers carry at that sequence length.

One run is one ``RecallConfig``: the model (mixer, width, layers, heads, options), the difficulty
(vocabulary, length, pairs), how the prompt is shown, and the optimisation. It trains with the
trainer's own pieces (``build_training``: compiled blocks and fused AdamW on CUDA; ``training_step``:
bf16 autocast, gradient clipping and the non-finite guard; ``lr_at``: warmup then cosine), on batches
drawn by (seed, step) from a fixed training set, the loss on the answers only.

Two ways to help a recurrent model (Arora et al. 2024, "Just read twice"):
* ``prompt="jrt"`` (JRT-Prompt): the key–value context is shown twice before the queries, so on the
  second reading the model has seen every pair once already;
* the ``jrt`` mixer with ``prefix=True`` (JRT-RNN's encoder): its layers read the context
  non-causally (``prefix_len`` = the context's length). The model masks the next-token loss inside the
  prefix (``LanguageModel.forward``); MQAR asks nothing there anyway.

The state is counted by each layer's own ``state_bytes`` at the prompt's length, in bf16 (two bytes an
element): a recurrence's fixed state, or attention's KV cache, which grows with the prompt.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmscale.config import IGNORE_INDEX, ConfigError, ModelConfig, TrainConfig
from lmscale.tasks.mqar import MQAR, accuracy, train_test

if TYPE_CHECKING:
    import torch

PROMPTS = ("plain", "jrt")
EXPERIMENT = "recall"


@dataclass
class RecallConfig:
    """One recall run; the defaults are the CPU scale, the GPU specs set Zoology's sizes."""

    mixer: str = "attention"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    mixer_options: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 8192
    seq_len: int = 256
    num_pairs: int = 16
    power_a: float = 0.01
    prompt: str = "plain"  # "jrt": the key–value context twice, then the queries
    prefix: bool = False  # the jrt mixer reads the context non-causally (prefix_len = its length)
    lr: float = 1e-3
    steps: int = 2000
    warmup_steps: int = 100
    batch_size: int = 64
    weight_decay: float = 0.1
    n_train: int = 20_000
    n_test: int = 1000
    seed: int = 0
    device: str = "cpu"
    compile: bool = False

    def __post_init__(self) -> None:
        self.task  # noqa: B018 - builds the task, which checks the difficulty
        if self.prompt not in PROMPTS:
            raise ConfigError("prompt", self.prompt, f"must be one of {', '.join(map(repr, PROMPTS))}")
        if self.prefix and self.mixer != "jrt":
            raise ConfigError("prefix", self.prefix, "needs mixer 'jrt', whose layers read a prefix non-causally")
        for name in ("n_train", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be a positive integer")
        self.train_config  # noqa: B018 - checks lr, steps, warmup and the device
        self.model_config  # noqa: B018 - checks the shape

    @property
    def task(self) -> MQAR:
        return MQAR(self.vocab_size, self.seq_len, self.num_pairs, self.power_a)

    @property
    def prompt_len(self) -> int:
        """Tokens the model reads: the sequence, plus the context again under JRT-Prompt."""
        return self.seq_len + (self.task.context_len if self.prompt == "jrt" else 0)

    @property
    def model_config(self) -> ModelConfig:
        options = dict(self.mixer_options)
        if self.prefix:
            options["prefix_len"] = self.task.context_len * (2 if self.prompt == "jrt" else 1)
        return ModelConfig(mixer=self.mixer, vocab_size=self.vocab_size, d_model=self.d_model,
                           n_layers=self.n_layers, n_heads=self.n_heads, max_seq_len=self.prompt_len,
                           mixer_options=options)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.prompt_len, lr=self.lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, seed=self.seed,
                           device=self.device, compile=self.compile, min_lr_ratio=0.0, tensorboard=False)


def shown(inputs: torch.Tensor, targets: torch.Tensor, cfg: RecallConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples as the model reads them: unchanged, or with the context read twice (JRT-Prompt),
    the answers' targets moving with their queries."""
    import torch

    from lmscale.data.jrt_prompt import jrt_prompt

    if cfg.prompt == "plain":
        return inputs, targets
    m = cfg.task.context_len
    x = jrt_prompt(inputs[:, :m], inputs[:, m:], separator=())
    y = torch.cat([torch.full_like(targets[:, :m], IGNORE_INDEX), targets], dim=1)
    return x, y


def state_bytes(model_cfg: ModelConfig, context_len: int) -> int:
    """Decoding state of every layer after ``context_len`` tokens, in bf16, from the mixers' own counts."""
    import torch

    from lmscale.model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(model_cfg)
    return sum(block.mixer.state_bytes(context_len, torch.bfloat16) for block in model.blocks)


def run_recall(cfg: RecallConfig) -> dict[str, Any]:
    """Train on the task and return the metrics: test accuracy, state bytes, losses, time."""
    import torch

    from lmscale.distributed import World
    from lmscale.train import (
        TrainingDivergedError,
        _autocast,
        autocast_dtype,
        build_training,
        check_device,
        lr_at,
        training_step,
    )

    check_device(cfg.device)
    device, train_cfg, model_cfg = torch.device(cfg.device), cfg.train_config, cfg.model_config
    (x_train, y_train), (x_test, y_test) = train_test(cfg.task, cfg.n_train, cfg.n_test, cfg.seed)
    x_train, y_train = shown(x_train, y_train, cfg)
    x_test, y_test = shown(x_test, y_test, cfg)
    torch.manual_seed(cfg.seed)
    world = World()
    raw, model, optimizer = build_training(model_cfg, train_cfg, world, device)
    dtype = autocast_dtype(train_cfg.autocast, device)
    start, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train_cfg)
        rows = torch.from_numpy(np.random.default_rng([cfg.seed, step]).integers(0, len(x_train), cfg.batch_size))
        result = training_step(model, raw, optimizer, x_train[rows], y_train[rows], train_cfg, world, device, dtype)
        if not result.applied:
            raise TrainingDivergedError(f"loss {result.loss} / gradient norm {result.grad_norm} at step {step} "
                                        f"(lr {cfg.lr:g}); lower lr")
        losses.append(result.loss)
    seconds = time.perf_counter() - start
    correct = asked = 0
    raw.eval()
    with torch.no_grad():
        for xb, yb in zip(x_test.split(cfg.batch_size), y_test.split(cfg.batch_size), strict=True):
            with _autocast(device, dtype):
                logits = raw(xb.to(device))
            c, a = accuracy(logits.float(), yb.to(device))
            correct, asked = correct + c, asked + a
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "accuracy": correct / asked,
        "correct": correct,
        "asked": asked,
        "test_examples": len(x_test),
        "state_bytes": state_bytes(model_cfg, cfg.prompt_len),
        "state_dtype": "bfloat16",
        "prompt_len": cfg.prompt_len,
        "params": raw.num_params(),
        "params_non_embedding": raw.num_params(non_embedding=True),
        "final_train_loss": float(np.mean(tail)),
        "train_seconds": seconds,
        "steps": cfg.steps,
        "diverged": not math.isfinite(losses[-1]),
    }


def recall_and_record(cfg: RecallConfig, experiment: str = EXPERIMENT, run_id: str | None = None,
                      results_root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run ``cfg`` and write its record (``<results>/<experiment>/<run_id>.jsonl``)."""
    from lmscale.results import make_record, require_commit, write_record

    require_commit(cfg.device)
    metrics = run_recall(cfg)
    fields = dataclasses.asdict(cfg)
    record = make_record(experiment, kind="recall", seed=cfg.seed, metrics=metrics, device=cfg.device, run_id=run_id,
                         config={"model": cfg.model_config.to_dict(), "train": fields,
                                 "task": dataclasses.asdict(cfg.task)})
    return write_record(record, results_root), metrics


def variant(train: dict[str, Any]) -> str:
    """A run's model as the chapter names it: the mixer, with JRT-Prompt and the prefix encoder marked."""
    marks = [m for m, on in (("JRT-Prompt", train.get("prompt") == "jrt"), ("prefix encoder", train.get("prefix")))
             if on]
    return train["mixer"] + (f" + {' + '.join(marks)}" if marks else "")


def recall_table(records):
    """One row per finished recall run of ``records`` (``lmscale.results.load_records``)."""
    import pandas as pd

    rows = []
    for _, r in records[(records["status"] == "ok") & (records["kind"] == "recall")].iterrows():
        train = {k.removeprefix("config.train."): v for k, v in r.items() if k.startswith("config.train.")}
        rows.append({"model": variant(train), "mixer": train["mixer"], "d_model": int(train["d_model"]),
                     "task": f"T={int(train['seq_len'])}, {int(train['num_pairs'])} pairs",
                     "seq_len": int(train["seq_len"]), "num_pairs": int(train["num_pairs"]), "lr": float(train["lr"]),
                     "accuracy": float(r["metrics.accuracy"]), "state_bytes": int(r["metrics.state_bytes"]),
                     "run_id": r["run_id"]})
    columns = ["model", "mixer", "d_model", "task", "seq_len", "num_pairs", "lr", "accuracy", "state_bytes", "run_id"]
    return pd.DataFrame(rows, columns=columns)


def best_per_point(table):
    """Per (model, width, task): the learning rate with the highest accuracy (Zoology keeps the best)."""
    if table.empty:
        return table
    best = table.loc[table.groupby(["model", "d_model", "task"])["accuracy"].idxmax()]
    return best.sort_values(["task", "model", "d_model"]).reset_index(drop=True)


def pareto_front(table):
    """Per task, the points no other point beats on both counts: less state and at least the accuracy."""
    fronts = []
    for _, g in table.sort_values(["state_bytes", "accuracy"], ascending=[True, False]).groupby("task", sort=False):
        best = -1.0
        keep = []
        for i, row in g.iterrows():
            if row["accuracy"] > best:
                keep.append(i)
                best = row["accuracy"]
        fronts.append(g.loc[keep])
    import pandas as pd

    return pd.concat(fronts) if fronts else table.iloc[0:0]
