"""The traced operation mix: every operation classified, MACs equal to the cost models, meta = real tensors."""

import pytest
import torch

from lmscale.mixers import available
from lmscale.model import LanguageModel
from lmscale.presets import preset
from lmscale.profile.chips import CHIPS, fit_table
from lmscale.profile.opmix import KINDS, op_mix_table, trace_step

CONTEXT = 24


@pytest.fixture(scope="module")
def tiny_table():
    return op_mix_table("tiny", CONTEXT).set_index("mixer")


@pytest.mark.parametrize("mixer", available())
def test_every_operation_is_classified_and_the_macs_agree_with_the_cost_model(tiny_table, mixer):
    row = tiny_table.loc[mixer]
    assert row["uncounted"] == ""
    # the cost models count a state update k vᵀ as matmul FLOPs; the trace sees it as element-wise products
    assert row["mixer_mac"] <= row["mixer_mac_analytic"] <= row["mixer_mac"] + row["mixer_multiply"]
    assert all(row[f"model_{k}"] >= row[f"mixer_{k}"] >= 0 for k in KINDS)


def test_outside_the_mixers_the_macs_are_the_mlps_and_the_head(tiny_table):
    cfg = preset("tiny", "gla")
    mlp_and_head = cfg.n_layers * 3 * cfg.d_model * cfg.d_hidden + cfg.d_model * cfg.vocab_size
    row = tiny_table.loc["gla"]
    assert row["model_mac"] - row["mixer_mac"] == mlp_and_head


def test_attention_attends_over_the_context_and_itself(tiny_table):
    cfg = preset("tiny", "attention")
    per_layer = 4 * cfg.d_model * cfg.d_model + 2 * (CONTEXT + 1) * cfg.d_model  # q, k, v, o; q·K and p·V
    assert tiny_table.loc["attention", "mixer_mac"] == cfg.n_layers * per_layer
    assert tiny_table.loc["attention", "mixer_mac"] == tiny_table.loc["attention", "mixer_mac_analytic"]


@pytest.mark.parametrize("mixer", ["attention", "mamba", "lru"])
def test_the_meta_device_counts_what_real_tensors_count(mixer):
    torch.manual_seed(0)
    real = trace_step(LanguageModel(preset("tiny", mixer, max_seq_len=CONTEXT + 1)), CONTEXT)
    with torch.device("meta"):
        meta_model = LanguageModel(preset("tiny", mixer, max_seq_len=CONTEXT + 1))
    meta = trace_step(meta_model, CONTEXT)
    assert meta == real


def test_chips_needed_follow_the_bytes_and_the_recurrent_state_is_what_attention_lacks():
    table = op_mix_table("50M", 2048, ["attention", "gla"])
    fit = fit_table(table, weight_bits=8, state_bits=16).set_index(["mixer", "chip"])
    northpole = next(c for c in CHIPS if c.name == "NorthPole")
    row = table.set_index("mixer").loc["gla"]
    expected = (row["weight_bytes"] / 2 + row["state_bytes"] / 2 * 2) / northpole.sram_bytes
    assert fit.loc[("gla", "NorthPole"), "chips_needed"] == pytest.approx(expected)
    # Loihi 2 counts state entries against its neurons: a 2K-token KV cache outgrows one chip, GLA's state does not
    assert fit.loc[("attention", "Loihi 2"), "chips_needed"] > 1 > fit.loc[("gla", "Loihi 2"), "chips_needed"]
