"""Result records: written atomically, read back whole, malformed files named."""

import json

import pandas as pd
import pytest

from lmscale.results import RecordError, load_curves, load_records, make_record, read_records, write_record


def _record(run_id="r1", loss=1.5, experiment="exp"):
    return make_record(
        experiment,
        kind="train",
        config={"model": {"mixer": "gla", "d_model": 64}, "train": {"steps": 10}},
        seed=3,
        metrics={"val_loss": loss, "bad": float("nan")},
        curves={"train": [{"step": 5, "loss": 2.0}, {"step": 10, "loss": loss}]},
        run_id=run_id,
    )


def test_record_carries_provenance():
    record = _record()
    prov = record["provenance"]
    assert set(prov) >= {"git_commit", "git_dirty", "versions", "hardware", "command", "date"}
    assert "torch" in prov["versions"] and prov["hardware"]["device"] == "cpu"
    assert record["metrics"]["bad"] is None  # NaN is not valid JSON: stored as null


def test_write_then_load_round_trip(tmp_path):
    path = write_record(_record("a", 1.0), tmp_path)
    write_record(_record("b", 2.0), tmp_path)
    assert path == tmp_path / "exp" / "a.jsonl"
    assert not list(tmp_path.glob("exp/.*tmp"))
    df = load_records("exp", tmp_path)
    assert sorted(df["run_id"]) == ["a", "b"]
    assert df.set_index("run_id").loc["b", "metrics.val_loss"] == 2.0
    assert df.set_index("run_id").loc["a", "config.model.mixer"] == "gla"
    curves = load_curves("exp", "train", tmp_path)
    assert len(curves) == 4 and set(curves.columns) >= {"run_id", "step", "loss", "model.mixer"}


def test_a_runs_extra_fields_become_columns(tmp_path):
    """A failed run's error (``make_record``'s extra) reaches the tables that explain it."""
    record = make_record("exp", kind="x", config={}, seed=0, metrics={}, run_id="a", status="skipped",
                         extra={"error": "out of memory"})
    write_record(record, tmp_path)
    write_record(_record("b", 2.0), tmp_path)
    df = load_records("exp", tmp_path).set_index("run_id")
    assert df.loc["a", "error"] == "out of memory" and pd.isna(df.loc["b", "error"])


def test_rewriting_a_run_replaces_its_record(tmp_path):
    write_record(_record("a", 1.0), tmp_path)
    write_record(_record("a", 0.5), tmp_path)
    df = load_records("exp", tmp_path)
    assert list(df["metrics.val_loss"]) == [0.5]


def test_malformed_record_names_the_file(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    bad = folder / "broken.jsonl"
    bad.write_text('{"schema": 1, "experiment": "exp"\n')
    with pytest.raises(RecordError, match=r"broken\.jsonl:1: malformed"):
        load_records("exp", tmp_path)


def test_record_missing_fields_names_them(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "partial.jsonl").write_text(json.dumps({"schema": 1, "experiment": "exp"}) + "\n")
    with pytest.raises(RecordError, match=r"partial\.jsonl:1: record lacks field\(s\) \['run_id'"):
        read_records(folder / "partial.jsonl")


def test_names_that_would_escape_the_folder_are_refused():
    with pytest.raises(RecordError, match="experiment name"):
        make_record("../evil", kind="train", config={}, seed=0, metrics={})


def test_a_gpu_record_must_name_its_commit(monkeypatch):
    from lmscale import results

    monkeypatch.delenv("LMSCALE_GIT_COMMIT", raising=False)
    monkeypatch.setattr(results, "_git", lambda *args: None)  # a tree without .git, as on the GPU machine
    monkeypatch.setattr(results, "_checkout_commit", results._checkout_commit.__wrapped__)  # not the cached one
    with pytest.raises(RecordError, match=r"no git commit for a record made on cuda.*--git-commit"):
        make_record("exp", kind="train", config={}, seed=0, metrics={}, device="cuda")
    assert make_record("exp", kind="train", config={}, seed=0, metrics={}, device="cpu")["provenance"]["git_commit"] \
        is None  # a CPU record reruns anywhere; it is kept and says it has no commit
    monkeypatch.setenv("LMSCALE_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("LMSCALE_GIT_DIRTY", "true")
    record = make_record("exp", kind="train", config={}, seed=0, metrics={}, device="cuda")
    assert (record["provenance"]["git_commit"], record["provenance"]["git_dirty"]) == ("0123abc", True)


def test_the_cli_takes_the_commit_as_an_argument_and_refuses_gpu_work_without_one(monkeypatch, capsys):
    import os

    from lmscale import results
    from lmscale.cli import main

    monkeypatch.delenv("LMSCALE_GIT_COMMIT", raising=False)
    monkeypatch.delenv("LMSCALE_GIT_DIRTY", raising=False)
    monkeypatch.setattr(results, "_git", lambda *args: None)
    monkeypatch.setattr(results, "_checkout_commit", results._checkout_commit.__wrapped__)
    assert main(["bench", "train", "--device", "cuda", "--quick"]) == 2
    assert "no git commit for a record made on cuda" in capsys.readouterr().err
    assert main(["--git-commit", "feedbee", "presets", "--mixer", "gla"]) == 0
    assert os.environ["LMSCALE_GIT_COMMIT"] == "feedbee" and os.environ["LMSCALE_GIT_DIRTY"] == "false"


def test_code_changed_since_tells_current_numbers_from_outdated_ones():
    import subprocess

    from lmscale.paths import repo_root
    from lmscale.results import code_changed_since

    assert code_changed_since(None) is None and code_changed_since("0" * 40) is None  # unknown, not "unchanged"
    git = ["git", "-C", str(repo_root())]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    if not head:
        pytest.skip("this copy of the project has no .git")
    edited = subprocess.run([*git, "diff", "--name-only", "HEAD", "--", "src"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert code_changed_since(head) is bool(edited)
    first = subprocess.run([*git, "rev-list", "--max-parents=0", "HEAD"], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    if first != head:  # a shallow clone has one commit only
        assert code_changed_since(first) is True  # the library has changed since the first commit


def test_a_changed_byte_in_a_record_is_caught_by_its_checksum(tmp_path):
    """A flipped digit still parses as JSON and passes every field check; only the checksum sees it."""
    record = _record()
    path = write_record(record, tmp_path)
    line = path.read_text()
    assert '"checksum": "blake2b:' in line
    assert read_records(path) == [json.loads(json.dumps(record))]  # verified; the checksum is not shown
    flipped = line.replace('"val_loss": 1.5', '"val_loss": 1.4')
    assert flipped != line
    path.write_text(flipped)
    with pytest.raises(RecordError, match=rf"{path.name}:1: the record's checksum does not match its content"):
        read_records(path)


def test_records_written_before_checksums_still_read(tmp_path):
    record = _record()
    path = tmp_path / "legacy.jsonl"
    path.write_text(json.dumps(record, sort_keys=True) + "\n")
    assert read_records(path) == [json.loads(json.dumps(record))]


def test_a_process_names_the_commit_it_started_at_while_commits_land(monkeypatch):
    from lmscale import results

    monkeypatch.delenv("LMSCALE_GIT_COMMIT", raising=False)
    heads = iter(["a" * 40, "", "b" * 40, ""])  # rev-parse, status, then HEAD moves on
    monkeypatch.setattr(results, "_git", lambda *args: next(heads))
    results._checkout_commit.cache_clear()
    try:
        first = results.code_commit()
        assert results.code_commit() == first == ("a" * 40, False)
    finally:
        results._checkout_commit.cache_clear()
