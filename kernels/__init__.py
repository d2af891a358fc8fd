"""Triton kernels of trelm-fast, importable as `trelm_fast.kernels` (one op per module).

Each module holds private `_name_kernel` Triton functions, a host launcher, and the plain PyTorch
reference the kernel is tested against. Nothing here queries CUDA at import time; on CPU tensors
the kernels run only under `TRITON_INTERPRET=1` (set before import), which is how tests run them.

Every op dispatches by `kernel_backend` (`_launch`): the kernel on CUDA tensors, the reference
elsewhere, unless `with kernel_backend("triton"|"reference"):` says otherwise.
"""
from ._launch import kernel_backend

__all__ = ["kernel_backend"]
