"""CUDA only: every kernel against its reference at the MiniLM and BERT-base shapes (64 x 128
tokens), fp32 and bf16, with production layouts (benchmarks/kernel_check.py; `make gpu-check` runs
the same table). The CPU test runs the table at its tiny odd shape under the interpreter."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kernel_check  # noqa: E402
from trelm_fast.precision import set_tf32  # noqa: E402


def _failures(rows):
    return [(r["shape"], r["dtype"], r["output"], r.get("error") or f"rel err {r['max_rel_err']:.2e} > {r['tolerance']:g}")
            for r in rows if not r["passed"]]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", kernel_check.DTYPES, ids=str)
@pytest.mark.parametrize("kernel", list(kernel_check.CHECKS))
def test_kernel_matches_reference_at_model_shapes(kernel, dtype):
    rows = kernel_check.run_checks(torch.device("cuda"), kernels=[kernel], dtypes=[dtype])
    assert {r["shape"] for r in rows} == {s.name for s in kernel_check.GPU_SHAPES}
    assert not _failures(rows)


@pytest.mark.parametrize("kernel", list(kernel_check.CHECKS))
def test_kernel_table_on_cpu(kernel):
    rows = kernel_check.run_checks(torch.device("cpu"), kernels=[kernel])
    assert rows and not _failures(rows)


def test_kernel_table_runs_after_the_trainer_set_tf32():
    """The table forces IEEE fp32 with the same `fp32_precision` API the trainer sets TF32 with (torch
    refuses the legacy `allow_tf32` flags after that; on the H100 this failed every cuda kernel test
    that ran after tests/test_precision.py), and restores the mode it found."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        set_tf32(torch.device("cuda"), True)
        rows = kernel_check.run_checks(torch.device("cpu"), kernels=["sparse_ffn"], dtypes=[torch.float32])
        assert rows and not _failures(rows)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
