# charrnn: every target creates .venv and installs the project first, so each works
# on a fresh clone by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Tests run CUDA kernels under numba's simulator (set before numba is imported).
SIM    := NUMBA_ENABLE_CUDASIM=1

.PHONY: install names sample test test-gpu bench bench-gpu lint corpora train-names train-shakespeare clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

names: $(STAMP)
	$(BIN)/charrnn names

sample: $(STAMP)
	$(BIN)/charrnn sample --temp 0.8

test: $(STAMP)
	$(SIM) $(BIN)/python -m pytest -q -m "not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

bench: $(STAMP)
	$(BIN)/python -m bench.run --out BENCHMARKS.md

bench-gpu: $(STAMP)
	$(BIN)/python -m bench.run --gpu --out BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/ruff check charrnn tests bench corpora

corpora: $(STAMP)
	$(BIN)/python corpora/build.py

train-names: $(STAMP)
	$(BIN)/charrnn train ../shared/corpora/names.txt --lines --cell lstm --layers 2 --hidden 128 \
	  --embed 32 --batch-size 64 --steps 6000 --lr 3e-3 --test-count 1000 --val-frac 0.05 \
	  --out checkpoints/runs/names

clean:
	rm -rf $(VENV) build *.egg-info
