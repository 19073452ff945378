"""The trainer under torchrun (2 CPU processes, gloo): DDP and FSDP2 train on slices of the same global
batch, so they log the losses of one process; rank 0 alone writes; checkpoints move between layouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train import _data as make_data  # the same learnable stream as the single-process tests

from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.distributed import World, world_from_env
from lmscale.train import load_checkpoint, train

TESTS = Path(__file__).resolve().parent


def configs(**train_overrides):
    model = ModelConfig(mixer="attention", vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
    options = {"steps": 12, "batch_size": 8, "grad_accum_steps": 2, "seq_len": 32, "lr": 1e-2, "warmup_steps": 3,
               "eval_interval": 4, "eval_batches": 2, "log_interval": 2, "checkpoint_interval": 4, "seed": 1,
               "tensorboard": False}
    options.update(train_overrides)
    return model, TrainConfig(**options)


# Each torchrun process runs this: a whole run that writes a record, then a run cut short at step 7
# (after the checkpoint at 4) and resumed, which under several processes loads through rank 0's broadcast.
WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import lmscale.train as train_mod
from test_distributed import configs, make_data

out, parallel = sys.argv[1], sys.argv[2]
model_cfg, train_cfg = configs(parallel=parallel)
data = make_data()
path, whole = train_mod.train_and_record("dist", model_cfg, train_cfg, data, data_name="synthetic",
                                         out_dir=out + "/whole", results_root=out + "/results", run_id="whole")
real_batch_at = train_mod.batch_at

def crash_at_step_7(tokens, batch_size, seq_len, seed, step):
    if step == 7:
        raise KeyboardInterrupt
    return real_batch_at(tokens, batch_size, seq_len, seed, step)

train_mod.batch_at = crash_at_step_7
try:
    train_mod.train(model_cfg, train_cfg, data, out_dir=out + "/cut")
except KeyboardInterrupt:
    pass
train_mod.batch_at = real_batch_at
resumed = train_mod.train(model_cfg, train_cfg, data, out_dir=out + "/cut", resume=True)
if whole.rank == 0:
    curves = {{name: r.curves for name, r in (("whole", whole), ("resumed", resumed))}}
    print("RESULT " + json.dumps({{"curves": curves, "metrics": whole.metrics}}))
"""


def _losses(curves):
    return [p["loss"] for p in curves["train"]], [p["loss"] for p in curves["eval"]]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_log_the_losses_of_one(parallel, tmp_path):
    model_cfg, train_cfg = configs()
    one = train(model_cfg, train_cfg, make_data())
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), parallel]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    whole = result["curves"]["whole"]
    # the same global batch, summed over two halves and all-reduced: equal up to float32 rounding
    for mine, reference in zip(_losses(whole), _losses(one.curves), strict=True):
        assert mine == pytest.approx(reference, rel=1e-5)
    assert _losses(result["curves"]["resumed"]) == _losses(whole)  # exact resume under the same layout
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["parallel"] == parallel
    assert result["metrics"]["tokens"] == one.metrics["tokens"] == 12 * 16 * 32

    # rank 0 alone wrote: one record, one line per logged point, a full checkpoint that one process reads
    assert [p.name for p in (tmp_path / "results" / "dist").iterdir()] == ["whole.jsonl"]
    log = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    assert len(log) == len(one.curves["train"]) + len(one.curves["eval"])
    saved = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    for name, tensor in one.model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-6)


def test_a_batch_that_does_not_divide_among_processes_fails_before_training(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    model_cfg, train_cfg = configs(batch_size=3)
    with pytest.raises(ConfigError, match=r"'batch_size'=3: must divide among the 2 processes"):
        train(model_cfg, train_cfg, make_data())
    assert not dist.is_initialized()


def test_parallel_mode_follows_torchrun_and_refuses_what_cannot_work():
    assert world_from_env("auto", {}) == World(size=1, rank=0, local_rank=0, parallel="none")
    assert world_from_env("auto", {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(4, 3, 1, "ddp")
    assert world_from_env("fsdp", {"WORLD_SIZE": "1"}).parallel == "fsdp"  # one process, sharded: allowed
    with pytest.raises(ConfigError, match="'parallel'='ddp': needs processes started by torchrun"):
        world_from_env("ddp", {})
    with pytest.raises(ConfigError, match="'parallel'='none': WORLD_SIZE=2 processes would each train"):
        world_from_env("none", {"WORLD_SIZE": "2"})
