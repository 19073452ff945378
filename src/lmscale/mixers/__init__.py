"""Sequence mixers by name: ``build_mixer(cfg, layer_idx)`` returns the one ``cfg.mixer`` names.

Every module in this package is imported here, so a new mixer file registers itself by existing.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from lmscale.config import ConfigError, ModelConfig
from lmscale.mixers.base import MIXERS, Cost, Mixer, Option, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Cost", "Mixer", "Option", "UnknownMixerError", "available", "build_mixer", "register"]


class UnknownMixerError(ConfigError):
    """``cfg.mixer`` names no registered mixer; the message lists them and suggests the closest."""

    def __init__(self, name: str):
        why = f"unknown mixer; valid mixers: {', '.join(available())}"
        close = difflib.get_close_matches(name, available(), n=1)
        if close:
            why += f". Did you mean {close[0]!r}?"
        super().__init__("mixer", name, why)


def available() -> list[str]:
    """Names of all registered mixers, sorted."""
    return sorted(MIXERS)


def build_mixer(cfg: ModelConfig, layer_idx: int) -> Mixer:
    """The mixer for block ``layer_idx`` of a model shaped by ``cfg``."""
    if cfg.mixer not in MIXERS:
        raise UnknownMixerError(cfg.mixer)
    return MIXERS[cfg.mixer](cfg, layer_idx)
