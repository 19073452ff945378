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
import torch.nn.functional as F

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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms' gains and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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
        with _autocast(device, dtype):
            logits = model(x[rows].to(device))
        sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), y[rows].to(device).flatten(), reduction="sum")
        sums[1] += y[rows].numel()
    model.train(was_training)
    total, count = all_reduce(sums, world).tolist()
    loss = total / count
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if bytes_per_token:
        metrics["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return metrics


def save_checkpoint(path: Path, model_state: dict, optimizer_state: dict, step: int, model_cfg: ModelConfig,
                    train_cfg: TrainConfig, curves: dict[str, list[dict[str, Any]]], rng: dict[str, torch.Tensor]) -> None:
    """Atomic write: a crash mid-save leaves the previous checkpoint intact.

    The states are full (gathered) and keyed by parameter name: ``distributed.full_state_dicts``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "step": step,
        "rng": rng,
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
        state["rng"]["torch"]
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or incompatible checkpoint ({type(e).__name__}: {e})") from e
    return state


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig,
             world: World, device: torch.device) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    """Load model, optimiser and RNG from rank 0's checkpoint on every rank; returns (step, curves)."""
    state, error = None, None
    if world.is_main:
        try:
            state = load_checkpoint(checkpoint)
            if state["model_config"] != model_cfg:
                raise CheckpointError(f"{checkpoint}: saved for model {state['model_config']}, asked to resume {model_cfg}")
        except CheckpointError as e:
            error = str(e)
    meta = broadcast((error, None if state is None else {k: state[k] for k in ("step", "curves", "rng")}), world)
    if meta[0]:
        raise CheckpointError(meta[0])
    meta = meta[1]
    load_full_state_dicts(model, optimizer, state["model"] if state else {}, state["optimizer"] if state else {}, world)
    torch.set_rng_state(meta["rng"]["torch"])
    if device.type == "cuda" and "cuda" in meta["rng"]:
        torch.cuda.set_rng_state(meta["rng"]["cuda"], device)
    return int(meta["step"]), meta["curves"]


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
    device = process_device(world, train_cfg.device)
    init_process_group(world, device)
    return _train(model_cfg, train_cfg, data, Path(out_dir) if out_dir else None, resume, progress, world, device)


def _train(model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData, out_dir: Path | None, resume: bool,
           progress: bool, world: World, device: torch.device) -> TrainResult:
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    raw = LanguageModel(model_cfg).to(device)
    params, params_non_embedding = raw.num_params(), raw.num_params(non_embedding=True)
    flops_per_token = 3 * raw.flops_per_token(cfg.seq_len)  # training ≈ forward + 2× forward for backward
    model = parallelize(raw, world, device)  # DDP wraps; FSDP shards ``raw`` in place
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(raw, cfg)
    dtype = autocast_dtype(cfg.autocast, device)
    peak, peak_source = peak_flops(cfg, device)
    curves: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    start = 0
    checkpoint = out_dir / "checkpoint.pt" if out_dir else None
    if resume:
        start, curves = _restore(checkpoint, raw, optimizer, model_cfg, world, device)
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    for point in curves["eval"]:
        stopper.update(point["step"], point["loss"])

    log = writer = bar = None
    if out_dir and world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "log.jsonl", "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
        writer = _tensorboard(out_dir, start) if cfg.tensorboard else None
    if progress and world.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{model_cfg.mixer}", leave=False)
    # eval_batches global batches of fixed windows, run in micro-batches: the same text however split
    eval_batches = eval_windows(data.validation, cfg.eval_batches * cfg.grad_accum_steps, cfg.batch_size, cfg.seq_len)
    bpt = data.bytes_per_token.get("validation")

    def record(kind: str, point: dict[str, Any]) -> None:
        curves[kind].append(point)
        if log:
            log.write(json.dumps({"kind": kind, **point}) + "\n")
            log.flush()
        if writer:
            for key, value in point.items():
                if key not in ("step", "tokens") and value is not None:
                    writer.add_scalar(f"{kind}/{key}", value, point["step"])

    def save(step: int) -> None:
        model_state, optimizer_state = full_state_dicts(raw, optimizer)  # a collective under FSDP
        if checkpoint and world.is_main:
            save_checkpoint(checkpoint, model_state, optimizer_state, step, model_cfg, cfg, curves, _rng_state(device))

    done = saved = start
    loss, stop_votes = math.nan, 0.0
    train_seconds = interval_seconds = first_step_seconds = 0.0
    interval_steps = 0
    model.train()
    t0 = time.perf_counter()
    try:
        with _catch_sigterm() as sigterm:
            for step in range(start, start if stopper.stopped else cfg.steps):
                t_step = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = batch_at(data.train, cfg.sequences_per_step, cfg.seq_len, cfg.seed, step)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device)
                for i, (xb, yb) in enumerate(_micro_batches(x, y, cfg, world)):
                    with gradient_sync(model, world, enabled=i == cfg.grad_accum_steps - 1):
                        with _autocast(device, dtype):
                            logits = step_model(xb.to(device))
                        micro_loss = F.cross_entropy(logits.flatten(0, 1).float(), yb.to(device).flatten())
                        (micro_loss / cfg.grad_accum_steps).backward()
                    loss_sum += micro_loss.detach()
                # one all-reduce per step: the global mean loss, and whether any process got SIGTERM
                shared = torch.stack([loss_sum / cfg.grad_accum_steps, torch.tensor(float(sigterm.received), device=device)])
                loss_total, stop_votes = all_reduce(shared, world).tolist()
                loss = loss_total / world.size
                if not math.isfinite(loss):
                    where = f"the last good checkpoint {checkpoint} is kept" if checkpoint and checkpoint.exists() else "no checkpoint was written"
                    raise TrainingDivergedError(
                        f"loss is {loss} at step {step} (lr {lr:.3g}); {where}. "
                        "Lower lr, raise warmup_steps or enable grad_clip."
                    )
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip).item()
                    if cfg.grad_clip > 0
                    else float("nan")
                )
                optimizer.step()
                done = step + 1
                elapsed = time.perf_counter() - t_step
                if step == start:
                    first_step_seconds = elapsed
                train_seconds += elapsed
                interval_seconds += elapsed
                interval_steps += 1
                if done % cfg.log_interval == 0 or done == cfg.steps:
                    record("train", _train_point(done, loss, lr, grad_norm, cfg, interval_steps, interval_seconds,
                                                 flops_per_token, peak, world))
                    interval_seconds, interval_steps = 0.0, 0
                if done % cfg.eval_interval == 0 or done == cfg.steps:
                    metrics = evaluate(raw, eval_batches, device, bpt, dtype=dtype, world=world)
                    record("eval", {"step": done, "tokens": done * cfg.tokens_per_step, **metrics})
                    stopper.update(done, metrics["loss"])
                    if stopper.stopped and (not curves["train"] or curves["train"][-1]["step"] != done):
                        record("train", _train_point(done, loss, lr, grad_norm, cfg, interval_steps,
                                                     interval_seconds, flops_per_token, peak, world))
                if checkpoint and (stop_votes or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0)):
                    save(done)
                    saved = done
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                if stop_votes or stopper.stopped:
                    break
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
        if writer:
            writer.close()
    elapsed = time.perf_counter() - t0
    if checkpoint and saved != done:
        save(done)
    if stop_votes and done < cfg.steps and not stopper.stopped:
        barrier(world)  # rank 0 has written the checkpoint before any process exits
        kept = f"checkpoint {checkpoint} holds it; resume with resume=True (--resume)" if checkpoint else \
            "no out_dir was given, so nothing was saved"
        raise TrainingInterrupted(f"training stopped by SIGTERM after step {done} of {cfg.steps}; {kept}")

    # steady-state throughput: the session's first step pays for compilation and warm-up, so it is left out
    timed_steps, timed_seconds = (done - start - 1, train_seconds - first_step_seconds) if done - start > 1 else \
        (done - start, train_seconds)
    tokens_per_second = timed_steps * cfg.tokens_per_step / timed_seconds if timed_seconds > 0 else None
    memory, memory_source = peak_memory(device)
    if memory is not None and world.distributed:
        memory = int(all_reduce(torch.tensor(float(memory), dtype=torch.float64, device=device), world, op="max").item())
        memory_source += ", largest over processes"
    final = curves["eval"][-1]
    metrics = {
        "val_loss": final["loss"],
        "val_perplexity": final["perplexity"],
        "val_bits_per_byte": final.get("bits_per_byte"),
        "train_loss": curves["train"][-1]["loss"],
        "best_val_loss": stopper.best_loss,
        "steps": done,
        "tokens": done * cfg.tokens_per_step,
        "stopped_early": stopper.stopped,
        "stopped_at_step": done if stopper.stopped else None,
        "params": params,
        "params_non_embedding": params_non_embedding,
        "sequences_per_step": cfg.sequences_per_step,
        "world_size": world.size,
        "parallel": world.parallel,
        "autocast": "bf16" if dtype is torch.bfloat16 else "off",
        "wall_seconds": elapsed,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops_per_token,
        "mfu": _mfu(tokens_per_second, flops_per_token, peak, world),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
    }
    return TrainResult(model=raw, metrics=metrics, curves=curves, rank=world.rank)


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
    from lmscale.results import make_record, write_record

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
