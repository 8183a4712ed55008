# liverfusion: `make demo` and `make test` each install first when needed (one command on a fresh machine).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# CPU machines take the CPU build of torch first (about 200 MB instead of the multi-GB CUDA wheel), from PyTorch's
# CPU wheel index when pip can reach it, else from pip's own index (which serves a CPU build on this machine);
# GPU machines (nvidia-smi answers) take pip's default CUDA build. An installed torch is always kept.
TORCH_SPEC ?= torch>=2.6
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := .make/install.stamp
PYTEST_ARGS ?=
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: help install demo test test-slow lint format bench clean

help:  ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@mkdir -p .make
	@if ! $(PYTHON) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
			echo "GPU found: installing torch with CUDA"; $(PIP) install "$(TORCH_SPEC)"; \
		else \
			echo "no GPU: installing torch's CPU-only build"; \
			$(PIP) install --timeout 20 --retries 1 --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_SPEC)" || $(PIP) install "$(TORCH_SPEC)"; \
		fi; \
	fi
	$(PIP) install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## install the package and dev tools (idempotent)

demo: $(STAMP)  ## run the main job on the embedded phantom
	$(PYTHON) -m liverfusion.demo

test: $(STAMP)  ## run the fast test suite (real-data tests run when LIVERFUSION_SHARED_DATA is set)
	@$(PYTHON) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$status

test-slow: $(STAMP)  ## run the slow tests too (long training, benchmarks)
	$(PYTHON) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff lint + format check
	$(PYTHON) -m ruff check liverfusion hydra_plugins tests benchmarks
	$(PYTHON) -m ruff format --check liverfusion hydra_plugins tests benchmarks

format: $(STAMP)  ## apply ruff fixes and formatting
	$(PYTHON) -m ruff check --fix liverfusion hydra_plugins tests benchmarks
	$(PYTHON) -m ruff format liverfusion hydra_plugins tests benchmarks

bench: $(STAMP)  ## run the benchmark scripts (long; resumable; results in benchmarks/results/)
	$(PYTHON) benchmarks/run_all.py

clean:  ## remove caches, logs and build outputs (not data/)
	rm -rf .make .cache logs outputs build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
