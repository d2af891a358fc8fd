"""Test setup: Triton kernels run under the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at
collection time. Tests marked `cuda` are skipped when no GPU is present. Shared fixtures:
`tiny_dir`, the tiny synthetic dataset built once per session; `dataset`, the hand-made dataset
directory of `test_model.make_dataset` (what a model reads; no tokenizer), once per session.
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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny synthetic dataset (seed 0, a small fast TransE), built once per session."""
    from trelm_fast.data.build import BuildConfig, build_dataset
    from trelm_fast.data.sources.synthetic import generate

    d = tmp_path_factory.getbasetemp() / "data_tiny"
    if not (d / "manifest.json").exists():
        build_dataset(generate("tiny", seed=0), d, BuildConfig(transe_epochs=10, transe_dim=16), progress=False)
    return d


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    from test_model import make_dataset

    return make_dataset(tmp_path_factory.mktemp("ds"))
