"""Builds the C++ extension `trelm_fast._C` from csrc/ with pybind11 (metadata lives in pyproject.toml)."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "trelm_fast._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    # kernels/ ships as trelm_fast.kernels through the symlink trelm_fast/kernels -> ../kernels,
    # never as a top-level `kernels` module (that name belongs to another package).
    packages=find_packages(include=["trelm_fast", "trelm_fast.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
