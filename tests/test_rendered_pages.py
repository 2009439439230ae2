"""Rendered-page check: every built chapter page, loaded in headless Chromium.

A page fails when it shows a traceback or error output, a broken image, a Sphinx error message, or
math that MathJax did not render. MathJax is served locally (offline), so a page whose equations
stay raw TeX fails here.

Needs Debian's ``chromium`` and ``chromium-driver`` and a built book (``make html-golden`` or
``make book``). Without Chromium the tests skip with a message, unless ``BOOK_REQUIRE_BROWSER=1``
(set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import functools
import http.server
import os
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
                 "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
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
