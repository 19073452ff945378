"""The context study's tables: the loss by position from records, and the change past the trained length."""

import pytest

from lmscale.config import ModelConfig, TrainConfig
from lmscale.context import extrapolation, position_frame
from lmscale.results import load_records, make_record, write_record


def _write(root, mixer, seq_len, curve, options=None):
    model = ModelConfig(mixer=mixer, d_model=32, n_layers=2, n_heads=2, mixer_options=options or {})
    train = TrainConfig(seq_len=seq_len)
    length = 4 * seq_len
    edges = [round(i * length / len(curve)) for i in range(len(curve) + 1)]
    metrics = {"position_loss": {str(length): {"split": "test", "windows": 3, "bin_edges": edges, "loss": curve}}}
    record = make_record("context", kind="train", config={"model": model.to_dict(), "train": train.to_dict()},
                         seed=0, metrics=metrics, device="cpu", run_id=f"{mixer}-{seq_len}-{len(options or {})}")
    write_record(record, root)


def test_positions_and_the_change_past_the_trained_length(tmp_path):
    _write(tmp_path, "attention", 8, [5.0, 4.0, 3.0, 3.0, 6.0, 7.0, 8.0, 8.0])  # bins of 4 over 32 positions
    _write(tmp_path, "leap", 8, [5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 2.5, 2.5], options={"window": "global"})
    positions = position_frame(load_records("context", tmp_path))
    assert len(positions) == 16 and set(positions["model"]) == {"attention", "leap (window=global)"}
    assert positions["eval_len"].unique().tolist() == [32] and positions["position"].iloc[0] == 2
    table = extrapolation(positions).set_index("model")
    assert table.loc["attention", "loss (T/2, T]"] == 4.0  # positions 4–8: the second bin
    assert table.loc["attention", "loss (T, 2T]"] == pytest.approx(3.0)  # positions 8–16
    assert table.loc["attention", "loss (2T, L]"] == pytest.approx(7.25)
    assert table.loc["attention", "change past T"] == pytest.approx((3 + 3 + 6 + 7 + 8 + 8) / 6 - 4.0)  # (T, L]
    assert table.loc["leap (window=global)", "change past T"] < 0
