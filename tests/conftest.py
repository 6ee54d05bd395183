"""Fixtures: the tiny family parameter, the real default model and the shared data folder (helpers: helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAMILIES

DATA_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(params=FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, fp32 on CPU) and its tokenizer."""
    from melayer import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared data folder missing: {DATA_DIR}")
    return DATA_DIR
