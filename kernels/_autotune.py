"""Autotune configurations shared by the kernels: one pinned config under the interpreter.

`TRITON_INTERPRET` is read once, at import (it must be set before the kernels are imported).
"""
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(first: triton.Config, *gpu_only: triton.Config) -> list[triton.Config]:
    """`[first]` when interpreting (autotuning pinned to one config), else `[first, *gpu_only]`."""
    return [first] if INTERPRET else [first, *gpu_only]
