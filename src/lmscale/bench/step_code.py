"""Which library files one mixer's training step runs: what decides whether a throughput record still
describes the code of the checkout.

A record measured at an earlier commit stands for the current code only while none of these files has
changed since. Every mixer shares the model, the MLP, the loss and the trainer; beyond them a mixer runs its
own module and the modules under ``mixers/`` and ``ops/`` that it imports, directly or through others. So a
change to Mamba's scan withholds Mamba's records (and those of every mixer importing the same scan), not
GLA's, and a rerun measures only what changed.

Imports are read from the source, function bodies included (the Triton kernels are imported where they are
called). Importing a module also runs its parent packages, so their ``__init__.py`` files count too. The one
import left out is the mixer registry's loading of every mixer module (``lmscale.mixers`` imports them all
to register them; a step runs only its own). That is the only dynamic import under ``mixers/`` and ``ops/``,
and a test checks that it stays so.
"""

from __future__ import annotations

import ast
import inspect
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # src/lmscale
# every mixer's step runs these (``mixers/__init__.py`` builds the mixer; ``base.py`` defines its interface)
SHARED_STEP_CODE = ("src/lmscale/model.py", "src/lmscale/mlp.py", "src/lmscale/train.py", "src/lmscale/loss.py",
                    "src/lmscale/rope.py", "src/lmscale/config.py", "src/lmscale/presets.py",
                    "src/lmscale/distributed.py", "src/lmscale/mixers/__init__.py", "src/lmscale/mixers/base.py")
FOLLOWED = ("lmscale.mixers.", "lmscale.ops")  # the imports followed beyond the shared files


def module_file(module: str) -> Path | None:
    """The source file of an ``lmscale`` module (a package's ``__init__.py``), None if there is none."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The ``lmscale`` modules a file imports anywhere in it, with the parent packages each import runs."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lmscale."):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("lmscale."))
    parents = {".".join(n.split(".")[:i]) for n in names for i in range(2, n.count(".") + 1)}
    return {n for n in names | parents if module_file(n)}


def _relative(path: Path) -> str:
    return str(Path("src") / path.relative_to(PACKAGE.parent))


@cache
def step_code(mixer: str | None = None) -> tuple[str, ...]:
    """The files (repository paths) a training step of ``mixer`` runs; None: the shared ones alone (the loss
    benchmark's head). An unknown mixer is refused with the registered names."""
    if mixer is None:
        return SHARED_STEP_CODE
    from lmscale.mixers import MIXERS, available

    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; registered: {', '.join(available())}")
    files, todo = set(), [Path(inspect.getfile(MIXERS[mixer]))]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        todo += [module_file(m) for m in imported_modules(path) if m.startswith(FOLLOWED) and m != "lmscale.mixers"]
    return tuple(sorted(set(SHARED_STEP_CODE) | {_relative(f) for f in files}))


def measures_current_code(commit: str | None, mixer: str | None) -> bool | None:
    """Whether a record of ``mixer`` measured at ``commit`` still describes the checkout's code (None:
    unknown, e.g. no .git here or a commit this clone lacks)."""
    from lmscale.results import code_changed_since

    changed = code_changed_since(commit, step_code(mixer))
    return None if changed is None else not changed


def current_code_flags(records) -> list[bool | None]:
    """``measures_current_code`` for each row of a throughput frame (``lmscale.results.load_records``): rows of
    the loss benchmark have no mixer and count the shared files only; each (commit, mixer) is asked once."""
    mixers = records["config.mixer"] if "config.mixer" in records else [None] * len(records)
    keys = [(c if isinstance(c, str) else None, m if isinstance(m, str) else None)
            for c, m in zip(records["git_commit"], mixers)]
    verdict = {key: measures_current_code(*key) for key in set(keys)}
    return [verdict[key] for key in keys]
