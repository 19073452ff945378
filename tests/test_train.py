"""The trainer on synthetic token streams: it learns, resumes exactly (also after SIGTERM), stops early
or cleanly on bad input, and reports throughput, MFU and memory."""

import functools
import itertools
import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lmscale.train as train_mod
from lmscale.cli import build_parser
from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.model import LanguageModel
from lmscale.train import (
    CheckpointError,
    TokenData,
    TrainingDivergedError,
    batch_at,
    evaluate,
    load_checkpoint,
    lr_at,
    peak_flops,
    split_windows,
    train,
    train_and_record,
)

TESTS = Path(__file__).resolve().parent


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


def _crash_at_step(crash_step, monkeypatch):
    """Make training raise KeyboardInterrupt when it asks for the batch of ``crash_step``; returns the real batch_at."""
    real_batch_at = train_mod.batch_at

    def crashing(tokens, batch_size, seq_len, seed, step):
        if step == crash_step:
            raise KeyboardInterrupt("simulated interruption")
        return real_batch_at(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(train_mod, "batch_at", crashing)
    return real_batch_at


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

    real_batch_at = _crash_at_step(13, monkeypatch)
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


def test_a_flipped_bit_inside_a_tensor_is_caught_by_the_checksum(tmp_path):
    """torch.load reads a flipped bit in a tensor's bytes without complaint; the checkpoint's digest does not."""
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=10)
    train(model_cfg, train_cfg, data, out_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path)["step"] == 10  # intact: the digest matches
    raw = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=True)["model"]["embed.weight"]
    needle = weight.contiguous().view(torch.uint8).numpy().tobytes()[:64]  # the tensor's first bytes, in the zip
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 3] ^= 0x10  # one bit of the first embedding value
    path.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["embed.weight"], weight)  # torch loads it
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: corrupt checkpoint: its contents do not match the checksum"):
        load_checkpoint(path)


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


def _losses(result):
    return [p["loss"] for p in result.curves["train"]], [p["loss"] for p in result.curves["eval"]]


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10:80] == [1.0] * 70  # stable until the last decay_fraction of the steps
    drops = [a - b for a, b in itertools.pairwise(lrs[79:])]
    assert drops == pytest.approx([0.9 / 20] * 20)  # linear, reaching the floor at the last step
    assert lrs[-1] == pytest.approx(0.1)


def test_accumulated_micro_batches_equal_one_large_batch():
    data = _data()
    model_cfg, whole = _cfgs(steps=6, batch_size=8, log_interval=1)
    _, split = _cfgs(steps=6, batch_size=4, grad_accum_steps=2, log_interval=1)
    a, b = train(model_cfg, whole, data), train(model_cfg, split, data)
    # the same 8 windows per step, summed in two halves: equal up to float32 rounding
    assert _losses(b)[0] == pytest.approx(_losses(a)[0], rel=1e-5)
    assert _losses(b)[1] == pytest.approx(_losses(a)[1], rel=1e-5)
    assert a.metrics["tokens"] == b.metrics["tokens"] == 6 * 8 * 32
    assert b.metrics["sequences_per_step"] == 8 and b.curves["train"][-1]["tokens"] == 6 * 8 * 32


def test_bf16_autocast_is_off_on_cpu_unless_asked():
    data = _data()
    model_cfg, auto = _cfgs(steps=4, warmup_steps=1)
    _, bf16 = _cfgs(steps=4, warmup_steps=1, autocast="bf16")
    fp32_run, bf16_run = train(model_cfg, auto, data), train(model_cfg, bf16, data)
    assert fp32_run.metrics["autocast"] == "off" and bf16_run.metrics["autocast"] == "bf16"
    fp32_loss, bf16_loss = _losses(fp32_run)[1][-1], _losses(bf16_run)[1][-1]
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, abs=0.05)


def test_compiled_model_trains_like_the_eager_one(monkeypatch):
    # aot_eager traces forward and backward as torch.compile does, minus inductor's C++ code generation,
    # whose first CPU step alone takes ~45 s here; GPU runs exercise inductor itself.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    data = _data()
    model_cfg, eager = _cfgs(steps=3, warmup_steps=1, log_interval=1)
    _, compiled = _cfgs(steps=3, warmup_steps=1, log_interval=1, compile=True)
    a, b = train(model_cfg, eager, data), train(model_cfg, compiled, data)
    assert _losses(b)[0] == pytest.approx(_losses(a)[0], rel=1e-4)
    assert list(b.model.state_dict()) == list(a.model.state_dict())  # checkpoints keep plain names


def test_early_stopping_records_that_and_where(tmp_path):
    data = _data()
    # no evaluation can beat the first by 10 nats, so the second and third fail and patience 2 runs out
    model_cfg, train_cfg = _cfgs(steps=30, eval_interval=4, early_stopping_patience=2, early_stopping_min_delta=10.0)
    path, result = train_and_record("early-stop", model_cfg, train_cfg, data, data_name="synthetic",
                                    out_dir=tmp_path / "run", results_root=tmp_path / "results")
    metrics = json.loads(path.read_text())["metrics"]
    assert metrics["stopped_early"] is True and metrics["stopped_at_step"] == 12
    assert metrics["steps"] == 12 and metrics["tokens"] == 12 * 8 * 32
    assert [p["step"] for p in result.curves["eval"]] == [4, 8, 12] and result.curves["train"][-1]["step"] == 12
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 12
    again = train(model_cfg, train_cfg, data, out_dir=tmp_path / "run", resume=True)  # nothing left to do
    assert again.metrics["steps"] == 12 and again.curves == result.curves


def test_resume_is_exact_with_accumulation_wsd_and_early_stopping(tmp_path, monkeypatch):
    data = _data()
    # evaluations at 5, 10, 15, …; nothing counts as improving after the first, so patience 2 stops at 15
    # only if the resumed run remembers the evaluation at 10 that came before its checkpoint
    model_cfg, train_cfg = _cfgs(steps=30, batch_size=4, grad_accum_steps=2, schedule="wsd", decay_fraction=0.5,
                                 eval_interval=5, checkpoint_interval=10, early_stopping_patience=2,
                                 early_stopping_min_delta=10.0)
    whole = train(model_cfg, train_cfg, data, out_dir=tmp_path / "whole")
    real_batch_at = _crash_at_step(13, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(model_cfg, train_cfg, data, out_dir=tmp_path / "cut")
    monkeypatch.setattr(train_mod, "batch_at", real_batch_at)
    resumed = train(model_cfg, train_cfg, data, out_dir=tmp_path / "cut", resume=True)
    assert whole.metrics["stopped_at_step"] == resumed.metrics["stopped_at_step"] == 15
    assert _losses(resumed) == _losses(whole)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


SIGTERM_RUN = """
import sys, time
import torch
sys.path.insert(0, {tests!r})
import lmscale.train as train_mod
from test_train import _data, _cfgs

torch.set_num_threads({threads})
real_batch_at = train_mod.batch_at

def slow_batch_at(*args):  # time for the signal to land mid-run; the numbers are unchanged
    time.sleep(0.05)
    return real_batch_at(*args)

train_mod.batch_at = slow_batch_at
train_mod.train(*_cfgs(steps=40), _data(), out_dir={out!r})
"""


def test_sigterm_checkpoints_the_step_in_flight_and_resume_is_exact(tmp_path):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=40)
    whole = train(model_cfg, train_cfg, data)
    out = tmp_path / "run"
    script = SIGTERM_RUN.format(tests=str(TESTS), threads=torch.get_num_threads(), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 60
    while not (log.is_file() and '"step": 10' in log.read_text()):
        assert child.poll() is None and time.monotonic() < deadline, "the training run did not reach step 10"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "TrainingInterrupted: training stopped by SIGTERM after step" in err, err
    stopped_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 10 <= stopped_at < 40
    resumed = train(model_cfg, train_cfg, data, out_dir=out, resume=True)
    assert _losses(resumed) == _losses(whole)


def test_mfu_is_analytic_flops_over_a_given_peak_and_absent_on_cpu_otherwise():
    data = _data()
    model_cfg, plain = _cfgs(steps=4, warmup_steps=1)
    _, with_peak = _cfgs(steps=4, warmup_steps=1, peak_flops=1e12)
    m = train(model_cfg, plain, data).metrics
    assert m["mfu"] is None and "set peak_flops" in m["peak_flops_source"]
    assert m["peak_memory_bytes"] > 10 * 2**20 and "max RSS" in m["peak_memory_source"]
    m = train(model_cfg, with_peak, data).metrics
    flops_per_token = 3 * LanguageModel(model_cfg).flops_per_token(32)
    assert m["flops_per_token"] == flops_per_token
    assert m["mfu"] == pytest.approx(m["tokens_per_second"] * flops_per_token / 1e12)


def test_peak_flops_comes_from_the_gpu_table(monkeypatch):
    cfg = TrainConfig()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(cfg, torch.device("cuda")) == (989.4e12, "bf16 dense peak of NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    peak, why = peak_flops(cfg, torch.device("cuda"))
    assert peak is None and "'Some Future GPU' is not in" in why
    assert peak_flops(TrainConfig(peak_flops=5e14), torch.device("cuda"))[0] == 5e14


def test_missing_tensorboard_is_one_clear_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    model_cfg, train_cfg = _cfgs(steps=2, warmup_steps=1)
    with caplog.at_level(logging.WARNING, logger="lmscale.train"):
        train(model_cfg, train_cfg, _data(), out_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0]
    assert (tmp_path / "log.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


def test_tensorboard_events_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    model_cfg, train_cfg = _cfgs(steps=2, warmup_steps=1)
    train(model_cfg, train_cfg, _data(), out_dir=tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("grad_accum_steps", 0, "must be a positive integer"),
    ("schedule", "linear", "must be one of 'cosine', 'wsd'"),
    ("decay_fraction", 0.0, r"must lie in \(0, 1\]"),
    ("autocast", "fp16", "must be one of 'auto', 'bf16', 'off'"),
    ("parallel", "tp", "must be one of 'auto', 'none', 'ddp', 'fsdp'"),
    ("early_stopping_patience", -1, "must be a non-negative integer"),
    ("early_stopping_min_delta", -0.1, "must be non-negative"),
    ("compile", "yes", "must be True or False"),
    ("peak_flops", 0, "must be the device's peak FLOP/s"),
    ("final_eval", ["test", ""], "must be a list of corpus split names"),
    ("position_eval_lengths", [1024, 1], "must be a list of window lengths above 1"),
    ("final_eval_tokens", -1, "must be a non-negative integer"),
])
def test_new_training_fields_name_themselves(field, value, message):
    with pytest.raises(ConfigError, match=rf"'{field}'=.*{message}"):
        TrainConfig(**{field: value})


def test_wsd_decay_that_does_not_fit_names_decay_fraction():
    with pytest.raises(ConfigError, match="'decay_fraction'=0.9: wsd's decay takes 90 steps and warmup 20"):
        TrainConfig(steps=100, warmup_steps=20, schedule="wsd", decay_fraction=0.9)


def test_cli_switches_take_true_or_false_and_peak_flops_a_number(capsys):
    args = build_parser().parse_args(["train", "--compile", "--tensorboard", "False", "--peak-flops", "989.4e12"])
    assert args.compile is True and args.tensorboard is False and args.peak_flops == 989.4e12
    assert build_parser().parse_args(["train"]).compile is None  # unset: TrainConfig's default applies
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--compile", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_infinite_gradient_under_a_finite_loss_is_neither_applied_nor_saved(tmp_path, monkeypatch, grad_clip):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=20, checkpoint_interval=5, grad_clip=grad_clip)
    real_build = train_mod.build_training
    backwards = {"n": 0}

    def poisoned_build(*args, **kwargs):
        raw, model, optimizer = real_build(*args, **kwargs)

        def hook(grad):  # one backward per step: from step 7 on, one weight's gradient is infinite
            backwards["n"] += 1
            return grad + math.inf if backwards["n"] > 7 else grad

        raw.blocks[0].mlp.down_proj.weight.register_hook(hook)
        return raw, model, optimizer

    monkeypatch.setattr(train_mod, "build_training", poisoned_build)
    with pytest.raises(TrainingDivergedError,
                       match=r"gradient norm is inf while the loss \([0-9.]+\) is finite at step 7 .*not applied "
                             r"and the last good checkpoint .* is kept"):
        train(model_cfg, train_cfg, data, out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_checkpoint_with_a_non_finite_tensor_is_not_written(tmp_path):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=6)
    result = train(model_cfg, train_cfg, data, out_dir=tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    state["norm.weight"][3] = float("nan")
    with pytest.raises(CheckpointError, match=r"not written, because 1 tensor\(s\) hold NaN or inf "
                                              r"\(first: model.norm.weight\); the checkpoint already on disk"):
        train_mod.save_checkpoint(tmp_path / "checkpoint.pt", state, {}, 6, model_cfg, train_cfg, {}, {})
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_a_changed_trajectory_and_records_allowed_changes(tmp_path):
    data = _data()
    model_cfg, train_cfg = _cfgs(steps=10)
    train(model_cfg, train_cfg, data, out_dir=tmp_path)
    for change, named in (({"seed": 2}, "seed 1 -> 2"), ({"lr": 5e-3}, "lr 0.01 -> 0.005"),
                          ({"batch_size": 4, "warmup_steps": 3}, "batch_size 8 -> 4, warmup_steps 5 -> 3"),
                          ({"schedule": "wsd"}, "schedule 'cosine' -> 'wsd'")):
        _, other = _cfgs(steps=10, **change)
        with pytest.raises(CheckpointError, match=rf"resuming would change the training trajectory \({named}\)"):
            train(model_cfg, other, data, out_dir=tmp_path, resume=True)
    _, shorter = _cfgs(steps=8)
    with pytest.raises(CheckpointError, match="holds step 10, beyond steps=8; steps may only grow"):
        train(model_cfg, shorter, data, out_dir=tmp_path, resume=True)
    _, longer = _cfgs(steps=20, eval_interval=5)
    resumed = train(model_cfg, longer, data, out_dir=tmp_path, resume=True)
    assert resumed.metrics["steps"] == 20
    assert resumed.metrics["resumes"] == [{"step": 10, "changed": {"steps": {"from": 10, "to": 20},
                                                                   "eval_interval": {"from": 10, "to": 5}}}]
    again = train(model_cfg, longer, data, out_dir=tmp_path, resume=True)  # every resume is kept, in order
    assert [r["step"] for r in again.metrics["resumes"]] == [10, 20] and again.metrics["resumes"][1]["changed"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_line(capsys):
    from lmscale.cli import main

    model_cfg, train_cfg = _cfgs(device="cuda")
    with pytest.raises(ConfigError, match=r"'device'='cuda': this torch .*; use --device cpu"):
        train(model_cfg, train_cfg, _data())
    assert main(["train", "--device", "cuda", "--steps", "2", "--warmup-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmscale: error: config field 'device'='cuda'") and "\n" not in err


@pytest.mark.parametrize(("field", "value"), [("lr", math.inf), ("lr", math.nan), ("grad_clip", math.inf),
                                              ("weight_decay", math.nan), ("beta2", math.nan),
                                              ("early_stopping_min_delta", math.inf), ("peak_flops", math.inf)])
def test_non_finite_float_fields_are_refused(field, value):
    with pytest.raises(ConfigError, match=rf"'{field}'=.*: must be a finite number"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("compile", [False, True])
def test_activation_checkpointing_trains_exactly_like_storing_activations(monkeypatch, compile):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    data = _data()
    model_cfg, stored = _cfgs("gla", steps=4, warmup_steps=1, log_interval=1, compile=compile)
    _, recomputed = _cfgs("gla", steps=4, warmup_steps=1, log_interval=1, compile=compile,
                          activation_checkpointing=True)
    a, b = train(model_cfg, stored, data), train(model_cfg, recomputed, data)
    assert _losses(b) == _losses(a)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_split_windows_are_consecutive_inside_documents_capped_and_even():
    tokens = np.arange(100, dtype=np.uint16)
    windows = split_windows(tokens, 10)
    assert windows.shape == (9, 11) and (windows[1] == np.arange(10, 21)).all()  # stride 10, 11 tokens each
    inside = split_windows(tokens, 10, eos_id=35)  # the window holding the separator is dropped
    assert len(inside) == 8 and not (inside == 35).any()
    capped = split_windows(tokens, 10, max_tokens=30)
    assert [w[0] for w in capped] == [0, 40, 80]  # evenly spread over the split
    assert len(split_windows(tokens, 10, multiple=4)) == 8


def test_final_evaluation_scores_whole_splits_and_positions(tmp_path):
    data = _data()
    rng = np.random.default_rng(5)
    data.others = {"test": data.validation.copy(), "test_ood": rng.integers(0, 257, 3000).astype(np.uint16)}
    data.bytes_per_token.update({"test": 4.0, "test_ood": 3.0})
    model_cfg, cfg = _cfgs(final_eval=["test", "test_ood"], position_eval_lengths=[16, 32], final_eval_tokens=1024)
    result = train(model_cfg, cfg, data)
    final = result.metrics["final_eval"]
    windows = split_windows(data.others["test"], cfg.seq_len, 1024)
    batches = [(torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])) for w in np.split(windows, [8, 16, 24])]
    expected = evaluate(result.model, batches, torch.device("cpu"), 4.0)
    assert final["test"]["tokens"] == 1024 and final["test"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert final["test_ood"]["loss"] > final["test"]["loss"] + 1  # noise is far harder than the learnt grammar
    assert final["test_ood"]["bits_per_byte"] == pytest.approx(final["test_ood"]["loss"] / math.log(2) / 3.0)
    by_position = result.metrics["position_loss"]["32"]
    assert by_position["split"] == "test" and by_position["windows"] == 32
    assert len(by_position["loss"]) == 32 and by_position["bin_edges"][-1] == 32
    long = torch.from_numpy(split_windows(data.others["test"], 32, 1024))  # no eos_id: every window counts
    with torch.no_grad():
        logits = result.model(long[:, :-1])
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), long[:, 1:], reduction="none")
    np.testing.assert_allclose(by_position["loss"], per_token.mean(0).double().numpy(), rtol=1e-5)
    assert len(result.metrics["position_loss"]["16"]["loss"]) == 16


def test_evaluation_builds_no_autograd_graph():
    """A graph kept across evaluation batches grew with the split: 15 GB at 11M parameters on the GPU."""
    model = LanguageModel(_cfgs()[0])
    grad_modes = []
    model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    windows = torch.from_numpy(split_windows(_data().validation, 32, 256))
    evaluate(model, [(windows[:4, :-1], windows[:4, 1:]), (windows[4:, :-1], windows[4:, 1:])], torch.device("cpu"), None)
    assert grad_modes == [False, False]


def test_final_evaluation_mistakes_fail_before_training():
    model_cfg, cfg = _cfgs(final_eval=["tset"])
    with pytest.raises(ConfigError, match="'final_eval'='tset': is not a split of this corpus; its splits are "
                                          "train, validation"):
        train(model_cfg, cfg, _data())
    model_cfg, cfg = _cfgs(position_eval_lengths=[64])
    with pytest.raises(ConfigError, match=r"exceed the model's max_seq_len=32; raise max_seq_len"):
        train(model_cfg, cfg, _data())
