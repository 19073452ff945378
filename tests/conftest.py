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


# `make test-gpu`: the kernel tests on a GPU, whose outcome becomes a record (data/results/gpu-tests/).
TEST_RECORD_ENV = "LMSCALE_TEST_RECORD"
_outcomes: dict[str, dict[str, int]] = {}
_failed: list[str] = []


def pytest_configure(config):
    if os.environ.get(TEST_RECORD_ENV) and not torch.cuda.is_available():
        raise pytest.UsageError(f"{TEST_RECORD_ENV} is set (make test-gpu) but torch sees no CUDA device: the GPU "
                                "test record must come from a GPU; run it on the GPU machine")


def pytest_runtest_logreport(report):
    if not os.environ.get(TEST_RECORD_ENV):
        return
    if report.when == "call" or report.outcome != "passed":  # setup/teardown count only when they fail or skip
        outcome = "failed" if report.failed else report.outcome
        counts = _outcomes.setdefault(report.nodeid.split("::")[0], {"passed": 0, "failed": 0, "skipped": 0})
        counts[outcome] = counts.get(outcome, 0) + 1
        if report.failed:
            _failed.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    folder = os.environ.get(TEST_RECORD_ENV)
    if not folder:
        return
    import time

    from lmscale.results import make_record, write_records

    totals = {k: sum(c.get(k, 0) for c in _outcomes.values()) for k in ("passed", "failed", "skipped")}
    record = make_record("gpu-tests", kind="test-run", config={"files": sorted(_outcomes)}, seed=0,
                         metrics={**totals, "by_file": _outcomes, "exit_status": int(exitstatus)},
                         device="cuda", status="ok" if totals["failed"] == 0 and exitstatus == 0 else "failed",
                         extra={"failed_tests": _failed},
                         run_id=f"gpu-tests-{time.strftime('%Y%m%dT%H%M%S')}")
    path = write_records([record], Path(folder) / f"{record['run_id']}.jsonl")
    print(f"\ngpu test record: {path} ({totals['passed']} passed, {totals['failed']} failed, "
          f"{totals['skipped']} skipped)")
