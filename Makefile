# One command each for a fresh machine:  make demo  |  make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data
ARCH   := $(shell uname -m)
# torch + torchvision pairs known to import together (see ../shared/ENVIRONMENT.md)
TORCH  := $(if $(filter aarch64,$(ARCH)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

.PHONY: setup data demo test test-fast mutation compose-test clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Fashion-MNIST: Debian's package where it can be installed, else torchvision's download.
data: $(VENV)/.installed
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true; fi
	$(VENV)/bin/flain data fetch fmnist --data-dir $(DATA)

demo: setup
	$(VENV)/bin/flain run

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

# the unit tests alone (no Flower runs, processes or builds): under a minute
test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# mutation testing of the core math (pyproject [tool.mutmut]; slow, not in CI; docs/testing.md)
mutation: setup
	$(PY) -m pip install -q mutmut==3.8.1
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

# docker compose for real: engine, images, TLS + node auth, a run with a killed node (docker/compose_test.py)
compose-test: setup
	$(PY) docker/compose_test.py --data-dir $(DATA)

clean:
	rm -rf runs .pytest_cache mutants
