"""Scale-out on one node: the same training run on 1, 2, 4 and 8 GPUs, read from its records.

The runs of ``data/sweeps/multi-gpu.yaml`` differ only in how the fixed global batch is laid out (the
number of processes ``world_size``, DDP or FSDP2, and the micro-batching that keeps each GPU's share
the same), so they train on the same tokens in the same order and must log the same losses up to
bf16 rounding. What changes is speed: the scaling efficiency of a run on W GPUs is its throughput
over W times the one-GPU run's, 1 when communication costs nothing.
"""

from __future__ import annotations

import math
from typing import Any

from lmscale.ladder import model_fields, model_label

TABLE_COLUMNS = ("preset", "mixer", "parallel", "gpus", "tokens_per_second", "mfu", "peak_memory_gib",
                 "efficiency", "max_loss_gap")


def _identity(record: Any) -> tuple[str, str]:
    """(size, model) of a row of ``load_records``: the model's width and depth, and its label."""
    model = model_fields(record)
    return f"d{int(model['d_model'])}-l{int(model['n_layers'])}", model_label(model)


def _train_losses(curves: Any) -> dict[int, float]:
    return {p["step"]: p["loss"] for p in (curves or {}).get("train", [])}


def scale_out_table(records) -> Any:
    """One row per finished run of ``records`` (``lmscale.results.load_records``): its layout, throughput,
    MFU, peak memory (the largest of its processes), scaling efficiency against the one-process run of the
    same model, and the largest gap between their logged training losses at the same steps. A model
    without a finished one-process run gets NaN for both."""
    import pandas as pd

    ok = records[records["status"] == "ok"]
    rows = []
    for _, r in ok.iterrows():
        size, mixer = _identity(r)
        memory = r.get("metrics.peak_memory_bytes")
        rows.append({"preset": size, "mixer": mixer, "parallel": r["metrics.parallel"],
                     "gpus": int(r["metrics.world_size"]), "tokens_per_second": r["metrics.tokens_per_second"],
                     "mfu": r.get("metrics.mfu"), "peak_memory_gib": memory / 2**30 if memory else math.nan,
                     "losses": _train_losses(r["curves"])})
    table = pd.DataFrame(rows, columns=[*TABLE_COLUMNS[:7], "losses"])
    efficiency, gaps = [], []
    for _, row in table.iterrows():
        single = table[(table["preset"] == row["preset"]) & (table["mixer"] == row["mixer"]) & (table["gpus"] == 1)]
        if single.empty:
            efficiency.append(math.nan)
            gaps.append(math.nan)
            continue
        base = single.iloc[0]
        efficiency.append(row["tokens_per_second"] / (row["gpus"] * base["tokens_per_second"]))
        shared = sorted(set(row["losses"]) & set(base["losses"]))
        gaps.append(max((abs(row["losses"][s] - base["losses"][s]) for s in shared), default=math.nan))
    table["efficiency"], table["max_loss_gap"] = efficiency, gaps
    return table.drop(columns="losses").sort_values(["preset", "mixer", "gpus", "parallel"]).reset_index(drop=True)
