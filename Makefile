# The two commands of the README:
#   make run    set up, build the default dataset, train briefly on CPU, print the probe score
#   make test   set up and run the test suite (what CI runs, through .ci/run)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; CUDA users set TORCH_SPEC to their own build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q -m "not cuda"

.PHONY: setup run test bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,data]"
	touch $@

run: setup
	$(PY) trelm_fast/train.py --overwrite

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/run.py --suite all --out bench_out

bench-quick: setup
	$(PY) benchmarks/run.py --suite all --quick --out bench_out

clean:
	rm -rf $(VENV) build *.egg-info trelm_fast/_C*.so
