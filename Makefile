# The two commands of the README:
#   make run    set up, build the default dataset, train briefly on CPU, print the probe score
#   make test   set up and run the test suite (what CI runs, through .ci/run)
# and, on a GPU machine as it comes (no venv, no pip: benchmarks/README.md, "GPU check"):
#   make gpu-check   build the C++ extension in place, run benchmarks/gpu_check.py (with the venv's
#                    python where one was set up, as here: no GPU, its CPU smoke version; else python3)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; CUDA users set TORCH_SPEC to their own build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q -m "not cuda"
GPU_CHECK_OUT ?= gpu_check_out
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: setup run test bench bench-quick gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,data,hf]"
	touch $@

run: setup
	$(PY) trelm_fast/train.py --overwrite

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/run.py --suite all --out bench_out

bench-quick: setup
	$(PY) benchmarks/run.py --suite all --quick --out bench_out

# No dependency on setup: the GPU machine has no package registry; the project is used in place.
gpu-check:
	$(GPU_PYTHON) setup.py -q build_ext --inplace
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info trelm_fast/_C*.so
