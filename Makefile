# Two entry points, each creating/updating its own environment in .venv:
#   make quickstart   prune + repair the shipped Fashion-MNIST ResNet-18 (configs/quickstart.yaml)
#   make test         the test suite (CPU, tiny models, generated data)
#   make test-fast    the core's tests only, without whole-command or multi-process runs (about 2 minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: quickstart test test-fast fashion-mnist benchmark

# apt-get install as root or through sudo, refreshing the package lists once if a package is not found
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); apt_install() { $$SUDO apt-get install -y -qq "$$@" || \
  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq "$$@"; }; }; apt_install

# Debian and Ubuntu ship venv separately (python3-venv)
$(BIN)/lightning-repair: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); $(APT_INSTALL) python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
fashion-mnist:
	@test -f $(FASHION_MNIST) || test -f data/t10k-images-idx3-ubyte.gz || \
	  test -f data/FashionMNIST/raw/t10k-images-idx3-ubyte.gz || { $(APT_INSTALL) dataset-fashion-mnist; }

quickstart: $(BIN)/lightning-repair fashion-mnist
	$(BIN)/lightning-repair fit --config configs/quickstart.yaml

test: $(BIN)/lightning-repair
	$(BIN)/python -m pytest -q --durations=15

# the core's tests only (no whole-command runs, no multi-process runs, tests/conftest.py): about 2 minutes
test-fast: $(BIN)/lightning-repair
	$(BIN)/python -m pytest -q -m "not cli and not ddp" --durations=10

benchmark: $(BIN)/lightning-repair fashion-mnist
	$(BIN)/lightning-repair-sweep --config configs/sweep/fashion_mnist_transition.yaml
