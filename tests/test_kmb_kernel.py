"""kernels/kmb_update.py: the Triton kernel (interpreted on CPU) against its PyTorch reference."""
import pytest
import torch

from trelm_fast.kernels.kmb_update import ema_apply_ref, group_by_slot, kmb_update_ref, kmb_update_triton, window_mean_ref


def _problem(seed, rows=3, n=37, d=45, bank=11, spans=19, distinct=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, n, d, generator=g)
    row = torch.randint(0, rows, (spans,), generator=g)
    lo = torch.randint(0, n - 17, (spans,), generator=g)
    hi = lo + torch.randint(1, 18, (spans,), generator=g)  # windows up to 17 wide: two tiles of 16
    slots = torch.randint(0, distinct, (spans,), generator=g) * 2 + 1  # duplicates, some rows untouched
    cls_index = torch.where(torch.rand(spans, generator=g) < 0.6, row, -1)
    local = torch.randn(bank, d, generator=g).to(dtype)
    gmean = torch.randn(bank, d, generator=g).to(dtype)
    counts = torch.randint(0, 4, (bank,), generator=g)
    return (hidden, row, lo, hi, slots, hidden[:, 0], cls_index), (local, gmean, counts)


def test_group_by_slot_keeps_span_order_within_a_slot():
    slots = torch.tensor([4, 2, 4, 9, 2, 4])
    order, offsets, group = group_by_slot(slots)
    assert order.tolist() == [1, 4, 0, 2, 5, 3]
    assert offsets.tolist() == [0, 2, 5, 6, 6, 6, 6]  # then empty groups: the size is known on the host
    assert group.tolist() == [1, 0, 1, 2, 0, 1]


def test_window_mean_matches_slicing():
    (hidden, row, lo, hi, *_), _ = _problem(0)
    expected = torch.stack([hidden[r, a:b].mean(0) for r, a, b in zip(row, lo, hi)])
    torch.testing.assert_close(window_mean_ref(hidden, row, lo, hi), expected)


def test_reference_is_a_sequential_ema_in_span_order():
    (hidden, row, lo, hi, slots, cls, cls_index), bank = _problem(1)
    local, gmean, counts = (t.clone() for t in bank)
    gamma = 0.3
    for e in range(slots.numel()):  # eqs. 4-6 one span at a time
        s = slots[e]
        local[s] = (1 - gamma) * local[s] + gamma * hidden[row[e], lo[e] : hi[e]].mean(0)
        if cls_index[e] >= 0:
            counts[s] += 1
            gmean[s] = gmean[s] + (cls[cls_index[e]] - gmean[s]) / counts[s]
    got = tuple(t.clone() for t in bank)
    kmb_update_ref(hidden, row, lo, hi, slots, cls, cls_index, *got, gamma)
    torch.testing.assert_close(got[0], local)
    torch.testing.assert_close(got[1], gmean)
    assert torch.equal(got[2], counts)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        (dict(rows=3, n=37, d=45, bank=11, spans=19, distinct=5), torch.float32),
        (dict(rows=2, n=41, d=17, bank=12, spans=5, distinct=5), torch.float32),  # mostly distinct slots
        (dict(rows=4, n=23, d=130, bank=9, spans=13, distinct=2), torch.float32),  # several d-blocks
        (dict(rows=3, n=37, d=45, bank=11, spans=19, distinct=5), torch.bfloat16),
        (dict(rows=3, n=37, d=33, bank=11, spans=9, distinct=3), torch.float16),
    ],
)
def test_kernel_matches_reference(shape, dtype):
    args, bank = _problem(2, dtype=dtype, **shape)
    expected = tuple(t.clone() for t in bank)
    got = tuple(t.clone() for t in bank)
    kmb_update_ref(*args, *expected, 0.25)
    kmb_update_triton(*args, *got, 0.25)
    tol = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[0], expected[0], **tol)
    torch.testing.assert_close(got[1], expected[1], **tol)
    assert torch.equal(got[2], expected[2])
    untouched = torch.ones(bank[0].shape[0], dtype=torch.bool)
    untouched[args[4]] = False
    assert torch.equal(got[0][untouched], bank[0][untouched])


def test_kernel_with_no_spans_changes_nothing():
    (hidden, row, lo, hi, slots, cls, cls_index), bank = _problem(3)
    got = tuple(t.clone() for t in bank)
    empty = slots[:0]
    kmb_update_triton(hidden, empty, empty, empty, empty, cls, empty, *got, 0.5)
    for a, b in zip(got, bank):
        assert torch.equal(a, b)


def test_kernel_on_precomputed_means_as_length_one_windows():
    """The DDP path on CUDA: gathered window means applied as windows of length 1."""
    (hidden, row, lo, hi, slots, cls, cls_index), bank = _problem(4)
    means = window_mean_ref(hidden, row, lo, hi)
    idx = torch.arange(slots.numel())
    expected = tuple(t.clone() for t in bank)
    got = tuple(t.clone() for t in bank)
    ema_apply_ref(means, slots, cls, cls_index, *expected, 0.4)
    kmb_update_triton(means[:, None], idx, torch.zeros_like(idx), torch.ones_like(idx), slots, cls, cls_index, *got, 0.4)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("fn", [kmb_update_ref, kmb_update_triton])
def test_a_skip_flag_on_the_device_leaves_the_bank_unchanged(fn, device):
    """skip = True (a 0-dim bool tensor the kernel reads as it is) changes nothing; False is a plain update."""
    (hidden, *rest), bank = _problem(5)
    hidden, rest, bank = hidden.to(device), [t.to(device) for t in rest], tuple(t.to(device) for t in bank)
    got = tuple(t.clone() for t in bank)
    fn(torch.full_like(hidden, float("nan")), *rest, *got, 0.3, skip=torch.tensor(True, device=device))
    assert all(torch.equal(a, b) for a, b in zip(got, bank))
    expected = tuple(t.clone() for t in bank)
    kmb_update_ref(hidden, *rest, *expected, 0.3)
    fn(hidden, *rest, *got, 0.3, rounds=None, skip=torch.tensor(False, device=device))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_reference_with_the_rounds_given_matches_it_computed():
    args, bank = _problem(6)
    slots = args[4]
    rounds = int(torch.bincount(slots).max())
    expected, got = (tuple(t.clone() for t in bank) for _ in range(2))
    kmb_update_ref(*args, *expected, 0.2)
    kmb_update_ref(*args, *got, 0.2, rounds=rounds)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
