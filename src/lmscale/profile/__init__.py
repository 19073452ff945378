"""The analytic cost model: what each mixer costs in state, decode and training, before measuring."""

from lmscale.profile.mixer_table import TRAINING_FLOPS_FACTOR, format_mixer_table, mixer_table

__all__ = ["TRAINING_FLOPS_FACTOR", "format_mixer_table", "mixer_table"]
