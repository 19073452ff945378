"""Llama-architecture weights into lmscale's attention model and back, logits equal to transformers'."""

import pytest
import torch

from lmscale.config import ConfigError, ModelConfig
from lmscale.convert import from_llama, to_llama
from lmscale.model import LanguageModel

transformers = pytest.importorskip("transformers")


def _llama(**overrides):
    torch.manual_seed(0)
    fields = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": True, "rope_theta": 500.0}
    config = transformers.LlamaConfig(**{**fields, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def test_a_saved_llama_folder_loads_with_equal_logits_and_goes_back(tmp_path):
    llama = _llama()
    llama.save_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    model = from_llama(tmp_path).eval()
    assert model.cfg.d_hidden == 88 and model.blocks[0].mixer.n_kv_heads == 2
    with torch.no_grad():
        reference = llama(tokens).logits
        torch.testing.assert_close(model(tokens), reference, rtol=1e-5, atol=1e-5)
        back = to_llama(model)
        torch.testing.assert_close(back(tokens).logits, reference, rtol=1e-5, atol=1e-5)
    for name, tensor in llama.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_relu_gated_llama_keeps_its_gate():
    llama = _llama(hidden_act="relu")
    model = from_llama(llama).eval()
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    assert model.cfg.mlp_activation == "relu"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), llama(tokens).logits, rtol=1e-5, atol=1e-5)
        assert to_llama(model).config.hidden_act == "relu"


def test_what_the_block_cannot_express_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="output head is a separate matrix"):
        from_llama(_llama(tie_word_embeddings=False))
    with pytest.raises(ConfigError, match="projections have biases"):
        from_llama(_llama(attention_bias=True))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=97))
    with pytest.raises(ConfigError, match="only Llama-architecture checkpoints"):
        from_llama(gpt2)
    hybrid = LanguageModel(ModelConfig(mixer="gla", attention_every=2, n_layers=2, d_model=32, n_heads=4,
                                       vocab_size=97, max_seq_len=64))
    with pytest.raises(ConfigError, match="no Llama counterpart"):
        to_llama(hybrid)
    moe = LanguageModel(ModelConfig(mixer="attention", moe_experts=4, n_layers=2, d_model=32, n_heads=4,
                                    vocab_size=97, max_seq_len=64))
    with pytest.raises(ConfigError, match="MLPs are dense"):
        to_llama(moe)
