"""``lmscale bench train`` on the CPU at the quick size: records with the trainer's numbers, one process per
point, resumable, and failures recorded without stopping the sweep."""

import json
from pathlib import Path

import pytest

from lmscale.bench.training import Point, format_table, measured_keys, run_points, variant
from lmscale.cli import main
from lmscale.config import ConfigError
from lmscale.mixers import available
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


def test_each_mixers_step_code_holds_every_library_module_its_step_imports():
    """The chapters withhold a throughput record once its mixer's step code changes after its commit: a module
    the step imports from outside it could change the numbers unnoticed (``lmscale.mlp`` once was such a module)."""
    from lmscale.bench.step_code import imported_modules, module_file, step_code

    root = Path(__file__).resolve().parents[1]
    # not the benchmarked step's work: writing records, formatting counts, reading the corpus (the bench feeds
    # random tokens), quantisation (only under TrainConfig.quantize, which no bench point sets)
    harness = {"lmscale.results", "lmscale.scaling", "lmscale.data", "lmscale.quantize"}
    for mixer in available():
        files = step_code(mixer)
        imported = {m for f in files for m in imported_modules(root / f)}
        outside = {m for m in imported - harness - {"lmscale.mixers"}
                   if str(module_file(m).relative_to(root)) not in files}
        assert outside == set(), mixer
    assert "src/lmscale/mlp.py" in step_code("gla") and "src/lmscale/loss.py" in step_code(None)


def test_a_change_to_one_mixers_code_withholds_only_the_mixers_that_run_it():
    from lmscale.bench.step_code import step_code

    assert "src/lmscale/ops/triton/selective_scan.py" in step_code("mamba")  # imported inside a function
    assert "src/lmscale/ops/triton/selective_scan.py" not in step_code("gla")
    assert "src/lmscale/mixers/attention.py" in step_code("based")  # its sliding-window layers
    assert "src/lmscale/mixers/mamba.py" not in step_code("attention")
    with pytest.raises(ValueError, match="unknown mixer 'transformer'; registered: attention"):
        step_code("transformer")


def test_the_registry_is_the_only_dynamic_import_the_step_code_closure_leaves_out():
    """The closure follows static imports; a string import under mixers/ or ops/ would hide a dependency."""
    root = Path(__file__).resolve().parents[1] / "src" / "lmscale"
    dynamic = {str(f.relative_to(root)) for d in ("mixers", "ops") for f in (root / d).rglob("*.py")
               if "import_module" in f.read_text() or "__import__" in f.read_text()}
    assert dynamic == {"mixers/__init__.py"}


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
