"""Every registered mixer trains at the tiny preset through each front door: the CLI, the papermill
template and ``transformers.Trainer``. A mixer added to the registry is covered here by existing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from lmscale.cli import main
from lmscale.hf import LmscaleConfig, LmscaleForCausalLM
from lmscale.mixers import available
from lmscale.model import LanguageModel
from lmscale.presets import preset
from lmscale.train import TokenData, eval_windows, evaluate

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "8", "--warmup-steps", "1", "--batch-size", "2", "--seq-len", "32", "--max-seq-len", "32",
         "--eval-batches", "1", "--tensorboard", "false"]


def _untrained_val_loss(model_cfg, seed: int) -> float:
    """The validation loss of the model the trainer starts from (same seed, same windows as its evaluation)."""
    torch.manual_seed(seed)
    model = LanguageModel(model_cfg)
    data = TokenData.from_corpus()
    return evaluate(model, eval_windows(data.validation, 1, 2, 32), torch.device("cpu"), None)["loss"]


@pytest.mark.parametrize("mixer", available())
def test_cli_trains_the_tiny_preset(mixer, tmp_path, monkeypatch, corpus_dir, capsys):
    monkeypatch.setenv("LMSCALE_RESULTS", str(tmp_path))
    assert main(["train", "--preset", "tiny", "--mixer", mixer, "--experiment", "every-mixer", *SHORT]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("record: ")
    record = json.loads(Path(path).read_text())
    expected = preset("tiny", mixer, max_seq_len=32)
    assert record["config"]["model"] == expected.to_dict()
    assert record["metrics"]["steps"] == 8
    assert record["metrics"]["val_loss"] < _untrained_val_loss(expected, seed=0) - 0.02  # it learnt something


@pytest.mark.slow
def test_papermill_template_trains_every_mixer_at_the_tiny_preset(tmp_path, corpus_dir):
    """One kernel per mixer, as a sweep would run them."""
    template = subprocess.run(
        [sys.executable, "-m", "jupytext", "--to", "ipynb", str(ROOT / "notebooks" / "train.py"), "-o", "-"],
        capture_output=True, text=True, check=True,
    ).stdout
    params = {"experiment": "every-mixer", "preset": "tiny", "steps": 3, "warmup_steps": 1, "batch_size": 2,
              "seq_len": 32, "eval_interval": 3, "eval_batches": 1}
    env = {"LMSCALE_RESULTS": str(tmp_path), "LMSCALE_ROOT": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    for mixer in available():
        cmd = [sys.executable, "-m", "papermill", "-", str(tmp_path / f"{mixer}.ipynb"), "--cwd",
               str(ROOT / "notebooks"), "-y", json.dumps({**params, "mixer": mixer})]
        proc = subprocess.run(cmd, input=template, capture_output=True, text=True, timeout=600, check=False,
                              env={**os.environ, **env})
        assert proc.returncode == 0, (mixer, proc.stderr[-3000:])
    records = {json.loads(p.read_text())["config"]["model"]["mixer"] for p in (tmp_path / "every-mixer").glob("*.jsonl")}
    assert records == set(available())


class _Tokens(torch.utils.data.Dataset):
    """A few fixed random sequences (memorisable) as {input_ids, labels}."""

    def __init__(self, vocab: int, n: int = 8, T: int = 16):
        self.ids = torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("mixer", available())
def test_transformers_trainer_trains_the_tiny_preset(mixer, tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny", mixer, vocab_size=257, max_seq_len=32)
    model = LmscaleForCausalLM(LmscaleConfig.from_model_config(cfg))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=_Tokens(257)).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
