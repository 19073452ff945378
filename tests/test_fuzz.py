"""Fuzzed inputs (hypothesis): any config, sweep spec or record either works or is refused with an error
that names the field — never another exception, never a partial record."""

from __future__ import annotations

import dataclasses
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmscale.config import ConfigError, ModelConfig, TrainConfig
from lmscale.mixers import available
from lmscale.model import LanguageModel
from lmscale.results import RecordError, validate_record
from lmscale.sweep import expand, parse_spec

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=8), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                         st.integers(), max_size=2))


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _refused_by_name(error: ConfigError, names: list[str]) -> bool:
    """The error names a field of the config (or an option inside one)."""
    return any(error.field == name or str(error.field).startswith(f"{name}[") for name in names)


@FUZZ
@given(st.dictionaries(st.sampled_from(_fields(ModelConfig)), ANY, max_size=4),
       st.sampled_from(available()))
def test_model_configs_build_or_name_the_field(fields, mixer):
    fields = {"mixer": mixer, "vocab_size": 64, "max_seq_len": 32, **fields}
    if isinstance(fields.get("d_model"), int) and not isinstance(fields["d_model"], bool):
        fields["d_model"] = min(fields["d_model"], 128)  # keep the meta build small, not the value range
    if isinstance(fields.get("n_layers"), int) and not isinstance(fields["n_layers"], bool):
        fields["n_layers"] = min(fields["n_layers"], 4)
    try:
        cfg = ModelConfig(**fields)
        with torch.device("meta"):
            LanguageModel(cfg)
    except ConfigError as e:
        assert _refused_by_name(e, _fields(ModelConfig)) or e.field.startswith("mixer_options"), e


@FUZZ
@given(st.dictionaries(st.sampled_from(_fields(TrainConfig)), ANY, max_size=4))
def test_train_configs_work_or_name_the_field(fields):
    try:
        TrainConfig(**fields)
    except ConfigError as e:
        assert _refused_by_name(e, _fields(TrainConfig)), e


SPEC_VALUES = st.one_of(ANY, st.lists(ANY, max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(["experiment", "runner", "fixed", "grid", "cases", "extra"]),
                       st.one_of(SPEC_VALUES, st.dictionaries(st.sampled_from(["mixer", "d_model", "steps", "lr",
                                                                               "seed", "warmup_steps", "bogus"]),
                                                              SPEC_VALUES, max_size=3)), max_size=5))
def test_sweep_specs_expand_or_name_the_key(data):
    data = {"experiment": "fuzz", **data}
    try:
        expand(parse_spec(data))
    except (ConfigError, RecordError) as e:
        assert str(e)


@FUZZ
@given(st.recursive(ANY, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                 st.dictionaries(st.sampled_from(["schema", "experiment", "run_id",
                                                                                  "kind", "status", "config", "seed",
                                                                                  "metrics", "provenance", "curves"]),
                                                                 inner, max_size=6)), max_leaves=12))
def test_records_validate_or_say_what_is_wrong(record):
    try:
        validate_record(json.loads(json.dumps(record, default=str)), "fuzzed record")
    except RecordError as e:
        assert "fuzzed record" in str(e)
