"""Ladder tables: rows from records, fits per model, gaps to attention, the seeds' spread."""

import math

import numpy as np
import pytest

from lmscale.config import ModelConfig, TrainConfig
from lmscale.ladder import (
    best_lr,
    fit_ladders,
    gaps_to_reference,
    ladder_lr,
    ladder_table,
    regime,
    seed_spread,
)
from lmscale.results import load_records, make_record, write_record

UNIQUE = 6.5e6


def _write(root, mixer, d_model, loss, *, lr=3e-3, seed=0, attention_every=None, status="ok"):
    model = ModelConfig(mixer=mixer, d_model=d_model, n_layers=4, n_heads=2, attention_every=attention_every)
    train = TrainConfig(lr=lr, seed=seed)
    non_embedding = 12 * d_model**2 * 4
    metrics = {} if status != "ok" else {
        "val_loss": loss + 0.01, "tokens": 26e6, "params": non_embedding + 50257 * d_model,
        "params_non_embedding": non_embedding, "flops_per_token": 6.0 * non_embedding,
        "final_eval": {"test": {"loss": loss}, "test_ood": {"loss": loss + 0.5}},
    }
    record = make_record("ladder", kind="train", config={"model": model.to_dict(), "train": train.to_dict()},
                         seed=seed, metrics=metrics, status=status, device="cpu",
                         run_id=f"{mixer}-e{attention_every}-{d_model}-{lr}-{seed}")
    write_record(record, root)


def _ladder(root, e=3.0, a=40.0, alpha=0.3, widths=(64, 96, 128, 192, 256), **kwargs):
    for d in widths:
        _write(root, kwargs.get("mixer", "attention"), d, e + a * (12 * d**2 * 4) ** -alpha,
               **{k: v for k, v in kwargs.items() if k != "mixer"})


def test_rows_hold_sizes_losses_compute_and_provenance(tmp_path):
    _ladder(tmp_path)
    _write(tmp_path, "gla", 64, 6.0, attention_every=4)
    _write(tmp_path, "gla", 96, math.nan, status="error")  # a failed run is no row
    table = ladder_table(load_records("ladder", tmp_path), UNIQUE)
    assert len(table) == 6
    assert set(table["model"]) == {"attention", "gla+attention/4"}
    row = table[table["model"] == "gla+attention/4"].iloc[0]
    assert row["params_non_embedding"] == 12 * 64**2 * 4 and row["test_ood_loss"] == 6.5
    assert row["train_flops"] == pytest.approx(6.0 * 12 * 64**2 * 4 * 26e6)
    assert row["epochs"] == pytest.approx(4.0) and "epochs" in row["regime"]
    assert row["hardware"] and row["date"]


def test_regimes_follow_chinchilla_and_the_repetition_horizons():
    assert regime(20e6, 1e6, 26e6).startswith("20.0 tokens/param (at or above 20), 0.8 epochs: no repetition")
    assert regime(26e6, 10e6, 6.5e6).endswith("4.0 epochs: repetition nearly as good as fresh data")
    assert "repetition losing value" in regime(65e6, 10e6, 6.5e6)
    assert "past its worth" in regime(200e6, 10e6, 6.5e6)
    assert "below 20" in regime(26e6, 10e6, 6.5e6)


def test_fits_recover_a_clean_ladder_and_explain_short_ones(tmp_path):
    _ladder(tmp_path)
    _ladder(tmp_path, mixer="gla", widths=(64, 96, 128))
    fits = fit_ladders(ladder_table(load_records("ladder", tmp_path), UNIQUE), n_boot=50).set_index("model")
    assert fits.loc["attention", "E"] == pytest.approx(3.0, abs=1e-3)
    assert fits.loc["attention", "alpha"] == pytest.approx(0.3, abs=1e-3)
    assert fits.loc["attention", "alpha low"] <= 0.3 + 1e-6 <= fits.loc["attention", "alpha high"] + 2e-6
    assert np.isnan(fits.loc["gla", "alpha"]) and "at least 4 distinct sizes" in fits.loc["gla", "note"]


def test_gaps_best_lr_and_seed_spread(tmp_path):
    _ladder(tmp_path)
    _ladder(tmp_path, e=3.1, mixer="gla")
    _write(tmp_path, "gla", 64, 9.0, lr=1e-2)  # a worse learning rate at one width
    _write(tmp_path, "gla", 64, 3.1 + 40.0 * (12 * 64**2 * 4) ** -0.3 + 0.02, seed=1)
    table = ladder_table(load_records("ladder", tmp_path), UNIQUE)
    best = best_lr(table).set_index(["model", "d_model"])
    assert best.loc[("gla", 64), "lr"] == 3e-3
    gaps = gaps_to_reference(table[table["lr"] == 3e-3])
    assert set(gaps["model"]) == {"gla"} and len(gaps) == 5
    assert gaps.set_index("d_model").loc[96, "gap"] == pytest.approx(0.1)
    assert gaps.set_index("d_model").loc[64, "gap"] == pytest.approx(0.11)  # two seeds averaged
    spread = seed_spread(table[table["lr"] == 3e-3])
    assert spread[["model", "d_model", "seeds"]].values.tolist() == [["gla", 64, 2]]
    assert spread["std over seeds"].iloc[0] == pytest.approx(0.02 / math.sqrt(2))


def test_the_ladders_rate_is_the_best_mean_among_rates_that_finished_everywhere(tmp_path):
    for mixer, d, base in (("attention", 64, 5.0), ("attention", 96, 4.8), ("gla", 64, 5.1), ("gla", 96, 4.9)):
        _write(tmp_path, mixer, d, base + 0.3, lr=1e-3)
        _write(tmp_path, mixer, d, base, lr=2e-3)
        _write(tmp_path, mixer, d, base - 0.2 if mixer == "gla" else base + 0.1, lr=4e-3)
    # 8e-3 is best where it ran, but diverged at one point: not eligible
    for mixer, d in (("attention", 64), ("attention", 96), ("gla", 64)):
        _write(tmp_path, mixer, d, 3.0, lr=8e-3)
    _write(tmp_path, "gla", 96, math.nan, lr=8e-3, status="error")
    table = ladder_table(load_records("ladder", tmp_path), UNIQUE)
    assert ladder_lr(table) == 4e-3  # mean offset −0.05 against 2e-3's 0
    with pytest.raises(ValueError, match="no learning rate finished"):
        ladder_lr(table[(table["lr"] == 1e-3) & (table["model"] == "gla")
                        | (table["lr"] == 2e-3) & (table["model"] == "attention")])
