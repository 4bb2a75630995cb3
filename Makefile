# Entry points for a fresh machine: `make train` and `make test` set up .venv on first use.
# Extra arguments go through ARGS, e.g. `make train ARGS="optimizer=sophia_g trainer.max_epochs=5"`.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The library's own environment: the oldest torch pyproject allows, flatsophia without the template's
# extras, and the library tests' tools (the `test-lib` extra).
LIB_VENV ?= .venv-lib
LIB_TORCH := torch==2.13.0
ARGS ?=

.PHONY: install train test test-lib bench gpu-check lint clean

# The marker is rebuilt when pyproject.toml changes. torch and torchvision are pinned as a pair
# (another torch with PyPI's torchvision breaks `import timm`).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -e ".[template,test]"
	touch $@

install: $(VENV)/.installed

## train: default run (MNIST-1D, embedded; ~2 min on 2 CPU cores), prints the validation metric
train: install
	$(PY) src/train.py $(ARGS)

## test: the test suite on 2 workers (pytest's "no tests collected", exit 5, counts as success)
test: install
	@$(PY) -m pytest -n 2 -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

$(LIB_VENV)/.installed: pyproject.toml
	test -x $(LIB_VENV)/bin/python || python3 -m venv $(LIB_VENV)
	$(LIB_VENV)/bin/pip install $(LIB_TORCH)
	$(LIB_VENV)/bin/pip install -e ".[test-lib]"
	touch $@

## test-lib: the optimizer library's tests (pytest --library) in $(LIB_VENV): the oldest torch allowed, no template extras
test-lib: $(LIB_VENV)/.installed
	$(LIB_VENV)/bin/python -m pytest --library -n 2 -q $(ARGS)

## bench: optimizer benchmark (python -m flatsophia.bench; ARGS="--help" for options, docs/performance.md)
bench: install
	$(PY) -m flatsophia.bench $(ARGS)

## gpu-check: the GPU acceptance run on one CUDA GPU (CUDA tests, bf16 runs, CUDA benchmark)
gpu-check: install
	PY=$(PY) bash scripts/gpu_check.sh

## lint: ruff over the sources and tests
lint: install
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install ruff
	$(PY) -m ruff check src tests scripts

## clean: remove run outputs and caches (not .venv, not data/)
clean:
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
