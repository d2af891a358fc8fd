"""Kernels as training runs them: production layouts, in-place autotuning, autotune keys that settle.

Each test drives a kernel through its production caller (`KnowledgeMemoryBank.update`,
`TrelmOptimizer.step`, `TrainStep`) under `kernel_backend("triton")`, which sends CPU tensors to the
Triton kernels (interpreted, tests/conftest.py), and compares with the same calls under
`kernel_backend("reference")`. `full_autotune`
gives a kernel back its full GPU config list (the interpreter pins one) and benchmarks every config
by running it on the real arguments, as the GPU autotuner does: what corrupted in-place kernels on
the H100 (issue 11). On a CUDA machine the same tests run on the GPU.
"""
import contextlib
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from test_memory_bank import _bank, _batch
from test_model import make_batch, tiny_config
from trelm_fast.ffn import ffn_modules, swap_ffn
from trelm_fast.kernels import attribution, slice_adamw, sparse_ffn
from trelm_fast.kernels import kernel_backend
from trelm_fast.kernels._launch import bucket, index_arg, use_triton
from trelm_fast.optim import TrelmOptimizer
from trelm_fast.step import build_step_model, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCH_RUNS = 3  # kernel runs per config and tuning round (triton's do_bench runs many more)


@contextlib.contextmanager
def full_autotune(monkeypatch, module, name):
    """`module.name` becomes an autotuner over its full config list; yields the list of tuning rounds
    (one entry per config benchmarked: its key)."""
    tuner = getattr(module, name)
    rounds = []

    def bench(kernel_call, quantiles):
        t0 = time.perf_counter()
        for _ in range(BENCH_RUNS):
            kernel_call()
        rounds.append(1)
        return [time.perf_counter() - t0] * len(quantiles)

    full = type(tuner)(tuner.fn, tuner.arg_names, tuner.all_configs, tuner.keys, tuner.reset_to_zero,
                       tuner.restore_value, do_bench=bench)
    assert len(full.configs) > 1
    monkeypatch.setattr(module, name, full)
    yield rounds


def test_dispatch_rule_per_backend():
    """auto: kernels on CUDA tensors, except an op that opts out (its reference measured faster on the
    GPU: the sparse FFN weight gradients); gpu: as auto on CUDA, any device; forced backends win over both."""
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)  # use_triton reads is_cuda only
    table = {backend: [use_triton(t, auto_on_cuda=a) for t in (cuda, cpu) for a in (True, False)]
             for backend in ("auto", "triton", "reference")}
    for backend in ("triton", "reference", "gpu"):
        with kernel_backend(backend):
            table[backend] = [use_triton(t, auto_on_cuda=a) for t in (cuda, cpu) for a in (True, False)]
    assert table == {"auto": [True, False, False, False], "triton": [True] * 4, "reference": [False] * 4,
                     "gpu": [True, False, True, False]}


def test_sparse_weight_gradients_take_the_kernel_only_when_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(sparse_ffn, "gathered_tn_matmul_triton", lambda *a, **k: calls.append(1) or (None, None))
    a, b, idx = torch.randn(5, 7), torch.randn(5, 3), torch.tensor([1, 4])
    monkeypatch.setattr(sparse_ffn, "use_triton", lambda t, auto_on_cuda=True: use_triton(
        SimpleNamespace(is_cuda=True), auto_on_cuda))  # as if a were on the GPU
    out, sums = sparse_ffn.gathered_tn_matmul(a, b, a_idx=idx, colsum=True)
    torch.testing.assert_close(out, a[:, idx].t() @ b)
    assert calls == []
    with kernel_backend("triton"):
        sparse_ffn.gathered_tn_matmul(a, b, a_idx=idx)
    assert calls == [1]


def test_index_arg_makes_views_contiguous_int64_and_names_bad_input():
    spans = torch.arange(20, dtype=torch.int32).view(5, 4)
    col = spans.unbind(1)[2]
    assert col.stride() == (4,)
    out = index_arg(col, "lo", "op", col.device)
    assert out.is_contiguous() and out.dtype == torch.int64 and out.tolist() == [2, 6, 10, 14, 18]
    with pytest.raises(ValueError, match="op: lo must be a 1-D int32/int64 tensor, got torch.float32"):
        index_arg(col.float(), "lo", "op", col.device)
    with pytest.raises(ValueError, match="op: lo is on meta, the operands on cpu"):
        index_arg(col.to("meta"), "lo", "op", torch.device("cpu"))
    assert [bucket(n) for n in (0, 1, 5, 64, 65)] == [1, 1, 8, 64, 128]


def test_bank_update_through_the_kernel_takes_unbind_views():
    """KnowledgeMemoryBank.update passes spans.unbind(1) views (stride 4) straight to the kernel."""
    expected, ids = _bank(device=DEVICE)
    got, _ = _bank(device=DEVICE)
    for seed in range(3):
        hidden, spans, mask = (t.to(DEVICE) for t in _batch(ids, seed))
        with kernel_backend("reference"):
            expected.update(hidden, spans, attention_mask=mask)
        with kernel_backend("triton"):
            got.update(hidden, spans, attention_mask=mask)
    torch.testing.assert_close(got.local, expected.local)
    torch.testing.assert_close(got.global_mean, expected.global_mean)
    assert torch.equal(got.counts, expected.counts)


def _sliced_model(seed=0):
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=37, max_position_embeddings=24)).eval()
    swap_ffn(model)
    for i, f in enumerate(ffn_modules(model)):
        f.set_path(torch.randperm(37, generator=torch.Generator().manual_seed(i))[:11].sort().values)
    return model.to(DEVICE)


def _optimizer_steps(model, steps=2):
    opt = TrelmOptimizer(model, lr=3e-3, betas=(0.9, 0.98), weight_decay=0.05)
    for s in range(steps):
        ids = torch.randint(2, 53, (3, 9), generator=torch.Generator().manual_seed(s)).to(DEVICE)
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_slice_optimizer_with_the_full_autotune_list_is_right_from_the_first_step(monkeypatch):
    """The autotuner runs the in-place AdamW kernel once per benchmark run: restore_value undoes them."""
    expected, got = _sliced_model(), _sliced_model()
    with kernel_backend("reference"):
        ref_opt = _optimizer_steps(expected)
    with full_autotune(monkeypatch, slice_adamw, "_slice_adamw_kernel") as rounds, kernel_backend("triton"):
        opt = _optimizer_steps(got)
    assert rounds, "the kernel was not autotuned"
    for (name, p), q in zip(got.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for st, ref in zip(opt.slice_state, ref_opt.slice_state):
        for key in ref:
            torch.testing.assert_close(st[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sparse_ffn_autotunes_once_per_bucket(monkeypatch):
    """Varying token counts and path sizes within one power-of-two bucket reuse the first tuning."""
    g = torch.Generator().manual_seed(0)
    d, inter = 24, 40
    with full_autotune(monkeypatch, sparse_ffn, "_gathered_tn_matmul_kernel") as rounds:
        counts = []
        for tokens, k in ((100, 9), (128, 13), (97, 16), (120, 11)):
            dy = torch.randn(tokens, inter, generator=g).to(DEVICE)
            x = torch.randn(tokens, d, generator=g).to(DEVICE)
            idx = torch.randperm(inter, generator=g)[:k].sort().values.to(DEVICE)
            out, sums = sparse_ffn.gathered_tn_matmul_triton(dy, x, a_idx=idx, colsum=True)
            ref, ref_sums = sparse_ffn.gathered_tn_matmul_reference(dy, x, a_idx=idx, colsum=True)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)
            counts.append(len(rounds))
        n_configs = len(sparse_ffn._gathered_tn_matmul_kernel.configs)
        assert counts == [n_configs] * 4
        sparse_ffn.gathered_tn_matmul_triton(torch.randn(300, inter).to(DEVICE), torch.randn(300, d).to(DEVICE),
                                             a_idx=idx, colsum=True)
        assert len(rounds) == 2 * n_configs  # a new bucket (512 tokens) tunes once more


def test_attribution_autotunes_once_per_bucket(monkeypatch):
    g = torch.Generator().manual_seed(1)
    d, inter, m = 24, 40, 3
    w2 = torch.randn(d, inter, generator=g).to(DEVICE)
    weights = torch.full((m,), 1.0 / m, device=DEVICE)
    with full_autotune(monkeypatch, attribution, "_attribution_kernel") as rounds:
        counts = []
        for n in (40, 33, 64, 50):  # target rows of successive refreshes
            grads = torch.randn(m, n, d, generator=g).to(DEVICE)
            v = torch.randn(n, inter, generator=g).to(DEVICE)
            got = attribution.attribution_scores_triton(grads, weights, w2, v)
            ref = attribution.attribution_scores_reference(grads, weights, w2, v)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            counts.append(len(rounds))
        assert counts == [len(attribution._attribution_kernel.configs)] * 4


def test_train_step_through_every_kernel_matches_the_reference_step(dataset, monkeypatch):
    """Three `trelm` steps (a refresh, bank updates, slice updates) with every kernel, autotuned
    over its full config list, against the same steps on the PyTorch references."""
    cfg = tiny_config()

    def run():
        torch.manual_seed(0)
        model = build_step_model("trelm", cfg, dataset, device=DEVICE)
        step = make_step("trelm", model, cfg)
        losses = [float(step(make_batch(seed=i), i).loss) for i in range(3)]
        return model, step, losses

    with kernel_backend("reference"):
        ref_model, ref_step, ref_losses = run()
    with contextlib.ExitStack() as stack:
        rounds = [stack.enter_context(full_autotune(monkeypatch, mod, name)) for mod, name in (
            (slice_adamw, "_slice_adamw_kernel"), (sparse_ffn, "_gathered_tn_matmul_kernel"),
            (attribution, "_attribution_kernel"))]
        stack.enter_context(kernel_backend("triton"))
        model, step, losses = run()
    assert all(rounds), "a kernel was not used by the step"
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert [p.tolist() for p in step.paths] == [p.tolist() for p in ref_step.paths]
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(model.bank.local, ref_model.bank.local)
    torch.testing.assert_close(model.bank.global_mean, ref_model.bank.global_mean)
    assert torch.equal(model.bank.counts, ref_model.bank.counts)
