"""Pre-trained weights in and out: a Llama-architecture ``transformers`` model ↔ lmscale's attention model.

lmscale's Transformer++ is the Llama block (RMSNorm before each sublayer, bias-free projections, RoPE in
the rotate-half layout, SwiGLU), so a ``LlamaForCausalLM`` maps onto it tensor for tensor:

    model.embed_tokens / lm_head (tied)   ->  embed (= head)
    layers.i.input_layernorm              ->  blocks.i.mixer_norm
    layers.i.self_attn.{q,k,v,o}_proj     ->  blocks.i.mixer.{q,k,v,o}_proj   (grouped KV heads: n_kv_heads)
    layers.i.post_attention_layernorm     ->  blocks.i.mlp_norm
    layers.i.mlp.{gate,up,down}_proj      ->  blocks.i.mlp.{gate,up,down}_proj
    model.norm                            ->  norm

What lmscale's model cannot express is refused with the reason rather than converted approximately:
an untied output head, biases, RoPE scaling, another activation or a head size other than d / heads.
GPT-2 checkpoints (LayerNorm, GELU, learned absolute positions, biases) are a different block and are
refused the same way: they would need a second model, not a mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmscale.config import MLP_ACTIVATIONS, ConfigError, ModelConfig
from lmscale.model import LanguageModel

_LAYER = {
    "input_layernorm.weight": "mixer_norm.weight",
    "self_attn.q_proj.weight": "mixer.q_proj.weight",
    "self_attn.k_proj.weight": "mixer.k_proj.weight",
    "self_attn.v_proj.weight": "mixer.v_proj.weight",
    "self_attn.o_proj.weight": "mixer.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _refuse(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(field, value, f"{why}; lmscale's attention model is the Llama block without it, so this "
                                     "checkpoint cannot be converted exactly")


def _check(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise _refuse("model_type", getattr(config, "model_type", None), "only Llama-architecture checkpoints map "
                      "onto lmscale's block (GPT-2 has LayerNorm, GELU, learned positions and biases)")
    if not config.tie_word_embeddings:
        raise _refuse("tie_word_embeddings", False, "the output head is a separate matrix")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise _refuse(flag, True, "the projections have biases")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise _refuse("rope_parameters", rope, "RoPE is scaled")
    if config.hidden_act not in MLP_ACTIVATIONS:
        raise _refuse("hidden_act", config.hidden_act, f"the MLP's activation is none of {', '.join(MLP_ACTIVATIONS)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise _refuse("head_dim", head_dim, "heads do not split the width evenly")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def model_config_from_llama(config) -> ModelConfig:
    """The lmscale config of a ``LlamaConfig`` (checked: see the module docstring)."""
    _check(config)
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    options = {} if kv_heads == config.num_attention_heads else {"n_kv_heads": kv_heads}
    # d_hidden = ceil(int(ratio · d) / multiple) · multiple: a multiple of the width itself lands on it exactly
    return ModelConfig(mixer="attention", vocab_size=config.vocab_size, d_model=config.hidden_size,
                       n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                       mlp_ratio=config.intermediate_size / config.hidden_size, mlp_multiple=config.intermediate_size,
                       max_seq_len=config.max_position_embeddings, rope_theta=_rope_theta(config),
                       norm_eps=config.rms_norm_eps, mixer_options=options, mlp_activation=config.hidden_act)


def from_llama(source: str | Path | Any) -> LanguageModel:
    """lmscale's model with the weights of a local Llama folder (or a loaded ``LlamaForCausalLM``)."""
    if isinstance(source, (str, Path)):
        from transformers import LlamaForCausalLM

        source = LlamaForCausalLM.from_pretrained(source)
    cfg = model_config_from_llama(source.config)
    weights = source.state_dict()
    state = {"embed.weight": weights["model.embed_tokens.weight"], "norm.weight": weights["model.norm.weight"]}
    for i in range(cfg.n_layers):
        for theirs, ours in _LAYER.items():
            state[f"blocks.{i}.{ours}"] = weights[f"model.layers.{i}.{theirs}"]
    state["head.weight"] = state["embed.weight"]
    model = LanguageModel(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(next(iter(weights.values())).dtype)


def to_llama(model: LanguageModel):
    """The ``LlamaForCausalLM`` with this attention model's weights; ``save_pretrained`` writes it out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    if cfg.layers is not None or cfg.attention_every is not None or cfg.mixer != "attention":
        raise ConfigError("mixer", cfg.mixer, "only an all-attention model is a Llama model; hybrids and "
                                              "recurrent mixers have no Llama counterpart")
    if cfg.moe_experts:
        raise ConfigError("moe_experts", cfg.moe_experts, "a Llama model's MLPs are dense; a mixture of experts "
                                                          "would be a Mixtral checkpoint, which this converter does not write")
    options = model.blocks[0].mixer
    if options.window is not None:
        raise ConfigError("mixer_options['window']", options.window, "Llama attends over the whole context; "
                                                                     "a sliding window has no Llama counterpart")
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_hidden,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=options.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                         hidden_act=cfg.mlp_activation, attention_bias=False, mlp_bias=False)
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["norm.weight"],
             "lm_head.weight": ours["embed.weight"]}
    for i in range(cfg.n_layers):
        for theirs, mine in _LAYER.items():
            state[f"model.layers.{i}.{theirs}"] = ours[f"blocks.{i}.{mine}"]
    llama = LlamaForCausalLM(config).to(ours["embed.weight"].dtype)
    llama.load_state_dict(state, strict=True)
    return llama.eval()
