"""Make the built HTML work with no network, and load each script once.

- MathJax: Sphinx points at a CDN by default, which an offline reader (and the test browser) cannot
  reach. The MathJax 3 build shipped by the ``sphinx-mathjax-offline`` wheel is copied into
  ``_static/mathjax`` — only the TeX→CHTML component and its fonts — and used instead.
- sphinx-thebe registers its inline configuration script twice under Jupyter Book 1.0 (its
  ``env-before-read-docs`` hook runs twice), which redeclares a ``const`` and throws in the console.
  Identical script entries are dropped from every page.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sphinx.util.fileutil import copy_asset

MATHJAX_FILES = ["tex-chtml.js", "output/chtml"]


def _mathjax_source() -> Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the sphinx-mathjax-offline package is missing; run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "static" / "mathjax"


def _copy_mathjax(app, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    source = _mathjax_source()
    target = Path(app.outdir) / "_static" / "mathjax"
    for name in MATHJAX_FILES:
        destination = target / name if (source / name).is_dir() else target
        copy_asset(str(source / name), str(destination))


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # the same inline script is registered once with filename None and once with ''
        key = (script.filename or "", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    _mathjax_source()  # fail at start-up, not after the whole build
    app.config.mathjax_path = "mathjax/tex-chtml.js"
    app.connect("html-page-context", _dedupe_scripts, priority=1000)  # after every other handler
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
