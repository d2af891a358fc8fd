"""slice_adamw: Triton kernel (interpreted) vs reference vs torch.optim.AdamW on the slices."""
import pytest
import torch

from trelm_fast.kernels.slice_adamw import slice_adamw, slice_adamw_reference, slice_adamw_triton

HP = dict(lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.05)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _state(shape, dim, seed):
    p = _rand(*shape, seed=seed)
    m, v = 0.1 * _rand(*shape, seed=seed + 1), _rand(*shape, seed=seed + 2).abs()
    steps = torch.randint(1, 6, (shape[dim],), generator=torch.Generator().manual_seed(seed))
    return p, m, v, steps


def _idx(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@pytest.mark.parametrize("shape,dim", [((37, 19), 0), ((19, 37), 1), ((37,), 0)])
@pytest.mark.parametrize("k", [1, 13, 37])
def test_kernel_matches_reference(shape, dim, k):
    p, m, v, steps = _state(shape, dim, seed=k)
    idx = _idx(shape[dim], k, seed=k + 1)
    gshape = list(shape)
    gshape[dim] = k
    g = _rand(*gshape, seed=k + 2)
    ref = [t.clone() for t in (p, m, v)]
    slice_adamw_reference(*ref[:1], g, *ref[1:], steps, idx, dim, **HP)
    slice_adamw_triton(p, g, m, v, steps, idx, dim, **HP)
    for a, b in zip((p, m, v), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_untouched_slices_are_bitwise_unchanged_and_int32_idx():
    p, m, v, steps = _state((19, 37), 1, seed=3)
    idx = torch.tensor([2, 5, 36], dtype=torch.int32)
    before = [t.clone() for t in (p, m, v)]
    slice_adamw_triton(p, _rand(19, 3, seed=4), m, v, steps, idx, 1, **HP)
    keep = torch.ones(37, dtype=torch.bool)
    keep[idx.long()] = False
    for a, b in zip((p, m, v), before):
        assert torch.equal(a[:, keep], b[:, keep])
        assert not torch.equal(a[:, ~keep], b[:, ~keep])


def test_reference_equals_torch_adamw_per_slice():
    """Each selected row is one torch AdamW parameter at its own step count."""
    p, m, v, _ = _state((11, 7), 0, seed=9)
    m.zero_(), v.zero_()
    steps = torch.zeros(11, dtype=torch.long)
    rows = [torch.nn.Parameter(p[i].clone()) for i in range(11)]
    opt = torch.optim.AdamW(rows, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    for it, idx in enumerate([torch.tensor([0, 3, 4]), torch.tensor([3, 10]), torch.tensor([0, 3, 5, 10])]):
        g = _rand(idx.numel(), 7, seed=20 + it)
        steps[idx] += 1
        slice_adamw(p, g, m, v, steps, idx, 0, **HP)
        for r in rows:
            r.grad = None
        for j, i in enumerate(idx.tolist()):
            rows[i].grad = g[j].clone()
        opt.step()
    torch.testing.assert_close(p, torch.stack([r.detach() for r in rows]), rtol=1e-6, atol=1e-7)


def test_bad_shapes_are_named():
    p, m, v, steps = _state((5, 4), 0, seed=1)
    with pytest.raises(ValueError, match="grad shape"):
        slice_adamw(p, torch.zeros(3, 5), m, v, steps, torch.tensor([0, 1]), 0, **HP)
    with pytest.raises(ValueError, match="exp_avg must match"):
        slice_adamw(p, torch.zeros(2, 4), m.t().contiguous().t(), v, steps, torch.tensor([0, 1]), 0, **HP)
    with pytest.raises(ValueError, match="steps must have shape"):
        slice_adamw(p, torch.zeros(2, 4), m, v, steps[:3], torch.tensor([0, 1]), 0, **HP)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("fn", [slice_adamw_reference, slice_adamw_triton])
def test_a_skip_flag_on_the_device_leaves_everything_unchanged(fn, device):
    """A step with a non-finite loss: NaN gradients, skip = True; nothing is written. skip = False is a plain step.
    The kernel reads the flag, a 0-dim bool tensor, as it is."""
    p, m, v, steps = (t.to(device) for t in _state((19, 37), 1, seed=5))
    idx = torch.tensor([2, 5, 36], device=device)
    before = [t.clone() for t in (p, m, v)]
    fn(p, torch.full((19, 3), float("nan"), device=device), m, v, steps, idx, 1, **HP,
       skip=torch.tensor(True, device=device))
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), before))
    g = _rand(19, 3, seed=6).to(device)
    expected = [t.clone() for t in before]
    slice_adamw_reference(expected[0], g, *expected[1:], steps, idx, 1, **HP)
    fn(p, g, m, v, steps, idx, 1, **HP, skip=torch.tensor(False, device=device))
    for a, b in zip((p, m, v), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [slice_adamw_reference, slice_adamw_triton])
def test_a_tensor_learning_rate_equals_the_float(fn):
    """lr as a 0-dim tensor (what a CUDA graph reads on the device) gives the float's update."""
    p, m, v, steps = _state((23, 9), 0, seed=5)
    idx, g = _idx(23, 7, seed=6), _rand(7, 9, seed=7)
    ref = [t.clone() for t in (p, m, v)]
    slice_adamw_reference(ref[0], g, ref[1], ref[2], steps, idx, 0, **HP)
    fn(p, g, m, v, steps, idx, 0, **{**HP, "lr": torch.tensor(HP["lr"])})
    for a, b in zip((p, m, v), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
