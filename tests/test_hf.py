"""The Hugging Face face: config round trips, shifted loss, save/load, Trainer, and generate with mixer states."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from lmscale.config import ConfigError, ModelConfig
from lmscale.hf import LmscaleCache, LmscaleConfig, LmscaleForCausalLM
from lmscale.mixers import available
from lmscale.model import LanguageModel

VOCAB = 257
TINY = {"vocab_size": VOCAB, "d_model": 32, "n_heads": 2, "max_seq_len": 64}
HYBRID = ModelConfig(mixer="gla", n_layers=4, attention_every=2, mixer_options={"gla": {"chunk_size": 8}}, **TINY)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread runs them fastest, and no thread spins on a CPU others are loading."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> LmscaleForCausalLM:
    """An eval-mode model; init_std 0.3 makes logits depend strongly on context, so a wrong state shows."""
    torch.manual_seed(seed)
    return LmscaleForCausalLM(LmscaleConfig.from_model_config(cfg, init_std=0.3)).to(dtype).eval()


def tiny(mixer: str, n_layers: int = 3) -> ModelConfig:
    """Three layers: LEAP's windows differ per layer (4, 8, global), Based's kinds are conv, linear, sliding."""
    return ModelConfig(mixer=mixer, n_layers=n_layers, **TINY)


def random_tokens(B: int = 2, T: int = 11, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T))


# --- config -----------------------------------------------------------------------------------------


def test_config_holds_every_model_config_field_with_the_same_defaults():
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= {f.name for f in dataclasses.fields(LmscaleConfig)}
    assert LmscaleConfig().to_model_config() == ModelConfig()
    cfg = LmscaleConfig(mixer="gla", vocab_size=257, d_model=64, n_layers=2, n_heads=2)
    assert cfg.to_model_config() == ModelConfig(mixer="gla", vocab_size=257, d_model=64, n_layers=2, n_heads=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)  # transformers' names


@pytest.mark.parametrize("cfg", [HYBRID, ModelConfig(layers=["attention", "leap", "gla"], n_layers=3, **TINY),
                                 ModelConfig(mixer="based", mixer_options={"window": 8, "feature_dim": 4}, **TINY)],
                         ids=["attention_every", "layers", "options"])
def test_model_config_round_trips_through_config_json(cfg, tmp_path):
    assert LmscaleConfig.from_model_config(cfg).to_model_config() == cfg
    LmscaleConfig.from_model_config(cfg).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LmscaleConfig) and loaded.to_model_config() == cfg


def test_to_model_config_is_a_copy():
    config = LmscaleConfig.from_model_config(HYBRID)
    config.to_model_config().mixer_options["gla"]["chunk_size"] = 1
    assert config.mixer_options["gla"]["chunk_size"] == 8


@pytest.mark.parametrize("fields, field_name", [
    ({"d_model": 30, "n_heads": 4}, "d_model"),
    ({"n_layers": 4, "attention_every": 2, "layers": ["gla"] * 4}, "attention_every"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"d_modle": 64}, "d_modle"),  # a typo is not silently kept as an extra attribute
])
def test_config_rejects_what_model_config_rejects(fields, field_name):
    with pytest.raises(ConfigError) as error:
        LmscaleConfig(**fields)
    assert error.value.field == field_name


# --- the model ------------------------------------------------------------------------------------------


def test_wraps_the_language_model_with_its_own_initialisation():
    """transformers' generic init must not overwrite LanguageModel's (residual scaling, Mamba's Δ, …)."""
    cfg = ModelConfig(mixer="mamba", n_layers=2, **TINY)
    torch.manual_seed(0)
    reference = LanguageModel(cfg)
    torch.manual_seed(0)
    model = LmscaleForCausalLM(LmscaleConfig.from_model_config(cfg))
    assert isinstance(model.lm, LanguageModel) and model.lm.head.weight is model.lm.embed.weight
    reference_weights = reference.state_dict()
    for name, weight in model.lm.state_dict().items():
        assert torch.equal(weight, reference_weights[name]), name


def test_loss_is_next_token_cross_entropy_with_labels_shifted_inside():
    model, ids = make_model(HYBRID, dtype=torch.float32), random_tokens()  # the loss is computed in float32
    labels = ids.clone()
    labels[0, 4] = -100  # ignored
    out = model(ids, labels=labels)
    assert torch.equal(out.logits, model.lm(ids))
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_forward_with_cache_continues_the_sequence():
    model, ids = make_model(HYBRID), random_tokens(T=13)
    first = model(ids[:, :8], use_cache=True)
    rest = model(ids[:, 8:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), model(ids).logits)
    assert rest.cache is first.cache and rest.cache.get_seq_length() == 13
    older = model(ids[:, :8], use_cache=True).cache
    with pytest.warns(FutureWarning, match="past_key_values"):  # transformers' older name for `cache`
        continued = model(ids[:, 8:], past_key_values=older)
    torch.testing.assert_close(continued.logits, rest.logits)
    assert model(ids).cache is not None and model(ids, use_cache=False).cache is None  # default: config.use_cache
    assert model.train()(ids).cache is None  # but off while training


def test_padding_is_refused_with_a_clear_error():
    model, ids = make_model(HYBRID), random_tokens()
    assert model(ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 11, VOCAB)
    left_padded = torch.ones_like(ids)
    left_padded[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=left_padded)
    with pytest.raises(ValueError, match="padding"):
        model.generate(ids, attention_mask=left_padded, max_new_tokens=2, do_sample=False)


# --- generate -------------------------------------------------------------------------------------------


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


@pytest.mark.parametrize("mixer", available())
def test_cached_greedy_generation_equals_recomputing_the_prefix(mixer):
    model, prompt = make_model(tiny(mixer)), random_tokens(B=2, T=11)
    fed = []  # lengths of the blocks the LanguageModel is given, by forward or by step
    model.lm.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    step = model.lm.step
    model.lm.step = lambda idx_t, state: (fed.append(1), step(idx_t, state))[1]

    cached = greedy(model, prompt)
    assert fed == [11] + [1] * 7  # the prompt once, then only each new token
    fed.clear()
    recomputed = greedy(model, prompt, use_cache=False)
    assert fed == list(range(11, 19))

    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=1e-9, atol=1e-9)
    assert cached.cache.get_seq_length() == 18 and len(cached.cache) == 3


def test_the_cache_holds_each_layers_state_as_its_mixer_defines_it():
    model = make_model(HYBRID)
    short = greedy(model, random_tokens(T=5)).cache
    long = greedy(model, random_tokens(T=20)).cache
    gla_short, kv_short = short.states[0], short.states[1]
    assert long.states[0].shape == gla_short.shape  # recurrent: the same size whatever the context
    assert (kv_short.k.shape[2], long.states[1].k.shape[2]) == (12, 27)  # attention: one key per token seen


def test_generation_continues_from_a_returned_cache():
    model, prompt = make_model(HYBRID), random_tokens()
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    resumed = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(resumed, model.generate(prompt, max_new_tokens=8, do_sample=False))


def test_beam_search_reorders_the_states():
    model, prompt = make_model(HYBRID), random_tokens()
    cached = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    recomputed = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_cache_selects_and_repeats_batch_rows_of_every_state():
    model, ids = make_model(HYBRID), random_tokens(B=3)
    cache = model(ids, use_cache=True).cache
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)  # rows 2, 2, 0, 0
    rows = torch.tensor([2, 2, 0, 0])
    next_token = random_tokens(B=4, T=1, seed=5)
    expected = model(torch.cat([ids[rows], next_token], dim=1)).logits[:, -1]
    torch.testing.assert_close(model(next_token, cache=cache).logits[:, -1], expected)
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.states is None and isinstance(cache, LmscaleCache)


# --- save and load ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", available())
def test_save_then_load_gives_identical_logits(mixer, tmp_path):
    model, ids = make_model(tiny(mixer, n_layers=2), dtype=torch.float32), random_tokens()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        stored = set(weights.keys())
    assert "lm.embed.weight" in stored and "lm.head.weight" not in stored  # tied: stored once
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, LmscaleForCausalLM) and not loaded.training
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.lm.head.weight is loaded.lm.embed.weight
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# --- Trainer --------------------------------------------------------------------------------------------


class RandomTokens(torch.utils.data.Dataset):
    """A few fixed random sequences as {input_ids, labels}: memorisable, so a few steps lower the loss."""

    def __init__(self, n: int = 8, T: int = 16):
        self.ids = random_tokens(B=n, T=T, seed=3)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_it(tmp_path, require):
    require(importlib.util.find_spec("accelerate") is not None,
            "transformers.Trainer needs accelerate: pip install 'accelerate>=1.1.0'")
    torch.manual_seed(0)
    model = LmscaleForCausalLM(LmscaleConfig(mixer="gla", n_layers=2, **TINY))
    data = RandomTokens()
    batch = {key: torch.stack([data[i][key] for i in range(len(data))]) for key in ("input_ids", "labels")}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = model(**batch).loss.item()

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()

    assert result.global_step == 5
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.lm.head.weight is model.lm.embed.weight  # still tied after the optimiser's steps
    with torch.no_grad():
        assert model(**batch).loss.item() < loss_before - 0.5  # it memorises the training sequences
