# The whole set-up on a fresh machine is `make demo` or `make test`; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,all]"
	touch $(STAMP)

install: $(STAMP)

# Everything, the slow multi-process and SLURM tests included (that is what CI runs).
test: install
	$(PY) -m pytest -q --timeout=900

# Unit tests only, for the edit loop.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm" --timeout=300

demo: install
	bash launch/demo.sh

# On one GPU, <= 8 minutes: the gpu tests, every configs/cpu task under the deepspeed launcher, bench at paper
# scale, bench-data; JSON under $(OUT). CPU/CI: make gpu-check ARGS="--device cpu --tiny".
OUT ?= runs/gpu-check
gpu-check: install
	OUT=$(OUT) $(PY) launch/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs data/synthetic .pytest_cache
