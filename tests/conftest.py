"""Fixtures: the tiny family parameter, the real default model and the shared data folder (helpers: helpers.py)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the fused scan reduction's Triton kernel runs in Triton's interpreter, which Triton reads when first
# imported. Not in the vLLM suite's venv: vLLM's own Triton kernels must stay compiled there.
if not torch.cuda.is_available() and importlib.util.find_spec("vllm") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import FAMILIES

DATA_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=str(DATA_DIR), help="the shared benchmark data (layout of shared/data)")
    parser.addoption("--require-data", action="store_true",
                     help="fail, rather than skip, the tests that need the data when it is missing (make test)")


@pytest.fixture(params=FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, fp32 on CPU) and its tokenizer."""
    from melayer import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    path = Path(request.config.getoption("--data-dir")).resolve()
    if not path.is_dir():
        message = f"shared data folder missing: {path} (pass --data-dir)"
        if request.config.getoption("--require-data"):
            pytest.fail(message)
        pytest.skip(message)
    return path
