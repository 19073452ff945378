"""``lmscale bench inference`` on the CPU at the tiny preset: records, predictions, skips, resumption."""

from __future__ import annotations

import copy

import pytest
import torch

from lmscale.bench import inference
from lmscale.bench.inference import Point
from lmscale.config import ConfigError
from lmscale.model import LanguageModel
from lmscale.results import read_records, write_records

FAST = {"decode_tokens": 3, "repeats": 2}


def run(grid, tmp_path, **kwargs):
    records, path = inference.run_points(grid, "cpu", tmp_path, progress=False, **kwargs)
    return records, path


def test_grid_has_prefills_then_decodes_per_model():
    grid = inference.points(["attention", "gla"], ["tiny"], ["float32"], [64, 128], [32], [1, 2])
    assert [(p.mixer, p.phase, p.length, p.batch_size) for p in grid] == [
        ("attention", "prefill", 64, 1), ("attention", "prefill", 128, 1),
        ("attention", "decode", 32, 1), ("attention", "decode", 32, 2),
        ("gla", "prefill", 64, 1), ("gla", "prefill", 128, 1), ("gla", "decode", 32, 1), ("gla", "decode", 32, 2)]


@pytest.mark.parametrize("fields, message", [
    ({"phase": "train"}, "must be 'prefill' or 'decode'"),
    ({"dtype": "float16"}, "must be one of bfloat16, float32"),
    ({"length": 0}, "must be a positive integer"),
    ({"mixer": "transformer"}, "unknown mixer"),
])
def test_bad_points_are_refused_before_anything_runs(fields, message, tmp_path):
    point = Point(**{"mixer": "gla", "preset": "tiny", "phase": "decode", "length": 8, **fields})
    with pytest.raises(ConfigError, match=message):
        run([Point("gla", "tiny", "prefill", 8, dtype="float32", **FAST), point], tmp_path)
    assert not list(tmp_path.glob("*.jsonl"))


def test_attention_decodes_on_its_static_cache_sized_to_the_context():
    cfg = inference.model_config(Point("attention", "tiny", "decode", 100, decode_tokens=4, repeats=2))
    assert cfg.mixer_options == {"kv_cache": "static"} and cfg.max_seq_len >= 100 + 3 * 4
    assert inference.model_config(Point("gla", "tiny", "prefill", 64)).mixer_options == {}


def test_decode_prediction_grows_with_attention_context_only():
    def cost(mixer, L, B=1):
        point = Point(mixer, "tiny", "decode", L, B, "float32")
        with torch.device("meta"):
            model = LanguageModel(inference.model_config(point))
        return inference.predicted_cost(model, point)

    short, long = cost("attention", 64), cost("attention", 4096)
    cfg = inference.model_config(Point("attention", "tiny", "decode", 64))
    kv_read = cfg.n_layers * 2 * (4096 - 64) * cfg.d_model * 4  # keys and values of 4032 more positions, float32
    assert long["bytes"] - short["bytes"] == kv_read and long["flops"] > short["flops"]
    assert cost("gla", 64)["bytes"] == cost("gla", 4096)["bytes"]
    one, sixteen = cost("gla", 64), cost("gla", 64, 16)
    assert sixteen["flops"] == 16 * one["flops"]  # every sequence its own arithmetic
    assert one["weight_bytes"] < sixteen["bytes"] < 16 * one["bytes"]  # the weights are read once


def test_records_prefill_and_decode_with_prediction_and_no_invented_energy(tmp_path):
    grid = [Point("attention", "tiny", "prefill", 64, dtype="float32", **FAST),
            Point("attention", "tiny", "decode", 40, 2, "float32", **FAST),
            Point("jrt", "tiny", "decode", 16, 1, "float32", **FAST)]
    records, path = run(grid, tmp_path)
    assert [r["status"] for r in records] == ["ok"] * 3 and read_records(path) == records
    prefill, decode, eager = (r["metrics"] for r in records)
    assert prefill["tokens_per_second"] > 0 and prefill["predicted_ms"] > 0 and prefill["flops"] > 0
    assert decode["decode_path"].startswith("static buffers") and decode["ms_per_step"] > 0
    # a static cache holds every slot of its context; the analytic state counts the positions decoded after
    assert decode["state_bytes_allocated"] >= decode["state_bytes_analytic"] > 0
    assert eager["decode_path"].startswith("model.step in a loop: layer 0 ('jrt')")
    for m in (prefill, decode, eager):
        assert m["energy"] is None and "NVML measures NVIDIA GPUs only" in m["energy_not_measured"]
        assert m["bound"] in ("compute", "memory") and m["measured_over_predicted"] > 0
    assert records[0]["config"]["model"]["mixer"] == "attention"


class LongEnergyWindow:
    """NVML's window as a GPU fills it: many more passes of the timed window than the timed repeats."""

    passes, why = 12, None

    def measure(self, call, sync, work_per_call):
        for _ in range(self.passes):
            call()
        return {"joules_per_unit": 1.0}


def test_the_energy_window_decodes_past_the_static_cache_the_timed_repeats_size(tmp_path, monkeypatch):
    """A GPU decodes for a second in the energy window, far more steps than attention's static cache holds
    (session 14's H100 run: every attention decode failed); each pass rewinds to the timed window."""
    monkeypatch.setattr(inference, "Energy", lambda device: LongEnergyWindow())
    point = Point("attention", "tiny", "decode", 40, 1, "float32", **FAST)
    records, _ = run([point], tmp_path)
    assert records[0]["status"] == "ok", records[0].get("error")
    capacity = inference.model_config(point).max_seq_len
    assert 40 + LongEnergyWindow.passes * FAST["decode_tokens"] > capacity


def test_a_point_that_cannot_fit_is_skipped_with_the_reason_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "_free_bytes", lambda device: 10**6)
    records, _ = run([Point("gla", "tiny", "decode", 32, 4, "float32", **FAST)], tmp_path)
    assert records[0]["status"] == "skipped"
    assert "GiB are free" in records[0]["error"] and "the state of 4 sequence(s) at 32 tokens" in records[0]["error"]


def test_recorded_points_are_not_measured_again(tmp_path):
    grid = [Point("gla", "tiny", "prefill", 32, dtype="float32", **FAST)]
    first, _ = run(grid, tmp_path)
    again, _ = run(grid + [Point("gla", "tiny", "prefill", 48, dtype="float32", **FAST)], tmp_path)
    assert len(first) == 1 and [r["config"]["length"] for r in again] == [48]
    assert len(inference.frame(first + again)) == 2


def test_each_energy_table_prices_only_the_memory_of_its_devices(tmp_path):
    from lmscale.profile.energy import HOROWITZ_45NM, JOUPPI_7NM

    cpu_record, _ = run([Point("gla", "tiny", "prefill", 32, dtype="float32", **FAST)], tmp_path)
    gpu_record = copy.deepcopy(cpu_record[0])
    gpu_record["provenance"]["hardware"]["device"] = "cuda"
    rows = inference.frame(cpu_record + [gpu_record])
    horowitz, jouppi = (f"estimated_joules_per_token_low[{t.citation}]" for t in (HOROWITZ_45NM, JOUPPI_7NM))
    assert rows[horowitz].notna().all()  # DRAM at 45 nm prices a CPU's DDR and a GPU's memory alike
    assert rows[jouppi].isna().tolist() == [True, False]  # HBM2 is a GPU's memory, not a CPU's
    m, c = gpu_record["metrics"], gpu_record["config"]
    tokens = c["batch_size"] * c["length"]
    expected = JOUPPI_7NM.estimate(m["flops"], m["bytes"], "float32")["joules_low"] / tokens
    assert rows[jouppi].iloc[1] == pytest.approx(expected)


def test_a_context_whose_prefill_chunk_would_not_fit_goes_in_smaller_chunks(tmp_path, monkeypatch):
    point = Point("mamba", "tiny", "decode", 256, 4, "float32", **FAST)
    with torch.device("meta"):
        shell = LanguageModel(inference.model_config(point))
    free = {"whole": 10**12}
    cpu = torch.device("cpu")
    _, at_64 = inference.fitting_chunk(shell, Point("mamba", "tiny", "decode", 64, 4, "float32"), cpu, free["whole"])
    monkeypatch.setattr(inference, "_free_bytes", lambda device: int(at_64 / inference.MEMORY_MARGIN) + 4096)
    records, _ = run([point], tmp_path)
    assert records[0]["status"] == "ok" and records[0]["metrics"]["prefill_chunk"] == 64
    monkeypatch.setattr(inference, "_free_bytes", lambda device: at_64 // 2)
    prefill = Point("mamba", "tiny", "prefill", 256, 4, "float32", **FAST)
    records, _ = run([prefill], tmp_path)
    assert records[0]["status"] == "skipped" and "a forward over 256 tokens" in records[0]["error"]


def test_causal_attention_is_counted_over_its_attended_pairs_only():
    import torch.nn.functional as F

    q, v = torch.empty(2, 3, 5, 8, device="meta"), torch.empty(2, 3, 7, 4, device="meta")
    with inference.causal_sdpa_flops() as counter:
        out = F.scaled_dot_product_attention(q, v.new_empty(2, 3, 7, 8), v, is_causal=True)
        square = F.scaled_dot_product_attention(q, v.new_empty(2, 3, 7, 8), v)
    assert out.shape == square.shape == (2, 3, 5, 4)
    causal_pairs = 1 + 2 + 3 + 4 + 5  # five queries over seven keys, masked from the top left
    assert counter.flops == 2 * (8 + 4) * 6 * (causal_pairs + 5 * 7)


def test_flop_check_counts_every_mixer_on_meta_and_agrees_where_the_forms_compute_no_waste(tmp_path):
    records = inference.flop_check_records(["attention", "gla", "mamba", "lru", "based"], ["tiny"], [256])
    ratio = {r["config"]["mixer"]: r["metrics"]["flops_analytic_over_counted"] for r in records}
    assert {r["kind"] for r in records} == {"flop-count"}
    assert ratio["attention"] == pytest.approx(1, abs=1e-6) and ratio["mamba"] == ratio["lru"] == pytest.approx(1, abs=1e-6)
    assert abs(ratio["gla"] - 1) < 0.02  # its chunked form also computes each chunk's masked square
    # Based's sliding-window layers run a dense masked square in PyTorch: counted above the window's pairs
    assert ratio["based"] < 0.95
    write_records(records, tmp_path / "flops.jsonl")
    assert inference.measured_keys(tmp_path) == set() and inference.frame(read_records(tmp_path / "flops.jsonl")).empty
