"""The trainer on synthetic token streams: it learns, resumes exactly, and stops cleanly on bad input."""

import itertools
import math

import numpy as np
import pytest
import torch

import lmscale.train as train_mod
from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.train import (
    CheckpointError,
    TokenData,
    TrainingDivergedError,
    batch_at,
    load_checkpoint,
    lr_at,
    train,
)


def _data(n=20_000, vocab=257, seed=0):
    """A stream with learnable structure: a fixed random 'grammar' of successor tokens plus noise."""
    rng = np.random.default_rng(seed)
    successor = rng.integers(0, vocab, size=vocab)
    tokens = np.empty(n, dtype=np.uint16)
    tokens[0] = 1
    for i in range(1, n):
        tokens[i] = successor[tokens[i - 1]] if rng.random() < 0.9 else rng.integers(0, vocab)
    split = int(0.9 * n)
    return TokenData(train=tokens[:split], validation=tokens[split:], bytes_per_token={"validation": 4.0})


def _cfgs(mixer="attention", steps=30, **train_overrides):
    model = ModelConfig(mixer=mixer, vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
    options = {"steps": steps, "batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 5,
               "eval_interval": 10, "eval_batches": 2, "log_interval": 5, "seed": 1}
    options.update(train_overrides)
    return model, TrainConfig(**options)


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = batch_at(tokens, 4, 16, seed=7, step=3)
    x2, _ = batch_at(tokens, 4, 16, seed=7, step=3)
    x3, _ = batch_at(tokens, 4, 16, seed=7, step=4)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_tiny_model_learns(mixer):
    model_cfg, train_cfg = _cfgs(mixer, steps=60)
    result = train(model_cfg, train_cfg, _data())
    evals = result.curves["eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, evals
    assert evals[-1]["loss"] < math.log(257) - 1.5
    m = result.metrics
    assert m["val_bits_per_byte"] == pytest.approx(m["val_loss"] / math.log(2) / 4.0)
    assert m["tokens"] == 60 * 8 * 32 and m["params"] > m["params_non_embedding"]


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=20, checkpoint_interval=10)
    whole = train(model_cfg, train_cfg, data, out_dir=tmp_path / "whole")

    real_batch_at = train_mod.batch_at

    def crash_at_step_13(tokens, batch_size, seq_len, seed, step):
        if step == 13:
            raise KeyboardInterrupt("simulated interruption")
        return real_batch_at(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(train_mod, "batch_at", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(model_cfg, train_cfg, data, out_dir=tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 10
    monkeypatch.setattr(train_mod, "batch_at", real_batch_at)
    resumed = train(model_cfg, train_cfg, data, out_dir=tmp_path / "cut", resume=True)

    assert [p["loss"] for p in resumed.curves["train"]] == [p["loss"] for p in whole.curves["train"]]
    assert [p["loss"] for p in resumed.curves["eval"]] == [p["loss"] for p in whole.curves["eval"]]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=20, checkpoint_interval=5)
    real_batch_at = train_mod.batch_at
    original_forward = train_mod.LanguageModel.forward
    calls = {"n": 0}

    def poisoned_forward(self, idx, *args, **kwargs):
        out = original_forward(self, idx, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 7:
                return out * float("nan")
        return out

    monkeypatch.setattr(train_mod, "batch_at", real_batch_at)
    monkeypatch.setattr(train_mod.LanguageModel, "forward", poisoned_forward)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 7.*checkpoint.*kept"):
        train(model_cfg, train_cfg, data, out_dir=tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5


def test_corrupt_checkpoint_names_the_file(tmp_path):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=10)
    train(model_cfg, train_cfg, data, out_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: corrupt"):
        train(model_cfg, train_cfg, data, out_dir=tmp_path, resume=True)


def test_resume_with_another_architecture_is_refused(tmp_path):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=10)
    train(model_cfg, train_cfg, data, out_dir=tmp_path)
    other, _ = _cfgs("gla", steps=10)
    with pytest.raises(CheckpointError, match="saved for model"):
        train(other, train_cfg, data, out_dir=tmp_path, resume=True)


def test_impossible_configs_name_the_field():
    with pytest.raises(ConfigError, match="'d_model'=30: must be divisible by n_heads=4"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="'warmup_steps'"):
        TrainConfig(steps=10, warmup_steps=10)
    model_cfg, train_cfg = _cfgs()
    model_cfg.max_seq_len = 16
    with pytest.raises(ConfigError, match="'seq_len'=32: exceeds the model's max_seq_len=16"):
        train(model_cfg, train_cfg, _data())
    small_vocab = ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    with pytest.raises(ConfigError, match="'vocab_size'=100: the data holds token id"):
        train(small_vocab, train_cfg, _data())
