# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
# e.g. DEMO_ARGS=--fresh (start over) or DEMO_ARGS=--steps-scale=2 (continue every run to twice its steps)
DEMO_ARGS ?=
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch,test,lpips]'
	# PyTorch LPIPS for the parity test only; --no-deps because it asks for torchvision, which does not
	# import beside the CPU torch wheel used here (and the test needs only its linear layers).
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	touch $@

demo: setup
	$(VENV)/bin/ehrxdiff info --config configs/ehrxdiff.py
	$(VENV)/bin/ehrxdiff demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
