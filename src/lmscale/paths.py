"""Where the repository's data lives, found the same way from the CLI, tests and notebooks.

Notebooks execute with their own folder as the working directory (papermill, Jupyter Book), so
paths are resolved from the repository root, not the cwd. ``LMSCALE_ROOT`` overrides the search.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The folder holding ``_toc.yml`` and ``src/lmscale``: from $LMSCALE_ROOT, the cwd upwards, or the package."""
    env = os.environ.get("LMSCALE_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "_toc.yml").is_file() and (candidate / "src" / "lmscale").is_dir():
            return candidate
    package_root = Path(__file__).resolve().parents[2]
    if (package_root / "src" / "lmscale").is_dir():
        return package_root
    return here


def data_dir() -> Path:
    return Path(os.environ.get("LMSCALE_DATA", repo_root() / "data"))


def results_dir() -> Path:
    return Path(os.environ.get("LMSCALE_RESULTS", data_dir() / "results"))
