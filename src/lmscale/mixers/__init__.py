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
    """A mixer name (``cfg.mixer`` or an entry of ``cfg.layers``) that is not registered; the message
    lists the registered ones and suggests the closest."""

    def __init__(self, name: str, field_name: str = "mixer"):
        why = f"unknown mixer; valid mixers: {', '.join(available())}"
        close = difflib.get_close_matches(name, available(), n=1)
        if close:
            why += f". Did you mean {close[0]!r}?"
        super().__init__(field_name, name, why)


def available() -> list[str]:
    """Names of all registered mixers, sorted."""
    return sorted(MIXERS)


def build_mixer(cfg: ModelConfig, layer_idx: int) -> Mixer:
    """The mixer for block ``layer_idx`` of a model shaped by ``cfg``, hybrid or not.

    The mixer is built from ``cfg.layer_config(layer_idx)``: a single-mixer view holding only its own
    options. In a hybrid, its config errors are re-raised naming the hybrid's field and the layer.
    """
    layer_cfg = cfg.layer_config(layer_idx)
    if layer_cfg.mixer not in MIXERS:
        raise UnknownMixerError(layer_cfg.mixer, cfg.layer_field(layer_idx))
    try:
        return MIXERS[layer_cfg.mixer](layer_cfg, layer_idx)
    except ConfigError as e:
        if len(cfg.mixer_names) == 1:
            raise
        raise _in_hybrid(e, layer_cfg.mixer, layer_idx) from e


def _in_hybrid(error: ConfigError, name: str, layer_idx: int) -> ConfigError:
    """``error`` from one layer's view, restated for the hybrid config the user wrote."""
    why = str(error).removeprefix(f"config field '{error.field}'={error.value!r}: ")
    field_name = error.field
    if field_name.startswith("mixer_options["):  # the view's options are the hybrid's options[name]
        field_name = f"mixer_options[{name!r}]" + field_name.removeprefix("mixer_options")
    return ConfigError(field_name, error.value, f"{why} (mixer {name!r} of layer {layer_idx})")
