"""Named model sizes, matched in parameter count across mixers, so a comparison compares mixers, not sizes.

Every preset fixes the shape (d_model, n_layers, n_heads) for all mixers; mixers differ only in the
width of the SwiGLU MLP. That width is solved per mixer so its non-embedding parameter count lands
within ``TOLERANCE`` (±5%) of the softmax-attention model of the same preset: a mixer with more
parameters per layer gets a narrower MLP, one with fewer a wider MLP. Depth and width never change,
so every mixer at a preset sees the same residual stream and the same number of layers.

125M, 350M, 760M and 1.3B are the shapes of Table 2.1 of Brown et al. (2020), GPT-3 Small … XL
(Pythia 160M, 410M and 1.4B share three of them). GPT-3 XL lists 24 heads of 128 channels, which
cannot tile d_model = 2048; the preset takes Pythia-1.4B's 16 heads of 128. "50M" takes Pythia-70M's
width (512, 8 heads of 64, as in 125M and 350M) with 8 layers instead of 6: our
embedding is tied, so Pythia's separate 25.7M-parameter output matrix is gone, and 8 layers give
≈51M in all, half of it outside the embedding. "tiny" and "small-cpu" train in seconds to minutes on
a laptop; they round the MLP to multiples of 8, not 32, because one 32-wide step is 11% of tiny's
non-embedding parameters and alignment buys nothing on a CPU. All presets use GPT-2's vocabulary
(50257), the one the corpus is tokenized with.

Parameter counts come from building the real model on PyTorch's meta device (shapes, no memory), so
the 1.3B preset costs nothing to count. Solved widths are memoised on the config's JSON: a preset and
its overrides always give the same config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from lmscale.config import HYBRID_ATTENTION, ConfigError, ModelConfig
from lmscale.mixers import UnknownMixerError, available
from lmscale.model import LanguageModel
from lmscale.scaling import format_count

TOLERANCE = 0.05  # non-embedding parameters within ±5% of the attention model of the same preset
GPT2_VOCAB = 50257


@dataclass(frozen=True)
class Shape:
    """What a preset fixes for every mixer; the MLP width is solved per mixer."""

    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    mlp_multiple: int


_SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 2, 2, max_seq_len=1024, mlp_multiple=8),
    "small-cpu": Shape(128, 4, 4, max_seq_len=1024, mlp_multiple=8),
    "11M": Shape(192, 4, 3, max_seq_len=2048, mlp_multiple=32),
    "18M": Shape(256, 6, 4, max_seq_len=2048, mlp_multiple=32),
    "34M": Shape(384, 8, 6, max_seq_len=2048, mlp_multiple=32),
    "50M": Shape(512, 8, 8, max_seq_len=2048, mlp_multiple=32),
    "81M": Shape(640, 10, 10, max_seq_len=2048, mlp_multiple=32),
    "125M": Shape(768, 12, 12, max_seq_len=2048, mlp_multiple=32),
    "350M": Shape(1024, 24, 16, max_seq_len=2048, mlp_multiple=32),
    "760M": Shape(1536, 24, 16, max_seq_len=2048, mlp_multiple=32),
    "1.3B": Shape(2048, 24, 16, max_seq_len=2048, mlp_multiple=32),
}
PRESETS: tuple[str, ...] = tuple(_SHAPES)  # smallest first


def _jamba(preset_name: str, shape: Shape) -> dict[str, Any]:
    """Jamba's layout (Lieber et al. 2024, the released model's config): groups of eight layers, each
    Mamba except one attention layer at offset 4 (1:7), and a 16-expert top-2 mixture of experts in
    every other layer (layers 1, 3, 5, …), its load-balancing loss weighted 0.001."""
    period, offset = 8, 4
    if shape.n_layers % period:
        fits = [p for p, s in _SHAPES.items() if s.n_layers % period == 0]
        raise ConfigError("preset", preset_name, f"has {shape.n_layers} layers; Jamba's 1:7 attention pattern tiles "
                                                 f"groups of {period}, so use one of {', '.join(fits)}")
    return {"mixer": "jamba", "layers": ["attention" if i % period == offset else "mamba" for i in range(shape.n_layers)],
            "moe_experts": 16, "moe_top_k": 2, "moe_every": 2, "moe_aux_loss_coef": 1e-3}


# architectures that are more than one mixer: a name usable wherever a preset takes a mixer
ARCHITECTURES = {"jamba": _jamba}

TABLE_COLUMNS = ("preset", "mixer", "d_model", "n_layers", "n_heads", "d_hidden", "params",
                 "non_embedding_params", "ratio_to_attention", "total_params", "note")


def _unknown_preset(name: str) -> ConfigError:
    why = f"unknown preset; valid presets: {', '.join(PRESETS)}"
    lowered = {p.lower(): p for p in PRESETS}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1)
    if close:
        why += f". Did you mean {lowered[close[0]]!r}?"
    return ConfigError("preset", name, why)


def _key(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


class _ShapesOnly(LanguageModel):
    """The language model without its weight initialisation: counting reads shapes, never values,
    and initialising 1.3B meta parameters costs most of the build."""

    def _init_weights(self) -> None:
        pass


@functools.cache
def _counts(key: str, active: bool) -> tuple[int, int]:
    cfg = ModelConfig.from_dict(json.loads(key))
    with torch.device("meta"):
        model = _ShapesOnly(cfg)
    return model.num_params(active=active), model.num_params(non_embedding=True, active=active)


def param_counts(cfg: ModelConfig, active: bool = False) -> tuple[int, int]:
    """(total, non-embedding) parameters of ``cfg``'s model, the tied embedding counted once; no memory used.
    ``active``: of each mixture of experts, only the ``moe_top_k`` experts a token uses."""
    return _counts(_key(cfg), active)


def _attention_reference(cfg: ModelConfig) -> ModelConfig:
    """The plain softmax-attention model with ``cfg``'s shape: what every mixer is matched to."""
    defaults = ModelConfig()
    return dataclasses.replace(cfg, mixer=HYBRID_ATTENTION, mixer_options={}, layers=None,
                               attention_every=None, mlp_ratio=defaults.mlp_ratio, moe_experts=0)


@functools.cache
def _solved_hidden(key: str) -> int:
    """SwiGLU width that brings the model ``key`` to its attention reference's non-embedding count.

    Non-embedding parameters are linear in the MLP width h: P(h) = P_rest + 3·d_model·n_layers·h (gate,
    up and down projections, no biases). One meta build gives P_rest; h is solved and rounded to the
    config's ``mlp_multiple``. A mixture-of-experts model is matched on its active parameters (the
    ``moe_top_k`` experts a token uses, each of width h), as Mixtral and Jamba are compared.
    """
    cfg = ModelConfig.from_dict(json.loads(key))
    target = param_counts(_attention_reference(cfg))[1]
    mlps_per_token = cfg.n_layers - cfg.moe_layers + cfg.moe_top_k * cfg.moe_layers
    per_unit = 3 * cfg.d_model * mlps_per_token
    rest = param_counts(cfg, active=True)[1] - per_unit * cfg.d_hidden
    multiple = cfg.mlp_multiple
    hidden = max(multiple, math.floor((target - rest) / per_unit / multiple + 0.5) * multiple)
    ratio = (rest + per_unit * hidden) / target
    if abs(ratio - 1) > TOLERANCE:
        layer_budget = (target - cfg.d_model) / cfg.n_layers  # per block, final norm left out
        raise ConfigError(
            "mixer", cfg.mixer,
            f"cannot be matched to attention at d_model={cfg.d_model}, n_layers={cfg.n_layers}: with the "
            f"SwiGLU width solved to d_hidden={hidden} it has {ratio:.1%} of attention's non-embedding "
            f"parameters (allowed {1 - TOLERANCE:.0%}–{1 + TOLERANCE:.0%}); each block holds ≈"
            f"{rest / cfg.n_layers:,.0f} parameters outside its MLP, a whole attention block "
            f"{layer_budget:,.0f}. Use smaller mixer_options, or pass mlp_ratio to take it unmatched")
    return hidden


def _ratio_for(hidden: int, d_model: int) -> float:
    """An mlp_ratio whose ``ModelConfig.d_hidden`` is exactly ``hidden`` despite float rounding."""
    ratio = hidden / d_model
    return ratio if int(ratio * d_model) == hidden else math.nextafter(ratio, math.inf)


def preset(name: str, mixer: str, **overrides: Any) -> ModelConfig:
    """The ``mixer`` model of preset ``name``, its MLP width solved to match attention's parameter count.
    ``mixer`` may also name an architecture of ``ARCHITECTURES`` (``jamba``).

    ``overrides`` set any other ModelConfig field (e.g. ``vocab_size``, ``max_seq_len``,
    ``mixer_options``, ``attention_every``); the MLP is then solved for the overridden config against
    attention at the same shape. Passing ``mlp_ratio`` skips the solve. A mixer that cannot come within
    ±5% raises ConfigError saying how far off it is.
    """
    if name not in _SHAPES:
        raise _unknown_preset(name)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for field_name, value in overrides.items():
        if field_name not in known:
            raise ConfigError(field_name, value, f"unknown model field; valid fields: {sorted(known - {'mixer'})}")
    recipe = ARCHITECTURES[mixer](name, _SHAPES[name]) if mixer in ARCHITECTURES else {"mixer": mixer}
    fields = {**dataclasses.asdict(_SHAPES[name]), "vocab_size": GPT2_VOCAB, **recipe, **overrides}
    cfg = ModelConfig(**fields)
    for i in range(cfg.n_layers):  # an unknown mixer fails here, naming the registered ones
        if cfg.mixer_for_layer(i) not in available():
            raise UnknownMixerError(cfg.mixer_for_layer(i), cfg.layer_field(i))
    if "mlp_ratio" in overrides:
        return cfg
    return dataclasses.replace(cfg, mlp_ratio=_ratio_for(_solved_hidden(_key(cfg)), cfg.d_model))


def preset_table(mixers: list[str] | None = None, presets: list[str] | None = None) -> pd.DataFrame:
    """One row per (preset, mixer): shape, solved ``d_hidden``, total and non-embedding parameters;
    ``mixers`` and ``presets`` (default: all) choose the rows.

    ``ratio_to_attention`` is the non-embedding count over attention's at the same preset (the matched
    quantity; the total ratio is closer still, the embedding being the same). A mixture-of-experts
    model counts its active parameters there, and all of them in ``total_params``. A mixer that cannot
    be matched at a preset keeps its row with NaN counts and the reason in ``note``.
    """
    names = available() if mixers is None else list(mixers)
    for name in names:
        if name not in available() and name not in ARCHITECTURES:
            raise UnknownMixerError(name)
    for name in presets or []:
        if name not in _SHAPES:
            raise _unknown_preset(name)
    rows = []
    for preset_name in [p for p in PRESETS if presets is None or p in presets]:
        reference = param_counts(preset(preset_name, HYBRID_ATTENTION))[1]
        for name in names:
            shape = _SHAPES[preset_name]
            row = {"preset": preset_name, "mixer": name, "d_model": shape.d_model,
                   "n_layers": shape.n_layers, "n_heads": shape.n_heads, "note": ""}
            try:
                cfg = preset(preset_name, name)
            except ConfigError as e:
                rows.append({**row, "d_hidden": math.nan, "params": math.nan,
                             "non_embedding_params": math.nan, "ratio_to_attention": math.nan,
                             "total_params": math.nan, "note": str(e)})
                continue
            total, non_embedding = param_counts(cfg, active=True)
            rows.append({**row, "d_hidden": cfg.d_hidden, "params": total,
                         "non_embedding_params": non_embedding,
                         "ratio_to_attention": non_embedding / reference, "total_params": param_counts(cfg)[0]})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def format_preset_table(table: pd.DataFrame) -> str:
    """The table as text, parameter counts with K/M/B suffixes, under a line saying what was matched."""
    shown = table.copy()
    for column in ("params", "non_embedding_params", "total_params"):
        shown[column] = table[column].map(lambda v: "—" if math.isnan(v) else format_count(v))
    if (table["total_params"].fillna(0) == table["params"].fillna(0)).all():  # no mixture of experts
        shown = shown.drop(columns="total_params")
    shown["d_hidden"] = table["d_hidden"].map(lambda v: "—" if math.isnan(v) else f"{v:.0f}")
    shown["ratio_to_attention"] = table["ratio_to_attention"].map(lambda v: "—" if math.isnan(v) else f"{v:.3f}")
    if not shown["note"].astype(bool).any():
        shown = shown.drop(columns="note")
    header = (f"vocab {GPT2_VOCAB}, tied embedding; SwiGLU width d_hidden solved per mixer so non-embedding "
              f"parameters are within ±{TOLERANCE:.0%} of attention's (ratio_to_attention)")
    return header + "\n" + shown.to_string(index=False)
