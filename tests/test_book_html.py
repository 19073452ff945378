"""The built book, opened in headless Chromium: every chart rendered, no console errors, no table that
scrolls sideways, no "nan" cell, no MyST role left as raw text; and, from the HTML files, every internal
link resolves.

Needs `make book` first (`make test` does it) and Debian's chromium + chromium-driver. Under CI a
missing browser or book is a failure; elsewhere the test skips and says how to get them.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
# Chapters that must show at least one chart.
CHART_PAGES = ["notebooks/literature_review.html", "notebooks/toolkit.html", "notebooks/corpus.html", "notebooks/compare_mixers.html",
               "notebooks/gpu_kernels.html"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def server(require):
    require((HTML / "index.html").is_file(), f"no built book at {HTML}; run `make book`")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(require):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    require(bool(chromium and driver_path),
          "headless Chromium not found; install it with `sudo apt-get install chromium chromium-driver`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def _pages() -> list[str]:
    skip = {"genindex.html", "search.html"}
    return sorted(
        str(p.relative_to(HTML)) for p in HTML.rglob("*.html")
        if p.name not in skip and "_static" not in p.parts and "_sources" not in p.parts
    )


CHARTS_JS = """
const imgs = [...document.querySelectorAll('article img')].filter(i => /\\.svg($|\\?)|^data:image\\/svg/.test(i.src));
const inline = [...document.querySelectorAll('article svg.marks')];
return {
  imgs: imgs.map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
  inline: inline.map(s => s.querySelectorAll('[class^="mark-"]').length),
};
"""


# Tables of at most this many columns must fit their column of text (no scrollbar inside the page).
NARROW_TABLE_COLUMNS = 8
TABLES_JS = """
return [...document.querySelectorAll('article table')].map(t => {
  const box = t.closest('.cell_output, .output, .pst-scrollable-table-container, article') || t.parentElement;
  const head = t.querySelector('tr');
  return {columns: head ? head.children.length : 0, width: t.scrollWidth, room: box.clientWidth,
          id: t.id || (t.querySelector('caption') || {}).innerText || '',
          missing: [...t.querySelectorAll('td')].map(c => c.innerText.trim()).filter(x => /^(nan|NaN|None|<NA>)$/.test(x))};
});
"""


# A figure's caption is italic text in its cell's output (or the next cell's) that says where its numbers
# come from: records and runs, or the code computed at build time.
CAPTIONS_JS = """
const charts = [...document.querySelectorAll('article img')].filter(i => /\\.svg($|\\?)|^data:image\\/svg/.test(i.src))
  .concat([...document.querySelectorAll('article svg.marks')]);
const source = /record|run\\(s\\)|runs? of|computed from|counted from|literature/i;
return charts.map(c => {
  const cell = c.closest('.cell');
  const next = cell && cell.nextElementSibling && cell.nextElementSibling.classList.contains('cell')
    ? cell.nextElementSibling : null;
  const texts = [cell, next].filter(Boolean).flatMap(x => [...x.querySelectorAll('.cell_output em')].map(e => e.innerText));
  return {chart: c.getAttribute('src') || 'inline svg', captioned: texts.some(t => source.test(t))};
}).filter(c => !c.captioned).map(c => c.chart);
"""


# A role the renderer did not process shows as its source, e.g. "{cite:p}" before the key in code font.
RAW_ROLES_JS = """
const article = document.querySelector('article');
if (!article) return [];
const prose = article.cloneNode(true);
prose.querySelectorAll('pre, code, .cell_input, .highlight').forEach(e => e.remove());
return prose.textContent.match(/\\{(cite|ref|doc|numref|eq)(:[a-z]+)?\\}/g) || [];
"""


def test_every_page_loads_without_console_errors_and_charts_render(server, browser):
    pages = _pages()
    assert "index.html" in pages and set(CHART_PAGES) <= set(pages), pages
    for page in pages:
        browser.get(f"{server}/{page}")
        charts = browser.execute_script(CHARTS_JS)
        for img in charts["imgs"]:
            assert img["ok"], f"{page}: chart {img['src']} did not render"
            if not img["src"].startswith("data:"):
                svg = (HTML / page).parent.joinpath(img["src"]).resolve().read_text()
                assert re.search(r'class="mark-(line|point|rect|area|symbol)', svg), f"{page}: {img['src']} has no marks"
        assert all(n > 0 for n in charts["inline"]), f"{page}: an inline chart has no marks"
        if page in CHART_PAGES:
            assert charts["imgs"] or charts["inline"], f"{page}: expected a chart, found none"
        raw = browser.execute_script(RAW_ROLES_JS)
        assert not raw, f"{page}: {len(raw)} MyST role(s) shown as raw text, e.g. {raw[:3]}"
        uncaptioned = browser.execute_script(CAPTIONS_JS)
        assert not uncaptioned, f"{page}: {len(uncaptioned)} figure(s) without a caption naming their source"
        for table in browser.execute_script(TABLES_JS):
            assert not table["missing"], f"{page}: table {table['id']} shows missing values as {table['missing'][:3]}"
            if table["columns"] <= NARROW_TABLE_COLUMNS:
                assert table["width"] <= table["room"] + 2, (
                    f"{page}: table {table['id']} ({table['columns']} columns) is {table['width']} px wide in "
                    f"{table['room']} px: it scrolls sideways")
        # The browser asks every site for /favicon.ico on its own; the book has none and links none.
        errors = [e for e in browser.get_log("browser")
                  if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
        assert not errors, f"{page}: console errors {errors}"


LINK = re.compile(r'<a\s[^>]*href="([^"#:?]*)(?:#([^"]*))?"')


def test_every_internal_link_resolves(require):
    require((HTML / "index.html").is_file(), f"no built book at {HTML}; run `make book`")
    ids: dict[Path, set[str]] = {}
    broken = []
    for page in _pages():
        path = HTML / page
        for target, anchor in LINK.findall(path.read_text()):
            if target.startswith(("_static", "_sources")) or not (target or anchor):
                continue
            file = (path.parent / target).resolve() if target else path
            if target and not file.exists():
                broken.append(f"{page}: {target}")
            elif anchor and file.suffix == ".html":
                if file not in ids:
                    ids[file] = set(re.findall(r'\bid="([^"]+)"', file.read_text()))
                if anchor not in ids[file]:
                    broken.append(f"{page}: {target}#{anchor}")
    assert not broken, f"{len(broken)} broken internal links, e.g. {broken[:5]}"
