"""Size presets: GPT-3 shapes for every mixer, parameter counts matched to attention by the MLP width."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmscale.cli import main
from lmscale.config import ConfigError
from lmscale.mixers import available
from lmscale.mixers.attention import Attention
from lmscale.mixers.base import MIXERS
from lmscale.model import LanguageModel
from lmscale.presets import PRESETS, TOLERANCE, param_counts, preset, preset_table

GPT3_SHAPES = {"125M": (768, 12, 12), "350M": (1024, 24, 16), "760M": (1536, 24, 16), "1.3B": (2048, 24, 16)}


def test_every_mixer_matches_attention_within_tolerance_at_every_preset():
    table = preset_table()
    assert list(table["preset"].unique()) == list(PRESETS)
    assert sorted(table["mixer"].unique()) == available()
    assert (table["note"] == "").all(), table.loc[table["note"] != "", ["preset", "mixer", "note"]]
    assert table["ratio_to_attention"].between(1 - TOLERANCE, 1 + TOLERANCE).all()
    assert (table.loc[table["mixer"] == "attention", "ratio_to_attention"] == 1).all()
    for _, group in table.groupby("preset"):  # the shape is the preset's, never the mixer's
        assert group[["d_model", "n_layers", "n_heads"]].nunique().max() == 1
        attention = group.loc[group["mixer"] == "attention", "params"].item()
        assert group["params"].between((1 - TOLERANCE) * attention, (1 + TOLERANCE) * attention).all()


def test_presets_have_the_gpt3_shapes_and_sizes():
    for name, (d_model, n_layers, n_heads) in GPT3_SHAPES.items():
        cfg = preset(name, "attention")
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size) == (d_model, n_layers, n_heads, 50257)
    nominal = {"11M": 11e6, "18M": 18e6, "34M": 34e6, "50M": 50e6, "81M": 81e6, "125M": 125e6, "350M": 350e6, "760M": 760e6, "1.3B": 1.3e9}
    for name, size in nominal.items():
        total, _ = param_counts(preset(name, "attention"))
        assert abs(total / size - 1) < 0.04, (name, total)  # the name is the total, rounded
    assert (preset("tiny", "gla").d_model, preset("small-cpu", "gla").d_model) == (64, 128)


def test_counts_are_those_of_the_built_model():
    for mixer in available():
        cfg = preset("tiny", mixer, vocab_size=257, max_seq_len=64)
        model = LanguageModel(cfg)
        assert param_counts(cfg) == (model.num_params(), model.num_params(non_embedding=True)), mixer
        idx = torch.randint(0, cfg.vocab_size, (2, 16))
        assert model(idx).shape == (2, 16, cfg.vocab_size)


def test_a_mixer_with_more_parameters_gets_a_narrower_mlp():
    attention, mamba, jrt = (preset("125M", m) for m in ("attention", "mamba", "jrt"))
    assert mamba.d_hidden < attention.d_hidden < jrt.d_hidden
    assert (mamba.d_model, mamba.n_layers) == (attention.d_model, attention.n_layers)


def test_a_preset_is_a_pure_function_of_its_arguments():
    first = preset("350M", "gated_deltanet", mixer_options={"conv_size": 4})
    assert preset("350M", "gated_deltanet", mixer_options={"conv_size": 4}).to_dict() == first.to_dict()
    assert preset("350M", "gated_deltanet", mixer_options={"conv_size": 4}) is not first


def test_overrides_are_applied_and_the_mlp_solved_for_them():
    cfg = preset("small-cpu", "gla", vocab_size=257, max_seq_len=128)
    assert (cfg.vocab_size, cfg.max_seq_len) == (257, 128)
    assert cfg.d_hidden == preset("small-cpu", "gla").d_hidden  # the embedding is not what is matched
    hybrid = preset("small-cpu", "mamba", attention_every=2)
    ratio = param_counts(hybrid)[1] / param_counts(preset("small-cpu", "attention"))[1]
    assert abs(ratio - 1) <= TOLERANCE and hybrid.mixer_names == ["mamba", "attention"]
    assert preset("tiny", "gla", mlp_ratio=4.0).d_hidden == 256  # an explicit width is kept, unmatched


def test_unknown_preset_lists_the_valid_ones_and_suggests_one():
    with pytest.raises(ConfigError) as info:
        preset("125m", "gla")
    assert info.value.field == "preset" and "1.3B" in str(info.value) and "Did you mean '125M'" in str(info.value)


def test_unknown_mixer_or_field_is_named():
    with pytest.raises(ConfigError, match="Did you mean 'gla'"):
        preset("tiny", "glaa")
    with pytest.raises(ConfigError, match="unknown model field") as info:
        preset("tiny", "gla", d_modle=64)
    assert info.value.field == "d_modle"


def test_a_mixer_too_large_for_the_budget_is_refused():
    with pytest.raises(ConfigError, match="cannot be matched") as info:
        preset("tiny", "lru", mixer_options={"d_state": 2048})
    assert info.value.field == "mixer" and "mlp_ratio" in str(info.value)


class _GiantAttention(Attention):
    """Attention carrying 50 extra d_model² matrices: more than any MLP width can compensate."""

    mixer_name = "giant"

    def __init__(self, cfg, layer_idx):
        super().__init__(cfg, layer_idx)
        self.extra = nn.Parameter(torch.zeros(50 * cfg.d_model, cfg.d_model))


def test_the_table_records_a_mixer_it_cannot_match(monkeypatch):
    monkeypatch.setitem(MIXERS, "giant", _GiantAttention)
    table = preset_table(["attention", "giant"]).set_index(["preset", "mixer"])
    row = table.loc[("125M", "giant")]
    assert math.isnan(row["params"]) and "cannot be matched" in row["note"]
    assert table.loc[("125M", "attention"), "ratio_to_attention"] == 1


def test_cli_prints_the_table(capsys):
    assert main(["presets", "--mixer", "gla", "mamba"]) == 0
    out = capsys.readouterr().out
    for word in (*PRESETS, "gla", "mamba", "ratio_to_attention", "non_embedding_params"):
        assert word in out
    assert "attention " not in out.split("\n", 1)[1]  # only the mixers asked for
    assert main(["presets", "--mixer", "glaa"]) == 2
    assert "Did you mean 'gla'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["presets", "--help"], ["budget", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "usage: lmscale" in capsys.readouterr().out
