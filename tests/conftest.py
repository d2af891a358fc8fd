"""Test setup: Triton kernels run under the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at
collection time. Tests marked `cuda` are skipped when no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
