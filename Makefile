# make demo: train -> generate -> attribute (DAS) on the embedded fashion2 data, offline, on CPU
# make test: the fast CPU test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-features bench-lds clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/python train.py
	WANDB_MODE=offline $(BIN)/python attribute.py method=das
	@echo "DAS grids: outputs/fashion2/tiny/full/seed0/scores/das/*/grid.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-features: $(STAMP)
	$(BIN)/python benchmarks/features.py

clean:
	rm -rf outputs multirun
