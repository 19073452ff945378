"""The book's chart style, rendered offline.

Altair's default renderer loads vega from a CDN, which shows nothing on an offline machine. The
``svg`` renderer draws the chart in Python through vl-convert and hands the notebook a static SVG,
so the built HTML needs no script at all.
"""

from __future__ import annotations

from typing import Any

import altair as alt

# Tableau 20, dark shades first: enough distinct colours for every registered mixer in one chart
PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#ffbb78", "#c49c94",
]


def _theme() -> dict[str, Any]:
    return {
        "config": {
            "view": {"continuousWidth": 520, "continuousHeight": 300, "stroke": None},
            "font": "DejaVu Sans, Helvetica, Arial, sans-serif",
            "range": {"category": PALETTE},
            "axis": {"labelFontSize": 12, "titleFontSize": 13, "grid": True, "gridOpacity": 0.4},
            "legend": {"labelFontSize": 12, "titleFontSize": 12, "labelLimit": 320},
            "header": {"labelFontSize": 13, "titleFontSize": 13},  # facet labels, 10 px by default
            "title": {"fontSize": 14, "anchor": "start"},
        }
    }


def setup() -> None:
    """Register the theme and the offline SVG renderer; call once at the top of a notebook."""
    alt.theme.register("lmscale", enable=True)(_theme)
    alt.renderers.enable("svg")
    alt.data_transformers.disable_max_rows()


# Vega expression: token counts as 1K, 256K, 1M (powers of two read as the binary prefixes people say)
TOKENS_LABEL = ("datum.value >= 1048576 ? format(datum.value / 1048576, '~g') + 'M' : "
                "datum.value >= 1024 ? format(datum.value / 1024, '~g') + 'K' : format(datum.value, '~g')")


def tokens_axis(values=None, **kwargs: Any) -> alt.Axis:
    """An axis of token counts labelled 1K, 8K, 256K (d3's "~s" would say 1.024k, 262.144k); ``values``
    puts a tick on every measured point."""
    if values is not None:
        kwargs["values"] = sorted({int(v) for v in values})
    return alt.Axis(labelExpr=TOKENS_LABEL, **kwargs)


def provenance_caption(records) -> str:
    """One line naming where the plotted numbers come from: runs, hardware, commits, dates."""
    commits = sorted({(c or "uncommitted")[:10] + ("+dirty" if d else "") for c, d in zip(records["git_commit"], records["git_dirty"])})
    hardware = sorted(set(records["hardware"].astype(str)))
    dates = sorted(records["date"].astype(str))
    span = dates[0][:10] if dates[0][:10] == dates[-1][:10] else f"{dates[0][:10]} to {dates[-1][:10]}"
    return (
        f"{len(records)} run(s) on {', '.join(hardware)}; torch {', '.join(sorted(set(records['torch'])))}; "
        f"commit {', '.join(commits)}; {span}."
    )


def table(frame, name: str, formats: dict[str, Any] | None = None, code: tuple[str, ...] = ()):
    """A compact HTML table for the book: no index, a fixed id (``name``) so that outputs are
    reproducible under nbval, long identifiers (hashes) in monospace and allowed to wrap; a missing value
    shows as "—"."""
    formats = dict(formats or {})
    for column in code:
        formats[column] = lambda value: f"<code>{value}</code>"
    return (
        frame.style.hide(axis="index")
        .format(formats, na_rep="—")
        .set_uuid(name)
        .set_table_styles(
            [
                {"selector": "td, th", "props": "font-size: 0.85em; padding: 0.2em 0.6em; vertical-align: top"},
                {"selector": "td code", "props": "word-break: break-all; font-size: 0.9em"},
            ]
        )
    )
