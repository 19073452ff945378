# Two commands: `make book` builds the report, `make test` runs the tests. Both set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
TRITON := triton==3.6.0
CORPUS := data/corpus/manifest.json
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: book test test-slow test-gpu setup data browser lint clean

# Execution is cached per notebook source. New result records or a changed library also invalidate
# the cache, so that chapters pick up runs made since the last build and never show stale numbers.
BUILD_STAMP := _build/.inputs-stamp
book: setup data
	@if [ -f $(BUILD_STAMP) ] && [ -n "$$(find data/results src -newer $(BUILD_STAMP) \( -name '*.jsonl' -o -name '*.py' \) 2>/dev/null | head -1)" ]; then \
	  echo "new result records or library changes: re-executing notebooks"; rm -rf _build/.jupyter_cache _build/.doctrees; fi
	$(BIN)/jupyter-book build book --path-output . --warningiserror --keep-going
	@mkdir -p _build && touch $(BUILD_STAMP)
	@echo "report: $(CURDIR)/_build/html/index.html"

test: book browser
	$(BIN)/python -m pytest -q

# the crash-consistency suite: SIGKILL at random moments, then resume (minutes; not part of make test)
test-slow: setup data
	$(BIN)/python -m pytest -q -s -m crash

# On a GPU machine, with its own torch (no venv, no network): the kernel, loss and decoding tests that the
# CPU runs in Triton's interpreter or skips (bf16, CUDA graphs), and a pass/fail record of the run in
# data/results/gpu-tests/ (pass --git-commit's SHA as LMSCALE_GIT_COMMIT where the tree has no .git).
GPU_TESTS := tests/test_triton_chunk.py tests/test_triton_cumulative_softmax.py tests/test_triton_delta_rule.py \
	tests/test_triton_scan_complex.py tests/test_triton_selective_scan.py tests/test_triton_step.py \
	tests/test_loss.py tests/test_decode.py
test-gpu:
	LMSCALE_TEST_RECORD=data/results/gpu-tests PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m pytest -q $(GPU_TESTS)

setup: $(STAMP)

# torch first and pinned: an unpinned torch drags in a multi-GB CUDA build. Triton pinned to the GPU
# machine's version, so the interpreter in the tests runs the same compiler front end.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) $(TRITON)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

data: setup
	$(BIN)/lmscale data prepare

# Debian's Chromium for the headless test of the built HTML; best effort outside CI.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	        || echo "could not install chromium; the browser test will say how"; \
	    else echo "chromium missing: run 'sudo apt-get install chromium chromium-driver' to enable the browser test"; fi; }

lint: setup
	$(BIN)/ruff check src tests notebooks

clean:
	rm -rf _build book/_build
