"""Crash consistency: real `lmscale train` processes killed with SIGKILL at random moments, then resumed,
end with the weights of an uninterrupted run, bit for bit; every file on disk stays readable after every
kill, and the run is recorded exactly once. The slow tier: `make test-slow` (marker ``crash``)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmscale.results import make_record, read_records, write_record
from lmscale.train import load_checkpoint

pytestmark = pytest.mark.crash
KILLS = 20
EXPERIMENT = "reliability"  # the suite's own numbers, for the book (data/results/reliability/)


def _record_numbers(name: str, metrics: dict) -> None:
    """The suite's counts as a result record (the book prints them), beside the printed summary."""
    write_record(make_record(EXPERIMENT, kind="crash-suite", config={"suite": name, "kills": KILLS}, seed=0,
                             metrics=metrics, device="cpu", run_id=f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"))
ARGS = ["--preset", "tiny", "--mixer", "gla", "--max-seq-len", "32", "--seq-len", "32", "--batch-size", "4",
        "--steps", "60", "--warmup-steps", "4", "--eval-interval", "20", "--eval-batches", "1",
        "--checkpoint-interval", "3", "--tensorboard", "false", "--experiment", "crash", "--run-id", "crash-run"]


def _train(out_dir: Path, results: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmscale", "train", *ARGS, "--out-dir", str(out_dir), *(["--resume"] if resume else [])]
    env = {**os.environ, "LMSCALE_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint)["model"]


def test_sigkill_at_random_moments_loses_nothing(tmp_path, corpus_dir):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    start = time.perf_counter()
    proc = _train(reference / "run", reference / "results", resume=False)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    run_seconds = time.perf_counter() - start

    rng = random.Random(20261207)
    kills = corrupt = resumed = finished_early = 0
    while True:
        checkpoint = crashed / "run" / "checkpoint.pt"
        proc = _train(crashed / "run", crashed / "results", resume=checkpoint.exists())
        if kills < KILLS:
            try:
                proc.wait(timeout=rng.uniform(0.2, run_seconds))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                if checkpoint.exists():  # whatever moment the kill hit, the checkpoint on disk is whole
                    try:
                        load_checkpoint(checkpoint)
                    except Exception:  # noqa: BLE001 - counted and reported below
                        corrupt += 1
                for path in (crashed / "results").glob("*/*.jsonl"):
                    read_records(path)  # a record on disk is complete or absent
                continue
        code = proc.wait(timeout=600)
        assert code == 0, proc.stderr.read()[-3000:]
        if kills >= KILLS:
            break
        finished_early += 1  # it outran this kill: start over, so that every kill hits a run in progress
        shutil.rmtree(crashed)
    final = crashed / "run" / "checkpoint.pt"
    expected, got = _weights(reference / "run" / "checkpoint.pt"), _weights(final)
    assert expected.keys() == got.keys()
    resumed = len(load_checkpoint(final)["resumes"])
    exact = all(torch.equal(expected[k], got[k]) for k in expected)
    records = list((crashed / "results" / "crash").glob("*.jsonl"))
    print(f"\ncrash suite: {kills} kills, {resumed} resumes from a checkpoint in the run that finished, "
          f"{finished_early} runs that finished before their kill, exact weights: {exact}, corrupt files: "
          f"{corrupt}, records: {len(records)}")
    assert kills == KILLS and corrupt == 0 and exact
    assert len(records) == 1 and len(read_records(records[0])) == 1  # counted once, not lost
    _record_numbers("train", {"kills": kills, "resumes": resumed, "finished_before_kill": finished_early,
                              "exact_weights": exact, "corrupt_files": corrupt, "records": len(records)})
    ref_record = read_records(next((reference / "results" / "crash").glob("*.jsonl")))[0]
    assert read_records(records[0])[0]["metrics"]["val_loss"] == ref_record["metrics"]["val_loss"]


def test_a_sweep_killed_again_and_again_finishes_every_run_once(tmp_path, corpus_dir):
    """SIGKILL the sweep itself; its children live on holding their runs' locks, so a re-run leaves those
    to them ("running elsewhere") and runs the rest; in the end every run has one complete record."""
    import yaml

    from lmscale.sweep import expand, load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "experiment": "crash-sweep", "runner": "direct",
        "fixed": {"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 16, "max_seq_len": 16, "steps": 30,
                  "warmup_steps": 2, "batch_size": 2, "eval_batches": 1, "tensorboard": False},
        "grid": {"mixer": ["attention", "gla"], "seed": [0, 1, 2]}}))
    results = tmp_path / "results"
    env = {**os.environ, "LMSCALE_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    rng = random.Random(7)
    kills = corrupt = 0
    for _ in range(60):
        proc = subprocess.Popen([sys.executable, "-m", "lmscale", "sweep", str(spec), "--jobs", "2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 8:
            try:
                proc.wait(timeout=rng.uniform(0.5, 8.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                for path in (results / "crash-sweep").glob("*.jsonl"):
                    try:
                        read_records(path)  # complete or absent, whatever the kill interrupted
                    except Exception:  # noqa: BLE001 - counted, and must stay 0
                        corrupt += 1
                continue
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
        done = {p.stem: read_records(p) for p in (results / "crash-sweep").glob("*.jsonl")}
        if kills >= 8 and len(done) == 6 and all(r[-1]["status"] == "ok" for r in done.values()):
            break
        time.sleep(1.0)  # orphaned children of a killed sweep are still finishing their runs
    ids = {r.run_id for r in expand(load_spec(spec))}
    assert kills == 8 and set(done) == ids and corrupt == 0
    assert all(len(records) == 1 and records[0]["status"] == "ok" for records in done.values())
    print(f"\ncrash suite (sweep): {kills} kills of the sweep, {len(done)} runs recorded once each")
    _record_numbers("sweep", {"kills": kills, "runs": len(ids), "runs_recorded_once": len(done), "corrupt_files": corrupt})
