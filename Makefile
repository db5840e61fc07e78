# make demo: train -> generate -> attribute (DAS, D-TRAK, pixel) -> LDS on the embedded fashion2 data, offline, on CPU
# make test: the fast CPU test suite
# make bench-features / bench-lds: the CPU benchmarks (docs/benchmarks.md); make gpu-check: the GPU check
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# what a GPU machine without network needs beside its own torch/lightning/transformers/peft (pure Python wheels)
# EK-FAC influence; --no-deps: its metadata asks for torchvision, unused, which breaks lightning beside a CPU torch
KRONFLUENCE := 'kronfluence==1.0.1'
GPU_WHEELS := diffusers importlib_metadata 'hydra-core>=1.3,<1.4' 'omegaconf>=2.3,<2.4' antlr4-python3-runtime==4.9.3 traker einops einconv opt-einsum accelerate $(KRONFLUENCE)

.PHONY: demo test lint bench-features bench-lds gpu-check gpu-wheels clean

# PYTHONWARNINGS=ignore: setuptools' build warnings about editable installs are not ours to act on
PIP := PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(KRONFLUENCE)
	touch $(STAMP)

# the published recipe's projector (TRAK, PyPI traker: pure Python; its torch requirement is met by ours)
$(BENCH_STAMP): $(STAMP)
	$(PIP) -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# the whole job on the embedded data (conf/experiment/demo.yaml): full model, 8 subset models two at a time (one
# thread each: on 2 cores two one-thread trainings beat one two-thread training), attributions, the LDS, and the
# grids again at the c the LDS selected. Every step reuses what a previous run finished.
DEMO := experiment=demo
DEMO_SUBSETS := 0 1 2 3 4 5 6 7
demo: $(STAMP)
	$(BIN)/python train.py $(DEMO)
	printf '%s\n' $(DEMO_SUBSETS) | xargs -P 2 -I{} env OMP_NUM_THREADS=1 $(BIN)/python train.py $(DEMO) \
		subset=lds subset.index={} trainer.enable_progress_bar=false
	for method in das dtrak pixel; do $(BIN)/python attribute.py $(DEMO) method=$$method || exit 1; done
	$(BIN)/python evaluate_lds.py $(DEMO)
	$(BIN)/python attribute.py $(DEMO) method=das
	@echo "DAS grids at the selected c: outputs/demo/fashion2/tiny/full/seed0/scores/das/{val,generated}/grid.png"
	@echo "This LDS is a demonstration on 8 subset models; the measurement is make bench-lds (docs/benchmarks.md)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-features: $(BENCH_STAMP)
	$(BIN)/python benchmarks/features.py

bench-lds: $(STAMP)
	$(BIN)/python benchmarks/lds_fashion2.py

gpu-check: $(BENCH_STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# wheels to carry to an offline GPU machine: pip install --no-index --no-deps .whl/*.whl there
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir .whl $(GPU_WHEELS)

clean:
	rm -rf outputs multirun
