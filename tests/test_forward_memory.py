"""The traced forward memory that keeps a CPU benchmark from allocating more than the machine has."""

from __future__ import annotations

import torch

from lmscale.bench.forward_memory import live_bytes_mode, traced_forward_bytes
from lmscale.model import LanguageModel
from lmscale.presets import preset

MIB = 2**20


def test_counts_what_ops_allocate_while_it_lives_and_its_peak():
    with live_bytes_mode() as mode:
        a = torch.ones(256, 1024)  # 1 MiB of float32
        b = a * 2
        del a  # freed: b and c are alive together, never a, b and c
        c = b + 1
        b.add_(1)  # in place: nothing new
        flat = c.view(-1)  # a view: nothing new
        assert mode.live == 2 * MIB
        del b, c, flat
    assert mode.peak == 2 * MIB and mode.live == 0


def test_mamba_forward_holds_its_chunk_scan_decays_and_grows_with_the_batch():
    cfg = preset("tiny", "mamba")
    with torch.device("meta"):
        mixer = LanguageModel(cfg).blocks[0].mixer
    one, four = (traced_forward_bytes(cfg, b, 256, torch.float32) for b in (1, 4))
    decays = 256 * mixer.chunk_size * mixer.d_inner * mixer.d_state * 4  # [B, T, chunk, d_inner, N] in float32, batch 1
    assert one >= decays
    assert 3.5 * one < four < 4.5 * one
    gla = traced_forward_bytes(preset("tiny", "gla"), 1, 256, torch.float32)
    assert gla < one  # a chunked linear recurrence holds no pairwise decays per channel


def test_views_of_tensors_made_before_it_count_nothing():
    weights = torch.ones(512, 1024)
    with live_bytes_mode() as mode:
        parts = weights.split(128)  # a list of views
        row = weights[0]
        total = parts[0].sum() + row.sum()
    assert mode.peak < 1024 and total.item() == 128 * 1024 + 1024
