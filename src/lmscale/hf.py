"""Hugging Face face of ``LanguageModel``: a config, a ``PreTrainedModel`` and ``generate`` with mixer states.

    LmscaleConfig        ModelConfig's fields as a transformers config (config.json), validated by ModelConfig
    LmscaleForCausalLM   holds a LanguageModel as ``lm``; save/load (safetensors), loss, Trainer, generate
    LmscaleCache         each layer's state as its mixer defines it, plus the number of tokens absorbed

transformers' own caches hold key/value tensors per layer. A layer here carries whatever its mixer
decodes from: a KV cache for attention, fixed-size matrices for a recurrence, LEAP's cumulative
softmax sums. ``LmscaleCache`` keeps those objects as they are, so after the prompt each ``generate``
step feeds only the new token through ``LanguageModel.step``: O(1) work per token for a recurrent
layer, one more key and value for attention.

Padding is refused: a recurrent state would absorb the pad tokens (and attention's RoPE positions would
shift), so a left-padded batch would not decode as its rows would alone. Batch prompts of equal length,
or generate each prompt separately.

Importing this module registers model_type "lmscale" with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar

import torch
import transformers
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from lmscale.config import ConfigError, ModelConfig
from lmscale.model import LanguageModel

if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:
    raise ImportError(
        f"lmscale.hf needs a transformers release whose models take `cache=` (5.x; tested with 5.24), "
        f"found transformers {transformers.__version__}: pip install 'transformers>=5.24'"
    )

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class LmscaleConfig(PreTrainedConfig):
    """Every ModelConfig field, with ModelConfig's defaults and validation (errors are ``ConfigError``).

    Build it directly (``LmscaleConfig(mixer="gla", d_model=64, …)``) or from a ModelConfig
    (``from_model_config``); ``to_model_config`` gives the ModelConfig back. transformers' usual names
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``) read
    and write the lmscale fields they stand for.
    """

    model_type = "lmscale"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    mixer: str = "attention"
    vocab_size: int = 50257
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 8 / 3
    mlp_multiple: int = 32
    mlp_activation: str = "silu"
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mixer_options: dict[str, Any] = field(default_factory=dict)
    layers: list[str] | None = None
    attention_every: int | None = None
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_capacity_factor: float | None = None
    moe_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = True  # LanguageModel's head is its embedding matrix
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # transformers passes its own extra keys through here; a near miss of a model field is a typo
        for key, value in kwargs.items():
            close = difflib.get_close_matches(key, MODEL_FIELDS, n=1, cutoff=0.8)
            if close:
                raise ConfigError(key, value, f"unknown model field; did you mean {close[0]!r}?")
        super().__post_init__(**kwargs)
        self.to_model_config()  # raises ModelConfig's ConfigError for an impossible model

    def to_model_config(self) -> ModelConfig:
        """The ModelConfig this config describes (a copy: editing it leaves this config alone)."""
        return ModelConfig(**copy.deepcopy({name: getattr(self, name) for name in MODEL_FIELDS}))

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> LmscaleConfig:
        """``cfg``'s fields, overridden or joined by ``kwargs`` (fields, or transformers settings such as
        ``eos_token_id``)."""
        return cls(**{**cfg.to_dict(), **kwargs})


def _map_tensors(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``state`` with ``fn`` applied to each of its tensors, whatever the mixer's structure (tensor,
    dataclass, list, tuple); ints such as positions are shared by the batch and kept."""
    if isinstance(state, Tensor):
        return fn(state)
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(
            state, **{f.name: _map_tensors(getattr(state, f.name), fn) for f in dataclasses.fields(state)}
        )
    if isinstance(state, (list, tuple)):
        return type(state)(_map_tensors(part, fn) for part in state)
    return state


class LmscaleCache(Cache):
    """Per-layer decoding states (``LanguageModel.forward(…, return_state=True)``'s list) and the token count.

    ``states[i]`` is whatever layer i's mixer carries (``Mixer.init_state`` documents it); None before the
    first forward. The cache is updated in place by ``LmscaleForCausalLM.forward``, as transformers' are.
    """

    is_compileable = False  # states are Python objects whose structure differs by mixer
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier token

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.states: list[Any] | None = None
        self.seen_tokens = 0

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)

    def __repr__(self) -> str:
        kinds = [type(state).__name__ for state in self.states or []]
        return f"LmscaleCache(seen_tokens={self.seen_tokens}, states={kinds})"

    def update_states(self, states: list[Any], n_new_tokens: int) -> None:
        """Replace the states by those after ``n_new_tokens`` more tokens."""
        self.states = states
        self.seen_tokens += n_new_tokens

    @property
    def is_linear(self) -> list[bool]:
        """No layer is a transformers linear-attention layer, whose length is unknown: every layer here
        knows how many tokens it has absorbed, so ``generate`` can continue from this cache."""
        return [False] * len(self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens absorbed so far (the same for every layer)."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows beam search chose (``beam_idx`` [B]), in that order."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep batch rows ``indices`` (every state tensor is batch-first)."""
        self.states = _map_tensors(self.states, lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times in place: rows a, b -> a, a, b, b for 2."""
        self.states = _map_tensors(self.states, lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("an LmscaleCache cannot drop tokens: a recurrent state cannot be rolled "
                                      "back; keep a copy of the cache from before the tokens instead")

    def reset(self) -> None:
        self.states, self.seen_tokens = None, 0


def _reject_padding(attention_mask: Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "attention_mask has zeros (padding), which lmscale models cannot honour: a recurrent layer's state "
            "would absorb the pad tokens and attention's positions would shift. Batch sequences of equal "
            "length without padding, or generate each prompt on its own."
        )


class LmscaleForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``LanguageModel`` (``self.lm``) as a transformers causal LM: loss, save/load, Trainer, generate.

    forward(input_ids [B, T], labels [B, T] | None, cache, use_cache, attention_mask) ->
    CausalLMOutputWithPast(loss, logits [B, T, V], cache). Labels are shifted inside, as in every
    transformers causal LM: pass ``labels=input_ids``; -100 marks positions without a target.
    """

    config_class = LmscaleConfig
    # the head is the embedding matrix: saved once, tied again on load
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm.head.weight": "lm.embed.weight"}
    _is_stateful = True  # no assisted decoding: recurrent states cannot be rolled back
    accepts_loss_kwargs = True  # Trainer may pass num_items_in_batch

    def __init__(self, config: LmscaleConfig):
        super().__init__(config)
        self.lm = LanguageModel(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: LanguageModel initialises itself when built (GPT-2 init, plus the paper-prescribed init
        of the parameters mixers mark ``_no_reinit``), which transformers' generic init would overwrite."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The token embedding (tied with the head): what peft and resize_token_embeddings look for."""
        return self.lm.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.lm.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """``generate`` must not build a DynamicCache (KV tensors only): ``forward`` builds an LmscaleCache."""
        return False

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Tensor | None = None,
        cache: LmscaleCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids`` continuing from ``cache`` (None: from the start), the loss if ``labels``.

        With ``use_cache`` (default: ``config.use_cache`` outside training) the output carries the cache
        after these tokens; a given cache is updated in place. One new token runs ``LanguageModel.step``.
        ``num_items_in_batch`` (from Trainer) makes the loss a sum over that many targets, so gradient
        accumulation averages over tokens rather than over micro-batches.
        """
        _reject_padding(attention_mask)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = LmscaleCache()
        if cache is None:
            logits = self.lm(input_ids)
        elif cache.states is not None and input_ids.shape[1] == 1:
            logits_t, states = self.lm.step(input_ids[:, 0], cache.states)
            logits = logits_t.unsqueeze(1)  # (B, 1, V)
            cache.update_states(states, 1)
        else:
            logits, states = self.lm(input_ids, state=cache.states, return_state=True)
            cache.update_states(states, input_ids.shape[1])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


AutoConfig.register(LmscaleConfig.model_type, LmscaleConfig, exist_ok=True)
AutoModelForCausalLM.register(LmscaleConfig, LmscaleForCausalLM, exist_ok=True)
