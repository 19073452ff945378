"""Precision and sparsity of a trained model, measured: the neuromorphic chapter's evidence (issue 17).

From one checkpoint, on the validation split:

- the loss in float, and under each weight/activation scheme of ``lmscale.quantize`` applied after
  training (each on a fresh copy of the model);
- the loss of token-by-token decoding in float and with the state held in 8 and 4 bits, since a
  chip that keeps the state in SRAM keeps it in few bits, and a recurrence feeds each rounding into
  every later step;
- sparsity, from the float decoding pass: per layer, the share of exact zeros and of entries below 1 %
  of their row's absolute maximum, in the mixer's output, the MLP's hidden activation (the input of
  its down projection, where SwiGLU's gate could make zeros) and the state's update (the state after a
  step minus the state before it; for attention, the key and value written). An event-driven chip
  sends an event only for an entry that is not (near) zero: one minus these shares is the events'
  share.

A model trained with quantisation (``TrainConfig.quantize``) is evaluated as trained: its scheme is
rebuilt before the weights are loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmscale.config import TrainConfig
from lmscale.mixers.attention import KVCache
from lmscale.model import LanguageModel
from lmscale.quantize import SCHEMES, STATE_BITS, quantize_model, quantize_state, supported

NEAR_ZERO = 0.01  # |x| below this share of its row's absolute maximum counts as near zero


def load_trained(checkpoint: Path, device: torch.device) -> tuple[LanguageModel, TrainConfig]:
    """The model of a trainer checkpoint, with its training scheme rebuilt, in eval mode."""
    from lmscale.train import load_checkpoint

    state = load_checkpoint(checkpoint)
    train_cfg = TrainConfig.from_dict(state["train_config"])
    model = LanguageModel(state["model_config"])
    if train_cfg.quantize:
        quantize_model(model, train_cfg.quantize)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), train_cfg


def _leaves(state: Any) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state] if state.is_floating_point() or state.is_complex() else []
    if dataclasses.is_dataclass(state):
        return [t for f in dataclasses.fields(state) for t in _leaves(getattr(state, f.name))]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in _leaves(s)]
    if isinstance(state, dict):
        return [t for s in state.values() for t in _leaves(s)]
    return []


class _Sparsity:
    """Running counts of exact zeros and near zeros, per (layer, site)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], np.ndarray] = defaultdict(lambda: np.zeros(3))

    def add(self, layer: int, site: str, x: Tensor) -> None:
        if not x.numel():
            return
        x = torch.view_as_real(x) if x.is_complex() else x
        x = x.detach().float().reshape(-1, x.shape[-1] if x.dim() else 1)
        row_max = x.abs().amax(-1, keepdim=True)
        self.counts[(layer, site)] += (float((x == 0).sum()), float((x.abs() < NEAR_ZERO * row_max).sum()), x.numel())

    def table(self) -> list[dict[str, Any]]:
        return [{"layer": layer, "site": site, "zero": float(zero / n), "near_zero": float(near / n), "entries": int(n)}
                for (layer, site), (zero, near, n) in sorted(self.counts.items())]


def _state_update(before: list[Tensor], after: Any) -> list[Tensor]:
    """What a step wrote: the key and value of the new position for a KV cache (growing or sliding),
    after − before for every state tensor whose shape the step kept (``before``: copies of its leaves, taken before the step, since
    a kernel may update the state in place)."""
    if isinstance(after, KVCache):
        return [after.k[:, :, -1], after.v[:, :, -1]]
    updates = []
    for b, a in zip(before, _leaves(after), strict=True):
        if a.shape == b.shape:  # buffers that change shape (LEAP's window blocks) have no entry-wise update
            updates.append(a - b)
    return updates


@contextmanager
def _observed_steps(model: LanguageModel, sparsity: _Sparsity | None) -> Iterator[None]:
    """While decoding, each layer's mixer output and state update go to ``sparsity``, and each MLP's
    hidden activation (the input of its down projection)."""
    if sparsity is None:
        yield
        return
    hooks = [down.register_forward_pre_hook(lambda _m, args, i=i: sparsity.add(i, "mlp hidden", args[0]))
             for i, block in enumerate(model.blocks)
             for down in [m for name, m in block.mlp.named_modules() if name.endswith("down_proj")]]  # an MoE: each expert's
    for i, block in enumerate(model.blocks):
        def step(x_t, state, _original=block.mixer.step, i=i):
            before = [] if isinstance(state, KVCache) else [t.clone() for t in _leaves(state)]
            y_t, new_state = _original(x_t, state)
            sparsity.add(i, "mixer output", y_t)
            for update in _state_update(before, new_state):
                sparsity.add(i, "state update", update)
            return y_t, new_state

        block.mixer.step = step
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for block in model.blocks:
            del block.mixer.step  # the class's method shows again


@torch.no_grad()
def decode_loss(model: LanguageModel, batches: list[tuple[Tensor, Tensor]], device: torch.device,
                state_bits: int | None = None, sparsity: _Sparsity | None = None) -> float:
    """Mean next-token loss of decoding every window token by token, the state rounded after each step."""
    total, count = 0.0, 0
    with _observed_steps(model, sparsity):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            state = model.init_state(x.shape[0], device, next(model.parameters()).dtype)
            for t in range(x.shape[1]):
                logits, state = model.step(x[:, t], state)
                if state_bits is not None:
                    state = [quantize_state(layer_state, state_bits) for layer_state in state]
                total += float(F.cross_entropy(logits.float(), y[:, t], reduction="sum"))
                count += y.shape[0]
    return total / count


def precision_study(model: LanguageModel, batches: list[tuple[Tensor, Tensor]],
                    decode_batches: list[tuple[Tensor, Tensor]], device: torch.device) -> dict[str, Any]:
    """Every measurement of the module docstring, as a JSON-ready dict."""
    from lmscale.train import evaluate

    out: dict[str, Any] = {"float": {"loss": evaluate(model, batches, device, None)["loss"]}}
    reasons = supported(model)
    for scheme in SCHEMES:
        if reasons[scheme]:
            out[scheme] = {"loss": None, "not_supported": reasons[scheme]}
            continue
        quantized = copy.deepcopy(model)
        report = quantize_model(quantized, scheme)
        loss = evaluate(quantized, batches, device, None)["loss"]
        out[scheme] = {"loss": loss, "delta": loss - out["float"]["loss"], "layers": report.layers,
                       "quantized_share": report.quantized_params / report.block_params}
    sparsity = _Sparsity()
    decoded = decode_loss(model, decode_batches, device, sparsity=sparsity)
    out["decode_float"] = {"loss": decoded}
    for bits in STATE_BITS:
        loss = decode_loss(model, decode_batches, device, state_bits=bits)
        out[f"decode_state{bits}"] = {"loss": loss, "delta": loss - decoded if math.isfinite(loss) else None}
    out["sparsity"] = sparsity.table()
    return out


def precision_and_record(checkpoint: Path, *, device: str = "cpu", eval_batches: int = 16, batch_size: int = 16,
                         decode_windows: int = 8, decode_len: int = 256, experiment: str = "neuromorphic",
                         run_id: str | None = None, results_root: Path | None = None,
                         data: Any = None) -> tuple[Path, dict[str, Any]]:
    """Run ``precision_study`` on a checkpoint over fixed validation windows and write its record.

    The parallel-form losses use ``eval_batches`` batches of ``batch_size`` windows at the trained
    sequence length; decoding, token by token, uses ``decode_windows`` windows of ``decode_len``.
    ``data``: a ``TokenData`` (default: the prepared corpus).
    """
    from lmscale.results import make_record, require_commit, write_record
    from lmscale.train import TokenData, check_device, eval_windows

    check_device(device)
    require_commit(device)  # before any work: a GPU record without a commit would be refused at the end
    torch_device = torch.device(device)
    model, train_cfg = load_trained(Path(checkpoint), torch_device)
    data = data or TokenData.from_corpus()
    tokens = data.split("validation")
    batches = eval_windows(tokens, eval_batches, batch_size, train_cfg.seq_len)
    decode = eval_windows(tokens, 1, decode_windows, decode_len)
    metrics = precision_study(model, batches, decode, torch_device)
    cfg = model.cfg
    variant = "".join(f"-{v}" for v in (train_cfg.quantize, cfg.mlp_activation if cfg.mlp_activation != "silu" else "") if v)
    run_id = run_id or f"precision-{cfg.mixer}-d{cfg.d_model}-l{cfg.n_layers}-s{train_cfg.steps}{variant}-seed{train_cfg.seed}"
    config = {"model": cfg.to_dict(), "train": train_cfg.to_dict(),
              "precision": {"checkpoint": Path(checkpoint).name, "eval_batches": eval_batches, "batch_size": batch_size,
                            "decode_windows": decode_windows, "decode_len": decode_len, "split": "validation",
                            "near_zero": NEAR_ZERO}}
    record = make_record(experiment, kind="precision", config=config, seed=train_cfg.seed, metrics=metrics,
                         device=device, run_id=run_id)
    return write_record(record, results_root), metrics
