"""The analytic mixer table: every registered mixer, honest per-layer numbers, printed by the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from lmscale.cli import main
from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers import available, build_mixer
from lmscale.mixers.attention import Attention
from lmscale.mixers.base import MIXERS
from lmscale.profile import TRAINING_FLOPS_FACTOR, format_mixer_table, mixer_table

SMALL = {"d_model": 64, "n_heads": 4, "seq_len": 256, "context_len": 128, "n_layers": 4}


def test_every_registered_mixer_has_a_row():
    table = mixer_table()
    assert list(table["name"]) == available()
    assert table.attrs["d_model"] == 768 and table.attrs["dtype"] == "bfloat16"
    for row in table.itertuples():
        assert row.family == MIXERS[row.name].family and row.paper == MIXERS[row.name].paper
        assert row.state_bytes > 0 and row.params > 0 and row.train_flops_per_token > 0, row


def test_attention_state_grows_with_context_while_gla_state_is_constant():
    short = mixer_table(**{**SMALL, "context_len": 128}).set_index("name")
    long = mixer_table(**{**SMALL, "context_len": 256}).set_index("name")
    assert long.loc["attention", "state_bytes"] == 2 * short.loc["attention", "state_bytes"]
    assert long.loc["attention", "state_bytes_per_token"] == short.loc["attention", "state_bytes_per_token"]
    assert long.loc["attention", "state_bytes_per_token"] == 2 * 64 * 2  # K and V, d_model wide, bfloat16
    assert long.loc["gla", "state_bytes"] == short.loc["gla", "state_bytes"]
    assert long.loc["gla", "state_bytes_per_token"] == short.loc["gla", "state_bytes_per_token"] / 2
    assert long.loc["attention", "decode_flops_per_token"] > short.loc["attention", "decode_flops_per_token"]
    assert long.loc["gla", "decode_flops_per_token"] == short.loc["gla", "decode_flops_per_token"]


def test_numbers_are_the_mixer_contract_at_that_width():
    table = mixer_table(**SMALL, dtype=torch.float32).set_index("name")
    cfg = ModelConfig(mixer="gla", d_model=64, n_heads=4, n_layers=4, max_seq_len=256)
    gla = build_mixer(cfg, 0)
    row = table.loc["gla"]
    assert row["state_bytes"] == gla.state_bytes(128, torch.float32)
    assert row["state_bytes_per_token"] == gla.state_bytes(128, torch.float32) / 128
    assert row["decode_flops_per_token"] == gla.step_cost(128).flops
    assert row["train_flops_per_token"] == TRAINING_FLOPS_FACTOR * gla.cost(256).flops / 256
    assert row["params"] == sum(p.numel() for p in gla.parameters()) and row["note"] == ""


class LayerDependent(Attention):
    """Attention whose state shrinks with depth, standing in for per-layer windows (LEAP) or layer mixes."""

    mixer_name = "layer_dependent"

    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        return super().state_bytes(context_len, dtype) // (self.layer_idx + 1)


def test_layer_dependent_mixer_is_averaged_over_the_stack_and_says_so(monkeypatch):
    monkeypatch.setitem(MIXERS, "layer_dependent", LayerDependent)
    row = mixer_table(**SMALL).set_index("name").loc["layer_dependent"]
    per_layer = [2 * 128 * 64 * 2 // (i + 1) for i in range(4)]
    assert row["state_bytes"] == pytest.approx(sum(per_layer) / 4)
    assert row["note"] == "mean over a 4-layer stack; varies: state_bytes"


def test_a_mixer_that_cannot_take_the_width_gets_a_row_that_says_why():
    table = mixer_table(d_model=12, n_heads=4, seq_len=16, context_len=16, n_layers=2).set_index("name")
    assert math.isnan(table.loc["attention", "state_bytes"])  # head_dim 3 is odd: RoPE needs pairs
    assert "not buildable at this width" in table.loc["attention", "note"] and "RoPE" in table.loc["attention", "note"]


def test_formatted_table_has_units_and_settings():
    text = format_mixer_table(mixer_table())
    header, columns, *rows = text.splitlines()
    assert "d_model=768" in header and "T=2048" in header and "3× forward" in header
    assert "state/token" in columns and "decode FLOPs/token" in columns
    attention = next(line for line in rows if line.split()[0] == "attention")
    assert "3.0 KiB" in attention and "6.0 MiB" in attention  # 2 · 768 · 2 bytes per token; × 2048


def test_cli_prints_the_table(capsys):
    assert main(["mixers", "--d-model", "64", "--n-heads", "4", "--seq-len", "256", "--context-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "d_model=64" in out and "T=256" in out and "128 tokens of context" in out
    for name in available():
        assert any(line.split()[0] == name for line in out.splitlines()[2:]), name


def test_cli_rejects_an_impossible_width(capsys):
    with pytest.raises(ConfigError, match="'d_model'=30: must be divisible by n_heads=4"):
        mixer_table(d_model=30, n_heads=4)
    assert main(["mixers", "--d-model", "30", "--n-heads", "4"]) == 2
    assert "divisible by n_heads" in capsys.readouterr().err
