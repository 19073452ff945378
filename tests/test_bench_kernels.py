"""The kernel benchmark: every implementation is checked before it is timed, and the records say so.

The suite runs at its quick sizes on the CPU (our Triton kernels through the interpreter, which
conftest.py selects); a kernel that is not written yet is skipped with a message naming it.
"""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from lmscale.bench import KERNEL_OPS, kernels
from lmscale.bench.implementations import Impl, Unavailable, _torch_chunk, default_impls
from lmscale.bench.kernel_costs import crossover_context
from lmscale.bench.kernels import GATES, TOLERANCES, judge, relative_errors, run_suite
from lmscale.bench.timing import Budget, capture_graphs, l2_cache_bytes, rotation_sets, time_calls
from lmscale.cli import main
from lmscale.results import RecordError, read_records, write_records

OUR_KERNELS = {  # op -> the module its "ours" implementation imports
    "gla": "lmscale.ops.triton.chunk", "simple_gla": "lmscale.ops.triton.chunk",
    "linear_attention": "lmscale.ops.triton.chunk", "lru_scan": "lmscale.ops.triton.scan_complex",
    "selective_scan": "lmscale.ops.triton.selective_scan", "step": "lmscale.ops.triton.step",
}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    records, path = run_suite(device="cpu", quick=True, out=out, log=lambda line: None)
    return records, path


def _ok(records, **config):
    return [r for r in records if r["status"] == "ok" and all(r["config"].get(k) == v for k, v in config.items())]


def test_quick_suite_writes_one_file_of_complete_records(quick_run):
    records, path = quick_run
    assert path.suffix == ".jsonl" and list(path.parent.iterdir()) == [path]
    assert read_records(path) == records
    assert {r["config"]["op"] for r in records} == set(KERNEL_OPS)
    for r in records:
        assert r["experiment"] == "kernels" and r["kind"] == "kernel-bench"
        assert r["status"] in ("ok", "wrong", "refused", "skipped")
        assert {"op", "impl", "mode", "B", "T", "H", "D", "dtype", "graphed", "seed"} <= set(r["config"])
        assert r["seed"] == r["config"]["seed"] and r["provenance"]["hardware"]["device"] == "cpu"
        if r["status"] != "ok":
            assert r["error"] and "ms_median" not in r["metrics"]
    assert len({r["run_id"] for r in records}) == len(records)


def test_timed_records_passed_their_gate_and_carry_sane_numbers(quick_run):
    records, _ = quick_run
    timed = _ok(records)
    assert timed
    for r in timed:
        m = r["metrics"]
        assert 0 < m["ms_p10"] <= m["ms_median"] <= m["ms_p90"] and m["repeats"] == 2
        assert 0 <= m["max_rel_err"] <= m["tolerance"] == TOLERANCES[getattr(torch, r["config"]["dtype"])]
        if r["config"]["op"] in GATES:
            assert m["tflops"] == pytest.approx(m["flops"] / (m["ms_median"] / 1e3) / 1e12)
            assert m["gbps"] > 0
    for op in GATES:  # the PyTorch form and SDPA always exist: both modes, every gradient checked
        for impl in ("torch", "sdpa"):
            fwdbwd = _ok(records, op=op, impl=impl, mode="fwdbwd")
            assert fwdbwd and _ok(records, op=op, impl=impl, mode="fwd")
            expected = {"o", "q", "k", "v"} | ({"g"} if GATES[op] != "none" and impl == "torch" else set())
            assert {k.removeprefix("rel_err_").removeprefix("d") for k in fwdbwd[0]["metrics"]
                    if k.startswith("rel_err_")} == expected
    assert _ok(records, op="step", impl="sdpa", context=256) and _ok(records, op="model_step", graphed=False)
    assert _ok(records, op="ceiling", mode="matmul") and _ok(records, op="ceiling", mode="copy")


def test_graphs_and_missing_peers_are_skipped_on_the_cpu_with_a_reason(quick_run):
    records, _ = quick_run
    graphed = [r for r in records if r["config"]["graphed"]]
    assert graphed and all(r["status"] == "skipped" and "CUDA" in r["error"] for r in graphed)
    if not _present("fla"):
        fla = [r for r in records if r["config"]["impl"] == "fla" and not r["config"]["graphed"]]
        assert fla and all(r["status"] == "skipped" and "fla" in r["error"] for r in fla)


@pytest.mark.parametrize("op", sorted(OUR_KERNELS))
def test_our_kernel_passes_its_gate_where_it_exists(quick_run, op):
    records, _ = quick_run
    ours = [r for r in records if r["config"]["op"] == op and r["config"]["impl"] == "ours"
            and not r["config"]["graphed"]]
    assert ours
    if not _present(OUR_KERNELS[op]):
        assert all(r["status"] == "skipped" for r in ours)
        pytest.skip(f"{OUR_KERNELS[op]} is not written yet: its records say skipped")
    problems = [(r["config"]["mode"], r["config"]["T"], r["status"], r.get("error")) for r in ours if r["status"] != "ok"]
    assert not problems


def _scaled(factor):
    return lambda: (lambda q, k, v, g: _torch_chunk(q, k, v, g) * factor)


def _wrong_gradient():
    """The right forward, gradients 1.5× too large: only the forward+backward gate can see it."""
    def run(q, k, v, g):
        o = _torch_chunk(q, k, v, g)
        return o + 0.5 * (o - o.detach())
    return run


def _raises(error):
    def build():
        def run(q, k, v, g):
            raise error
        return run
    return build


def test_a_wrong_kernel_is_refused_and_never_timed(tmp_path):
    impls = {"gla": {
        "right": Impl(lambda: _torch_chunk, "recurrence"),
        "wrong": Impl(_scaled(1.1), "recurrence"),
        "nan": Impl(_scaled(math.nan), "recurrence"),
        "bad_grad": Impl(_wrong_gradient, "recurrence"),
        "refuses": Impl(_raises(RuntimeError("produces incorrect results (see #640)")), "recurrence"),
        "absent": Impl(_raises(Unavailable("not written yet")), "recurrence"),
    }}
    records, _ = run_suite(device="cpu", quick=True, ops=["gla"], out=tmp_path, impls=impls, log=lambda line: None)
    status = {(r["config"]["impl"], r["config"]["mode"]): r for r in records}
    assert len(status) == 12
    for mode in ("fwd", "fwdbwd"):
        assert status["right", mode]["status"] == "ok" and "ms_median" in status["right", mode]["metrics"]
        wrong = status["wrong", mode]
        assert wrong["status"] == "wrong" and "ms_median" not in wrong["metrics"]
        assert wrong["metrics"]["max_rel_err"] == pytest.approx(0.1, rel=1e-3) and "tolerance" in wrong["error"]
        assert status["nan", mode]["status"] == "wrong" and "NaN" in status["nan", mode]["error"]
        assert status["refuses", mode]["status"] == "refused" and "#640" in status["refuses", mode]["error"]
        assert status["absent", mode]["status"] == "skipped"
    assert status["bad_grad", "fwd"]["status"] == "ok"
    bad = status["bad_grad", "fwdbwd"]
    assert bad["status"] == "wrong" and bad["metrics"]["rel_err_o"] < 1e-6
    assert bad["metrics"]["rel_err_dq"] == pytest.approx(0.5, rel=1e-3)


def test_relative_errors_and_judge():
    ref = torch.randn(100, dtype=torch.float64)
    errors = relative_errors({"o": ref.float() * 1.01, "d": None}, {"o": ref, "d": ref, "skip": None})
    assert errors["o"] == pytest.approx(0.01, rel=1e-4) and math.isnan(errors["d"]) and "skip" not in errors
    assert errors["o@max"] == pytest.approx(float(0.01 * ref.abs().max() / ref.square().mean().sqrt()), rel=1e-4)
    assert judge({"o": 0.01}, 2e-2) is None
    assert "o" in judge({"o": 0.03, "p": 0.0}, 2e-2) and "NaN" in judge({"o": math.nan}, 2e-2)


def test_one_wrong_chunk_of_one_head_is_caught_although_the_norm_hides_it():
    """B16·H16·T2K (D = 8 keeps it small): one 64-token chunk of one head zeroed is 1/8192 of the tensor."""
    ref = torch.randn(16, 16, 2048, 8)
    x = ref + 4e-3 * torch.randn_like(ref)  # honest bf16-like rounding everywhere
    assert judge(relative_errors({"o": x}, {"o": ref}), 2e-2) is None
    x[9, 7, 640:704] = 0.0
    errors = relative_errors({"o": x}, {"o": ref})
    assert errors["o"] < 2e-2  # the norm-wise check alone would time this kernel
    assert "element-wise error" in judge(errors, 2e-2) and "in o exceeds" in judge(errors, 2e-2)


def test_crossover_context_interpolates_on_log_axes():
    contexts, times = [4096, 1024, 2048], [4.0, 1.0, 2.0]
    assert crossover_context(contexts, times, 2.0).context == pytest.approx(2048)
    assert crossover_context(contexts, times, 2**0.5).context == pytest.approx(2**10.5)
    assert str(crossover_context(contexts, times, 3.0)) == "3K"  # 2048 · 2^(log 1.5 / log 2) = 3072
    faster = crossover_context(contexts, times, 0.5)  # beats attention at every measured context
    assert faster.context is None and faster.high == 1024 and str(faster) == "below 1K"
    slower = crossover_context(contexts, times, 8.0)
    assert slower.context is None and slower.low == 4096 and str(slower) == "above 4K"


def test_timing_quantiles_budget_and_rotation():
    device = torch.device("cpu")
    calls = []
    timing = time_calls([lambda: calls.append(0), lambda: calls.append(1)], device,
                        Budget(warmup_ms=0, rep_ms=0, min_warmup=3, min_reps=5, max_reps=5))
    assert timing.repeats == 5 and calls == [0, 1, 0] + [0, 1, 0, 1, 0]  # warm-up, then timed, rotating
    assert 0 <= timing.ms_p10 <= timing.ms_median <= timing.ms_p90
    assert l2_cache_bytes(device) == 50 * 10**6
    assert rotation_sets(10**9, device) == 1 and rotation_sets(10**6, device) == 101
    assert rotation_sets(10**6, device, max_sets=4) == 4
    with pytest.raises(RuntimeError, match="CUDA"):
        capture_graphs([lambda: None], device)


def test_write_records_is_one_validated_file(tmp_path):
    records = run_suite(device="cpu", quick=True, ops=["ceiling"], out=tmp_path, log=lambda line: None)[0]
    path = write_records(records, tmp_path / "sub" / "all.jsonl")
    assert read_records(path) == records and not list(path.parent.glob(".*tmp"))
    with pytest.raises(RecordError, match="jsonl"):
        write_records(records, tmp_path / "all.json")
    with pytest.raises(RecordError, match="lacks"):
        write_records([{"experiment": "kernels"}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_cli_runs_checks_only_and_rejects_unknown_ops(tmp_path, capsys):
    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--ops", "ceiling,gla", "--check-only",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ceiling matmul" in out and "gla fwdbwd" in out and "written:" in out
    (path,) = tmp_path.glob("*-cpu-quick-check.jsonl")
    records = read_records(path)
    assert records and all(r["kind"] == "kernel-check" and "ms_median" not in r["metrics"] for r in records)
    assert {r["status"] for r in records if r["config"]["impl"] in ("torch", "sdpa")} == {"ok"}
    assert main(["bench", "kernels", "--device", "cpu", "--ops", "glaa"]) == 2
    assert "glaa" in capsys.readouterr().err
    assert main(["bench", "kernels", "--device", "cpu", "--ops", "ceiling"]) == 2  # full sizes: hours
    assert "--quick" in capsys.readouterr().err


def test_past_the_time_limit_nothing_more_is_measured(tmp_path):
    records, _ = run_suite(device="cpu", quick=True, ops=["ceiling", "model_step"], out=tmp_path, time_limit_s=0,
                           log=lambda line: None)
    assert len(records) == 4 and all(r["status"] == "skipped" and "time limit" in r["error"] for r in records)


def test_default_table_covers_every_timed_op():
    assert set(default_impls()) | {"ceiling", "model_step", "mixer_layer"} == set(KERNEL_OPS)


def test_the_cli_imports_nothing_the_gpu_machine_lacks():
    code = ("import sys, lmscale.cli; "
            "print([m for m in ('datasets', 'altair', 'papermill', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_mixer_layer_profile_checks_every_variant_against_pytorch(tmp_path):
    """The layer profile times each mixer as a model runs it and, for mixers with kernels, on PyTorch too;
    both agree with the higher-precision PyTorch layer (here float32 kernels in the interpreter vs float64)."""
    records, _ = run_suite(device="cpu", quick=True, ops=["mixer_layer"], out=tmp_path)
    seen = {(r["config"]["mixer"], r["config"]["impl"], r["config"]["mode"]) for r in records}
    assert seen == {(m, i, mode) for m, impls in (("attention", ("ours",)), ("gla", ("ours", "torch")))
                    for i in impls for mode in ("fwd", "fwdbwd")}
    for r in records:
        assert r["status"] == "ok" and r["metrics"]["max_rel_err"] < 1e-5 and r["metrics"]["ms_median"] > 0, r
        top = r["metrics"]["top_kernels"]  # where the call's time goes (on the CPU: operators)
        assert 0 < len(top) <= 8 and all(ms > 0 and n >= 1 for _, ms, n in top)
        assert [ms for _, ms, _ in top] == sorted((ms for _, ms, _ in top), reverse=True)


def test_mixer_layer_goes_on_past_a_mixer_whose_check_runs_out_of_memory(tmp_path, monkeypatch):
    """A mixer whose reference does not fit is recorded as skipped, with the reason, and the profile
    goes on to the next mixer (it used to abort the whole op)."""
    reference_outputs = kernels._reference_outputs_of
    calls = []

    def first_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
        return reference_outputs(*args, **kwargs)

    monkeypatch.setattr(kernels, "_reference_outputs_of", first_runs_out)
    records, _ = run_suite(device="cpu", quick=True, ops=["mixer_layer"], out=tmp_path)
    status = {(r["config"]["mixer"], r["config"]["impl"], r["config"]["mode"]): r["status"] for r in records}
    assert {s for (m, _, _), s in status.items() if m == "attention"} == {"skipped"}
    assert {s for (m, _, _), s in status.items() if m == "gla"} == {"ok"}
    assert all("32.00 GiB" in r["error"] for r in records if r["status"] == "skipped")


def test_mamba_layer_is_checked_against_its_memory_light_sequential_scan(tmp_path, monkeypatch):
    """Mamba's PyTorch chunk scan at the 350M width asks 32 GiB in float32: its reference runs the
    sequential scan, while the timed layers keep their own forms."""
    import lmscale.mixers

    built = []
    build = lmscale.mixers.build_mixer

    def spy(cfg, layer_idx):
        built.append(cfg.mixer_options.get("scan", "chunk"))
        return build(cfg, layer_idx)

    monkeypatch.setattr(lmscale.mixers, "build_mixer", spy)
    records, _ = run_suite(device="cpu", quick=True, ops=["mixer_layer"], mixers=["mamba"], out=tmp_path)
    assert sorted(built) == ["chunk", "chunk", "sequential"]
    assert records and all(r["status"] == "ok" and r["config"]["mixer"] == "mamba" for r in records)


def test_an_implementation_out_of_memory_is_skipped_not_refused(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB")

    monkeypatch.setattr(kernels, "time_calls", out_of_memory)
    records, _ = run_suite(device="cpu", quick=True, ops=["linear_attention"], out=tmp_path)
    assert records and all(r["status"] == "skipped" and "17.00 GiB" in r["error"] for r in records)


def test_a_profiler_that_fails_costs_the_breakdown_not_the_timing(tmp_path, monkeypatch):
    def no_profiler(*args, **kwargs):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(kernels, "top_kernels", no_profiler)
    records, _ = run_suite(device="cpu", quick=True, ops=["mixer_layer"], out=tmp_path)
    assert records and all(r["status"] == "ok" and r["metrics"]["ms_median"] > 0 for r in records)
    assert all("CUPTI unavailable" in r["metrics"]["top_kernels_error"] for r in records)


def test_chosen_implementations_alone_are_timed_and_unknown_ones_refused(tmp_path):
    """--impls leaves out what was not chosen, from the op tables and from the layer profile alike (here the
    interpreted kernels, to keep the test fast; on a GPU the usual choice is ours,fla,sdpa)."""
    records, _ = run_suite(device="cpu", quick=True, ops=["gla", "mixer_layer"], out=tmp_path,
                           impl_names=["torch", "sdpa"], log=lambda line: None)
    assert {r["config"]["impl"] for r in records if r["config"]["op"] == "gla"} == {"torch", "sdpa"}
    layers = {(r["config"]["mixer"], r["config"]["impl"]) for r in records if r["config"]["op"] == "mixer_layer"}
    assert layers == {("gla", "torch")}  # attention has no PyTorch variant beside "ours"; "ours" was not chosen
    assert all(r["status"] == "ok" for r in records)
    with pytest.raises(ValueError, match=r"unknown implementation\(s\) \['triton'\]; the suite has fla, ours, sdpa, torch"):
        run_suite(device="cpu", quick=True, ops=["gla"], out=tmp_path, impl_names=["triton"])
