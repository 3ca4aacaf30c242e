"""Bit-level codecs: bit streams, N:M ranks and pattern symbols, run length, float bit views."""

from __future__ import annotations

import math

import pytest
import torch

from slope_bench import codecs
from slope_bench.codecs import (
    bits_float,
    float_bits,
    group_symbols,
    nm_keep,
    nm_rank,
    nm_unrank,
    pack_bits,
    pattern_counts,
    rle_decode,
    rle_encode,
    rle_width,
    symbol_bits,
    unpack_bits,
)
from slope_bench.metrics import run_length_bits
from slope_bench.sparsity import NM, nm_mask

NM_PATTERNS = [NM(1, 4), NM(2, 4), NM(2, 8), NM(4, 8)]


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented layout, bit by bit: code i in stream bits [i·bits, (i+1)·bits), LSB first."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for b in range(bits):
            if code >> b & 1:
                j = i * bits + b
                out[j // 8] |= 1 << (j % 8)
    return out


# ---------------------------------------------------------------------------- bit streams
@pytest.mark.parametrize("bits", [*range(1, 17), 20, 24, 31, 32])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 13, 1001])
def test_pack_unpack_round_trip(bits, count):
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits * count), dtype=torch.int64)
    data = pack_bits(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(data, bits, count), codes)
    assert torch.equal(unpack_bits(torch.cat([data, torch.full((5,), 255, dtype=torch.uint8)]), bits, count), codes)
    if count <= 13:
        assert data.tolist() == reference_pack(codes.tolist(), bits)


def test_pack_layout_is_little_endian_lsb_first():
    assert pack_bits(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0b0]
    assert pack_bits(torch.tensor([0xABC]), 12).tolist() == [0xBC, 0x0A]
    assert pack_bits(torch.tensor([0xDEADBEEF]), 32).tolist() == [0xEF, 0xBE, 0xAD, 0xDE]


def test_pack_spans_blocks(monkeypatch):
    monkeypatch.setattr(codecs, "CHUNK", 16)
    codes = torch.randint(0, 1 << 11, (101,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_bits(pack_bits(codes, 11), 11, 101), codes)
    assert pack_bits(codes, 11).tolist() == reference_pack(codes.tolist(), 11)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.tensor([0]), 33)
    assert pack_bits(torch.zeros(4, dtype=torch.int64), 0).numel() == 0


# ---------------------------------------------------------------------------- N:M patterns
@pytest.mark.parametrize("pattern", [*NM_PATTERNS, NM(3, 18)], ids=str)
def test_nm_rank_is_a_bijection(pattern):
    n, m = pattern.n, pattern.m
    if m > 12:
        keep = nm_mask(torch.randn(500, m, generator=torch.Generator().manual_seed(0)), pattern)
        ranks = nm_rank(keep)
        assert int(ranks.max()) < math.comb(m, n)
        assert torch.equal(nm_unrank(ranks, n, m), keep)
        return
    every = (torch.arange(1 << m)[:, None] >> torch.arange(m)) & 1
    keep = every[every.sum(1) == n].bool()
    ranks = nm_rank(keep)
    assert sorted(ranks.tolist()) == list(range(math.comb(m, n)))
    assert math.ceil(math.log2(math.comb(m, n))) == pattern.index_bits
    assert torch.equal(nm_unrank(ranks, n, m), keep)


def test_nm_rank_is_colex():
    """Σ_i C(c_i, i) over the kept positions c_1 < … < c_n (the documented rank)."""
    for row in ([1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1]):
        kept = [p for p, k in enumerate(row) if k]
        expected = sum(math.comb(c, i + 1) for i, c in enumerate(kept))
        assert nm_rank(torch.tensor([row], dtype=torch.bool)).item() == expected


@pytest.mark.parametrize("pattern", NM_PATTERNS, ids=str)
def test_nm_rank_round_trip_random(pattern):
    score = torch.randn(37, pattern.m, generator=torch.Generator().manual_seed(3))
    keep = nm_mask(score, pattern)
    assert torch.equal(nm_unrank(nm_rank(keep), pattern.n, pattern.m), keep)
    with pytest.raises(ValueError, match="ranks must lie"):
        nm_unrank(torch.tensor([math.comb(pattern.m, pattern.n)]), pattern.n, pattern.m)
    with pytest.raises(ValueError, match="same number"):
        nm_rank(torch.cat([keep[:1], torch.zeros(1, pattern.m, dtype=torch.bool)]))


def test_nm_keep_fills_underfull_groups_with_the_first_zeros():
    nonzero = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert nm_keep(nonzero, 2).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1]]
    with pytest.raises(ValueError, match="more than n"):
        nm_keep(torch.ones(1, 4, dtype=torch.bool), 2)


@pytest.mark.parametrize("m", [1, 4, 8, 9, 16, 20])
def test_group_symbols_round_trip(m):
    keep = torch.rand(301, m, generator=torch.Generator().manual_seed(m)) < 0.4
    symbols = group_symbols(keep)
    assert symbols.dtype == torch.int64 and int(symbols.max()) < 1 << m
    assert symbols[0].item() == sum(1 << j for j in range(m) if keep[0, j])
    assert torch.equal(symbol_bits(symbols, m), keep)
    assert torch.equal(pattern_counts(symbols, m), keep.sum(1))


# ---------------------------------------------------------------------------- run length
@pytest.mark.parametrize("density", [0.0, 0.002, 0.05, 0.3, 0.9, 1.0])
def test_rle_round_trip_and_cost(density):
    nonzero = torch.rand(5003, generator=torch.Generator().manual_seed(7)) < density
    width, cost = rle_width(nonzero, 4)
    assert cost == run_length_bits(nonzero, 4)
    for r in (1, 3, width, 16):
        gaps, positions = rle_encode(nonzero, r)
        assert bool((gaps < 1 << r).all())
        assert torch.equal(rle_decode(gaps), positions)
        rebuilt = torch.zeros_like(nonzero)
        rebuilt[positions] = True
        assert torch.equal(rebuilt | ~nonzero, torch.ones_like(nonzero))  # every nonzero has an entry
        assert bool((~nonzero[positions]).sum() == positions.numel() - nonzero.sum())  # the rest are fillers on zeros


# ---------------------------------------------------------------------------- float views
def test_float_bits_round_trip_keeps_every_pattern():
    values = torch.tensor([0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), 1e-45, 3.4e38])
    patterns = float_bits(values)
    assert patterns[1].item() == 0x80000000 and bool((patterns >= 0).all()) and bool((patterns < 1 << 32).all())
    assert torch.equal(bits_float(patterns).view(torch.int32), values.view(torch.int32))
    nan = torch.tensor([0x7FC00001, 0xFFC00002], dtype=torch.int64)
    assert torch.equal(float_bits(bits_float(nan)), nan)  # NaN payloads survive
