"""Configuration dataclasses, validated early so an impossible config fails before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config field that cannot work; the message names the field, the value and the fix."""

    def __init__(self, field_name: str, value: Any, why: str):
        self.field = field_name
        self.value = value
        super().__init__(f"config field '{field_name}'={value!r}: {why}")


@dataclass
class ModelConfig:
    """Shape of a GPT-style language model: pre-norm blocks of (mixer, GLU MLP), tied embeddings."""

    mixer: str = "attention"
    vocab_size: int = 50257
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * d_model, rounded up to mlp_multiple
    mlp_multiple: int = 32
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mixer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "mlp_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                "d_model",
                self.d_model,
                f"must be divisible by n_heads={self.n_heads} (each head gets d_model / n_heads channels)",
            )
        if self.mlp_ratio <= 0:
            raise ConfigError("mlp_ratio", self.mlp_ratio, "must be positive")
        if not isinstance(self.mixer_options, dict):
            raise ConfigError("mixer_options", self.mixer_options, "must be a dict of mixer keyword options")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        raw = int(self.mlp_ratio * self.d_model)
        return -(-raw // self.mlp_multiple) * self.mlp_multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"unknown model field; valid fields: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainConfig:
    """One training run: optimiser, schedule, batch geometry, evaluation and checkpoint cadence."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: checkpoint only at the end
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        for name in ("warmup_steps", "checkpoint_interval", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(name, value, "must be a non-negative integer")
        if self.warmup_steps >= self.steps:
            raise ConfigError("warmup_steps", self.warmup_steps, f"must be smaller than steps={self.steps}")
        if not self.lr > 0:
            raise ConfigError("lr", self.lr, "must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be non-negative")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", self.grad_clip, "must be non-negative (0 disables clipping)")
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"):
            raise ConfigError("device", self.device, "must be 'cpu', 'cuda', 'cuda:N' or 'mps'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"unknown training field; valid fields: {sorted(known)}")
        return cls(**d)
