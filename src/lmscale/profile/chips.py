"""On-chip fit: does a model's weights and decode state fit in a neuromorphic chip's memory, or in how many chips?

A neuromorphic or dataflow chip keeps weights and state beside its cores; there is no DRAM to stream
them from (NorthPole has none; SpiNNaker 2 has one LPDDR4 package for the whole chip, which this
table leaves out: using it gives up the on-chip design's point). So the question is capacity. The
published capacities come in two kinds of unit, and each chip is compared in its own:

- bytes of on-chip SRAM (NorthPole, SpiNNaker 2): weights at ``weight_bits`` plus the state at
  ``state_bits`` must fit in the sum;
- synapses and neurons (Loihi 2): each weight is one synapse, each state entry one neuron's variable.

Every capacity is the vendor's or paper's headline figure, cited; a real mapping loses some of it to
code, routing tables and fragmentation, so the counts here are lower bounds on the chips needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    """One chip's published on-chip capacity: ``sram_bytes``, or ``synapses`` and ``neurons``."""

    name: str
    citation: str  # key in book/references.bib
    spec: str  # the published figures, in the source's words
    sram_bytes: float | None = None
    synapses: float | None = None
    neurons: float | None = None

    def chips_needed(self, weights: float, state_entries: float, weight_bits: int, state_bits: int) -> float:
        """How many chips hold ``weights`` parameters and ``state_entries`` state values (fractional)."""
        if self.sram_bytes is not None:
            return (weights * weight_bits + state_entries * state_bits) / 8 / self.sram_bytes
        return max(weights / self.synapses, state_entries / self.neurons)


CHIPS = (
    Chip("Loihi 2", "intel2021loihi2",
         "128 neuro cores; up to 1 million neurons and 120 million synapses per chip",
         synapses=120e6, neurons=1e6),
    Chip("SpiNNaker 2", "spinnaker2datasheet",
         "152 ARM Cortex-M4F processing elements, each with 128 KB of local code and data memory",
         sram_bytes=152 * 128 * 1024),
    Chip("NorthPole", "modha2023northpole", "256 cores, 224 MB of on-chip memory, no off-chip memory",
         sram_bytes=224e6),
)


def fit_table(op_mix, weight_bits: int = 8, state_bits: int = 16):
    """For each row of ``lmscale.profile.opmix.op_mix_table`` and each chip: the chips the whole model
    needs, and whether one layer fits on one chip (``layer_fits``).

    Weights and state are counted from the table's bytes at its own dtype (``weight_bytes``,
    ``state_bytes``) and re-priced at ``weight_bits`` and ``state_bits``.
    """
    import pandas as pd

    rows = []
    for _, r in op_mix.iterrows():
        itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[r["dtype"]]
        weights, state = r["weight_bytes"] / itemsize, r["state_bytes"] / itemsize
        layers = r["n_layers"]
        layer_weights = (r["weight_bytes"] - r["embedding_bytes"]) / itemsize / layers
        for chip in CHIPS:
            whole = chip.chips_needed(weights, state, weight_bits, state_bits)
            layer = chip.chips_needed(layer_weights, state / layers, weight_bits, state_bits)
            rows.append({"mixer": r["mixer"], "preset": r["preset"], "context_len": r["context_len"],
                         "chip": chip.name, "weight_bits": weight_bits, "state_bits": state_bits,
                         "chips_needed": whole, "whole_chips": math.ceil(whole), "layer_fits": layer <= 1,
                         "citation": chip.citation})
    return pd.DataFrame(rows)
