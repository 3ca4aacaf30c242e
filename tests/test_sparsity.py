import pytest
import torch

from slope_bench.sparsity import (
    NM,
    as_matrix,
    cubic_sparsity,
    from_matrix,
    global_prune_masks,
    magnitude_mask,
    nm_mask,
    satisfies_nm,
    sparsity_of,
)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (2, 8), (4, 8), (3, 3)])
@pytest.mark.parametrize("shape", [(16, 32), (8, 4, 3, 3), (5, 24)])
@pytest.mark.parametrize("order", ["input", "channel_major"])
def test_nm_mask_holds_in_every_group(n, m, shape, order):
    pattern = NM(n, m, order)
    w = torch.randn(shape)
    if not pattern.applies_to(w):
        pytest.skip("input size not divisible by m")
    mask = nm_mask(w, pattern)
    groups = as_matrix(mask, order).reshape(shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    assert satisfies_nm(w * mask, pattern)
    # kept weights are the largest in their group
    kept_min = torch.where(groups, as_matrix(w.abs(), order).reshape(groups.shape), torch.inf).amin(-1)
    dropped_max = torch.where(~groups, as_matrix(w.abs(), order).reshape(groups.shape), -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_channel_major_groups_run_across_input_channels():
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    w[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = nm_mask(w, NM(2, 4, "channel_major"))
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True]
    assert torch.equal(from_matrix(as_matrix(w, "channel_major"), w.shape, "channel_major"), w)


def test_nm_index_bits_and_density():
    assert NM(2, 4).index_bits == 3  # C(4,2) = 6 -> 3 bits
    assert NM(1, 4).index_bits == 2
    assert NM(2, 8).index_bits == 5  # C(8,2) = 28
    assert NM(4, 8).index_bits == 7  # C(8,4) = 70
    assert NM(2, 4).density == 0.5


@pytest.mark.parametrize("bad", [(5, 4), (0, 4), (2, 0)])
def test_nm_rejects_bad_patterns(bad):
    with pytest.raises(ValueError):
        NM(*bad)


def test_satisfies_nm_detects_violations():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert not satisfies_nm(w, NM(2, 4))
    assert satisfies_nm(w, NM(3, 4))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_hits_exact_sparsity_even_with_ties(sparsity):
    w = torch.randint(-3, 4, (40, 25)).float()  # many ties
    mask = magnitude_mask(w, sparsity)
    assert int((~mask).sum()) == round(sparsity * w.numel())
    assert sparsity_of(w * mask) >= sparsity - 1e-9


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (4, 16)])
def test_nm_mask_breaks_ties_by_position_on_both_kernels(n, m):
    # integer weights: many ties; the pairwise kernel (m <= 8) and topk (m > 8) agree
    # with the stable-sort reference, where equal magnitudes go to the lower position
    w = torch.randint(-2, 3, (12, 4 * m)).float()
    groups = w.abs().reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
    ref = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    mask = nm_mask(w, NM(n, m))
    assert mask.dtype == torch.bool
    assert (mask.reshape(-1, m).sum(-1) == n).all()
    if m <= 8:  # topk's choice among equal values is unspecified
        assert torch.equal(mask.reshape(-1, m), ref)


def test_cubic_schedule_endpoints_midpoint_and_monotone() -> None:
    s_i, s_f, t0, t1 = 0.1, 0.7, 0.1, 0.8
    assert cubic_sparsity(0.0, s_i, s_f, t0, t1) == s_i
    assert cubic_sparsity(t0, s_i, s_f, t0, t1) == s_i
    assert cubic_sparsity(t1, s_i, s_f, t0, t1) == pytest.approx(s_f)
    assert cubic_sparsity(1.0, s_i, s_f, t0, t1) == s_f
    mid = (t0 + t1) / 2
    assert cubic_sparsity(mid, s_i, s_f, t0, t1) == pytest.approx(s_f + (s_i - s_f) / 8)
    values = [cubic_sparsity(t / 200, s_i, s_f, t0, t1) for t in range(201)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_global_prune_masks_exact_count_ties_and_monotone() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(10, 10), torch.rand(7), torch.full((50,), 0.5)]  # many ties at 0.5
    masks = global_prune_masks(scores, 0.4)
    total = sum(s.numel() for s in scores)
    assert sum(int((~m).sum()) for m in masks) == round(0.4 * total)
    pooled = torch.cat([s.reshape(-1) for s in scores])
    kept = torch.cat([m.reshape(-1) for m in masks])
    assert float(pooled[kept].min()) >= float(pooled[~kept].max())
    # entries marked pruned (score -1) are removed first, even when their magnitude is large
    marked = [torch.where(m, s, torch.full_like(s, -1.0)) for s, m in zip(scores, masks)]
    again = global_prune_masks(marked, 0.6)
    for m_old, m_new in zip(masks, again):
        assert not bool((m_new & ~m_old).any())
    assert sum(int((~m).sum()) for m in again) == round(0.6 * total)
