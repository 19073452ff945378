"""The energy tables price what their sources print: FLOPs at (multiply + add) / 2, DRAM per 64-bit access."""

import pytest

from lmscale.profile.energy import (
    HOROWITZ_45NM,
    HOROWITZ_45NM_INT8,
    JOUPPI_7NM,
    JOUPPI_7NM_INT8,
    TABLES,
    chip_energy,
)


@pytest.mark.parametrize(("table", "dtype", "joules"), [
    (HOROWITZ_45NM, "float32", (3.7 + 0.9) / 2), (HOROWITZ_45NM, "bfloat16", (1.1 + 0.4) / 2),
    (JOUPPI_7NM, "float32", (1.31 + 0.38) / 2), (JOUPPI_7NM, "bfloat16", (0.21 + 0.11) / 2),
])
def test_a_teraflop_costs_the_mean_of_multiply_and_add(table, dtype, joules):
    est = table.estimate(1e12, 0.0, dtype)
    assert est["joules_low"] == pytest.approx(joules) and est["joules_high"] == pytest.approx(joules)
    assert est["arithmetic_share_low"] == 1.0


@pytest.mark.parametrize(("table", "low", "high"), [(HOROWITZ_45NM, 1.3, 2.6), (JOUPPI_7NM, 0.25, 0.45)])
def test_a_billion_64_bit_accesses_cost_the_source_range(table, low, high):
    est = table.estimate(0.0, 8e9, "float32")  # 8 GB = 1e9 accesses of 64 bits
    assert (est["joules_low"], est["joules_high"]) == (pytest.approx(low), pytest.approx(high))


def test_every_table_prices_the_dtypes_the_benchmark_measures_and_refuses_others():
    for table in TABLES:
        assert {"float32", "bfloat16"} <= set(table.pj_per_flop)
        with pytest.raises(ValueError, match=f"{table.name}.*int4"):
            table.estimate(1.0, 1.0, "int4")


@pytest.mark.parametrize(("table", "mac_pj", "sram_pj_per_64_bits"), [(HOROWITZ_45NM_INT8, 0.2 + 0.1, 10.0),
                                                                     (JOUPPI_7NM_INT8, 0.07 + 0.03, 7.5)])
def test_chip_energy_prices_each_mac_as_an_int8_multiply_and_an_int32_add(table, mac_pj, sram_pj_per_64_bits):
    assert chip_energy(1e6, 0, 0, 0, table) == pytest.approx(1e6 * mac_pj * 1e-12)
    assert chip_energy(0, 1e6, 1e6, 0, table) == pytest.approx(1e6 * mac_pj * 1e-12)
    assert chip_energy(0, 0, 0, 8e6, table) == pytest.approx(1e6 * sram_pj_per_64_bits * 1e-12)
