"""Sphinx extension for the book's API appendix (loaded by Sphinx only, never by the library).

The page ``book/api.md`` contains the marker ``<!-- api-modules -->``. At build time the marker is
replaced by one ``automodule`` section per public module, read from ``bistochastic.__all__``, so a
module added to the package appears in the reference without editing the page.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

MARKER = "<!-- api-modules -->"


def public_modules() -> list[str]:
    """Dotted names of the public modules of ``bistochastic``, in the order of ``__all__``."""
    pkg = importlib.import_module("bistochastic")
    names = []
    for name in getattr(pkg, "__all__", []):
        obj = getattr(pkg, name, None)
        if inspect.ismodule(obj):
            names.append(obj.__name__)
    # the solver's names are re-exported at the top level; its module comes first
    solver = "bistochastic.sinkhorn"
    return [solver] + [m for m in names if m != solver]


def api_markdown() -> str:
    """MyST text: the top-level names, then one section per module with its members."""
    out = []
    for mod in public_modules():
        out += [
            f"## `{mod}`",
            "",
            "```{eval-rst}",
            f".. automodule:: {mod}",
            "   :members:",
            "   :show-inheritance:",
            "```",
            "",
        ]
    return "\n".join(out)


def _source_read(app: Any, docname: str, source: list[str]) -> None:
    if MARKER in source[0]:
        source[0] = source[0].replace(MARKER, api_markdown())


def _module_headings_to_rubrics(app: Any, what: str, name: str, obj: Any, options: Any,
                                lines: list[str]) -> None:
    """Module docstrings use RST section titles ("Conventions" + a line of dashes); inside the
    API page these would become sections with clashing targets. Render them as rubrics."""
    if what != "module":
        return
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i].strip(), lines[i + 1].strip()
        if title and under and set(under) <= set("-=~^") and len(under) >= len(title):
            lines[i: i + 2] = [f".. rubric:: {title}", ""]
        i += 1


def setup(app: Any) -> dict:
    app.connect("source-read", _source_read)
    app.connect("autodoc-process-docstring", _module_headings_to_rubrics)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
