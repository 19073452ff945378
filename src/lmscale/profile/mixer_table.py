"""One row per registered mixer at a fixed width: decode state, decode FLOPs, training FLOPs, parameters.

Every number comes from the mixer's analytic contract (``state_bytes``, ``step_cost``, ``cost``,
``weight_bytes``), none from running it, so the table costs nothing at any width: mixers are built on
PyTorch's meta device, which gives parameters their shapes but no memory.

Training FLOPs per token are ``TRAINING_FLOPS_FACTOR · cost(T).flops / T``: the backward pass of a
matmul is two matmuls of the same size (gradients of its input and of its weight), so forward +
backward ≈ 3 × forward (Kaplan et al. 2020). Where a recurrent core recomputes chunk states in its
backward pass the true factor is a little higher; the table predicts, the benchmarks measure.

A mixer may depend on its layer index (LEAP's per-layer windows, Based's mix of layer kinds). The
table therefore builds every layer of an ``n_layers`` stack and reports the mean over the stack,
saying in ``note`` which quantities varied; a mixer that is the same in every layer shows layer 0.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import Mixer, available, build_mixer
from lmscale.mixers.base import MIXERS

TRAINING_FLOPS_FACTOR = 3  # forward + backward ≈ 3 × forward FLOPs (see the module docstring)

COLUMNS = ("name", "family", "paper", "state_bytes_per_token", "state_bytes", "decode_flops_per_token",
           "train_flops_per_token", "params", "note")
# per-layer quantities, averaged over the stack when they depend on the layer
LAYER_QUANTITIES = ("state_bytes", "decode_flops_per_token", "train_flops_per_token", "params")


def _build(cfg: ModelConfig, layer_idx: int) -> Mixer:
    """The mixer with shapes but no storage; on the CPU if its constructor computes on tensor values."""
    try:
        with torch.device("meta"):
            return build_mixer(cfg, layer_idx)
    except (NotImplementedError, RuntimeError):  # e.g. .item() on a meta tensor
        return build_mixer(cfg, layer_idx)


def _layer_row(mixer: Mixer, seq_len: int, context_len: int, dtype: torch.dtype) -> dict[str, float]:
    return {
        "state_bytes": mixer.state_bytes(context_len, dtype),
        "decode_flops_per_token": mixer.step_cost(context_len, dtype).flops,
        "train_flops_per_token": TRAINING_FLOPS_FACTOR * mixer.cost(seq_len, dtype).flops / seq_len,
        "params": sum(p.numel() for p in mixer.parameters()),
    }


def mixer_table(
    d_model: int = 768,
    n_heads: int = 12,
    seq_len: int = 2048,
    context_len: int = 2048,
    dtype: torch.dtype = torch.bfloat16,
    n_layers: int = 12,
) -> pd.DataFrame:
    """One row per registered mixer, built at this width with its default options.

    Columns: ``name``, ``family``, ``paper``; ``state_bytes`` (decode state of one sequence in one
    layer after ``context_len`` tokens, in ``dtype``) and ``state_bytes_per_token`` (the same divided
    by ``context_len``: constant for attention's KV cache, shrinking as 1/L for a fixed-size state);
    ``decode_flops_per_token`` (``step_cost(context_len).flops``); ``train_flops_per_token`` (forward
    + backward at T = ``seq_len``, see ``TRAINING_FLOPS_FACTOR``); ``params`` (per layer); ``note``
    (layer dependence over the ``n_layers`` stack, or why the mixer cannot be built at this width).
    The settings are kept in ``DataFrame.attrs``.
    """
    # a width no model can have raises here; one that only some mixers reject shows in their rows
    base = ModelConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                       max_seq_len=max(seq_len, context_len + 1))
    rows = []
    for name in available():
        cls = MIXERS[name]
        row = {"name": name, "family": cls.family, "paper": cls.paper, "note": ""}
        try:
            cfg = dataclasses.replace(base, mixer=name)
            layers = [_layer_row(_build(cfg, i), seq_len, context_len, dtype) for i in range(n_layers)]
        except ConfigError as e:
            rows.append({**row, **dict.fromkeys(LAYER_QUANTITIES, math.nan),
                         "note": f"not buildable at this width: {e}"})
            continue
        varied = [q for q in LAYER_QUANTITIES if any(layer[q] != layers[0][q] for layer in layers)]
        row.update({q: sum(layer[q] for layer in layers) / n_layers if q in varied else layers[0][q]
                    for q in LAYER_QUANTITIES})
        if varied:
            row["note"] = f"mean over a {n_layers}-layer stack; varies: {', '.join(varied)}"
        rows.append(row)
    table = pd.DataFrame(rows)
    table["state_bytes_per_token"] = table["state_bytes"] / context_len
    table = table[list(COLUMNS)]
    table.attrs.update(d_model=d_model, n_heads=n_heads, seq_len=seq_len, context_len=context_len,
                       dtype=str(dtype).removeprefix("torch."), n_layers=n_layers,
                       training_flops_factor=TRAINING_FLOPS_FACTOR)
    return table


def _units(value: float, base: int, units: tuple[str, ...]) -> str:
    if math.isnan(value):
        return "—"
    i = 0
    while abs(value) >= base and i < len(units) - 1:
        value, i = value / base, i + 1
    return f"{value:.3g} {units[i]}" if i == 0 else f"{value:.1f} {units[i]}"


def _bytes(value: float) -> str:
    return _units(value, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def _count(value: float) -> str:
    return _units(value, 1000, ("", "K", "M", "G", "T", "P")).rstrip()


def format_mixer_table(table: pd.DataFrame) -> str:
    """The table as text with units, under a line stating the width, context and dtype it assumes."""
    a = table.attrs
    header = (f"d_model={a['d_model']}, n_heads={a['n_heads']}, {a['dtype']}, per layer; decode after "
              f"{a['context_len']} tokens of context; training at T={a['seq_len']} "
              f"({a['training_flops_factor']}× forward FLOPs: forward + backward)")
    shown = pd.DataFrame({
        "mixer": table["name"],
        "family": table["family"],
        "paper": table["paper"],
        "state/token": table["state_bytes_per_token"].map(_bytes),
        f"state@{a['context_len']}": table["state_bytes"].map(_bytes),
        "decode FLOPs/token": table["decode_flops_per_token"].map(_count),
        f"train FLOPs/token@{a['seq_len']}": table["train_flops_per_token"].map(_count),
        "params": table["params"].map(_count),
        "note": table["note"],
    })
    return header + "\n" + shown.to_string(index=False)
