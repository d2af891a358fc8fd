"""Every Triton kernel against its PyTorch reference, on the device the check runs on.

On CUDA at the model shapes (MiniLM d=384, I=1536; BERT-base d=768, I=3072; 64 x 128 tokens), on
CPU at a tiny odd shape under the interpreter (TRITON_INTERPRET=1, set before this is imported);
each with fp32 and with bf16 inputs and state. Both sides get the same inputs; the error of an
output is max |kernel - reference| (max_abs_err) and that over max |reference| (max_rel_err),
checked against TOLERANCE[the output's dtype]. References run with TF32 off.

Kernels, called as their production callers call them:
- `attribution`: `attribution_scores_triton` vs `attribution_scores_reference` (m = 3 quadrature
  points, the target positions of a batch).
- `sparse_ffn`: `gathered_tn_matmul_triton` vs `gathered_tn_matmul_reference` for the three products
  of the sparse FFN backward at a 10% path: dW1[S] with colsum (a_idx), dW2[:, S] (b_idx), and
  column_slice_grad's ungathered product; the path index is a strided `unbind` view.
- `slice_adamw`: `slice_adamw_triton` vs `slice_adamw_reference` on W1 rows, W2 columns and b1 at a
  10% path, in place on clones of the same state, called twice in a row (the first call on a GPU
  autotunes: an in-place kernel without restore_value would apply its update once per config).
- `kmb_update`: `kmb_update_triton` vs `kmb_update_ref`: a batch's mention windows (span columns
  as `unbind` views), repeated slots, some spans without a [CLS] state; local, global mean, counts.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from trelm_fast.precision import ieee_fp32

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.int64: 0.0}
"""max_rel_err allowed per output dtype: fp32 results (fp32 accumulation, also of bf16 inputs) differ
by summation order; a bf16 result (bank rows, optimizer state) by a rounding step of the stored
value (up to 2^-7 of max |reference| each; two allowed); integer counts not at all."""
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Shape:
    """Model width d, FFN width I, tokens = sequences x seq_len, m quadrature points."""

    name: str
    d: int
    i: int
    sequences: int
    seq_len: int
    m: int = 3

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


GPU_SHAPES = (Shape("minilm", 384, 1536, 64, 128), Shape("bert-base", 768, 3072, 64, 128))
CPU_SHAPES = (Shape("tiny-odd", 40, 72, 3, 13),)


def _path(shape: Shape, g: torch.Generator, device) -> torch.Tensor:
    """A sorted 10% knowledge path as the router passes it: a strided view (a column of [|S|, 2])."""
    s = torch.randperm(shape.i, generator=g)[: max(2, shape.i // 10)].sort().values
    return torch.stack([s, s], 1).to(device).unbind(1)[0]


def _rand(g: torch.Generator, dtype, device, *size: int) -> torch.Tensor:
    return torch.randn(*size, generator=g).to(device=device, dtype=dtype)


def check_attribution(shape: Shape, dtype, device, g) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from trelm_fast.kernels.attribution import attribution_scores_reference, attribution_scores_triton

    n = 2 * shape.sequences * 2  # two target spans of ~2 tokens per sequence
    args = (_rand(g, dtype, device, shape.m, n, shape.d), torch.rand(shape.m, generator=g).to(device),
            _rand(g, dtype, device, shape.d, shape.i), _rand(g, dtype, device, n, shape.i))
    return {"scores": (attribution_scores_triton(*args), attribution_scores_reference(*args))}


def check_sparse_ffn(shape: Shape, dtype, device, g) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from trelm_fast.kernels.sparse_ffn import gathered_tn_matmul_reference, gathered_tn_matmul_triton

    t = shape.tokens
    s = _path(shape, g, device)
    d_pre, x = _rand(g, dtype, device, t, shape.i), _rand(g, dtype, device, t, shape.d)
    dy, a = _rand(g, dtype, device, t, shape.d), _rand(g, dtype, device, t, shape.i)
    a_s = a[:, s.long()].contiguous()
    out = {}
    for name, args, kwargs in (("dW1_rows", (d_pre, x), {"a_idx": s, "colsum": True}),
                               ("dW2_cols", (dy, a), {"b_idx": s}),
                               ("dW2_cols_from_A_S", (a_s, dy), {})):
        (got, got_sum), (want, want_sum) = (gathered_tn_matmul_triton(*args, **kwargs),
                                            gathered_tn_matmul_reference(*args, **kwargs))
        out[name] = (got, want)
        if want_sum is not None:
            out[f"{name}_colsum"] = (got_sum, want_sum)
    return out


def check_slice_adamw(shape: Shape, dtype, device, g) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from trelm_fast.kernels.slice_adamw import slice_adamw_reference, slice_adamw_triton

    s = _path(shape, g, device)
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    out = {}
    for name, size, dim in (("W1_rows", (shape.i, shape.d), 0), ("W2_cols", (shape.d, shape.i), 1),
                            ("b1", (shape.i,), 0)):
        state = [_rand(g, dtype, device, *size), torch.zeros(size, dtype=dtype, device=device),
                 torch.zeros(size, dtype=dtype, device=device)]
        runs = {"kernel": [t.clone() for t in state], "reference": [t.clone() for t in state]}
        steps = {k: torch.zeros(size[dim], dtype=torch.int64, device=device) for k in runs}
        grad_size = list(size)
        grad_size[dim] = s.numel()
        for call in (1, 2):
            grad = _rand(g, dtype, device, *grad_size)
            for which, fn in (("kernel", slice_adamw_triton), ("reference", slice_adamw_reference)):
                steps[which][s.long()] += 1
                param, exp_avg, exp_avg_sq = runs[which]
                fn(param, grad, exp_avg, exp_avg_sq, steps[which], s, dim, **hyper)
            for part, k, r in zip(("param", "exp_avg", "exp_avg_sq"), runs["kernel"], runs["reference"]):
                out[f"{name}_{part}_call{call}"] = (k.clone(), r.clone())
    return out


def check_kmb_update(shape: Shape, dtype, device, g) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from trelm_fast.kernels.kmb_update import kmb_update_ref, kmb_update_triton

    per_row, n_slots = 6, max(8, shape.sequences * 2)  # few slots: entities repeat within a batch
    hidden = _rand(g, dtype, device, shape.sequences, shape.seq_len, shape.d)
    e = shape.sequences * per_row
    rows = torch.arange(shape.sequences).repeat_interleave(per_row)
    lo = torch.randint(1, shape.seq_len - 4, (e,), generator=g)
    hi = lo + torch.randint(1, 4, (e,), generator=g)
    slots = torch.randint(0, n_slots, (e,), generator=g)
    spans = torch.stack([rows, lo, hi, slots], 1).to(device)  # the bank passes columns of its span table
    rows, lo, hi, slots = spans.unbind(1)
    cls = hidden[:, 0]
    cls_index = torch.where(torch.rand(e, generator=g) < 0.8, rows.cpu(), -1).to(device)
    bank = [_rand(g, dtype, device, n_slots, shape.d), _rand(g, dtype, device, n_slots, shape.d),
            torch.randint(0, 3, (n_slots,), generator=g).to(device)]
    runs = {"kernel": [t.clone() for t in bank], "reference": [t.clone() for t in bank]}
    for which, fn in (("kernel", kmb_update_triton), ("reference", kmb_update_ref)):
        fn(hidden, rows, lo, hi, slots, cls, cls_index, *runs[which], gamma=0.1)
    return {part: (k, r) for part, k, r in zip(("local", "global_mean", "counts"), runs["kernel"], runs["reference"])}


CHECKS: dict[str, Callable] = {
    "attribution": check_attribution,
    "sparse_ffn": check_sparse_ffn,
    "slice_adamw": check_slice_adamw,
    "kmb_update": check_kmb_update,
}


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"kernel output {tuple(got.shape)} != reference {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return diff, (diff / scale if scale > 0 else diff)


def run_checks(device: torch.device, kernels=tuple(CHECKS), dtypes=DTYPES) -> list[dict]:
    """One row per (kernel, shape, input dtype, output): errors, tolerance, passed; or one row with the
    traceback of a failed call (`error`, passed False). `kernels`, `dtypes`: a subset to check."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    rows = []
    for kernel in kernels:
        check = CHECKS[kernel]
        for shape in shapes:
            for dtype in dtypes:
                base = {"kernel": kernel, "shape": shape.name, "dtype": str(dtype).removeprefix("torch.")}
                try:
                    with ieee_fp32():
                        outputs = check(shape, dtype, device, torch.Generator().manual_seed(0))
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                    for output, (got, want) in outputs.items():
                        abs_err, rel = _errors(got, want)
                        tol = TOLERANCE[want.dtype]
                        rows.append({**base, "output": output, "max_abs_err": abs_err, "max_rel_err": rel,
                                     "tolerance": tol, "passed": rel <= tol})
                except Exception:  # a kernel that fails to run is a failed check; the others still run
                    rows.append({**base, "output": "-", "error": traceback.format_exc(), "passed": False})
    return rows


def markdown(rows: list[dict]) -> list[str]:
    """The table of `run_checks` rows."""
    lines = ["| kernel | shape | inputs | output | max abs err | max rel err | tolerance | passed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            errs = f"error: {r['error'].strip().splitlines()[-1]} | | -"
        else:
            errs = f"{r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} | {r['tolerance']:g}"
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['output']} | {errs} | "
                     f"{'yes' if r['passed'] else '**no**'} |")
    return lines
