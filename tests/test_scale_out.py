"""Every mixer family under torchrun on CPU (gloo): a checkpoint written by one process layout resumes
under another (1 → 4 processes under FSDP2, 4 → 1, and 4 → 2 under DDP started as two simulated nodes
with the README's multi-node command), and the resumed run logs the losses of the uninterrupted
single-process run. A sweep with ``nproc`` starts its runs under torchrun."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_distributed import configs, make_data
from test_sweep import TINY

from lmscale.config import ConfigError
from lmscale.results import load_records, read_records
from lmscale.scaleout import scale_out_table
from lmscale.sweep import load_spec, run_sweep
from lmscale.train import load_checkpoint, train

TESTS = Path(__file__).resolve().parent
# one model per family of state update; attention's layouts are tested in test_distributed
FAMILIES = {
    "gla": {"mixer": "gla"},
    "retnet": {"mixer": "retnet"},
    "mamba": {"mixer": "mamba"},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "lru": {"mixer": "lru"},
    "leap": {"mixer": "leap"},
    "based": {"mixer": "based"},
    "infini_attention": {"mixer": "infini_attention", "mixer_options": {"segment_len": 8}},
    "hybrid": {"mixer": "gla", "attention_every": 2},
    "moe": {"mixer": "gla", "moe_experts": 4, "moe_every": 2},
}
CUT_AT = 6  # the cut run stops here, after its checkpoint at step 4


def family_configs(family: str):
    import dataclasses

    model, run = configs(steps=8, grad_accum_steps=1)
    return dataclasses.replace(model, **FAMILIES[family]), run


WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import lmscale.train as train_mod
from test_scale_out import CUT_AT, FAMILIES, family_configs, make_data

out, layout, parallel, resume_in = sys.argv[1:5]
data = make_data()
real_batch_at = train_mod.batch_at

def cut(tokens, batch_size, seq_len, seed, step):
    if step == CUT_AT:
        raise KeyboardInterrupt
    return real_batch_at(tokens, batch_size, seq_len, seed, step)

resumed = {{}}
for family in FAMILIES:
    model_cfg, train_cfg = family_configs(family)
    train_cfg.parallel = parallel
    if layout != "-":  # a run cut short, leaving this layout's checkpoint at step 4
        train_mod.batch_at = cut
        try:
            train_mod.train(model_cfg, train_cfg, data, out_dir=f"{{out}}/{{layout}}/{{family}}")
        except KeyboardInterrupt:
            pass
        train_mod.batch_at = real_batch_at
    result = train_mod.train(model_cfg, train_cfg, data, out_dir=f"{{out}}/{{resume_in}}/{{family}}", resume=True)
    resumed[family] = [p["loss"] for p in result.curves["train"]]
if result.rank == 0:
    print("RESULT " + json.dumps(resumed))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(commands: list[list[str]]) -> dict[str, list[float]]:
    """Run the torchrun commands together (the agents of one job); the RESULT line of rank 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    [line] = [line for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def _losses(curves) -> list[float]:
    return [p["loss"] for p in curves["train"]]


@pytest.mark.slow
def test_checkpoints_move_between_process_layouts_for_every_mixer_family(tmp_path):
    data = make_data()
    reference, from_four = {}, {}
    for family in FAMILIES:
        model_cfg, train_cfg = family_configs(family)
        reference[family] = _losses(train(model_cfg, train_cfg, data).curves)
        import lmscale.train as train_mod

        real = train_mod.batch_at
        train_mod.batch_at = lambda *a, real=real: (_ for _ in ()).throw(KeyboardInterrupt) if a[4] == CUT_AT else real(*a)
        try:
            train(model_cfg, train_cfg, data, out_dir=tmp_path / "one" / family)
        except KeyboardInterrupt:
            pass
        finally:
            train_mod.batch_at = real
        assert load_checkpoint(tmp_path / "one" / family / "checkpoint.pt")["step"] == 4

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    run = [sys.executable, "-m", "torch.distributed.run"]
    def copy(source: str, target: str) -> None:  # a checkpoint to resume elsewhere, the original kept
        for family in FAMILIES:
            shutil.copytree(tmp_path / source / family, tmp_path / target / family)

    # four processes under FSDP2: cut (a 4-process checkpoint), then resume the 1-process checkpoint
    copy("one", "four-from-one")
    four = _launch([[*run, "--standalone", "--nproc_per_node", "4", str(script), str(tmp_path), "four", "fsdp",
                     "four-from-one"]])
    # two simulated nodes of one process each, DDP, the README's rendezvous: resume the 4-process checkpoint
    port = _free_port()
    node = [*run, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "scale-out-test",
            str(script), str(tmp_path), "-", "ddp", "two-from-four"]
    copy("four", "two-from-four")
    two = _launch([node, node])
    copy("four", "one-from-four")
    for family in FAMILIES:
        model_cfg, train_cfg = family_configs(family)
        from_four[family] = _losses(train(model_cfg, train_cfg, data, out_dir=tmp_path / "one-from-four" / family,
                                          resume=True).curves)
    for family, losses in reference.items():
        for name, resumed in (("1 → 4", four[family]), ("4 → 2", two[family]), ("4 → 1", from_four[family])):
            # the same global batches, summed in other orders: equal up to float32 rounding; except the
            # mixture of experts, whose balance loss is taken over each process's tokens (as in Switch and
            # Mixtral), so its objective itself depends on the layout, by 1e-3 of the loss here
            assert resumed == pytest.approx(losses, rel=3e-3 if family == "moe" else 1e-4), (family, name)


@pytest.mark.slow
def test_a_sweep_with_nproc_runs_under_torchrun(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"experiment": "scale-out", "runner": "direct", "fixed": {**TINY, "mixer": "gla"},
                                    "cases": [{"nproc": 1, "parallel": "none"}, {"nproc": 2, "parallel": "ddp"}]}))
    outcomes = run_sweep(load_spec(spec), results_root=tmp_path / "results")
    assert [o.status for o in outcomes] == ["ok", "ok"]
    one, two = (read_records(o.record)[-1] for o in outcomes)
    assert (one["metrics"]["world_size"], two["metrics"]["world_size"]) == (1, 2)
    assert two["metrics"]["parallel"] == "ddp"
    # the same global batches: the same losses, up to float32 rounding of the all-reduce
    assert two["metrics"]["val_loss"] == pytest.approx(one["metrics"]["val_loss"], rel=1e-5)
    table = scale_out_table(load_records("scale-out", tmp_path / "results"))
    assert list(table["gpus"]) == [1, 2] and list(table["parallel"]) == ["none", "ddp"]
    assert table["efficiency"].iloc[0] == 1.0
    assert table["efficiency"].iloc[1] == pytest.approx(
        two["metrics"]["tokens_per_second"] / (2 * one["metrics"]["tokens_per_second"]))
    assert table["max_loss_gap"].iloc[1] < 1e-4 and table["mixer"].tolist() == ["gla", "gla"]


@pytest.mark.parametrize("case,field", [({"nproc": 2, "parallel": "none"}, "parallel"),
                                        ({"nproc": 1, "parallel": "fsdp"}, "parallel"),
                                        ({"nproc": 3, "parallel": "ddp"}, "batch_size"),
                                        ({"nproc": 0, "parallel": "none"}, "nproc")])
def test_a_sweep_refuses_a_process_count_that_cannot_work(tmp_path, case, field):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"experiment": "scale-out", "runner": "direct",
                                    "fixed": {**TINY, "mixer": "gla", "batch_size": 4, **case}, "grid": {"seed": [0]}}))
    with pytest.raises(ConfigError, match=f"'{field}'"):
        run_sweep(load_spec(spec), results_root=tmp_path / "results", dry_run=True)
