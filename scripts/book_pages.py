"""A small Sphinx extension for the rendered book (loaded by ``scripts/book.py stage``).

* **No duplicated inline scripts.** Sphinx 7.4 registers an inline ``<script>`` that an extension adds
  after the builder started (``app.add_js_file(None, body=...)``, as sphinx-thebe does on
  ``env-before-read-docs``) twice: once in the builder's list as ``_JavaScript(None, body)`` and once
  more when the registry is replayed, as ``_JavaScript('', body)``; ``None != ''`` defeats the
  de-duplication. sphinx-thebe's body declares ``const THEBE_JS_URL``, so the second copy throws
  ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared`` on every page. Each page's
  script list keeps the first of identical inline scripts.
* **Download the chapter's MyST source.** The download menu offers the golden ``.ipynb`` (the
  rendered source) and the PDF; this adds the paired ``.md`` (copied to ``_sources`` by the stage).
"""

from __future__ import annotations

from pathlib import Path


def _dedupe_inline_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, keep = set(), []
    for js in scripts:
        filename = getattr(js, "filename", js)
        attrs = getattr(js, "attributes", {})
        if not filename and "body" in attrs:
            key = tuple(sorted((k, str(v)) for k, v in attrs.items()))
            if key in seen:
                continue
            seen.add(key)
        keep.append(js)
    scripts[:] = keep


def _md_download(app, pagename, templatename, context, doctree):
    md = Path(app.srcdir) / "_md_sources" / f"{pagename}.md"
    if not md.exists():
        return
    for group in context.get("header_buttons", []):
        if group.get("label") != "download-buttons":
            continue
        buttons = group["buttons"]
        if any(b.get("label") == "download-md-button" for b in buttons):
            return
        pos = next((i for i, b in enumerate(buttons) if b.get("label") == "download-pdf-button"),
                   len(buttons))
        buttons.insert(pos, {
            "type": "link",
            "url": f"{context['pathto']('_sources', 1)}/{pagename}.md",
            "text": ".md",
            "tooltip": "Download the chapter's source (MyST Markdown notebook)",
            "icon": "fab fa-markdown",
            "label": "download-md-button",
        })
        return


def _copy_md_sources(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    src = Path(app.srcdir) / "_md_sources"
    if not src.exists():
        return
    for md in src.rglob("*.md"):
        dest = Path(app.outdir) / "_sources" / md.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(md.read_bytes())


def setup(app):
    # after sphinx-book-theme has built the header buttons (priority 500)
    app.connect("html-page-context", _md_download, priority=900)
    app.connect("html-page-context", _dedupe_inline_scripts, priority=999)
    app.connect("build-finished", _copy_md_sources)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
