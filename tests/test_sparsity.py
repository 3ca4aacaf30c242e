import pytest
import torch

from slope_bench.sparsity import NM, as_matrix, from_matrix, magnitude_mask, nm_mask, satisfies_nm, sparsity_of


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
