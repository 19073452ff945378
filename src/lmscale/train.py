"""The trainer: AdamW, warmup + cosine or warmup-stable-decay, clipping, bf16 autocast, gradient
accumulation, ``torch.compile``, evaluation, early stopping, checkpoint/resume (also on SIGTERM), a
NaN guard, logs (JSONL, TensorBoard), tokens/s, MFU and peak memory; one process, or many under
``torchrun`` with DDP or FSDP2 (``lmscale.distributed``).

Batches are a pure function of ``(seed, step)``, and the checkpoint holds model, optimiser, step, RNG
and curves (early stopping's state is replayed from the evaluation curve), so a run resumed from a
checkpoint sees exactly the batches and updates the uninterrupted run saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.distributed import (
    World,
    all_reduce,
    barrier,
    broadcast,
    full_state_dicts,
    gradient_sync,
    init_process_group,
    load_full_state_dicts,
    parallelize,
    process_device,
    world_from_env,
)
from lmscale.loss import resolve_impl as resolve_loss_impl
from lmscale.model import LanguageModel

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class TrainingDivergedError(RuntimeError):
    """Loss became NaN/inf; the last good checkpoint (if any) is left untouched."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived; the step in flight finished and was checkpointed, so ``resume`` continues exactly."""


@dataclass
class TokenData:
    """Token streams for training and evaluation, plus UTF-8 bytes per token to turn loss into bits per byte."""

    train: np.ndarray
    validation: np.ndarray
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    others: dict[str, np.ndarray] = field(default_factory=dict)  # further splits for the final evaluation
    eos_id: int | None = None  # the document separator: windows without it lie inside one document

    @classmethod
    def from_corpus(cls, corpus_dir: Path | None = None) -> TokenData:
        from lmscale.data import load_manifest, load_split

        manifest = load_manifest(corpus_dir)
        splits = manifest["splits"]
        return cls(
            train=load_split(corpus_dir, "train"),
            validation=load_split(corpus_dir, "validation"),
            bytes_per_token={name: s["bytes"] / s["tokens"] for name, s in splits.items() if s["tokens"]},
            others={name: load_split(corpus_dir, name) for name in splits
                    if name not in ("train", "validation") and splits[name]["tokens"]},
            eos_id=manifest.get("document_separator", {}).get("id"),
        )

    def split(self, name: str) -> np.ndarray:
        """The tokens of split ``name``; an unknown name raises ConfigError listing the splits there are."""
        splits = {"train": self.train, "validation": self.validation, **self.others}
        if name not in splits:
            raise ConfigError("final_eval", name, f"is not a split of this corpus; its splits are {', '.join(splits)}")
        return splits[name]

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
    """Linear warmup to ``lr``, then decay to ``lr * min_lr_ratio``, reached at the last step.

    ``cosine`` decays along a half cosine over all steps after warmup; ``wsd`` (warmup-stable-decay)
    holds ``lr`` and falls linearly over the last ``decay_steps``, so a run can be branched off the
    stable phase and cooled down at any length.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - cfg.decay_steps
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (floor - cfg.lr) * (step - decay_start + 1) / cfg.decay_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device | None = None) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms' gains and biases are not decayed.

    On CUDA the fused AdamW kernel updates every parameter in a few launches (the same arithmetic as the
    default multi-tensor form); elsewhere PyTorch's default implementation runs.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``TrainConfig.autocast`` on ``device``; None runs in float32."""
    if setting == "bf16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's datasheets, by torch.cuda.get_device_name.
# MFU is measured against these whatever ``autocast`` says, so a float32 run shows how much it leaves.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H200": 989.4e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A10": 125e12,
    "NVIDIA L4": 121e12,
}


def peak_flops(cfg: TrainConfig, device: torch.device) -> tuple[float | None, str]:
    """One device's peak FLOP/s for MFU and where the number came from.

    ``cfg.peak_flops`` wins; else the GPU table; else None: a CPU has no single honest peak, so MFU is
    reported only when the user supplies one.
    """
    if cfg.peak_flops is not None:
        return float(cfg.peak_flops), "TrainConfig.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if name in PEAK_BF16_FLOPS:
            return PEAK_BF16_FLOPS[name], f"bf16 dense peak of {name}"
        return None, f"{name!r} is not in lmscale.train.PEAK_BF16_FLOPS; set peak_flops for MFU"
    return None, f"no peak is known for device type {device.type!r}; set peak_flops for MFU"


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """Peak memory in bytes and what was measured: the GPU allocator's peak, or the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable: no resource module on this platform"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kibibytes on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "process max RSS (ru_maxrss, whole process lifetime)"


@dataclass
class EarlyStopping:
    """Counts evaluations that fail to beat the best loss by more than ``min_delta``.

    A function of the evaluation curve alone, so a resumed run rebuilds it by replaying the curve.
    """

    patience: int  # 0: never stop
    min_delta: float
    best_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> None:
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
        else:
            self.evals_without_improvement += 1

    @property
    def stopped(self) -> bool:
        return 0 < self.patience <= self.evals_without_improvement


class _SigtermFlag:
    received = False


@contextlib.contextmanager
def _catch_sigterm() -> Iterator[_SigtermFlag]:
    """While active, SIGTERM sets ``received`` instead of killing the process, so the step in flight can
    finish and be checkpointed (clusters send SIGTERM before SIGKILL). Only the main thread gets signals;
    elsewhere the default behaviour stays."""
    flag = _SigtermFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def note(signum: int, frame: Any) -> None:
        flag.received = True

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def split_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0, eos_id: int | None = None,
                  multiple: int = 1) -> np.ndarray:
    """Consecutive, non-overlapping windows of ``seq_len + 1`` tokens ([n, seq_len + 1], int64).

    With ``eos_id`` only windows that hold no document separator are kept, so every position's context
    lies in one document. ``max_tokens`` > 0 keeps at most that many tokens' worth, evenly spread over
    the split; the count is cut to a multiple of ``multiple`` (the number of processes).
    """
    n = (len(tokens) - 1) // seq_len
    starts = np.arange(n, dtype=np.int64) * seq_len
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]) if n else \
        np.zeros((0, seq_len + 1), dtype=np.int64)
    if eos_id is not None and len(windows):
        windows = windows[~(windows == eos_id).any(axis=1)]
    if max_tokens and len(windows) > max(1, max_tokens // seq_len):
        keep = np.linspace(0, len(windows) - 1, num=max(1, max_tokens // seq_len)).round().astype(np.int64)
        windows = windows[keep]
    return windows[: len(windows) - len(windows) % multiple]


def _batches(windows: np.ndarray, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    w = torch.from_numpy(windows)
    return [(b[:, :-1], b[:, 1:]) for b in w.split(batch_size)]


def final_evaluation(model: LanguageModel, data: TokenData, cfg: TrainConfig, device: torch.device,
                     dtype: torch.dtype | None, world: World) -> dict[str, Any]:
    """The whole-split losses of ``cfg.final_eval`` and the loss by position of ``cfg.position_eval_lengths``."""
    out: dict[str, Any] = {}
    for name in cfg.final_eval or []:
        windows = split_windows(data.split(name), cfg.seq_len, cfg.final_eval_tokens, multiple=world.size)
        if not len(windows):
            raise ConfigError("final_eval", name, f"the split holds no whole window of seq_len={cfg.seq_len}")
        metrics = evaluate(model, _batches(windows, cfg.batch_size), device, data.bytes_per_token.get(name),
                           dtype=dtype, world=world)
        out.setdefault("final_eval", {})[name] = {**metrics, "tokens": int(windows.shape[0] * cfg.seq_len)}
    for length in cfg.position_eval_lengths or []:
        out.setdefault("position_loss", {})[str(length)] = position_loss(model, data, length, cfg, device, dtype,
                                                                         world)
    return out


POSITION_BINS = 128


def position_loss(model: LanguageModel, data: TokenData, length: int, cfg: TrainConfig, device: torch.device,
                  dtype: torch.dtype | None, world: World) -> dict[str, Any]:
    """Mean loss at each position of ``length``-token windows inside single test documents, averaged in
    ``POSITION_BINS`` equal bins: how the loss falls with the context used, and past the trained length."""
    split = "test" if "test" in data.others else "validation"
    windows = split_windows(data.split(split), length, cfg.final_eval_tokens, eos_id=data.eos_id,
                            multiple=world.size)
    if not len(windows):
        raise ConfigError("position_eval_lengths", length, f"the {split} split holds no document of {length + 1} "
                                                           "tokens; use shorter lengths")
    per_batch = max(world.size, cfg.batch_size * cfg.seq_len // length // world.size * world.size)
    was_training = model.training
    model.eval()
    sums = torch.zeros(length, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in _batches(windows, per_batch):
            share = len(x) // world.size
            rows = slice(world.rank * share, (world.rank + 1) * share)
            with _autocast(device, dtype):
                losses = model(x[rows].to(device), targets=y[rows].to(device), loss_reduction="none")
            sums += losses.double().sum(0)
    model.train(was_training)
    mean = (all_reduce(sums, world) / len(windows)).cpu()
    bins = min(POSITION_BINS, length)
    edges = np.linspace(0, length, bins + 1).round().astype(int)
    return {"split": split, "windows": len(windows), "bin_edges": edges.tolist(),
            "loss": [float(mean[a:b].mean()) for a, b in itertools.pairwise(edges.tolist())]}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    bytes_per_token: float | None,
    *,
    dtype: torch.dtype | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and, when the bytes per token are known, bits per byte.

    Under several processes each takes its slice of every batch and the sums are all-reduced, so the
    number is that of the whole evaluation set.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, tokens)
    for x, y in batches:
        share = len(x) // world.size
        rows = slice(world.rank * share, (world.rank + 1) * share)
        with _autocast(device, dtype):  # the head and loss chunk by chunk: no [tokens, vocab] logits
            sums[0] += model(x[rows].to(device), targets=y[rows].to(device), loss_reduction="sum")
        sums[1] += y[rows].numel()
    model.train(was_training)
    total, count = all_reduce(sums, world).tolist()
    loss = total / count
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if bytes_per_token:
        metrics["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return metrics


def save_checkpoint(path: Path, model_state: dict, optimizer_state: dict, step: int, model_cfg: ModelConfig,
                    train_cfg: TrainConfig, curves: dict[str, list[dict[str, Any]]], rng: dict[str, torch.Tensor],
                    resumes: list[dict[str, Any]] | None = None) -> None:
    """Atomic write: a crash mid-save leaves the previous checkpoint intact.

    The states are full (gathered) and keyed by parameter name: ``distributed.full_state_dicts``.
    """
    bad = [name for name, t in (*_named_tensors("model", model_state), *_named_tensors("optimizer", optimizer_state))
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: not written, because {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); "
                              "the checkpoint already on disk, if any, is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "step": step,
        "rng": rng,
        "model_config": json.dumps(model_cfg.to_dict()),
        "train_config": json.dumps(train_cfg.to_dict()),
        "curves": json.dumps(curves),
        "resumes": json.dumps(resumes or []),
    }
    state["digest"] = checkpoint_digest(state)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_digest(state: dict[str, Any]) -> str:
    """BLAKE2b over every tensor's bytes and every other field, in a fixed order: torch.load notices a
    truncated file, but not a flipped bit inside a tensor; this does."""
    h = hashlib.blake2b(digest_size=32)
    for name, t in sorted(_named_tensors("state", {k: v for k, v in state.items() if k != "digest"})):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k, v in state.items() if isinstance(v, (str, int)) and k != "digest"):
        h.update(f"{key}={state[key]}".encode())
    return h.hexdigest()


def _named_tensors(prefix: str, tree: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state dict, with a dotted name for messages."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _named_tensors(f"{prefix}.{key}", value)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _named_tensors(f"{prefix}.{i}", value)


# Training fields that decide which batches are drawn and which update each step applies: a resume that
# changes one would continue another run. The others (steps, evaluation, logging, checkpointing, device,
# compile, processes, the loss implementation) may change between the parts of a run; the record lists it.
TRAJECTORY_FIELDS = ("seed", "batch_size", "seq_len", "grad_accum_steps", "lr", "min_lr_ratio", "warmup_steps",
                     "schedule", "decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip", "autocast",
                     "quantize")


def resume_changes(saved: dict[str, Any], cfg: TrainConfig, checkpoint: Path, step: int) -> dict[str, dict[str, Any]]:
    """The training fields a resume changes, as {field: {"from": saved, "to": now}}.

    Raises CheckpointError naming every trajectory field that differs, or a step count below the
    checkpoint's; the allowed changes are returned so the run can record them.
    """
    defaults, now = TrainConfig().to_dict(), cfg.to_dict()
    changed = {name: {"from": saved.get(name, defaults[name]), "to": value} for name, value in now.items()
               if saved.get(name, defaults[name]) != value}
    refused = [name for name in TRAJECTORY_FIELDS if name in changed]
    if refused:
        detail = ", ".join(f"{n} {changed[n]['from']!r} -> {changed[n]['to']!r}" for n in refused)
        raise CheckpointError(f"{checkpoint}: resuming would change the training trajectory ({detail}); "
                              "resume with the saved values, or start a new run in another out_dir")
    if cfg.steps < step:
        raise CheckpointError(f"{checkpoint}: holds step {step}, beyond steps={cfg.steps}; steps may only grow on resume")
    return changed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load without unpickling arbitrary objects; any damage is reported with the file name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; train without resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        digest_ok = "digest" not in state or checkpoint_digest(state) == state["digest"]  # older ones: unchecked
        state["model_config"] = ModelConfig.from_dict(json.loads(state["model_config"]))
        state["train_config"] = json.loads(state["train_config"])
        state["curves"] = json.loads(state["curves"])
        state["resumes"] = json.loads(state.get("resumes", "[]"))
        int(state["step"])
        state["rng"]["torch"]
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or incompatible checkpoint ({type(e).__name__}: {e})") from e
    if not digest_ok:
        raise CheckpointError(f"{path}: corrupt checkpoint: its contents do not match the checksum written with them "
                              "(a flipped bit or a partial copy); resume from another copy or train again")
    return state


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig,
             cfg: TrainConfig, world: World,
             device: torch.device) -> tuple[int, dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Load model, optimiser and RNG from rank 0's checkpoint on every rank; returns (step, curves, resumes).

    ``resumes`` lists every resume of the run so far, this one last: the step and the training fields
    that changed (see ``resume_changes``).
    """
    state, error = None, None
    if world.is_main:
        try:
            state = load_checkpoint(checkpoint)
            if state["model_config"] != model_cfg:
                raise CheckpointError(f"{checkpoint}: saved for model {state['model_config']}, asked to resume {model_cfg}")
            changed = resume_changes(state["train_config"], cfg, checkpoint, int(state["step"]))
            state["resumes"].append({"step": int(state["step"]), "changed": changed})
        except CheckpointError as e:
            error = str(e)
    meta = broadcast((error, None if state is None else {k: state[k] for k in ("step", "curves", "rng", "resumes")}), world)
    if meta[0]:
        raise CheckpointError(meta[0])
    meta = meta[1]
    load_full_state_dicts(model, optimizer, state["model"] if state else {}, state["optimizer"] if state else {}, world)
    torch.set_rng_state(meta["rng"]["torch"])
    if device.type == "cuda" and "cuda" in meta["rng"]:
        torch.cuda.set_rng_state(meta["rng"]["cuda"], device)
    return int(meta["step"]), meta["curves"], meta["resumes"]


def build_training(model_cfg: ModelConfig, cfg: TrainConfig, world: World,
                   device: torch.device) -> tuple[LanguageModel, torch.nn.Module, torch.optim.Optimizer]:
    """The model (``raw``: its parameters and state dict), the module to call for training (DDP's wrapper,
    or ``raw`` itself, sharded in place under FSDP) and the optimiser.

    ``activation_checkpointing`` keeps only each block's input for the backward, which recomputes the
    block: about one more forward of compute for activations of one [B, T, D] tensor per layer.
    ``quantize`` swaps the blocks' linear layers for fake-quantised ones (``lmscale.quantize``) before
    anything else, so checkpoints hold the float master weights under their usual names.
    ``compile`` compiles each block in place, as torchtitan does: the blocks of one mixer share one
    compiled graph, so a 24-layer model compiles about as fast as one layer, and the state dict keeps its
    plain names. The embedding and the head's fused loss stay outside the graphs.
    """
    raw = LanguageModel(model_cfg)
    if cfg.quantize:  # quantisation-aware: the forward sees the quantised weights, the update the float ones
        from lmscale.quantize import quantize_model

        quantize_model(raw, cfg.quantize)
    raw = raw.to(device)
    raw.checkpoint_blocks = cfg.activation_checkpointing
    if cfg.compile:
        for block in raw.blocks:
            block.compile()
    model = parallelize(raw, world, device)  # DDP wraps; FSDP shards ``raw`` in place
    return raw, model, make_optimizer(raw, cfg, device)


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: float  # before clipping
    stop_votes: float  # processes that received SIGTERM
    applied: bool  # False: loss or gradient norm was not finite, so the optimiser was not stepped


def training_step(model: torch.nn.Module, raw: LanguageModel, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, cfg: TrainConfig, world: World, device: torch.device, dtype: torch.dtype | None,
                  stop_requested: bool = False) -> StepResult:
    """One optimiser step on the global batch (x, y) [sequences_per_step, seq_len].

    The update is applied only when the loss and the gradient norm are both finite: a finite loss can
    still come with infinite gradients, and one such update would poison every later checkpoint.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, (xb, yb) in enumerate(_micro_batches(x, y, cfg, world)):
        with gradient_sync(model, world, enabled=i == cfg.grad_accum_steps - 1):
            with _autocast(device, dtype):
                micro_loss = model(xb.to(device), targets=yb.to(device), loss_impl=cfg.loss_impl)
            (micro_loss / cfg.grad_accum_steps).backward()
        loss_sum += micro_loss.detach()
    # one all-reduce per step: the global mean loss, and whether any process got SIGTERM
    shared = torch.stack([loss_sum / cfg.grad_accum_steps, torch.tensor(float(stop_requested), device=device)])
    loss_total, stop_votes = all_reduce(shared, world).tolist()
    loss = loss_total / world.size
    if not math.isfinite(loss):
        return StepResult(loss, math.nan, stop_votes, applied=False)
    # the norm of every gradient, all-reduced under DDP and FSDP alike; clipping only when grad_clip > 0
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm).item()
    if not math.isfinite(grad_norm):
        return StepResult(loss, grad_norm, stop_votes, applied=False)
    optimizer.step()
    return StepResult(loss, grad_norm, stop_votes, applied=True)


def _micro_batches(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, world: World):
    """This process's share of each micro-step: of the global batch's rows, micro-step i holds
    [i·B, (i+1)·B) and rank r takes [i·B + r·B/W, i·B + (r+1)·B/W) (B = batch_size, W = processes)."""
    share = cfg.batch_size // world.size
    for i in range(cfg.grad_accum_steps):
        lo = i * cfg.batch_size + world.rank * share
        yield x[lo : lo + share], y[lo : lo + share]


def _tensorboard(out_dir: Path, start: int):
    """A SummaryWriter in out_dir/tensorboard, or None (with one line saying why) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("TensorBoard logs are off: the tensorboard package is not installed (pip install tensorboard; "
                       "or set tensorboard=False, --tensorboard false, to silence this). log.jsonl has every number.")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=start or None)


@dataclass
class TrainResult:
    model: LanguageModel  # under FSDP its parameters are this process's shards
    metrics: dict[str, Any]
    curves: dict[str, list[dict[str, Any]]]
    rank: int = 0  # of the process that returns it; rank 0 alone writes files


def check_device(device: str) -> None:
    """A device this torch and machine can use, or a ConfigError that says what is missing."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None else
                   f"this torch (CUDA {torch.version.cuda}) sees no GPU")
            raise ConfigError("device", device, f"{why}; use --device cpu, or run on a machine with a CUDA GPU")
        index = device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError("device", device, f"this machine has {torch.cuda.device_count()} GPU(s), "
                                                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", device, "MPS is not available on this machine; use --device cpu")


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: TokenData,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train from scratch (or resume from ``out_dir/checkpoint.pt``); returns the model, metrics and curves.

    ``out_dir`` receives ``log.jsonl`` (one line per logged step and evaluation), ``checkpoint.pt`` and,
    when the package is there, ``tensorboard/``. Under torchrun every process calls this with the same
    arguments (``lmscale.distributed``); rank 0 writes the files. SIGTERM finishes the step in flight,
    saves the checkpoint and raises ``TrainingInterrupted``; ``resume=True`` continues exactly.
    """
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            "seq_len", train_cfg.seq_len, f"exceeds the model's max_seq_len={model_cfg.max_seq_len}"
        )
    data.check(train_cfg.seq_len, model_cfg.vocab_size)
    world = world_from_env(train_cfg.parallel)
    if train_cfg.batch_size % world.size:
        raise ConfigError("batch_size", train_cfg.batch_size,
                          f"must divide among the {world.size} processes (each takes batch_size / {world.size} "
                          f"sequences of every micro-step); use a multiple of {world.size}")
    if resume and not out_dir:
        raise ConfigError("out_dir", out_dir, "resume needs the out_dir holding checkpoint.pt")
    check_device(train_cfg.device)
    device = process_device(world, train_cfg.device)
    init_process_group(world, device)
    return _train(model_cfg, train_cfg, data, Path(out_dir) if out_dir else None, resume, progress, world, device)


class _RunLog:
    """Where a run's logged points go: its curves (returned and checkpointed), and on rank 0 log.jsonl,
    TensorBoard and a progress bar; ``close`` (under ``contextlib.closing``) however training ends."""

    def __init__(self, curves: dict[str, list[dict[str, Any]]], out_dir: Path | None, resume: bool, start: int,
                 cfg: TrainConfig, world: World, progress: bool, name: str):
        self.curves = curves
        self.log = self.writer = self.bar = None
        if out_dir and world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.log = open(out_dir / "log.jsonl", "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self.writer = _tensorboard(out_dir, start) if cfg.tensorboard else None
        if progress and world.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, desc=name, leave=False)

    def record(self, kind: str, point: dict[str, Any]) -> None:
        self.curves[kind].append(point)
        if self.log:
            self.log.write(json.dumps({"kind": kind, **point}) + "\n")
            self.log.flush()
        if self.writer:
            for key, value in point.items():
                if key not in ("step", "tokens") and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, point["step"])

    def stepped(self, loss: float) -> None:
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        for handle in (self.bar, self.log, self.writer):
            if handle:
                handle.close()


@dataclass
class _StepClock:
    """Seconds inside training steps: all of them, the session's first (which pays for compilation and
    warm-up, so throughput leaves it out) and those since the last logged point."""

    steps: int = 0
    seconds: float = 0.0
    first: float = 0.0
    interval_steps: int = 0
    interval_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        if not self.steps:
            self.first = seconds
        self.steps += 1
        self.seconds += seconds
        self.interval_steps += 1
        self.interval_seconds += seconds

    def take_interval(self) -> tuple[int, float]:
        interval = self.interval_steps, self.interval_seconds
        self.interval_steps, self.interval_seconds = 0, 0.0
        return interval

    def tokens_per_second(self, tokens_per_step: int) -> float | None:
        """Steady-state throughput: without the first step when there are others."""
        steps, seconds = (self.steps - 1, self.seconds - self.first) if self.steps > 1 else (self.steps, self.seconds)
        return steps * tokens_per_step / seconds if seconds > 0 else None


def _check_evaluations(model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData) -> None:
    """A misspelt split or an impossible length fails now, not after the training it would waste."""
    for name in cfg.final_eval or []:
        data.split(name)
    too_long = [n for n in cfg.position_eval_lengths or [] if n > model_cfg.max_seq_len]
    if too_long:
        raise ConfigError("position_eval_lengths", too_long, f"exceed the model's max_seq_len="
                          f"{model_cfg.max_seq_len}; raise max_seq_len (RoPE needs no retraining to run longer)")


def _train(model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData, out_dir: Path | None, resume: bool,
           progress: bool, world: World, device: torch.device) -> TrainResult:
    torch.manual_seed(cfg.seed)
    _check_evaluations(model_cfg, cfg, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    raw, model, optimizer = build_training(model_cfg, cfg, world, device)
    flops_per_token = 3 * raw.flops_per_token(cfg.seq_len)  # training ≈ forward + 2× forward for backward
    dtype = autocast_dtype(cfg.autocast, device)
    peak, peak_source = peak_flops(cfg, device)
    curves: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    resumes: list[dict[str, Any]] = []
    start = 0
    checkpoint = out_dir / "checkpoint.pt" if out_dir else None
    if resume:
        start, curves, resumes = _restore(checkpoint, raw, optimizer, model_cfg, cfg, world, device)
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    for point in curves["eval"]:
        stopper.update(point["step"], point["loss"])
    # eval_batches global batches of fixed windows, run in micro-batches: the same text however split
    eval_batches = eval_windows(data.validation, cfg.eval_batches * cfg.grad_accum_steps, cfg.batch_size, cfg.seq_len)
    bpt = data.bytes_per_token.get("validation")

    def save(step: int) -> None:
        model_state, optimizer_state = full_state_dicts(raw, optimizer)  # a collective under FSDP
        if checkpoint and world.is_main:
            save_checkpoint(checkpoint, model_state, optimizer_state, step, model_cfg, cfg, curves, _rng_state(device),
                            resumes)

    def train_point(step: int) -> dict[str, Any]:
        point = _train_point(step, loss, lr, grad_norm, cfg, *clock.take_interval(), flops_per_token, peak, world)
        if raw.moe_aux_loss is not None:  # load balance of rank 0's last micro-batch (1: uniform)
            point["moe_aux_loss"] = float(raw.moe_aux_loss.detach())
        return point

    done = saved = start
    loss, stop_votes = math.nan, 0.0
    clock = _StepClock()
    model.train()
    t0 = time.perf_counter()
    with contextlib.closing(_RunLog(curves, out_dir, resume, start, cfg, world, progress, model_cfg.mixer)) as run_log, \
            _catch_sigterm() as sigterm:
        for step in range(start, start if stopper.stopped else cfg.steps):
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch_at(data.train, cfg.sequences_per_step, cfg.seq_len, cfg.seed, step)
            result = training_step(model, raw, optimizer, x, y, cfg, world, device, dtype,
                                   stop_requested=sigterm.received)
            loss, grad_norm, stop_votes = result.loss, result.grad_norm, result.stop_votes
            if not result.applied:
                raise _diverged(loss, grad_norm, step, lr, checkpoint)
            done = step + 1
            clock.add(time.perf_counter() - t_step)
            if done % cfg.log_interval == 0 or done == cfg.steps:
                run_log.record("train", train_point(done))
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                metrics = evaluate(raw, eval_batches, device, bpt, dtype=dtype, world=world)
                run_log.record("eval", {"step": done, "tokens": done * cfg.tokens_per_step, **metrics})
                stopper.update(done, metrics["loss"])
                if stopper.stopped and (not curves["train"] or curves["train"][-1]["step"] != done):
                    run_log.record("train", train_point(done))
            if checkpoint and (stop_votes or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0)):
                save(done)
                saved = done
            run_log.stepped(loss)
            if stop_votes or stopper.stopped:
                break
    elapsed = time.perf_counter() - t0
    if checkpoint and saved != done:
        save(done)
    if stop_votes and done < cfg.steps and not stopper.stopped:
        barrier(world)  # rank 0 has written the checkpoint before any process exits
        kept = f"checkpoint {checkpoint} holds it; resume with resume=True (--resume)" if checkpoint else \
            "no out_dir was given, so nothing was saved"
        raise TrainingInterrupted(f"training stopped by SIGTERM after step {done} of {cfg.steps}; {kept}")

    final = final_evaluation(raw, data, cfg, device, dtype, world)
    tokens_per_second = clock.tokens_per_second(cfg.tokens_per_step)
    memory, memory_source = peak_memory(device)
    if memory is not None and world.distributed:
        memory = int(all_reduce(torch.tensor(float(memory), dtype=torch.float64, device=device), world, op="max").item())
        memory_source += ", largest over processes"
    last = curves["eval"][-1]
    metrics = {
        "val_loss": last["loss"],
        "val_perplexity": last["perplexity"],
        "val_bits_per_byte": last.get("bits_per_byte"),
        "train_loss": curves["train"][-1]["loss"],
        "best_val_loss": stopper.best_loss,
        "steps": done,
        "tokens": done * cfg.tokens_per_step,
        "stopped_early": stopper.stopped,
        "stopped_at_step": done if stopper.stopped else None,
        "params": raw.num_params(),
        "params_non_embedding": raw.num_params(non_embedding=True),
        "params_active": raw.num_params(active=True),  # equal to params but in a mixture of experts
        "sequences_per_step": cfg.sequences_per_step,
        "world_size": world.size,
        "parallel": world.parallel,
        "autocast": "bf16" if dtype is torch.bfloat16 else "off",
        "wall_seconds": elapsed,
        "train_seconds": clock.seconds,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops_per_token,
        "mfu": _mfu(tokens_per_second, flops_per_token, peak, world),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "loss_impl": resolve_loss_impl(cfg.loss_impl, device, needs_grad=True),
        "resumes": resumes,  # each resume: the step and the training fields it changed (steps, intervals, …)
        **final,
    }
    return TrainResult(model=raw, metrics=metrics, curves=curves, rank=world.rank)


def _diverged(loss: float, grad_norm: float, step: int, lr: float, checkpoint: Path | None) -> TrainingDivergedError:
    where = f"the last good checkpoint {checkpoint} is kept" if checkpoint and checkpoint.exists() else \
        "no checkpoint was written"
    what = f"loss is {loss}" if not math.isfinite(loss) else \
        f"the gradient norm is {grad_norm} while the loss ({loss:.4g}) is finite"
    return TrainingDivergedError(f"{what} at step {step} (lr {lr:.3g}); the step was not applied and {where}. "
                                 "Lower lr, raise warmup_steps or enable grad_clip.")


def _mfu(tokens_per_second: float | None, flops_per_token: float, peak: float | None, world: World) -> float | None:
    """Model FLOPs utilisation: analytic training FLOPs per second over the devices' summed peak."""
    if not (tokens_per_second and peak):
        return None
    return tokens_per_second * flops_per_token / (peak * world.size)


def _train_point(step: int, loss: float, lr: float, grad_norm: float, cfg: TrainConfig, steps: int, seconds: float,
                 flops_per_token: float, peak: float | None, world: World) -> dict[str, Any]:
    """One logged training step; throughput and MFU over the steps since the last one (evaluation excluded)."""
    tokens_per_second = steps * cfg.tokens_per_step / seconds if seconds > 0 else None
    point = {"step": step, "tokens": step * cfg.tokens_per_step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
             "tokens_per_second": tokens_per_second}
    mfu = _mfu(tokens_per_second, flops_per_token, peak, world)
    if mfu is not None:
        point["mfu"] = mfu
    return point


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
) -> tuple[Path | None, TrainResult]:
    """Train, then write the run's result record; returns the record's path (None on ranks other than
    0, which write nothing) and the result."""
    from lmscale.results import make_record, require_commit, write_record

    require_commit(train_cfg.device)  # before training, not after: the record must name its code
    result = train(model_cfg, train_cfg, data, out_dir=out_dir, resume=resume, progress=progress)
    if result.rank != 0:
        return None, result
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
