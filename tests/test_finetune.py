"""LoRA through peft on a saved lmscale model: only adapters train, the adapter saves and reloads, and the
merged weights are the base plus the adapters' low-rank product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from lmscale.config import ModelConfig
from lmscale.finetune import LORA_TARGETS, finetune, lora_model, qlora_support
from lmscale.hf import LmscaleConfig, LmscaleForCausalLM

SHAPE = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}


def saved_model(tmp_path, mixer="attention"):
    torch.manual_seed(0)
    model = LmscaleForCausalLM(LmscaleConfig.from_model_config(ModelConfig(mixer=mixer, **SHAPE)))
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base", model


def tokens(n=4000, seed=1):
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], size=n).astype(np.uint16)


@pytest.mark.parametrize("mixer", ["attention", "gla", "mamba"])
def test_only_the_adapters_train_and_the_loss_falls(tmp_path, mixer):
    path, base = saved_model(tmp_path, mixer)
    model = lora_model(path, r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert all(".mixer." in n or ".mlp." in n for n in adapted) and not any("embed" in n or "head" in n for n in adapted)
    idx = torch.from_numpy(tokens(40).astype(np.int64)).view(2, 20)
    with torch.no_grad():  # B starts at zero: the adapted model is the base model until it trains
        torch.testing.assert_close(model(input_ids=idx).logits, base(input_ids=idx).logits)
    text = np.tile(tokens(50), 80)  # a repeated snippet: a few steps must learn it
    losses = finetune(model, text, steps=30, batch_size=4, seq_len=32, lr=1e-2)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_adapter_saves_reloads_and_merges_into_base_plus_low_rank_product(tmp_path):
    path, _ = saved_model(tmp_path)
    model = lora_model(path, r=4, alpha=8)
    finetune(model, np.tile(tokens(50), 40), steps=5, batch_size=2, seq_len=16, lr=1e-2)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    idx = torch.from_numpy(tokens(32).astype(np.int64)).view(2, 16)
    with torch.no_grad():
        expected = model(input_ids=idx).logits
    reloaded = peft.PeftModel.from_pretrained(LmscaleForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=idx).logits, expected)
    adapters = {n: m for n, m in reloaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    deltas = {n.removeprefix("base_model.model."): (m.lora_B["default"].weight @ m.lora_A["default"].weight)
              * m.scaling["default"] for n, m in adapters.items()}
    base = LmscaleForCausalLM.from_pretrained(path).state_dict()
    merged = reloaded.merge_and_unload().state_dict()
    assert deltas and set(deltas) <= {k.removesuffix(".weight") for k in merged}
    for name, delta in deltas.items():
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + delta)


def test_qlora_is_refused_with_the_reason_off_a_gpu(tmp_path):
    path, _ = saved_model(tmp_path)
    assert "CUDA only" in qlora_support("cpu")
    with pytest.raises(RuntimeError, match=r"QLoRA's 4-bit base runs on CUDA only \(bitsandbytes\); this is cpu"):
        lora_model(path, quantize="4bit", device="cpu")


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        lora_model(tmp_path / "nothing")
    path, _ = saved_model(tmp_path)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lora_model(path, r=0)
    with pytest.raises(ValueError, match="quantize must be None"):
        lora_model(path, quantize="8bit")
    assert LORA_TARGETS.startswith(r"lm\.blocks")
