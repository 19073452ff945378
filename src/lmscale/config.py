"""Configuration dataclasses, validated early so an impossible config fails before any work starts."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config field that cannot work; the message names the field, the value and the fix."""

    def __init__(self, field_name: str, value: Any, why: str):
        self.field = field_name
        self.value = value
        super().__init__(f"config field '{field_name}'={value!r}: {why}")


class _Fields:
    """A config's plain-dict form: what records and checkpoints store, and what reads them back."""

    _KIND = "config"  # named in the error for an unknown field

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"unknown {cls._KIND} field; valid fields: {sorted(known)}")
        return cls(**d)


IGNORE_INDEX = -100  # a target equal to this adds nothing to the loss (as in F.cross_entropy)
HYBRID_ATTENTION = "attention"  # the mixer that ``attention_every`` interleaves
MLP_ACTIVATIONS = ("silu", "relu")  # lmscale.mlp's gate nonlinearities


@dataclass
class ModelConfig(_Fields):
    """Shape of a GPT-style language model: pre-norm blocks of (mixer, GLU MLP), tied embeddings.

    Every layer uses ``mixer`` unless the config declares a hybrid (Jamba style), one of two ways:
    ``layers`` names each layer's mixer explicitly (then ``mixer`` is only the model's name, e.g. "jamba"), or ``attention_every=N``
    makes the last layer of each group of N softmax attention and the others ``mixer`` — layers N−1,
    2N−1, … (0-based), so N=8 is Jamba's 1:7 ratio (Jamba itself puts attention at offset 4 of each
    group; ``layers`` expresses that or any other placement). In a model that mixes several mixers,
    ``mixer_options`` is keyed by mixer name, e.g. ``{"gla": {"form": "chunk"}, "attention":
    {"impl": "math"}}``; each layer's mixer sees only its own options through ``layer_config``.
    """

    _KIND = "model"

    mixer: str = "attention"
    vocab_size: int = 50257
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * d_model, rounded up to mlp_multiple
    mlp_multiple: int = 32
    mlp_activation: str = "silu"  # the MLP's gate: "silu" (SwiGLU) or "relu" (ReGLU: exact zeros, sparse events)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mixer_options: dict[str, Any] = field(default_factory=dict)
    layers: list[str] | None = None  # one mixer name per layer; ``mixer`` is then unused
    attention_every: int | None = None  # layers N−1, 2N−1, … are attention, the others ``mixer``
    # mixture of experts (lmscale.mlp.MoE): 0 experts is the dense SwiGLU everywhere
    moe_experts: int = 0  # SwiGLU experts of width d_hidden in each MoE layer
    moe_top_k: int = 2  # experts per token
    moe_every: int = 1  # layers N−1, 2N−1, … get the MoE (Jamba: 2, every other layer)
    moe_capacity_factor: float | None = None  # None: dropless; c: an expert takes ≤ ⌈c·tokens·k/E⌉
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in training (Switch Transformer)

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):  # a list, so the config survives a JSON round trip unchanged
            self.layers = list(self.layers)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.mixer, str) or not self.mixer:
            raise ConfigError("mixer", self.mixer, "must be a mixer's name, e.g. 'gla' (see `lmscale mixers`)")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "mlp_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        for name in ("mlp_ratio", "rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(name, value, "must be a positive, finite number")
        if self.mlp_ratio * self.d_model >= 2**31:
            raise ConfigError("mlp_ratio", self.mlp_ratio, f"gives an MLP of {self.mlp_ratio * self.d_model:.3g} channels; "
                                                          "a SwiGLU's ratio is about 8/3")
        if self.d_model % self.n_heads:
            raise ConfigError(
                "d_model",
                self.d_model,
                f"must be divisible by n_heads={self.n_heads} (each head gets d_model / n_heads channels)",
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ConfigError("mlp_activation", self.mlp_activation,
                              f"must be one of {', '.join(map(repr, MLP_ACTIVATIONS))}")
        if not isinstance(self.mixer_options, dict):
            raise ConfigError("mixer_options", self.mixer_options, "must be a dict of mixer keyword options")
        self._validate_layer_pattern()
        self._validate_moe()

    def _validate_moe(self) -> None:
        experts = self.moe_experts
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 0:
            raise ConfigError("moe_experts", experts, "must be a non-negative integer (0: dense MLPs)")
        if not experts:
            return
        k = self.moe_top_k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= experts:
            raise ConfigError("moe_top_k", k, f"must be an integer from 1 to moe_experts={experts}")
        every = self.moe_every
        if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= self.n_layers:
            raise ConfigError("moe_every", every, f"must be an integer from 1 (every layer) to n_layers={self.n_layers}")
        c = self.moe_capacity_factor
        if c is not None and (not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) or c <= 0):
            raise ConfigError("moe_capacity_factor", c, "must be None (dropless) or a positive number such as 1.25")
        coef = self.moe_aux_loss_coef
        if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not math.isfinite(coef) or coef < 0:
            raise ConfigError("moe_aux_loss_coef", coef, "must be a non-negative number such as 0.01")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (0-based) has a mixture of experts instead of the dense MLP."""
        return self.moe_experts > 0 and (layer_idx + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def _validate_layer_pattern(self) -> None:
        """Shape of the hybrid pattern; whether each name is a registered mixer is checked at build."""
        if self.layers is not None and self.attention_every is not None:
            raise ConfigError("attention_every", self.attention_every,
                              "give either layers (each layer's mixer by name) or attention_every "
                              "(one attention layer per group), not both")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(isinstance(n, str) for n in self.layers):
                raise ConfigError("layers", self.layers, "must be a list of mixer names, one per layer")
            if len(self.layers) != self.n_layers:
                raise ConfigError("layers", self.layers,
                                  f"has {len(self.layers)} names; needs one per layer, n_layers={self.n_layers}")
        if self.attention_every is not None:
            every = self.attention_every
            if not isinstance(every, int) or isinstance(every, bool) or not 2 <= every <= self.n_layers:
                raise ConfigError("attention_every", every,
                                  f"must be an integer from 2 to n_layers={self.n_layers} (one attention "
                                  "layer per group of that many; 1 would make every layer attention)")
            if self.mixer == HYBRID_ATTENTION:
                raise ConfigError("mixer", self.mixer,
                                  "attention_every interleaves attention with another mixer; name that "
                                  "mixer here (e.g. 'gla')")
        names = self.mixer_names
        if len(names) > 1:
            for name, options in self.mixer_options.items():
                if name not in names:
                    raise ConfigError(f"mixer_options[{name!r}]", options,
                                      f"this model mixes {', '.join(names)}, so mixer_options is keyed by "
                                      f"mixer name, e.g. {{{names[0]!r}: {{...}}}}")
                if not isinstance(options, dict):
                    raise ConfigError(f"mixer_options[{name!r}]", options,
                                      f"must be a dict of {name!r}'s keyword options")

    def mixer_for_layer(self, layer_idx: int) -> str:
        """Name of the mixer in block ``layer_idx`` (0-based)."""
        if not 0 <= layer_idx < self.n_layers:
            raise IndexError(f"layer {layer_idx} of a model with n_layers={self.n_layers}")
        if self.layers is not None:
            return self.layers[layer_idx]
        if self.attention_every is not None and (layer_idx + 1) % self.attention_every == 0:
            return HYBRID_ATTENTION
        return self.mixer

    @property
    def mixer_names(self) -> list[str]:
        """The distinct mixers of the model, in order of first layer; more than one makes a hybrid."""
        return list(dict.fromkeys(self.mixer_for_layer(i) for i in range(self.n_layers)))

    def layer_field(self, layer_idx: int) -> str:
        """The config field that chose layer ``layer_idx``'s mixer, for error messages."""
        if self.layers is not None:
            return f"layers[{layer_idx}]"
        return "attention_every" if self.mixer_for_layer(layer_idx) != self.mixer else "mixer"

    def layer_config(self, layer_idx: int) -> ModelConfig:
        """The single-mixer config that layer ``layer_idx``'s mixer is built from: mixers know no hybrids."""
        name = self.mixer_for_layer(layer_idx)
        options = self.mixer_options.get(name, {}) if len(self.mixer_names) > 1 else self.mixer_options
        return dataclasses.replace(self, mixer=name, mixer_options=dict(options), layers=None,
                                   attention_every=None)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        raw = int(self.mlp_ratio * self.d_model)
        return -(-raw // self.mlp_multiple) * self.mlp_multiple



PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")  # auto: ddp under torchrun (WORLD_SIZE > 1), else none
AUTOCAST_MODES = ("auto", "bf16", "off")  # auto: bf16 on CUDA, off elsewhere
SCHEDULES = ("cosine", "wsd")
QUANTIZE_SCHEMES = ("int8", "w4", "ternary")  # lmscale.quantize.SCHEMES: quantisation-aware training
LOSS_IMPLS = ("auto", "chunked", "liger", "full")  # lmscale.loss.LOSS_IMPLS, kept here so config imports no torch


@dataclass
class TrainConfig(_Fields):
    """One training run: optimiser, schedule, batch geometry, evaluation, checkpoints and scale-out.

    Batch geometry, the same whatever the number of processes: ``batch_size`` sequences of ``seq_len``
    tokens go through one forward/backward (a micro-step; under torchrun each of W processes takes
    batch_size / W of them), and ``grad_accum_steps`` micro-steps make one optimiser step. The global
    batch is therefore ``batch_size × grad_accum_steps`` sequences, ``× seq_len`` tokens per step; more
    processes at the same config give the same run with less memory per device.
    """

    _KIND = "training"

    steps: int = 200
    batch_size: int = 16  # sequences per micro-step, summed over processes
    seq_len: int = 128
    grad_accum_steps: int = 1  # micro-steps per optimiser step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20
    schedule: str = "cosine"  # "cosine": warmup then cosine decay; "wsd": warmup, stable, linear decay
    decay_fraction: float = 0.2  # wsd: share of all steps spent in the final linear decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8  # global batches of fixed validation windows per evaluation
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0: never
    early_stopping_min_delta: float = 0.0  # an improvement lowers the best validation loss by more than this
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: checkpoint only at the end (and on SIGTERM)
    seed: int = 0
    device: str = "cpu"
    autocast: str = "auto"
    compile: bool = False  # torch.compile the model for training
    parallel: str = "auto"
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: the GPU table (none on CPU)
    tensorboard: bool = True  # also write TensorBoard events to out_dir/tensorboard (if installed)
    loss_impl: str = "auto"  # the head's loss without full logits: auto | chunked | liger | full (lmscale.loss)
    activation_checkpointing: bool = False  # keep each block's input only; recompute the block in the backward
    quantize: str = ""  # train through a fake-quantised scheme of lmscale.quantize (e.g. ternary: BitNet b1.58)
    # after training: the loss over whole corpus splits (e.g. validation, test, test_ood) in consecutive
    # seq_len windows, and the loss by position in windows of these lengths inside single test documents
    final_eval: list[str] | None = None
    position_eval_lengths: list[int] | None = None
    final_eval_tokens: int = 0  # at most this many tokens per split and length, evenly spread; 0: all

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "eval_interval", "eval_batches",
                     "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        for name in ("warmup_steps", "checkpoint_interval", "seed", "early_stopping_patience", "final_eval_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(name, value, "must be a non-negative integer")
        for name in ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip",
                     "early_stopping_min_delta", "peak_flops"):
            value = getattr(self, name)
            if value is None and name == "peak_flops":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(name, value, "must be a number")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(name, value, "must be a finite number")
        for name in ("schedule", "device", "autocast", "parallel", "loss_impl"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(name, getattr(self, name), "must be a string")
        if self.warmup_steps >= self.steps:
            raise ConfigError("warmup_steps", self.warmup_steps, f"must be smaller than steps={self.steps}")
        if not self.lr > 0:
            raise ConfigError("lr", self.lr, "must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        self._validate_schedule()
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be non-negative")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", self.grad_clip, "must be non-negative (0 disables clipping)")
        if not self.early_stopping_min_delta >= 0:
            raise ConfigError("early_stopping_min_delta", self.early_stopping_min_delta, "must be non-negative")
        if not (self.device in ("cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError("device", self.device, "must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.quantize not in ("", *QUANTIZE_SCHEMES):
            raise ConfigError("quantize", self.quantize, f"must be empty (float) or one of {', '.join(QUANTIZE_SCHEMES)}")
        for name, choices in (("autocast", AUTOCAST_MODES), ("parallel", PARALLEL_MODES), ("loss_impl", LOSS_IMPLS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, getattr(self, name), f"must be one of {', '.join(map(repr, choices))}")
        for name in ("compile", "tensorboard", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "must be True or False")
        if self.peak_flops is not None and not (
            isinstance(self.peak_flops, (int, float)) and not isinstance(self.peak_flops, bool) and self.peak_flops > 0
        ):
            raise ConfigError("peak_flops", self.peak_flops,
                              "must be the device's peak FLOP/s, a positive number such as 989.4e12, or None")

        self._validate_final_eval()

    def _validate_final_eval(self) -> None:
        splits = self.final_eval or []
        if not isinstance(splits, list) or not all(isinstance(s, str) and s for s in splits):
            raise ConfigError("final_eval", self.final_eval, "must be a list of corpus split names, e.g. "
                                                             "['validation', 'test', 'test_ood']")
        lengths = self.position_eval_lengths or []
        if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 1
                                                    for n in lengths):
            raise ConfigError("position_eval_lengths", self.position_eval_lengths,
                              "must be a list of window lengths above 1, e.g. [1024, 4096]")

    def _validate_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", self.schedule, f"must be one of {', '.join(map(repr, SCHEDULES))}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError("decay_fraction", self.decay_fraction, "must lie in (0, 1], e.g. 0.2 (the last 20% "
                                                                     "of steps decay)")
        if self.schedule == "wsd" and self.warmup_steps + self.decay_steps > self.steps:
            raise ConfigError("decay_fraction", self.decay_fraction,
                              f"wsd's decay takes {self.decay_steps} steps and warmup {self.warmup_steps}, more "
                              f"than steps={self.steps}; lower decay_fraction or warmup_steps")

    @property
    def decay_steps(self) -> int:
        """Steps of the WSD schedule's final linear decay (at least one)."""
        return max(1, round(self.decay_fraction * self.steps))

    @property
    def sequences_per_step(self) -> int:
        """The global batch: sequences per optimiser step, over all micro-steps and processes."""
        return self.batch_size * self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

