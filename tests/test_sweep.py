"""Sweeps: a spec's grid expands into named runs, each run in its own process writes one record, a rerun
skips finished runs and retries failed ones, and a bad spec fails before anything runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from lmscale.cli import main
from lmscale.config import ConfigError
from lmscale.results import make_record, read_records, write_record
from lmscale.sweep import _DirectRunner, expand, load_spec, parse_spec, run_id_for, run_lock, run_sweep

ROOT = Path(__file__).resolve().parents[1]
# The smallest model that trains on the real corpus (GPT-2 vocabulary) in a couple of seconds.
TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 16, "max_seq_len": 16, "steps": 3,
        "warmup_steps": 1, "batch_size": 2, "eval_batches": 1}


def _spec(tmp_path: Path, **overrides) -> Path:
    data = {"experiment": "sweep-check", "runner": "direct", "fixed": dict(TINY),
            "grid": {"mixer": ["attention", "gla"], "seed": [0, 1]}}
    data.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _records(results: Path, experiment: str = "sweep-check") -> dict[str, dict]:
    return {p.stem: read_records(p)[-1] for p in sorted((results / experiment).glob("*.jsonl"))}


def test_the_grid_expands_to_its_product_named_as_the_template_names_runs():
    runs = expand(load_spec(ROOT / "data" / "sweeps" / "tiny.yaml"))
    assert [r.run_id for r in runs] == [
        "attention-d32-l2-h2-t32-s20-seed0", "attention-d32-l2-h2-t32-s20-seed1",
        "gla-d32-l2-h2-t32-s20-seed0", "gla-d32-l2-h2-t32-s20-seed1",
    ]
    assert runs[1].point == {"mixer": "attention", "seed": 1}
    assert runs[1].params["max_seq_len"] == 32 and runs[1].params["lr"] == 3e-3  # fixed, then defaults


def test_axes_the_id_does_not_name_add_a_stable_hash():
    spec = parse_spec({"experiment": "e", "fixed": TINY, "grid": {"mixer": ["gla"], "lr": [1e-3, 3e-3]}})
    ids = [r.run_id for r in expand(spec)]
    assert len(set(ids)) == 2 and all(i.startswith("gla-d16-l1-h2-t16-s3-seed0-") for i in ids)
    assert ids == [r.run_id for r in expand(spec)]
    params = expand(spec)[0].params
    assert run_id_for(params, ["mixer"]) == "gla-d16-l1-h2-t16-s3-seed0"  # no extra axis, no hash


def test_cases_vary_settings_together_and_presets_give_the_shape():
    fixed = {k: v for k, v in TINY.items() if k not in ("seq_len", "batch_size")}
    spec = parse_spec({"experiment": "e", "fixed": {**fixed, "max_seq_len": 64}, "grid": {"mixer": ["attention", "gla"]},
                       "cases": [{"seq_len": 16, "batch_size": 8}, {"seq_len": 64, "batch_size": 2}]})
    runs = expand(spec)
    assert [(r.params["mixer"], r.params["seq_len"], r.params["batch_size"]) for r in runs] == [
        ("attention", 16, 8), ("attention", 64, 2), ("gla", 16, 8), ("gla", 64, 2)]
    assert runs[1].point == {"mixer": "attention", "seq_len": 64, "batch_size": 2}
    assert len({r.run_id for r in runs}) == 4
    hybrid = parse_spec({"experiment": "e", "fixed": {"preset": "18M", "steps": 3, "warmup_steps": 1},
                         "grid": {"seed": [0]}, "cases": [{"mixer": "attention"}, {"mixer": "mamba", "attention_every": 3}]})
    attention, mamba = expand(hybrid)
    assert (attention.params["d_model"], attention.params["n_layers"], mamba.params["d_model"]) == (256, 6, 256)
    assert mamba.params["attention_every"] == 3 and attention.params["attention_every"] is None
    assert attention.params["mlp_ratio"] != mamba.params["mlp_ratio"]  # each solved to attention's count
    argv = _DirectRunner().command("e", mamba, Path("."))[0]
    grouped = parse_spec({"experiment": "e", "fixed": {**fixed, "max_seq_len": 64}, "grid": {"seed": [0, 1]},
                          "cases": {"model": [{"mixer": "attention"}, {"mixer": "leap", "mixer_options": {"window": "global"}}],
                                    "context": [{"seq_len": 16, "batch_size": 8}, {"seq_len": 64, "batch_size": 2}]}})
    runs = expand(grouped)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    assert [(r.params["mixer"], r.params["mixer_options"], r.params["seq_len"]) for r in runs[:4]] == [
        ("attention", {}, 16), ("attention", {}, 64), ("leap", {"window": "global"}, 16), ("leap", {"window": "global"}, 64)]
    assert argv[argv.index("--preset") + 1] == "18M" and argv[argv.index("--attention-every") + 1] == "3"


def test_dry_run_lists_the_runs_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMSCALE_RESULTS", str(tmp_path / "results"))
    assert main(["sweep", str(ROOT / "data" / "sweeps" / "tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("to run") == 5 and "gla-d32-l2-h2-t32-s20-seed1" in out  # 4 rows and the total
    assert not (tmp_path / "results").exists()


def test_parallel_direct_sweep_writes_a_record_per_run_and_a_rerun_skips_them(tmp_path, monkeypatch, corpus_dir,
                                                                               capsys):
    results = tmp_path / "results"
    monkeypatch.setenv("LMSCALE_RESULTS", str(results))
    spec = _spec(tmp_path)
    assert main(["sweep", str(spec), "--jobs", "2"]) == 0
    records = _records(results)
    assert sorted(records) == [r.run_id for r in expand(load_spec(spec))]
    for run_id, record in records.items():
        assert record["status"] == "ok" and record["kind"] == "train" and record["metrics"]["val_loss"] > 0
        assert run_id.startswith(record["config"]["model"]["mixer"]) and record["config"]["train"]["steps"] == 3
    assert capsys.readouterr().out.count(" ok ") == 4

    mtimes = {p: p.stat().st_mtime_ns for p in (results / "sweep-check").glob("*.jsonl")}
    outcomes = run_sweep(load_spec(spec), jobs=2)
    assert [o.status for o in outcomes] == ["skipped"] * 4
    assert [o.val_loss for o in outcomes] == [records[o.run_id]["metrics"]["val_loss"] for o in outcomes]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_failing_run_leaves_an_error_record_the_others_finish_and_a_rerun_would_retry_it(tmp_path, corpus_dir,
                                                                                       monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("LMSCALE_RESULTS", str(results))
    # a vocabulary smaller than the corpus's token ids fails only when the run meets the data
    spec = _spec(tmp_path, fixed={**TINY, "mixer": "gla"}, grid={"vocab_size": [50257, 1000]})
    assert main(["sweep", str(spec), "--jobs", "2"]) == 1  # some run failed
    error, ok = sorted(_records(results).values(), key=lambda r: r["status"])
    assert ok["status"] == "ok" and ok["config"]["model"]["vocab_size"] == 50257
    assert error["status"] == "error" and error["kind"] == "train" and error["metrics"] == {}
    assert error["config"]["params"]["vocab_size"] == 1000 and error["config"]["runner"] == "direct"
    assert "'vocab_size'=1000" in error["error"]["stderr_tail"] and "--vocab-size" in error["error"]["command"]

    outcomes = {o.run_id: o.status for o in run_sweep(load_spec(spec), dry_run=True)}
    assert outcomes == {ok["run_id"]: "skipped", error["run_id"]: "to retry"}


def test_an_interrupted_direct_run_continues_from_its_checkpoint(tmp_path, corpus_dir, monkeypatch):
    """A run stopped mid-way (SIGTERM on a device whose time ran out) leaves its checkpoint in the sweep's
    folder; the next sweep resumes it there instead of starting again, then removes the folder."""
    import lmscale.train as train_mod
    from lmscale.config import ModelConfig, TrainConfig
    from lmscale.sweep import CHECKPOINTS

    results = tmp_path / "results"
    monkeypatch.setenv("LMSCALE_RESULTS", str(results))
    spec = _spec(tmp_path, fixed={**TINY, "steps": 4, "checkpoint_interval": 1}, grid={"mixer": ["gla"]})
    (run,) = expand(load_spec(spec))
    runner = _DirectRunner()
    model_cfg = ModelConfig(**{k: v for k, v in run.params.items() if k in runner.model_fields})
    train_cfg = TrainConfig(**{k: v for k, v in run.params.items() if k in runner.train_fields})
    real_batch_at = train_mod.batch_at

    def stopped_at_step_2(tokens, batch_size, seq_len, seed, step):
        if step == 2:
            raise KeyboardInterrupt("the device's time ran out")
        return real_batch_at(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(train_mod, "batch_at", stopped_at_step_2)
    folder = results / "sweep-check" / CHECKPOINTS / run.run_id
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(model_cfg, train_cfg, train_mod.TokenData.from_corpus(), out_dir=folder)
    assert (folder / "checkpoint.pt").is_file()

    assert main(["sweep", str(spec)]) == 0
    record = _records(results)[run.run_id]
    assert record["status"] == "ok" and [r["step"] for r in record["metrics"]["resumes"]] == [2]
    assert "--resume" in record["provenance"]["command"] and not folder.exists()


@pytest.mark.parametrize("change, key", [
    ({"grdi": {}}, "grdi"),
    ({"grid": {"mixer": []}}, "grid.mixer"),
    ({"grid": {"mixer": "gla"}}, "grid.mixer"),
    ({"fixed": {"d_modle": 32}}, "fixed.d_modle"),
    ({"fixed": {"experiment": "x"}}, "fixed.experiment"),
    ({"grid": {"lr": ["1e-3"]}}, "grid.lr"),
    ({"grid": {"d_model": [32]}}, "grid.d_model"),  # also in fixed
    ({"grid": {"seed": [0, 0]}}, "grid"),  # two runs, one id
    ({"fixed": {**TINY, "n_heads": 3}}, "d_model"),  # 16 channels do not split into 3 heads
    ({"runner": "slurm"}, "runner"),
    ({"grid": {"mixer": ["attention", "glaa"]}}, "'mixer'='glaa': unknown mixer.*Did you mean 'gla'"),
    ({"fixed": {**TINY, "seq_len": 32}}, "'seq_len'=32: exceeds the model's max_seq_len=16"),
    ({"fixed": {**TINY, "mixer_options": {"chunk_sise": 8}}, "grid": {"mixer": ["gla"]}},
     "mixer_options['chunk_sise']'=8: unknown option for mixer 'gla'"),
    ({"experiment": "my sweep"}, "experiment"),
    ({"cases": [{}]}, "cases"),
    ({"cases": [{"seed": 3}]}, "cases.seed"),  # also in grid
    ({"cases": [{"lr": 1.0e-3}, {"mlp_ratio": -1.0}]}, "mlp_ratio.*must be a positive, finite number"),
    ({"cases": [{"lr": "8"}]}, "cases.cases[0].lr"),
    ({"cases": {"a": [{"lr": 1.0e-3}], "b": [{"lr": 2.0e-3}]}}, "cases.b.lr.*also in cases.a"),
    ({"cases": {"model": []}}, "cases.model"),
    ({"fixed": {**TINY, "preset": "18m"}}, "'18m': unknown preset"),
])
def test_a_bad_spec_fails_before_any_run_naming_the_key(tmp_path, change, key):
    spec = _spec(tmp_path, **change)
    with pytest.raises(ValueError, match=key.replace("[", r"\[")) as info:
        run_sweep(load_spec(spec), results_root=tmp_path / "results")
    assert isinstance(info.value, ConfigError) or key == "experiment"  # experiment names are RecordErrors
    assert not (tmp_path / "results").exists()


def test_a_finished_record_with_another_config_is_an_error_not_a_skip(tmp_path):
    spec = parse_spec({"experiment": "sweep-check", "fixed": {**TINY, "lr": 3e-3}, "grid": {"mixer": ["gla"]}})
    run = expand(spec)[0]
    train = {k: v for k, v in run.params.items() if k in ("steps", "seq_len", "seed")} | {"lr": 1e-2}
    write_record(make_record("sweep-check", kind="train", config={"model": {"mixer": "gla"}, "train": train},
                             seed=0, metrics={"val_loss": 5.0}, run_id=run.run_id), tmp_path)
    with pytest.raises(ConfigError, match="'lr'=0.003: .* holds a finished run with lr=0.01"):
        run_sweep(spec, results_root=tmp_path)


@pytest.mark.skipif(not importlib.util.find_spec("papermill"), reason="the papermill runner needs papermill")
def test_papermill_runner_refuses_axes_the_template_does_not_name(tmp_path):
    spec = _spec(tmp_path, runner="papermill", fixed={k: v for k, v in TINY.items() if k != "max_seq_len"},
                 grid={"mixer": ["gla"], "lr": [1e-3, 3e-3]})
    with pytest.raises(ConfigError, match="grid.lr"):
        expand(load_spec(spec))


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("papermill"), reason="the papermill runner needs papermill")
def test_papermill_runner_writes_the_templates_record(tmp_path, corpus_dir):
    fixed = {k: v for k, v in TINY.items() if k != "max_seq_len"} | {"eval_interval": 3}  # template: max = seq_len
    spec = _spec(tmp_path, runner="papermill", fixed=fixed, grid={"mixer": ["gla"]})
    [outcome] = run_sweep(load_spec(spec), results_root=tmp_path / "results")
    assert (outcome.run_id, outcome.status) == ("gla-d16-l1-h2-t16-s3-seed0", "ok")
    record = json.loads(outcome.record.read_text())
    assert record["config"]["model"]["d_model"] == 16 and record["metrics"]["val_loss"] == outcome.val_loss


def test_a_run_another_sweep_holds_is_left_to_it(tmp_path, corpus_dir):
    results = tmp_path / "results"
    spec = load_spec(_spec(tmp_path, grid={"mixer": ["attention", "gla"]}))
    held = expand(spec)[1].run_id
    with run_lock(results.resolve(), "sweep-check", held) as lock:
        assert lock is not None
        outcomes = {o.run_id: o.status for o in run_sweep(spec, results_root=results)}
    assert outcomes[held] == "running elsewhere" and list(outcomes.values()).count("ok") == 1
    assert sorted(_records(results)) == sorted(set(outcomes) - {held})


@pytest.mark.slow
def test_two_sweeps_of_one_spec_share_the_runs_and_write_each_once(tmp_path, corpus_dir):
    import os
    import subprocess
    import sys

    results = tmp_path / "results"
    spec = _spec(tmp_path, grid={"mixer": ["attention", "gla"], "seed": [0, 1, 2]})
    env = {**os.environ, "LMSCALE_RESULTS": str(results)}
    cmd = [sys.executable, "-m", "lmscale", "sweep", str(spec)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    ran = sum(out.count(" ok ") for out, _ in outputs)
    assert ran == 6  # every run ran once, in one of the two
    for path in (results / "sweep-check").glob("*.jsonl"):
        assert len(read_records(path)) == 1, path
