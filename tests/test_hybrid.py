"""Hybrid layer patterns: attention interleaved with recurrent layers is one model, decoded as one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscale.cli import main
from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.mixers import UnknownMixerError, available
from lmscale.model import LanguageModel
from lmscale.train import TokenData, train

VOCAB = 61


def make_model(**fields):
    torch.manual_seed(0)
    defaults = {"mixer": "gla", "vocab_size": VOCAB, "d_model": 32, "n_layers": 4, "n_heads": 4,
                "max_seq_len": 64, "attention_every": 2}
    return LanguageModel(ModelConfig(**{**defaults, **fields}))


def random_tokens(B=2, T=19, seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T))


def kinds(model):
    return [block.mixer.mixer_name for block in model.blocks]


def test_attention_every_puts_attention_last_in_each_group():
    cfg = ModelConfig(mixer="gla", n_layers=8, attention_every=4)
    assert [cfg.mixer_for_layer(i) for i in range(8)] == ["gla"] * 3 + ["attention"] + ["gla"] * 3 + ["attention"]
    assert cfg.mixer_names == ["gla", "attention"]
    jamba = ModelConfig(mixer="gla", n_layers=16, attention_every=8)  # 1 attention : 7 recurrent
    assert [i for i in range(16) if jamba.mixer_for_layer(i) == "attention"] == [7, 15]


def test_layers_name_each_layer_and_the_model_builds_them():
    layers = ["attention", "gla", "gla", "attention"]
    model = make_model(layers=layers, attention_every=None)
    assert kinds(model) == layers
    assert kinds(make_model()) == ["gla", "attention", "gla", "attention"]


def test_options_keyed_by_mixer_name_reach_only_their_mixer():
    model = make_model(mixer_options={"gla": {"form": "parallel", "chunk_size": 8}, "attention": {"impl": "math"}})
    assert [b.mixer.form for b in model.blocks[0::2]] == ["parallel", "parallel"]
    assert [b.mixer.impl for b in model.blocks[1::2]] == ["math", "math"]
    layer_cfg = model.cfg.layer_config(1)
    assert (layer_cfg.mixer, layer_cfg.mixer_options) == ("attention", {"impl": "math"})
    assert layer_cfg.layers is None and layer_cfg.attention_every is None
    # an unmentioned mixer keeps its defaults
    assert [b.mixer.impl for b in make_model(mixer_options={"gla": {"form": "naive"}}).blocks[1::2]] == ["sdpa"] * 2
    # a model of one mixer given by `layers` keeps flat options
    assert make_model(layers=["gla"] * 4, attention_every=None, mixer_options={"form": "naive"}).blocks[2].mixer.form == "naive"


def test_forward_shapes_and_per_layer_states():
    model = make_model()
    logits, state = model(random_tokens(B=3, T=10), return_state=True)
    assert logits.shape == (3, 10, VOCAB) and len(state) == 4
    assert state[0].shape == (3, 4, 4, 8)  # GLA: [B, H, Dk, Dv] whatever the length
    assert state[1].k.shape == (3, 4, 10, 8)  # attention: keys of all 10 positions
    logits_t, state = model.step(random_tokens(B=3, T=1)[:, 0], state)
    assert logits_t.shape == (3, VOCAB) and state[1].k.shape[2] == 11 and state[0].shape == (3, 4, 4, 8)


@pytest.mark.parametrize("pattern", [{"attention_every": 2}, {"layers": ["attention", "gla", "gla", "gla"],
                                                              "attention_every": None}])
def test_prefix_then_step_equals_full(pattern):
    model, idx = make_model(**pattern, mixer_options={"gla": {"chunk_size": 8}}).double(), random_tokens()
    full = model(idx)
    logits, state = model(idx[:, :11], return_state=True)
    steps = []
    for t in range(11, idx.shape[1]):
        logits_t, state = model.step(idx[:, t], state)
        steps.append(logits_t)
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, dim=1)], dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer", [name for name in available() if name != "attention"])
def test_every_registered_mixer_interleaves_with_attention(mixer):
    """Hybrids compose mixers through their contract alone, whatever their state's structure."""
    model, idx = make_model(mixer=mixer, n_layers=2).double(), random_tokens(T=9)
    assert kinds(model) == [mixer, "attention"]
    logits, state = model(idx[:, :6], return_state=True)
    steps = []
    for t in range(6, idx.shape[1]):
        logits_t, state = model.step(idx[:, t], state)
        steps.append(logits_t)
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, dim=1)], dim=1), model(idx),
                               rtol=1e-10, atol=1e-12)


def test_decoding_from_init_state_and_chunked_prefill_equal_full():
    model, idx = make_model().double(), random_tokens(T=12)
    full = model(idx)
    state = model.init_state(2, "cpu", torch.float64)
    steps = []
    for t in range(5):
        logits_t, state = model.step(idx[:, t], state)
        steps.append(logits_t)
    rest, _ = model(idx[:, 5:], state=state, return_state=True)  # prefill continues from decoded state
    torch.testing.assert_close(torch.cat([torch.stack(steps, dim=1), rest], dim=1), full, rtol=1e-10, atol=1e-12)


def test_config_round_trips_through_json():
    for cfg in (ModelConfig(mixer="gla", n_layers=4, attention_every=2, mixer_options={"gla": {"form": "naive"}}),
                ModelConfig(n_layers=2, layers=("gla", "attention"))):
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "fields, field, hint",
    [
        ({"layers": ["gla", "attention"]}, "'layers'", "needs one per layer, n_layers=4"),
        ({"layers": ["gla", 3, "gla", "gla"]}, "'layers'", "list of mixer names"),
        ({"layers": ["gla"] * 4, "attention_every": 2}, "'attention_every'", "not both"),
        ({"attention_every": 1}, "'attention_every'", "from 2 to n_layers=4"),
        ({"attention_every": 5}, "'attention_every'", "from 2 to n_layers=4"),
        ({"mixer": "attention", "attention_every": 2}, "'mixer'", "name that mixer here"),
        ({"attention_every": 2, "mixer_options": {"form": "chunk"}}, "mixer_options['form']",
         "keyed by mixer name"),
        ({"attention_every": 2, "mixer_options": {"gla": "chunk"}}, "mixer_options['gla']", "must be a dict"),
    ],
)
def test_impossible_patterns_name_the_field(fields, field, hint):
    with pytest.raises(ConfigError) as excinfo:
        ModelConfig(**{"mixer": "gla", "n_layers": 4, **fields})
    assert field in str(excinfo.value) and hint in str(excinfo.value)


def test_unknown_layer_name_lists_the_valid_mixers():
    with pytest.raises(UnknownMixerError) as excinfo:
        make_model(layers=["gla", "attention", "glaa", "gla"], attention_every=None)
    message = str(excinfo.value)
    assert "'layers[2]'='glaa'" in message and "Did you mean 'gla'?" in message
    assert f"valid mixers: {', '.join(available())}" in message


def test_bad_option_in_a_hybrid_names_the_mixer_and_layer():
    with pytest.raises(ConfigError) as excinfo:
        make_model(mixer_options={"attention": {"impl": "flash"}})
    message = str(excinfo.value)
    assert "mixer_options['attention']['impl']'='flash'" in message
    assert "'sdpa', 'math'" in message and "mixer 'attention' of layer 1" in message


def _token_data(n=6000, seed=0):
    """A stream with structure to learn: each token's successor is fixed 90% of the time."""
    rng = np.random.default_rng(seed)
    successor = rng.integers(0, VOCAB, size=VOCAB)
    tokens = np.empty(n, dtype=np.uint16)
    tokens[0] = 1
    for i in range(1, n):
        tokens[i] = successor[tokens[i - 1]] if rng.random() < 0.9 else rng.integers(0, VOCAB)
    return TokenData(train=tokens[:5000], validation=tokens[5000:], bytes_per_token={"validation": 4.0})


def test_hybrid_trains():
    model_cfg = ModelConfig(mixer="gla", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                            attention_every=2, mixer_options={"gla": {"chunk_size": 16}})
    train_cfg = TrainConfig(steps=20, batch_size=8, seq_len=32, lr=2e-2, warmup_steps=3, eval_interval=20,
                            eval_batches=2, log_interval=5, seed=1)
    result = train(model_cfg, train_cfg, _token_data())
    assert kinds(result.model) == ["gla", "attention"]
    last = result.curves["eval"][-1]["loss"]
    assert last < math.log(VOCAB) - 2, last  # chance is ln 61 ≈ 4.1 nats; the stream's entropy is ≈ 0.75


def test_cli_trains_a_hybrid(tmp_path, monkeypatch, corpus_dir, capsys):
    monkeypatch.setenv("LMSCALE_RESULTS", str(tmp_path / "results"))
    code = main([
        "train", "--experiment", "hybrid-check", "--mixer", "gla", "--attention-every", "2", "--d-model", "16",
        "--n-layers", "2", "--n-heads", "2", "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "2",
        "--steps", "2", "--warmup-steps", "1", "--eval-batches", "1", "--mixer-option", 'gla={"form": "naive"}',
    ])
    assert code == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("record: ")
    model = json.loads(Path(path).read_text())["config"]["model"]
    assert model["attention_every"] == 2 and model["mixer_options"] == {"gla": {"form": "naive"}}


def test_cli_layers_flag_and_its_errors(capsys, corpus_dir):
    assert main(["train", "--layers", "gla, glaa", "--n-layers", "2", "--steps", "2", "--warmup-steps", "1"]) == 2
    assert "'layers[1]'='glaa'" in capsys.readouterr().err
    assert main(["train", "--layers", "gla,attention", "--n-layers", "3", "--steps", "2", "--warmup-steps", "1"]) == 2
    assert "n_layers=3" in capsys.readouterr().err
