# `make demo` and `make test` work on a fresh clone: they create .venv and install when it is
# missing or older than setup.cfg.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DA_SEG_DATA ?= $(CURDIR)/data

.PHONY: install test demo clean tensorboard

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Generate the synthetic domains, train the four baselines on synth-streets (1 seed), print the table.
demo: $(STAMP)
	$(BIN)/da-seg synth --benchmark streets
	$(BIN)/da-seg sweep --seeds 1 recipes/synthetic/streets/source_only.toml \
		recipes/synthetic/streets/source_only_aug.toml recipes/synthetic/streets/source_only_adabn.toml \
		recipes/synthetic/streets/oracle.toml
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs"

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
