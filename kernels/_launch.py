"""What every Triton launcher shares: argument checks, dispatch and the autotuning rules.

- `index_arg(t, name, op, device)`: an index tensor as a kernel reads it, contiguous int64 on the
  operands' device (a `unbind` view has stride > 1 and would be read as if contiguous), or a
  ValueError naming the op and the argument.
- `use_triton(t)`: the dispatch rule of every op: the Triton kernel for CUDA tensors, the PyTorch
  reference elsewhere (backend "auto"; an op whose reference measured faster on the GPU keeps it
  there too, `auto_on_cuda=False`). Inside `kernel_backend("triton")` every op takes its kernel,
  CPU tensors too (under `TRITON_INTERPRET=1`: how tests drive production callers through the
  kernels); inside `kernel_backend("reference")` every op takes its reference, CUDA tensors too;
  inside `kernel_backend("gpu")` every op dispatches as "auto" does CUDA tensors, CPU tensors too.
- `autotune(configs, key, restore_value)`: `triton.autotune` with the project's rules: an in-place
  kernel names what it writes in `restore_value` (the autotuner runs every config on the real
  arguments and would otherwise apply the update once per benchmark run); keys hold only sizes that
  are fixed for a model or bucketed with `bucket`; under the interpreter only the first config is
  kept (no benchmarking), and `Autotuner.all_configs` keeps the full list for tests.
- `bucket(n)`: the autotune key of a size that changes from batch to batch (target rows, path
  size, tokens): the next power of two, so training stops autotuning after warm-up.

- `record_flops(n)` / `kernel_flops()`: the matmul FLOPs of every Triton launch, counted analytically
  by its launcher (torch.utils.flop_counter sees the ops around a kernel, not inside it); the
  benchmarks' FLOP counts add them, so a kernel's work counts as its reference's would.

`TRITON_INTERPRET` is read once, at import (it must be set before the kernels are imported).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "triton", "reference", "gpu")
_backend = "auto"


def index_arg(t: torch.Tensor, name: str, op: str, device: torch.device) -> torch.Tensor:
    """`t` (1-D, int32 or int64, on `device`) as a contiguous int64 tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a 1-D int32/int64 tensor, got {got}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the operands on {device}")
    return t.to(torch.int64).contiguous()


_kernel_flops = 0


def record_flops(n: int) -> None:
    """Add the analytic matmul FLOPs (2 per multiply-add, as FlopCounterMode counts) of one launch."""
    global _kernel_flops
    _kernel_flops += int(n)


def kernel_flops() -> int:
    """FLOPs recorded by Triton launches in this process so far (take differences)."""
    return _kernel_flops


def use_triton(t: torch.Tensor, auto_on_cuda: bool = True) -> bool:
    """True when an op on `t` launches its Triton kernel under the current backend. An op whose
    reference measured faster on the GPU passes `auto_on_cuda=False`: its kernel runs only when forced."""
    return _backend == "triton" or (auto_on_cuda and (_backend == "gpu" or (_backend == "auto" and t.is_cuda)))


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Within the block every dispatching op uses `name`: "auto", "triton", "reference", or "gpu" (as
    "auto" dispatches CUDA tensors, whatever the device: how tests count the GPU's launches on CPU)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel_backend: {name!r} is not one of {BACKENDS}")
    before, _backend = _backend, name
    try:
        yield
    finally:
        _backend = before


def bucket(n: int) -> int:
    """The autotune key of a size that varies per batch: the next power of two (at least 1)."""
    return triton.next_power_of_2(max(int(n), 1))


def autotune(configs: Sequence[triton.Config], key: list[str], restore_value: Sequence[str] = ()):
    """`triton.autotune` under the rules in the module docstring (a decorator for a jitted kernel)."""
    configs = list(configs)

    def decorate(fn):
        tuner = triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key,
                                restore_value=list(restore_value))(fn)
        tuner.all_configs = configs
        return tuner

    return decorate
