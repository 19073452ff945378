"""The context-length study's records as tables: the loss by position, and what happens past the
trained length.

A run trained at length T and scored in windows of L > T tokens inside single documents
(``TrainConfig.position_eval_lengths``) records the mean loss in equal bins of positions. Positions
below T are in distribution; the mean loss over (T, L] against that over (T/2, T] says whether the
model extrapolates (about zero or below: it keeps using, or at least ignores, the longer context) or
breaks (well above zero: RoPE attention past its trained positions is the classic case).
"""

from __future__ import annotations

from lmscale.ladder import model_fields, variant_label


def position_frame(records):
    """Long form: one row per (run, scoring length, bin) with the bin's positions and mean loss."""
    import pandas as pd

    rows = []
    for _, r in records[records["status"] == "ok"].iterrows():
        by_length = r.get("metrics.position_loss")
        if not isinstance(by_length, dict):
            continue
        model = model_fields(r)
        for length, curve in by_length.items():
            edges = curve["bin_edges"]
            for start, end, loss in zip(edges[:-1], edges[1:], curve["loss"], strict=True):
                rows.append({"model": variant_label(model), "train_len": int(r["config.train.seq_len"]),
                             "eval_len": int(length), "start": start, "end": end, "position": (start + end) / 2,
                             "loss": loss, "windows": curve["windows"], "run_id": r["run_id"]})
    return pd.DataFrame(rows, columns=["model", "train_len", "eval_len", "start", "end", "position", "loss",
                                       "windows", "run_id"])


def extrapolation(positions):
    """Per (model, trained length, scored length): mean loss over positions (T/2, T] (in distribution),
    over (T, 2T] and (2T, L], and the change past T: the mean over (T, L] minus the in-distribution one."""
    import pandas as pd

    rows = []
    for (model, t, length), g in positions.groupby(["model", "train_len", "eval_len"]):
        def mean(lo: float, hi: float, g=g) -> float | None:
            part = g[(g["start"] >= lo) & (g["end"] <= hi)]
            return float(part["loss"].mean()) if len(part) else None

        inside, near, far, past = mean(t / 2, t), mean(t, 2 * t), mean(2 * t, length), mean(t, length)
        rows.append({"model": model, "train_len": t, "eval_len": length, "loss (T/2, T]": inside,
                     "loss (T, 2T]": near, "loss (2T, L]": far,
                     "change past T": None if inside is None or past is None else past - inside})
    return pd.DataFrame(rows, columns=["model", "train_len", "eval_len", "loss (T/2, T]", "loss (T, 2T]",
                                       "loss (2T, L]", "change past T"])
