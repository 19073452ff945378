"""Energy predicted from arithmetic and memory traffic, with per-operation energies from the literature.

A model's energy per token is, to first order, its FLOPs times the energy of one floating-point
operation plus its bytes moved from DRAM times the energy of one byte's access: the same two counts
the roofline uses for time (``lmscale.bench.inference``). Each table below is one published source;
each row says where its number comes from, and a row's range (low, high) is the source's own range.

What such an estimate leaves out, and why it is a lower bound on a real chip's energy: on-chip SRAM
and register traffic, the instruction fetch and control around every operation (on a general-purpose
core far costlier than the operation itself, Horowitz's point), static power, and the host. A measured energy well above the estimate is expected, and how far above
says how much of the chip's energy goes to anything but arithmetic and DRAM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnergyTable:
    """Picojoules per floating-point operation by dtype, and per byte read or written from DRAM."""

    name: str
    citation: str  # key in book/references.bib
    pj_per_flop: dict[str, tuple[float, float]]
    pj_per_dram_byte: tuple[float, float]
    rows: tuple[str, ...]  # what each number is, in the source's own terms
    devices: tuple[str, ...] = ("cpu", "cuda")  # whose memory its DRAM row prices

    def estimate(self, flops: float, dram_bytes: float, dtype: str) -> dict[str, float]:
        """Joules (low, high) for ``flops`` operations in ``dtype`` and ``dram_bytes`` of DRAM traffic."""
        if dtype not in self.pj_per_flop:
            raise ValueError(f"the {self.name} table has no arithmetic energy for {dtype}; it has "
                             f"{', '.join(sorted(self.pj_per_flop))}")
        (f_lo, f_hi), (m_lo, m_hi) = self.pj_per_flop[dtype], self.pj_per_dram_byte
        return {"joules_low": 1e-12 * (flops * f_lo + dram_bytes * m_lo),
                "joules_high": 1e-12 * (flops * f_hi + dram_bytes * m_hi),
                "arithmetic_share_low": flops * f_lo / (flops * f_lo + dram_bytes * m_lo)}


# One multiply–accumulate is two FLOPs: a multiply and an add, so a FLOP costs (multiply + add) / 2.
# bfloat16 is priced as the source's 16-bit float (the multiplier of bf16 is smaller than fp16's: an
# upper bound on its arithmetic).
HOROWITZ_45NM = EnergyTable(
    name="Horowitz 2014, 45 nm",
    citation="horowitz2014energy",
    pj_per_flop={"float32": ((3.7 + 0.9) / 2,) * 2, "bfloat16": ((1.1 + 0.4) / 2,) * 2},
    pj_per_dram_byte=(1300 / 8, 2600 / 8),
    rows=("32-bit float multiply 3.7 pJ, add 0.9 pJ",
          "16-bit float multiply 1.1 pJ, add 0.4 pJ",
          "DRAM, one 64-bit access 1.3–2.6 nJ"),
)

# Jouppi et al. 2021, Table 2, "Energy per Operation: 45 nm vs 7 nm" (memory in pJ per 64-bit access). Its
# footnote 2: the DRAM rows count only the I/O energy, so the DRAM term is lower still than Horowitz's.
# HBM2 is the row for a GPU's memory (an H100 has HBM3; the paper has no HBM3 row).
JOUPPI_7NM = EnergyTable(
    name="Jouppi et al. 2021, 7 nm, HBM2",
    citation="jouppi2021tenlessons",
    pj_per_flop={"float32": ((1.31 + 0.38) / 2,) * 2, "bfloat16": ((0.21 + 0.11) / 2,) * 2},
    pj_per_dram_byte=(250 / 8, 450 / 8),
    rows=("32-bit float multiply 1.31 pJ, add 0.38 pJ",
          "bfloat16 multiply 0.21 pJ, add 0.11 pJ",
          "HBM2, one 64-bit access 250–450 pJ (I/O only; DDR3/4: 1.3 nJ)"),
    devices=("cuda",),  # a CPU's DDR memory is the 1.3 nJ row, Horowitz's low end: nothing new there
)

TABLES = (HOROWITZ_45NM, JOUPPI_7NM)


@dataclass(frozen=True)
class IntegerTable:
    """Picojoules per integer operation and per byte of on-chip SRAM read: what a chip that keeps
    weights and state beside its cores (NorthPole, Loihi 2, SpiNNaker 2) pays instead of DRAM."""

    name: str
    citation: str
    pj_multiply: float  # one 8-bit integer multiply
    pj_accumulate: float  # one 32-bit integer add: products are summed in a wide accumulator
    pj_sram_byte: float
    rows: tuple[str, ...]


HOROWITZ_45NM_INT8 = IntegerTable(
    name="Horowitz 2014, 45 nm, int8 operands",
    citation="horowitz2014energy",
    pj_multiply=0.2,
    pj_accumulate=0.1,
    pj_sram_byte=10 / 8,
    rows=("8-bit integer multiply 0.2 pJ", "32-bit integer add 0.1 pJ",
          "SRAM (8 KB array), one 64-bit read 10 pJ"),
)


JOUPPI_7NM_INT8 = IntegerTable(
    name="Jouppi et al. 2021, 7 nm, int8 operands",
    citation="jouppi2021tenlessons",
    pj_multiply=0.07,
    pj_accumulate=0.03,
    pj_sram_byte=7.5 / 8,
    rows=("8-bit integer multiply 0.07 pJ", "32-bit integer add 0.03 pJ",
          "SRAM (8 KB), one 64-bit read 7.5 pJ"),
)


def chip_energy(mac: float, multiply: float, add: float, sram_bytes: float, table: IntegerTable = HOROWITZ_45NM_INT8
                ) -> float:
    """Joules for a token's multiply–accumulates, element-wise products and additions in int8 with wide
    accumulators, and its SRAM reads. Exp, division and the like are not priced: the table has no such
    row, so the result is a lower bound for a mixer that needs them."""
    pj = mac * (table.pj_multiply + table.pj_accumulate) + multiply * table.pj_multiply + add * table.pj_accumulate
    return 1e-12 * (pj + sram_bytes * table.pj_sram_byte)
