"""The trainer: AdamW, warmup + cosine, clipping, evaluation, checkpoint/resume, JSONL log.

Batches are a pure function of ``(seed, step)``, and the checkpoint holds model, optimiser and step,
so a run resumed from a checkpoint sees exactly the batches and updates the uninterrupted run saw.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.model import LanguageModel


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class TrainingDivergedError(RuntimeError):
    """Loss became NaN/inf; the last good checkpoint (if any) is left untouched."""


@dataclass
class TokenData:
    """Token streams for training and evaluation, plus UTF-8 bytes per token to turn loss into bits per byte."""

    train: np.ndarray
    validation: np.ndarray
    bytes_per_token: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_corpus(cls, corpus_dir: Path | None = None) -> TokenData:
        from lmscale.data import load_manifest, load_split

        manifest = load_manifest(corpus_dir)
        splits = manifest["splits"]
        return cls(
            train=load_split(corpus_dir, "train"),
            validation=load_split(corpus_dir, "validation"),
            bytes_per_token={name: s["bytes"] / s["tokens"] for name, s in splits.items() if s["tokens"]},
        )

    def check(self, seq_len: int, vocab_size: int) -> None:
        for name in ("train", "validation"):
            tokens = getattr(self, name)
            if len(tokens) <= seq_len + 1:
                raise ConfigError(
                    "seq_len", seq_len, f"the {name} split has only {len(tokens)} tokens; use a shorter seq_len"
                )
        top = int(max(self.train.max(), self.validation.max()))
        if top >= vocab_size:
            raise ConfigError("vocab_size", vocab_size, f"the data holds token id {top}; vocab_size must exceed it")


def batch_at(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows chosen by ``(seed, step)`` alone: the key to exact resume."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    x = torch.from_numpy(windows[:, :-1])
    y = torch.from_numpy(windows[:, 1:])
    return x, y


def eval_windows(tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced, fixed windows, so every evaluation of every run sees the same text."""
    n = n_batches * batch_size
    last = len(tokens) - seq_len - 1
    starts = np.linspace(0, last, num=n).astype(np.int64)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    batches = []
    for i in range(n_batches):
        w = torch.from_numpy(windows[i * batch_size : (i + 1) * batch_size])
        batches.append((w[:, :-1], w[:, 1:]))
    return batches


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms' gains and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: LanguageModel, batches, device: torch.device, bytes_per_token: float | None) -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and, when the bytes per token are known, bits per byte."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x.to(device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if bytes_per_token:
        metrics["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return metrics


def save_checkpoint(path: Path, model, optimizer, step: int, model_cfg: ModelConfig, train_cfg: TrainConfig, curves) -> None:
    """Atomic write: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "model_config": json.dumps(model_cfg.to_dict()),
        "train_config": json.dumps(train_cfg.to_dict()),
        "curves": json.dumps(curves),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load without unpickling arbitrary objects; any damage is reported with the file name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; train without resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["model_config"] = ModelConfig.from_dict(json.loads(state["model_config"]))
        state["train_config"] = json.loads(state["train_config"])
        state["curves"] = json.loads(state["curves"])
        int(state["step"])
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or incompatible checkpoint ({type(e).__name__}: {e})") from e
    return state


@dataclass
class TrainResult:
    model: LanguageModel
    metrics: dict[str, Any]
    curves: dict[str, list[dict[str, Any]]]


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: TokenData,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train from scratch (or resume from ``out_dir/checkpoint.pt``); returns the model, metrics and curves.

    ``out_dir`` receives ``log.jsonl`` (one line per logged step and evaluation) and ``checkpoint.pt``.
    """
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            "seq_len", train_cfg.seq_len, f"exceeds the model's max_seq_len={model_cfg.max_seq_len}"
        )
    data.check(train_cfg.seq_len, model_cfg.vocab_size)
    device = torch.device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    model = LanguageModel(model_cfg).to(device)
    optimizer = make_optimizer(model, train_cfg)
    curves: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    start = 0
    checkpoint = Path(out_dir) / "checkpoint.pt" if out_dir else None
    if resume:
        if checkpoint is None:
            raise ConfigError("out_dir", out_dir, "resume needs the out_dir holding checkpoint.pt")
        state = load_checkpoint(checkpoint)
        if state["model_config"] != model_cfg:
            raise CheckpointError(
                f"{checkpoint}: saved for model {state['model_config']}, asked to resume {model_cfg}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, curves = int(state["step"]), state["curves"]

    log = None
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(out_dir) / "log.jsonl", "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    eval_batches = eval_windows(data.validation, train_cfg.eval_batches, train_cfg.batch_size, train_cfg.seq_len)
    bpt = data.bytes_per_token.get("validation")
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len

    def record(kind: str, point: dict[str, Any]) -> None:
        curves[kind].append(point)
        if log:
            log.write(json.dumps({"kind": kind, **point}) + "\n")
            log.flush()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=train_cfg.steps, initial=start, desc=f"{model_cfg.mixer}", leave=False)
    model.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, train_cfg.steps):
            lr = lr_at(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch_at(data.train, train_cfg.batch_size, train_cfg.seq_len, train_cfg.seed, step)
            logits = model(x.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())
            if not torch.isfinite(loss):
                where = f"the last good checkpoint {checkpoint} is kept" if checkpoint and checkpoint.exists() else "no checkpoint was written"
                raise TrainingDivergedError(
                    f"loss is {loss.item()} at step {step} (lr {lr:.3g}); {where}. "
                    "Lower lr, raise warmup_steps or enable grad_clip."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip).item()
                if train_cfg.grad_clip > 0
                else float("nan")
            )
            optimizer.step()
            done = step + 1
            if done % train_cfg.log_interval == 0 or done == train_cfg.steps:
                record(
                    "train",
                    {"step": done, "tokens": done * tokens_per_step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm},
                )
            if done % train_cfg.eval_interval == 0 or done == train_cfg.steps:
                record("eval", {"step": done, "tokens": done * tokens_per_step, **evaluate(model, eval_batches, device, bpt)})
            if checkpoint and train_cfg.checkpoint_interval and done % train_cfg.checkpoint_interval == 0:
                save_checkpoint(checkpoint, model, optimizer, done, model_cfg, train_cfg, curves)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
    elapsed = time.perf_counter() - t0
    if checkpoint:
        save_checkpoint(checkpoint, model, optimizer, train_cfg.steps, model_cfg, train_cfg, curves)
    final = curves["eval"][-1]
    metrics = {
        "val_loss": final["loss"],
        "val_perplexity": final["perplexity"],
        "val_bits_per_byte": final.get("bits_per_byte"),
        "train_loss": curves["train"][-1]["loss"],
        "steps": train_cfg.steps,
        "tokens": train_cfg.steps * tokens_per_step,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "wall_seconds": elapsed,
        "tokens_per_second": (train_cfg.steps - start) * tokens_per_step / elapsed if elapsed > 0 else None,
    }
    return TrainResult(model=model, metrics=metrics, curves=curves)


def train_and_record(
    experiment: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: TokenData,
    *,
    data_name: str,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    results_root: Path | None = None,
    run_id: str | None = None,
) -> tuple[Path, TrainResult]:
    """Train, then write the run's result record; returns the record's path and the result."""
    from lmscale.results import make_record, write_record

    result = train(model_cfg, train_cfg, data, out_dir=out_dir, resume=resume, progress=progress)
    record = make_record(
        experiment,
        kind="train",
        config={"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "data": data_name},
        seed=train_cfg.seed,
        metrics=result.metrics,
        curves=result.curves,
        device=train_cfg.device,
        run_id=run_id,
    )
    return write_record(record, results_root), result
