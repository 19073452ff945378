"""Quantisation: schemes replace the blocks' linear layers, the state keeps its layout, QAT trains and reloads,
and decoding token by token scores what the parallel form scores."""

import numpy as np
import pytest
import torch
from torch import nn

from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.mixers.attention import KVCache
from lmscale.model import LanguageModel
from lmscale.precision import decode_loss, load_trained, precision_and_record
from lmscale.quantize import SCHEMES, BitLinear, quantize_model, quantize_state
from lmscale.results import read_records
from lmscale.train import TokenData, evaluate, train


def _model(mixer="gla", d_model=64, seed=0):
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(mixer=mixer, vocab_size=257, d_model=d_model, n_layers=2, n_heads=2,
                                     max_seq_len=64)).eval()


def _windows(n=4, t=24, seed=0):
    x = torch.randint(0, 257, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return [(x[:, :-1], x[:, 1:])]


def test_every_config_scheme_is_described_and_an_unknown_one_names_the_choices():
    from lmscale.config import QUANTIZE_SCHEMES

    assert tuple(SCHEMES) == QUANTIZE_SCHEMES
    with pytest.raises(ConfigError, match="unknown scheme; choose one of int8, w4, ternary"):
        quantize_model(_model(), "int3")
    with pytest.raises(ConfigError, match="one of int8, w4, ternary"):
        TrainConfig(quantize="fp4")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_schemes_replace_every_linear_of_the_blocks_and_leave_the_embedding(scheme):
    model = _model()
    linears = sum(isinstance(m, nn.Linear) for b in model.blocks for m in b.modules())
    embed = model.embed.weight.clone()
    report = quantize_model(model, scheme)
    assert report.layers == linears > 0
    assert not any(type(m) is nn.Linear for b in model.blocks for m in b.modules())
    assert 0.5 < report.quantized_params / report.block_params <= 1
    assert torch.equal(model.embed.weight, embed)
    x, y = _windows()[0]
    assert torch.isfinite(model(x, targets=y))


def test_ternary_weights_take_three_values_and_gradients_pass_straight_through(monkeypatch):
    torch.manual_seed(0)
    layer = BitLinear(32, 16, bias=False)
    seen = {}
    original = nn.functional.linear

    def spy(x, w, b=None):
        seen["w"] = w.detach()
        return original(x, w, b)

    monkeypatch.setattr(nn.functional, "linear", spy)
    layer(torch.randn(5, 32)).sum().backward()
    scale = layer.weight.abs().mean()
    assert torch.unique((seen["w"] / scale).round()).tolist() == [-1.0, 0.0, 1.0]
    # straight-through: the weight's gradient is that of the linear map with the quantised weight
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_int8_moves_the_outputs_little_and_int4_more():
    x, _ = _windows()[0]
    reference = _model()(x)
    errors = {}
    for scheme in ("int8", "w4"):
        model = _model()
        quantize_model(model, scheme)
        errors[scheme] = float((model(x) - reference).abs().mean() / reference.abs().mean())
    assert errors["int8"] < 0.02 and errors["int8"] < errors["w4"] < 0.3


def test_state_quantisation_rounds_rows_and_keeps_the_layout():
    k = torch.randn(2, 3, 5, 8)
    cache = KVCache(k, k.clone() * 3, offset=7)
    q = quantize_state([cache, (torch.arange(4), torch.randn(2, 4, dtype=torch.complex64))], 4)
    assert isinstance(q[0], KVCache) and q[0].offset == 7
    assert torch.equal(q[1][0], torch.arange(4))  # integer leaves untouched
    rows = q[0].k.reshape(-1, 8)
    scales = k.reshape(-1, 8).abs().amax(-1, keepdim=True) / 7
    grid = rows / scales
    assert torch.allclose(grid, grid.round(), atol=1e-4) and grid.abs().max() <= 7 + 1e-4
    assert (q[0].k - k).abs().max() <= scales.max() / 2 + 1e-6
    assert q[1][1].is_complex()
    with pytest.raises(ConfigError, match="choose one of"):
        quantize_state(k, 2)
    with pytest.raises(ConfigError, match="cannot quantise a state leaf of type object"):
        quantize_state([object()], 8)


@pytest.mark.parametrize("mixer", ["attention", "gla", "lru"])
def test_decoding_token_by_token_scores_what_the_parallel_form_scores(mixer):
    model = _model(mixer)
    windows = _windows()
    parallel = evaluate(model, windows, torch.device("cpu"), None)["loss"]
    assert decode_loss(model, windows, torch.device("cpu")) == pytest.approx(parallel, abs=1e-4)
    assert decode_loss(model, windows, torch.device("cpu"), state_bits=8) == pytest.approx(parallel, abs=0.02)


def _token_data(n=12_000, vocab=257):
    rng = np.random.default_rng(0)
    successor = rng.integers(0, vocab, size=vocab)
    tokens = np.empty(n, dtype=np.uint16)
    tokens[0] = 1
    for i in range(1, n):
        tokens[i] = successor[tokens[i - 1]] if rng.random() < 0.9 else rng.integers(0, vocab)
    return TokenData(train=tokens[:10_000], validation=tokens[10_000:], bytes_per_token={})


def test_a_ternary_trained_model_reloads_as_trained_and_its_study_is_recorded(tmp_path):
    data = _token_data()
    model_cfg = ModelConfig(mixer="gla", vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
    train_cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3, eval_interval=10,
                            eval_batches=2, log_interval=10, quantize="ternary", tensorboard=False)
    result = train(model_cfg, train_cfg, data, out_dir=tmp_path / "run")
    assert any(isinstance(m, BitLinear) for m in result.model.modules())
    model, cfg = load_trained(tmp_path / "run" / "checkpoint.pt", torch.device("cpu"))
    assert cfg.quantize == "ternary" and any(isinstance(m, BitLinear) for m in model.modules())
    path, metrics = precision_and_record(tmp_path / "run" / "checkpoint.pt", eval_batches=2, batch_size=4,
                                         decode_windows=2, decode_len=16, results_root=tmp_path / "results",
                                         data=data)
    assert metrics["float"]["loss"] < 5.0  # learnt the successor grammar (ln 257 = 5.55)
    assert {"int8", "w4", "ternary", "decode_float", "decode_state8", "decode_state4", "sparsity"} <= set(metrics)
    sites = {row["site"] for row in metrics["sparsity"]}
    assert sites == {"mixer output", "mlp hidden", "state update"}
    assert all(0 <= row["zero"] <= row["near_zero"] <= 1 for row in metrics["sparsity"])
    (record,) = read_records(path)
    assert record["run_id"] == "precision-gla-d32-l2-s30-ternary-seed0" and record["kind"] == "precision"


def test_a_relu_gated_mixture_of_experts_shows_its_zeros_in_the_sparsity_study(tmp_path):
    data = _token_data()
    model_cfg = ModelConfig(mixer="gla", vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                            mlp_activation="relu", moe_experts=4, moe_every=2)
    train_cfg = TrainConfig(steps=10, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, eval_interval=10,
                            eval_batches=2, log_interval=5, tensorboard=False)
    train(model_cfg, train_cfg, data, out_dir=tmp_path / "run")
    _, metrics = precision_and_record(tmp_path / "run" / "checkpoint.pt", eval_batches=2, batch_size=4,
                                      decode_windows=2, decode_len=16, results_root=tmp_path / "results", data=data)
    hidden = {row["layer"]: row["zero"] for row in metrics["sparsity"] if row["site"] == "mlp hidden"}
    assert set(hidden) == {0, 1}  # the dense layer 0 and the experts of layer 1
    assert all(0.2 < zero < 0.9 for zero in hidden.values())  # ReLU: exact zeros, about half of them
