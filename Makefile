# Two entry points for a fresh machine: `make demo` and `make test` (`make docs` builds the site).
# Each creates .venv if it is missing. torch is pinned to the CPU wheel that lies on
# disk here; where torch is already importable (a GPU machine) it is left alone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= envs,atari,logs,ray,bench,video,dev

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

test: venv
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check flatworld tests benchmarks

demo: venv
	$(BIN)/python -m flatworld.cli demo

# The documentation site into site/; --strict turns a broken link or a missing page into an error.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs-demo site

.PHONY: venv test lint demo docs clean
