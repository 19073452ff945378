"""The mixer contract: what every sequence mixer promises the model, the profiler and the tests."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmscale.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Cost:
    """Analytic forward cost of one sequence, predicted before anything is measured.

    flops: matmul FLOPs (2·m·n·k per product); elementwise work (norms, gates, softmax, decays) is
        lower order and left out. Causal products count only the pairs (t, s ≤ t) that are needed.
    bytes: every weight once plus the inputs and outputs of each projection and of the core op once,
        as a fused kernel would move them (no T×T matrix in memory): a lower bound on traffic.
    """

    flops: int
    bytes: int


def is_positive_int(value: object) -> bool:
    """An int > 0 that is not a bool (``True`` is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Option:
    """One mixer option: its default, a validity check, and the allowed values in words for errors."""

    default: Any
    allowed: str
    is_valid: Callable[[Any], bool]
    choices: tuple[Any, ...] = ()

    @classmethod
    def choice(cls, default: Any, choices: tuple[Any, ...]) -> Option:
        """An option that takes one of a fixed set of values."""
        words = ", ".join(repr(c) for c in choices)
        return cls(default, f"one of {words}", lambda value: value in choices, tuple(choices))


MIXERS: dict[str, type[Mixer]] = {}


def register(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator that makes a mixer buildable as ``ModelConfig(mixer=name)``."""

    def add(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"mixer name {name!r} is already registered by {MIXERS[name].__qualname__}")
        cls.mixer_name = name
        MIXERS[name] = cls
        return cls

    return add


class Mixer(nn.Module, abc.ABC):
    """Causal sequence mixer [B, T, D] -> [B, T, D] whose state makes decoding incremental.

    Subclasses are built as ``cls(cfg, layer_idx)``, declare their ``options`` (read from
    ``cfg.mixer_options``), and name their projection back into the residual stream ``o_proj`` so the
    model can scale its initialisation GPT-2 style.
    """

    mixer_name: ClassVar[str]
    family: ClassVar[str]  # e.g. "softmax attention", "gated linear recurrence", "diagonal SSM"
    paper: ClassVar[str]  # bibliography key of the paper the mixer follows (book/references.bib)
    options: ClassVar[dict[str, Option]] = {}
    # the option choosing between implementations that must agree (e.g. "form"), if there are several
    forms_option: ClassVar[str | None] = None

    @classmethod
    def read_options(cls, cfg: ModelConfig) -> dict[str, Any]:
        """Defaults overlaid with ``cfg.mixer_options``; unknown keys and invalid values raise ConfigError."""
        resolved = {key: option.default for key, option in cls.options.items()}
        for key, value in cfg.mixer_options.items():
            field_name = f"mixer_options[{key!r}]"
            if key not in cls.options:
                valid = ", ".join(sorted(cls.options)) or "none"
                raise ConfigError(field_name, value, f"unknown option for mixer {cls.mixer_name!r}; "
                                                     f"valid options: {valid}")
            if not cls.options[key].is_valid(value):
                raise ConfigError(field_name, value, f"must be {cls.options[key].allowed}")
            resolved[key] = value
        return resolved

    @abc.abstractmethod
    def forward(
        self, x: Tensor, state: Any = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, Any]:
        """x [B, T, D] -> y [B, T, D] from ``state`` (None: empty), plus the final state if asked."""

    @abc.abstractmethod
    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One token x_t [B, D] -> (y_t [B, D], new state).

        The given state is not modified, except by a state made to be a preallocated buffer (attention's
        static KV cache, the Triton step kernels' float32 state): that one is updated in place and
        returned, so that a CUDA graph can replay the step. Callers use the returned state either way."""

    @abc.abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        """The state before any token: zeros for a recurrence, an empty cache for attention."""

    @abc.abstractmethod
    def state_bytes(self, context_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of decoding state for one sequence after ``context_len`` tokens, in this one layer."""

    @abc.abstractmethod
    def cost(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Analytic forward cost of one sequence of ``seq_len`` tokens through this layer (see Cost)."""

    @abc.abstractmethod
    def step_cost(self, context_len: int, dtype: torch.dtype = torch.float32) -> Cost:
        """Analytic cost of decoding one token after ``context_len`` tokens (see Cost): the O(1)-versus-O(T) question."""

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of this mixer's parameters stored in ``dtype``."""
        return sum(p.numel() for p in self.parameters()) * dtype.itemsize
