# The README's two commands. Each sets up .venv on first use (a fresh machine needs nothing
# but python3 >= 3.10 and access to PyPI), then runs.
#   make train                 the main job: python -m lit_grpo fit --config $(CONFIG)
#                              (SpatialFlow-GRPO from the built-in SFT editor)
#   make test                  the default test suite (not slow, not gpu)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/spatialflow.yaml
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup train test lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import torch, torchvision, lightning; print('lit_grpo env: torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__)"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) -m lit_grpo fit --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check lit_grpo tests benchmarks
	$(PY) -m ruff format --check lit_grpo tests benchmarks
