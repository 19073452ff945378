"""Shared fixtures. Under CI (CI=true) a missing prerequisite fails; elsewhere the test skips and says how to get it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# The unit tests use tiny models, for which a second thread costs more in synchronisation than it
# saves; subprocesses (notebooks, torchrun) keep their own settings.
torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before any
# kernel is defined, i.e. before lmscale.ops.triton's modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _require(condition: bool, message: str) -> None:
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def require():
    """``require(condition, message)``: skip locally, fail under CI."""
    return _require


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The prepared corpus that `make test` builds before the tests run."""
    path = ROOT / "data" / "corpus"
    _require((path / "manifest.json").is_file(), "no prepared corpus; run `make data` (make test does)")
    return path
