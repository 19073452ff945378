"""The notebooks are real: the book's executed outputs reproduce, and the papermill template works.

nbval re-executes each notebook of the book and compares every output, strictly, with the outputs
the book build stored in its execution cache (``_build/.jupyter_cache``) — the very outputs the HTML
shows. (``_build/jupyter_execute/*.ipynb`` is no reference: on a cache hit myst-nb writes it without
outputs.) Outputs that honestly vary (throughput, wall time,
dates in captions) are marked ``nbval-ignore-output`` in the notebook or sanitised in
``nbval_sanitize.cfg``; nothing is checked laxly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupyter_cache import get_cache

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
BOOK_NOTEBOOKS = ["literature_review", "toolkit", "corpus", "compare_mixers", "gpu_kernels", "scaling", "context_length", "recall",
                  "inference", "neuromorphic", "conclusions"]


def _env(results: Path) -> dict[str, str]:
    env = dict(os.environ, LMSCALE_ROOT=str(ROOT), LMSCALE_RESULTS=str(results))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _book_outputs(name: str, require) -> nbformat.NotebookNode:
    """The notebook as the book executed it, read back from the book's execution cache."""
    require(CACHE.is_dir(), f"no execution cache at {CACHE}; run `make book` (make test does)")
    notebook = jupytext.reads((ROOT / "notebooks" / f"{name}.py").read_text(), fmt="py:percent")
    try:
        _, executed = get_cache(CACHE).merge_match_into_notebook(notebook)
    except KeyError:
        require(False, f"notebooks/{name}.py changed since the book was built; run `make book`")
    return executed


@pytest.mark.slow
@pytest.mark.parametrize("name", BOOK_NOTEBOOKS)
def test_book_notebook_outputs_reproduce(name, tmp_path, require, corpus_dir):
    executed = _book_outputs(name, require)
    # Re-execution writes records; keep them away from the book's own results.
    results = tmp_path / "results"
    if (ROOT / "data" / "results").is_dir():
        shutil.copytree(ROOT / "data" / "results", results)
    work = tmp_path / "nb"
    work.mkdir()
    path = work / f"{name}.ipynb"
    nbformat.write(executed, path)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
           "--nbval-kernel-name", "python3", "--rootdir", str(work), str(path)]
    proc = subprocess.run(cmd, cwd=work, env=_env(results), capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _papermill(notebook: str, out: Path, results: Path, **params) -> None:
    ipynb = subprocess.run(
        [sys.executable, "-m", "jupytext", "--to", "ipynb", str(ROOT / "notebooks" / notebook), "-o", "-"],
        capture_output=True, text=True, check=True,
    ).stdout
    args = [sys.executable, "-m", "papermill", "-", str(out), "--cwd", str(ROOT / "notebooks")]
    for key, value in params.items():
        args += ["-y", json.dumps({key: value})]
    proc = subprocess.run(args, input=ipynb, env=_env(results), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_papermill_template_writes_a_record_the_analysis_picks_up(tmp_path, corpus_dir):
    results = tmp_path / "results"
    _papermill("train.py", tmp_path / "train.ipynb", results, experiment="pm-check", mixer="gla", steps=20,
               warmup_steps=2, eval_interval=10, batch_size=4, seq_len=32, d_model=32, n_heads=2)
    records = list((results / "pm-check").glob("*.jsonl"))
    assert [p.name for p in records] == ["gla-d32-l2-h2-t32-s20-seed0.jsonl"]
    record = json.loads(records[0].read_text())
    assert record["config"]["model"]["mixer"] == "gla" and record["config"]["train"]["steps"] == 20
    assert record["metrics"]["val_loss"] > 0 and record["provenance"]["git_commit"]

    # The analysis notebook, told to train nothing itself, plots the template's run.
    _papermill("compare_mixers.py", tmp_path / "compare.ipynb", results, experiment="pm-check", mixers=[])
    nb = json.loads((tmp_path / "compare.ipynb").read_text())
    outputs = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    assert "gla-d32-l2-h2-t32-s20-seed0" in outputs and "image/svg+xml" in outputs
