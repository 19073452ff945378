"""``lmscale bench train`` on the CPU at the quick size: records with the trainer's numbers, one process per
point, resumable, and failures recorded without stopping the sweep."""

import json

import pytest

from lmscale.bench.training import Point, format_table, measured_keys, run_points, variant
from lmscale.cli import main
from lmscale.config import ConfigError
from lmscale.results import read_records


def _quick(mixer, **overrides):
    options = {"preset": "tiny", "seq_len": 32, "tokens_per_step": 64, "compile": False, "warmup_steps": 1,
               "timed_steps": 2}
    options.update(overrides)
    return Point(mixer=mixer, **options)


def test_each_point_runs_in_its_own_process_and_writes_the_trainers_numbers(tmp_path):
    records, path = run_points([_quick("attention"), _quick("gla")], "cpu", tmp_path, progress=False)
    assert [r["status"] for r in records] == ["ok", "ok"] and read_records(path) == records
    for r in records:
        m, c = r["metrics"], r["config"]
        assert c["batch_size"] == 2 and c["model"]["mixer"] == c["mixer"] and r["kind"] == "train-bench"
        assert m["tokens_per_second"] == pytest.approx(64 / (m["step_ms_median"] / 1e3))
        assert m["step_ms_p10"] <= m["step_ms_median"] <= m["step_ms_p90"]
        assert m["flops_per_token"] > 0 and m["mfu"] is None  # no invented CPU peak
        # the counter sees the same matmuls the analytic model counts, give or take the mixer's own terms
        assert m["flops_counted_per_token"] == pytest.approx(m["flops_per_token"], rel=0.05)
        assert m["peak_memory_bytes"] > 0 and m["loss_impl_resolved"] == "chunked"
        assert m["top_kernels"] and sum(k["share"] for k in m["top_kernels"]) <= 1 + 1e-9
        assert r["provenance"]["git_commit"]


def test_measured_points_are_skipped_and_force_measures_them_again(tmp_path):
    run_points([_quick("attention")], "cpu", tmp_path, in_process=True, progress=False)
    assert measured_keys(tmp_path) == {_quick("attention").key}
    records, _ = run_points([_quick("attention"), _quick("retnet", profile=False, count_flops=False)], "cpu",
                            tmp_path, in_process=True, progress=False)
    assert [r["config"]["mixer"] for r in records] == ["retnet"]
    assert "top_kernels" not in records[0]["metrics"] and "flops_counted_per_token" not in records[0]["metrics"]
    records, _ = run_points([_quick("attention")], "cpu", tmp_path, force=True, in_process=True, progress=False)
    assert len(records) == 1


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    records, _ = run_points([_quick("attention", loss_impl="liger"), _quick("attention")], "cpu", tmp_path,
                            progress=False)
    assert [r["status"] for r in records] == ["error", "ok"]
    assert "'liger' runs on CUDA only" in records[0]["error"]
    assert "error" in format_table(records) and measured_keys(tmp_path) == {_quick("attention").key}


def test_impossible_points_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="'tokens_per_step'=100: must be a multiple of seq_len=32"):
        run_points([_quick("attention", tokens_per_step=100)], "cpu", tmp_path, progress=False)


def test_micro_batches_split_the_step_and_are_a_point_of_their_own(tmp_path, monkeypatch):
    from lmscale.model import LanguageModel

    batches = []
    forward = LanguageModel.forward

    def counted(self, idx, *args, **kwargs):
        batches.append(idx.shape[0])
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "forward", counted)
    plain = _quick("attention", tokens_per_step=128, profile=False, count_flops=False)
    split = _quick("attention", tokens_per_step=128, profile=False, count_flops=False, micro_batches=2)
    records, _ = run_points([plain, split], "cpu", tmp_path, in_process=True, progress=False)
    assert [r["status"] for r in records] == ["ok", "ok"]
    # 3 steps of 4 sequences: one pass each, then two passes of 2 whose gradients accumulate
    assert batches == [4] * 3 + [2] * 6
    assert records[1]["config"]["micro_batches"] == 2 and records[1]["config"]["batch_size"] == 4
    assert measured_keys(tmp_path) == {plain.key, split.key}
    assert "attention (2 micro-batches, eager)" in format_table(records)  # compile=False
    with pytest.raises(ConfigError, match="'micro_batches'=3: must divide the step's 4 sequences"):
        run_points([_quick("attention", tokens_per_step=128, micro_batches=3)], "cpu", tmp_path, progress=False)


def test_a_steps_variant_names_every_way_it_differs_from_the_plain_step():
    assert variant({"activation_checkpointing": False, "micro_batches": 1, "compile": True}) == ""
    assert variant({"mixer": "gla"}) == ""  # records from before micro-batches existed
    assert variant({"activation_checkpointing": True, "micro_batches": 4, "compile": False}) == \
        "recomputed blocks, 4 micro-batches, eager"


def test_step_code_holds_every_library_module_a_training_step_imports():
    """The chapters withhold a throughput record once ``STEP_CODE`` changes after its commit: a module the step
    imports from outside it could change the numbers unnoticed (``lmscale.mlp`` was such a module)."""
    import ast
    from pathlib import Path

    from lmscale.bench.training import STEP_CODE

    root = Path(__file__).resolve().parents[1]
    # not the benchmarked step's work: writing records, formatting counts, reading the corpus (the bench feeds
    # random tokens), quantisation (only under TrainConfig.quantize, which no bench point sets)
    harness = {"lmscale.results", "lmscale.scaling", "lmscale.data", "lmscale.quantize"}

    def covered(module: str) -> bool:
        path = Path("src", *module.split("."))
        rel = str(path.with_suffix(".py") if (root / path.with_suffix(".py")).exists() else path)
        return any(rel == p or rel.startswith(p + "/") for p in STEP_CODE)

    files = [f for p in STEP_CODE for f in ((root / p).rglob("*.py") if (root / p).is_dir() else [root / p])]
    imported = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lmscale."):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("lmscale."))
    assert len(files) > 20 and "lmscale.mlp" in imported
    assert {m for m in imported - harness if not covered(m)} == set()


def test_cli_quick_run_writes_records_and_prints_the_table(tmp_path, capsys):
    assert main(["bench", "train", "--quick", "--device", "cpu", "--mixers", "lru", "--seq-len", "32",
                 "--tokens-per-step", "64", "--count-flops", "false", "--in-process", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lru" in out and "tiny" in out and "written:" in out
    (path,) = tmp_path.glob("*.jsonl")
    record = json.loads(path.read_text())
    assert record["status"] == "ok" and record["config"]["seq_len"] == 32
    assert main(["bench", "train", "--quick", "--device", "cpu", "--mixers", "no_such_mixer",
                 "--out", str(tmp_path)]) == 2
    assert "unknown mixer" in capsys.readouterr().err


def test_loss_benchmark_times_each_implementation_and_skips_what_cannot_run_here():
    from lmscale.bench.training import loss_records

    records = loss_records(["tiny"], "cpu", tokens=64)
    by_impl = {r["config"]["impl"]: r for r in records}
    assert by_impl["full"]["status"] == by_impl["chunked"]["status"] == "ok"
    assert by_impl["chunked"]["metrics"]["grad_weight_rel_error"] < 1e-5 and by_impl["chunked"]["metrics"]["ms_median"] > 0
    assert by_impl["liger"]["status"] == "skipped" and "CUDA only" in by_impl["liger"]["error"]


def test_counting_out_of_memory_keeps_the_timed_step(tmp_path, monkeypatch):
    """Mamba's PyTorch chunk scan, which the FLOP counter needs, took 4 GiB more than an H100 had left; the
    step it timed on the kernels was fine and must not be thrown away with the count."""
    import torch

    from lmscale.bench import training

    def out_of_memory(point, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")

    monkeypatch.setattr(training, "counted_flops_per_token", out_of_memory)
    (record,), _ = run_points([_quick("gla", profile=False)], "cpu", tmp_path, in_process=True, progress=False)
    m = record["metrics"]
    assert record["status"] == "ok" and m["tokens_per_second"] > 0
    assert m["flops_counted_per_token"] is None and m["mfu_counted"] is None
    assert m["flops_counted_error"].startswith("counting ran out of memory on the PyTorch forms: CUDA out of memory")


def test_an_architecture_of_several_mixers_gets_each_mixers_pytorch_form_by_name():
    import torch

    from lmscale.bench.training import _model_config, torch_forms
    from lmscale.model import LanguageModel

    assert torch_forms("mamba", "34M") == {"impl": "torch"}
    assert torch_forms("jamba", "34M") == {"mamba": {"impl": "torch"}}  # attention has no PyTorch-form option
    cfg = _model_config(_quick("jamba", preset="34M"), **torch_forms("jamba", "34M"))
    with torch.device("meta"):
        model = LanguageModel(cfg)
    assert {b.mixer.impl for b in model.blocks if type(b.mixer).__name__ == "Mamba"} == {"torch"}
