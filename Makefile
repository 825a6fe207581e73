# Two commands, both from nothing: `make test` and `make demo`.
# torch goes in first and on its own: TORCH_SPEC=torch==2.13.0 is the CPU wheel; GPU users
# install their CUDA build into .venv first (or pass TORCH_SPEC) and pip keeps it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,onnx,int8]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m jobs.demo

clean:
	rm -rf $(VENV) demo_out .pytest_cache
