"""Rendered-page check: every built chapter page, loaded in headless Chromium.

A page fails when it shows a traceback or error output, a broken image, a Sphinx error message, or
math that MathJax did not render. MathJax is served locally (offline), so a page whose equations
stay raw TeX fails here.

It also fails on what a reader should never see (issue "a book a researcher reads"): internal codes
in the text, code or output blocks that scroll sideways at a 1400-px window, figures without a
numbered caption, browser console errors, links to a repository that does not exist; and it moves
a slider of the interactive explorer and checks that the figure changes (over http and file://).

Needs Debian's ``chromium`` and ``chromium-driver`` and a built book (``make html-golden`` or
``make book``). Without Chromium the tests skip with a message, unless ``BOOK_REQUIRE_BROWSER=1``
(set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socketserver
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
REQUIRED = os.environ.get("BOOK_REQUIRE_BROWSER") == "1"

pytestmark = pytest.mark.browser


def _toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [c["file"] for c in part.get("chapters", [])]
    return pages


def _missing(msg: str):
    if REQUIRED:
        pytest.fail(msg + " (BOOK_REQUIRE_BROWSER=1: the rendered-page check is mandatory here)")
    pytest.skip(msg)


def _chromium() -> tuple[str, str] | None:
    for b in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if b and Path(b).exists():
            drv = shutil.which("chromedriver") or "/usr/bin/chromedriver"
            if Path(drv).exists():
                return b, drv
    return None


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").exists():
        _missing(f"no built book at {HTML} (run `make html-golden` or `make book` first)")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as httpd:
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def driver():
    found = _chromium()
    if found is None:
        _missing("headless Chromium not found: install Debian's `chromium` and `chromium-driver` "
                 "to run the rendered-page check")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # pragma: no cover
        _missing("selenium is not installed")
    binary, drv = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1600", f"--user-data-dir={profile}",
                 "--allow-file-access-from-files"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(drv), options=opts)
    d.set_page_load_timeout(60)
    d.set_script_timeout(60)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


_WAIT_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!document.querySelector('.math')) { done('no-math'); return; }
const start = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done('ok')).catch(e => done('error: ' + e));
  } else if (Date.now() - start > 30000) { done('MathJax never loaded'); }
  else { setTimeout(poll, 100); }
})();
"""

_INSPECT = """
const q = s => Array.from(document.querySelectorAll(s));
const text = document.body ? document.body.innerText : '';
return {
  tracebacks: q('.output.traceback, .output.error, div.cell_output .traceback, pre.traceback').length
              + (text.includes('Traceback (most recent call last)') ? 1 : 0),
  sphinx_errors: q('.system-message, .problematic').map(e => e.innerText.slice(0, 200)),
  broken_images: q('img').filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  images: q('img').length,
  math_total: q('.math').length,
  math_unrendered: q('.math').filter(e => !e.querySelector('mjx-container')).map(e => e.innerText.slice(0, 80)),
  math_errors: q('mjx-merror, .MathJax_Error').map(e => e.textContent.slice(0, 80)),
  title: document.title,
};
"""


@pytest.mark.parametrize("page", _toc_pages())
def test_page_renders_cleanly(page, site, driver):
    url = f"{site}/{page}.html"
    driver.get(url)
    status = driver.execute_async_script(_WAIT_MATHJAX)
    info = driver.execute_script(_INSPECT)
    assert status in ("ok", "no-math"), f"{page}: MathJax did not finish: {status}"
    assert info["tracebacks"] == 0, f"{page}: the page shows a traceback or error output"
    assert not info["sphinx_errors"], f"{page}: Sphinx error messages on the page: {info['sphinx_errors']}"
    assert not info["broken_images"], f"{page}: broken images: {info['broken_images']}"
    assert not info["math_unrendered"], f"{page}: math left unrendered: {info['math_unrendered'][:5]}"
    assert not info["math_errors"], f"{page}: MathJax errors: {info['math_errors'][:5]}"
    if page == _toc_pages()[0]:
        assert info["math_total"] > 0 and info["images"] > 0, "the preface has equations and a figure"
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "preface.png"))
        assert (SHOTS / "preface.png").stat().st_size > 10_000


def test_check_detects_a_broken_page(site, driver, tmp_path):
    """The check itself can fail: a page with a traceback, a missing image and raw math is caught."""
    bad = HTML / "_broken_check.html"
    mj = "mathjax/tex-mml-chtml.js"
    bad.write_text(
        "<html><head><script defer src='" + mj + "'></script></head><body>"
        "<div class='cell_output'><pre class='traceback'>Traceback (most recent call last):</pre></div>"
        "<img src='missing.png'><span class='math notranslate nohighlight'>\\(\\frac{1}{2\\)</span>"
        "</body></html>"
    )
    try:
        driver.get(f"{site}/_broken_check.html")
        driver.execute_async_script(_WAIT_MATHJAX)
        info = driver.execute_script(_INSPECT)
    finally:
        bad.unlink()
    assert info["tracebacks"] > 0
    assert info["broken_images"] == ["missing.png"]
    assert info["math_errors"] or info["math_unrendered"]


# --------------------------------------------------------------------------------------------------
# Presentation checks. Each page is loaded once; the checks below read the cached inspection.

# Internal codes readers cannot look up. Tuned against false positives: claim codes are one
# capital A-D followed by one or two digits as a whole word (not "A100", "L2", "H100"), matched
# outside math, code and outputs.
INTERNAL_CODE_PATTERNS = {
    "claim code": r"(?<![\w/.-])[ABCD]\d{1,2}(?![\w/])",
    "recipe number": r"\b[Rr]ecipes? [A-Z]?\d",
    "section sign": r"§",
    "the team notes": r"\b(the|our|team) notes\b",
    "doubtful claim number": r"\b[Dd]oubtful claim \d",
    "theorem code": r"\((T|L)\d{1,2}\)",
}
# Repositories that are known not to exist (the template placeholder of the book's own URL).
DEAD_REPOSITORIES = ("github.com/bistochastic/bistochastic-book",)

_PRESENT = r"""
const q = (s, root) => Array.from((root || document).querySelectorAll(s));
const art = document.querySelector('main article') || document.querySelector('article')
            || document.body;
// prose: the article without math, code inputs and cell outputs
const clone = art.cloneNode(true);
q('.math, mjx-container, script, style, .cell_input, .cell_output, pre, code, .highlight',
  clone).forEach(e => e.remove());
// overflow of code, outputs, tables and display math
const scrollers = q('div.highlight pre, .cell_output pre, .output pre, .cell_output table, '
                    + 'article table, div.math, mjx-container[display="true"]', art)
  .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 2)
  .map(e => ({tag: e.tagName, over: e.scrollWidth - e.clientWidth,
              text: (e.innerText || '').trim().slice(0, 60)}));
// figures: every image in the article must sit in a <figure> with a caption number
const imgs = q('img', art).filter(i => !i.closest('.sidebar, header, nav, .bd-header'));
const uncaptioned = imgs.filter(i => {
  const f = i.closest('figure');
  if (!f) return true;
  const c = f.querySelector('figcaption');
  return !c || !c.querySelector('.caption-number');
}).map(i => (i.getAttribute('alt') || i.getAttribute('src') || '').slice(0, 80));
const links = q('a[href]').map(a => a.href);
const buttons = q('a.btn, button.btn, .dropdown-launch-buttons a, .header-article-items a')
  .map(a => (a.href || a.getAttribute('data-bs-original-title') || a.title || '') + '');
const searches = q('.search-button-field, .search-button').filter(e => e.offsetParent !== null
  && getComputedStyle(e).display !== 'none').length;
const h1 = art.querySelector('h1');
const numbers = q('.caption-number', art).map(e => e.textContent.trim());
const refs = q('a.reference.internal', art).map(a => ({href: a.getAttribute('href') || '',
                                                        text: a.textContent.trim()}));
return {prose: clone.innerText, scrollers: scrollers, uncaptioned: uncaptioned,
        links: links, buttons: buttons, nimg: imgs.length, searches: searches,
        h1: h1 ? h1.textContent.trim() : '', numbers: numbers, refs: refs};
"""

_CACHE: dict = {}


def _inspect_presentation(page, site, driver):
    if page not in _CACHE:
        driver.get_log("browser")  # drop what earlier pages logged
        driver.get(f"{site}/{page}.html")
        driver.execute_async_script(_WAIT_MATHJAX)
        info = driver.execute_script(_PRESENT)
        info["console"] = [e["message"][:200] for e in driver.get_log("browser")
                           if e.get("level") == "SEVERE"]
        _CACHE[page] = info
    return _CACHE[page]


def internal_codes(text: str) -> list[str]:
    """Every internal-code match in ``text``, as 'kind: match (context)'."""
    import re

    found = []
    for kind, pat in INTERNAL_CODE_PATTERNS.items():
        for m in re.finditer(pat, text):
            ctx = text[max(0, m.start() - 30): m.end() + 30].replace("\n", " ")
            found.append(f"{kind}: {m.group(0)!r} in '...{ctx}...'")
    return found


def test_internal_code_patterns_are_tuned():
    """The patterns catch the codes the book used to show and leave ordinary text alone."""
    bad = ["as claim A3 states", "see B5.", "recipe 6 of", "recipe C13", "in §7.2",
           "doubtful claim 6 of the team notes", "Theorem (T1)", "lemma (L3)"]
    good = ["an A100 GPU", "the L2 norm", "H100 and H200", "Figure 3", "Chapter 12", "n = 64",
            "arXiv 2601.02080", "B-spline", "sha A1b2c3", "ε = 1e-3"]
    for t in bad:
        assert internal_codes(t), t
    for t in good:
        assert not internal_codes(t), (t, internal_codes(t))


@pytest.mark.parametrize("page", _toc_pages())
def test_no_internal_codes(page, site, driver):
    info = _inspect_presentation(page, site, driver)
    found = internal_codes(info["prose"])
    assert not found, f"{page}: {len(found)} internal code(s): {found[:6]}"


@pytest.mark.parametrize("page", _toc_pages())
def test_no_horizontal_overflow(page, site, driver):
    info = _inspect_presentation(page, site, driver)
    assert not info["scrollers"], (
        f"{page}: {len(info['scrollers'])} block(s) scroll sideways at 1400 px: "
        f"{info['scrollers'][:4]}")


@pytest.mark.parametrize("page", _toc_pages())
def test_every_figure_has_a_numbered_caption(page, site, driver):
    info = _inspect_presentation(page, site, driver)
    assert not info["uncaptioned"], (
        f"{page}: {len(info['uncaptioned'])} figure(s) without a numbered caption: "
        f"{info['uncaptioned'][:4]}")


@pytest.mark.parametrize("page", _toc_pages())
def test_no_console_errors(page, site, driver):
    info = _inspect_presentation(page, site, driver)
    assert not info["console"], f"{page}: browser console errors: {info['console'][:4]}"


@pytest.mark.parametrize("page", _toc_pages()[:1])
def test_one_search_box(page, site, driver):
    info = _inspect_presentation(page, site, driver)
    assert info["searches"] == 1, f"{page}: {info['searches']} visible search boxes at 1400 px"


_NUMBERED = re.compile(r"^(Theorem|Lemma|Proposition|Corollary|Definition|Conjecture|Remark|Example|"
                       r"Algorithm|Exercise|Fig\.|Table)\s+(\S+)")
_KINDS = ("Theorem", "Lemma", "Proposition", "Corollary", "Definition", "Conjecture", "Exercise")


@pytest.mark.parametrize("page", _toc_pages())
def test_results_and_figures_numbered_per_chapter(page, site, driver):
    """A result or figure on a chapter page carries that chapter's number ("Theorem 3.2",
    "Fig. 15.1"); pages without a chapter number count 1, 2, ... on their own."""
    info = _inspect_presentation(page, site, driver)
    m = re.match(r"^(\d+[a-z]?)\.\s", info["h1"])
    labels = [n for n in info["numbers"] if _NUMBERED.match(n)]
    for lab in labels:
        num = _NUMBERED.match(lab).group(2)
        if m:
            assert re.fullmatch(re.escape(m.group(1)) + r"\.\d+", num), (
                f"{page} ({info['h1'][:30]}): '{lab}' is not numbered in chapter {m.group(1)}")
        else:
            assert re.fullmatch(r"\d+", num), f"{page}: '{lab}' has a chapter prefix"
    if page.startswith("book/03_"):
        assert any(lab.startswith(("Proposition 3.", "Lemma 3.")) for lab in labels), labels
        assert any(lab.startswith("Fig. 3.") for lab in labels), labels


def test_index_of_results_links_numbered_results():
    """The index of results links every result with its per-chapter number: the number's chapter
    is the chapter of the page it links to."""
    pytest.importorskip("selenium")
    html = (HTML / "book" / "theorems.html")
    if not html.exists():
        _missing("no built index of results")
    text = html.read_text(encoding="utf-8")
    links = re.findall(r'<a class="reference internal" href="(\d+[a-z]?)_[^"#]*\.html#[^"]*">'
                       r'(?:<span[^>]*>)?\s*(' + "|".join(_KINDS) + r') (\d+[a-z]?)\.(\d+)', text)
    assert len(links) >= 20, f"index of results: only {len(links)} numbered links"
    for stem, kind, chap, _k in links:
        assert stem.lstrip("0") == chap or (stem == "0" and chap == "0"), (stem, kind, chap)


def _repository_url() -> str:
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    return ((cfg.get("repository") or {}).get("url") or "").strip()


@pytest.mark.parametrize("page", _toc_pages())
def test_no_link_to_a_missing_repository(page, site, driver):
    info = _inspect_presentation(page, site, driver)
    dead = [h for h in info["links"] + info["buttons"] if any(d in h for d in DEAD_REPOSITORIES)]
    assert not dead, f"{page}: links to a repository that does not exist: {dead[:4]}"
    if not _repository_url():  # no repository configured: no repository/launch buttons at all
        launch = [h for h in info["buttons"]
                  if any(k in h for k in ("mybinder", "colab.research", "/issues", "github.com"))]
        assert not launch, f"{page}: repository or launch buttons without a repository: {launch}"


_EXPLORER = "book/explorer"

_SLIDE = r"""
const name = arguments[0];
const s = document.querySelector('input[type=range][data-param="' + name + '"]');
if (!s) return {error: 'no slider ' + name};
const snap = () => Array.from(document.querySelectorAll('#explorer canvas'))
  .map(c => c.toDataURL()).join('|') + (document.querySelector('#explorer-readout') || {}).textContent;
const before = snap();
s.value = s.value === s.max ? s.min : s.max;
s.dispatchEvent(new Event('input', {bubbles: true}));
const after = snap();
return {changed: before !== after, canvases: document.querySelectorAll('#explorer canvas').length,
        readout: (document.querySelector('#explorer-readout') || {}).textContent || ''};
"""


@pytest.mark.skipif(_EXPLORER not in _toc_pages(), reason="no explorer page in the ToC")
@pytest.mark.parametrize("scheme", ["http", "file"])
@pytest.mark.parametrize("param", ["tau", "n", "iters", "scale"])
def test_explorer_slider_changes_the_figure(scheme, param, site, driver):
    url = f"{site}/{_EXPLORER}.html" if scheme == "http" else (HTML / f"{_EXPLORER}.html").as_uri()
    driver.get_log("browser")
    driver.get(url)
    # the explorer builds its sliders from script after load: wait for them (file:// pages can
    # return from get() before that script has run)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: d.execute_script(
        "return document.querySelectorAll('#explorer input[type=range]').length") >= 4)
    res = driver.execute_script(_SLIDE, param)
    assert "error" not in res, res
    assert res["canvases"] >= 2, "the explorer draws a heat map and a spectrum"
    assert res["changed"], f"moving the {param} slider did not change the figure ({scheme})"
    errors = [e["message"][:200] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    if scheme == "file":  # the theme cannot read its stored light/dark mode from file:// pages
        errors = [m for m in errors if "Got invalid theme mode" not in m]
    assert not errors, f"explorer over {scheme}: console errors {errors[:3]}"


def test_presentation_checks_can_fail(site, driver):
    """A page with an internal code, an overflowing block, an uncaptioned figure, a console error
    and a dead repository link is caught by every check."""
    bad = HTML / "_bad_presentation.html"
    bad.write_text(
        "<html><body><main><article><p>As claim A3 of the notes says (see §7.2).</p>"
        "<div class='highlight'><pre style='width:300px;overflow:auto'>" + "x" * 400 + "</pre></div>"
        "<img src='_static/none.png' alt='a plot'>"
        "<a href='https://github.com/bistochastic/bistochastic-book'>repo</a>"
        "<script>console.error('boom')</script></article></main></body></html>"
    )
    try:
        _CACHE.pop("_bad_presentation", None)
        info = _inspect_presentation("_bad_presentation", site, driver)
    finally:
        bad.unlink()
        _CACHE.pop("_bad_presentation", None)
    assert len(internal_codes(info["prose"])) >= 3
    assert info["scrollers"] and info["uncaptioned"]
    assert any("boom" in m for m in info["console"])
    assert any(DEAD_REPOSITORIES[0] in h for h in info["links"])
