"""Sphinx extension for the book's generated pages and numbering (loaded by Sphinx only, never by
the library).

- ``book/api.md``: the marker ``<!-- api-modules -->`` is replaced by one ``automodule`` section per
  public module, read from ``bistochastic.__all__``, so a module added to the package appears in the
  reference without editing the page.
- ``book/explorer.md``: the marker ``<!-- explorer-data -->`` is replaced by the data of
  :func:`bistochastic.explorer.precompute`, computed at build time.
- ``book/theorems.md``: the marker ``<!-- theorem-index -->`` is replaced by the index of results.
- ``book/17_conclusion.md``: the marker ``<!-- phase-diagram -->`` is replaced by the phase diagram
  of both traps (a figure computed by :mod:`bistochastic.explorer` and its caption).
- Results, figures and tables are numbered per chapter ("Theorem 3.2", "Fig. 15.1"): see
  :func:`renumber_per_chapter`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

MARKER = "<!-- api-modules -->"
EXPLORER_MARKER = "<!-- explorer-data -->"
THEOREM_MARKER = "<!-- theorem-index -->"
PHASE_MARKER = "<!-- phase-diagram -->"
PHASE_IMAGE = "_generated/phase_diagram.png"
_RESULT = re.compile(r"(?:`{3,}|:{3,})\{prf:(theorem|lemma|proposition|corollary|definition|conjecture)\}"
                     r"[ \t]*([^\n]*)\n:label:[ \t]*(\S+)")


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


def explorer_markdown() -> str:
    """A raw-HTML block that defines ``window.BS_EXPLORER`` (computed now, by the library)."""
    from bistochastic import explorer

    js = explorer.to_javascript(explorer.precompute())
    return "```{raw} html\n<script>\n" + js + "</script>\n```\n"


def phase_markdown(out_png: Path, trap: Any = None, cool: Any = None) -> str:
    """Compute the phase diagrams of both traps with the library (about 20 s on one core),
    save the figure to ``out_png`` and return a MyST figure with its numbered caption; every
    number in the caption is read from the computed data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bistochastic import explorer
    from bistochastic.book import round_sig
    from bistochastic.plotting import use_style

    use_style()
    trap = trap if trap is not None else explorer.homogeneity_phase()
    cool = cool if cool is not None else explorer.cooling_phase()
    fig = explorer.phase_figure(trap, cool)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    g = lambda x: f"{round_sig(float(x), 3):g}"  # noqa: E731
    big, small = int(trap.ns.max()), int(trap.ns.min())
    # the temperature where 4 layers reach delta, at the largest and the smallest n (measured)
    t4 = {}
    for n in (big, small):
        i = int(np.flatnonzero(trap.ns == n)[0])
        leff = np.log(1 / trap.delta) / np.log(1 / np.clip(trap.sigma2[i], 1e-12, 1 - 1e-12))
        t4[n] = explorer.crossing(trap.taus, 1 / leff, 1 / 4)  # first tau with L_eff <= 4
    fast, slow = float(cool.rates.max()), float(cool.rates.min())
    e_fast = explorer.crossing(cool.eps, cool.error[int(np.argmax(cool.rates))], cool.e_tol)
    crossing_rates = [r for r, e in zip(cool.rates, cool.error) if e.max() >= cool.e_tol]
    slow_txt = (f"at $1-\\alpha = {g(slow)}$ it stays below it down to $\\varepsilon = "
                f"{g(cool.eps.min())}$" if min(crossing_rates, default=1) > slow else
                f"even at $1-\\alpha = {g(slow)}$ it crosses it")
    fast_txt = (f"at $1-\\alpha = {g(fast)}$ it crosses it at $\\varepsilon \\approx "
                f"{g(e_fast)}$" if e_fast is not None else
                f"even at $1-\\alpha = {g(fast)}$ it stays below it")
    t4_txt = " and ".join(f"$\\tau \\approx {g(t4[n])}$ at $n = {n}$" for n in (small, big)
                          if t4[n] is not None)
    caption = (
        f"**Where each trap binds.** Left: mean $\\sigma_2$ of one Sinkhorn layer of standard "
        f"Gaussian logits ({trap.batch} draws per point) over temperature and size; white "
        f"lines: where a stack of 4 or 16 such layers has shrunk every detail component by "
        f"$\\delta = {g(trap.delta)}$ (solid: from the measured $\\sigma_2$ with the product bound "
        f"of [Chapter 4](04_effective_depth.ipynb); dashed: its closed-form law "
        f"$\\log(1/\\delta)/\\log(\\tau\\sqrt n/2)$). Right of a line a network of that depth "
        f"is in the Homogeneity Trap (its detail is gone before the last layer); left of it the "
        f"detail survives; a stack of 4 layers is trapped above {t4_txt}. "
        f"Right: tracking error of a Sinkhorn layer with $K = {cool.K}$ warm-started sweeps per "
        f"step ($N = {cool.N}$ Gaussian cost) under exponential cooling "
        f"$\\varepsilon \\leftarrow \\alpha\\varepsilon$ from $\\varepsilon = 1$, against the "
        f"temperature reached; white line: error $= {g(cool.e_tol)}$, the tolerance of "
        f"[Chapter 13](13_eph_asc.ipynb). Above and right of it exponential cooling outruns the "
        f"fixed point (the speed limit measured in [Chapter 12](12_speed_limit.ipynb)); below and "
        f"left of it the layer tracks it: {slow_txt}, {fast_txt}. Both panels are computed by "
        f"`bistochastic.explorer` when the book is built."
    )
    alt = ("Two heat maps. Left: sigma_2 over temperature and size, falling from 1 at low "
           "temperature to near 0 at high temperature, with effective-depth contour lines. Right: "
           "log tracking error over temperature and cooling rate, growing toward low temperature "
           "and fast cooling, with the tolerance contour.")
    return (f"```{{figure}} {PHASE_IMAGE}\n:name: fig-conclusion-phase\n:alt: {alt}\n"
            f":width: 100%\n\n{caption}\n```\n")


def _chapter_text(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        return "\n".join("".join(c.get("source", "")) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def theorem_index_markdown(book_dir: Path) -> str:
    """A table of every numbered result of the chapters in ``book_dir``: chapter, kind, title,
    each linked (``{prf:ref}`` shows the result's number and title)."""
    stems = sorted({p.stem for p in book_dir.glob("[0-9]*.md")}
                   | {p.stem for p in book_dir.glob("[0-9]*.ipynb")})
    rows = ["| chapter | result | title |", "|---|---|---|"]
    for stem in stems:
        md, nb = book_dir / f"{stem}.md", book_dir / f"{stem}.ipynb"
        text = _chapter_text(md if md.exists() else nb)
        for k, (kind, title, label) in enumerate(_RESULT.findall(text)):
            title = title.strip().replace("|", "\\|") or kind
            chapter = f"{{doc}}`{stem}`" if k == 0 else ""  # the chapter on its first row only
            rows.append(f"| {chapter} | {{prf:ref}}`{label}` | {title} |")
    return "\n".join(rows) + "\n"


def _source_read(app: Any, docname: str, source: list[str]) -> None:
    if THEOREM_MARKER in source[0]:
        book_dir = Path(app.srcdir) / Path(docname).parent
        source[0] = source[0].replace(THEOREM_MARKER, theorem_index_markdown(book_dir))
    if MARKER in source[0]:
        source[0] = source[0].replace(MARKER, api_markdown())
    if PHASE_MARKER in source[0]:
        out = Path(app.srcdir) / Path(docname).parent / PHASE_IMAGE
        source[0] = source[0].replace(PHASE_MARKER, phase_markdown(out))
    if EXPLORER_MARKER in source[0]:
        source[0] = source[0].replace(EXPLORER_MARKER, explorer_markdown())


_CHAPTER_NUMBER = re.compile(r"^(\d+[a-z]?)\.\s")


def chapter_number(title: str) -> str | None:
    """The number a chapter's title starts with ("9b. The trade-off" -> "9b"), or None."""
    m = _CHAPTER_NUMBER.match(title.strip())
    return m.group(1) if m else None


def renumber_per_chapter(fignumbers: dict[str, dict[str, dict[str, tuple]]],
                         titles: dict[str, str]) -> dict[str, dict[str, dict[str, tuple]]]:
    """Per-chapter numbers for results, figures and tables: ``(chapter, k)``.

    ``fignumbers`` is Sphinx's ``env.toc_fignumbers`` (docname -> type -> id -> number), numbered
    across the whole book when the toctree is not numbered ("Proposition 17"). Each page's items of
    one type are renumbered 1, 2, ... in their order, prefixed by the number its title starts with
    ("Theorem 3.2", "Fig. 15.1"). The chapter titles carry their numbers by hand, so no section
    numbers are added to the headings; pages whose title has no number (preface, conclusion,
    appendices) number their items 1, 2, ... without a prefix."""
    out: dict[str, dict[str, dict[str, tuple]]] = {}
    for docname, bytype in fignumbers.items():
        chap = chapter_number(titles.get(docname, ""))
        out[docname] = {}
        for figtype, ids in bytype.items():
            order = sorted(ids, key=lambda i: ids[i])  # the global counter follows the page order
            prefix = (chap,) if chap else ()
            out[docname][figtype] = {i: (*prefix, k) for k, i in enumerate(order, start=1)}
    return out


def _number_per_chapter(app: Any, env: Any) -> list[str]:
    """After Sphinx assigned its book-wide figure numbers (``env-get-updated``), number per
    chapter instead; returns the pages whose numbers changed (they are rewritten)."""
    titles = {d: t.astext() for d, t in env.titles.items()}
    new = renumber_per_chapter(env.toc_fignumbers, titles)
    changed = [d for d in new if new[d] != env.toc_fignumbers.get(d)]
    env.toc_fignumbers = new
    return changed


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


def _register_bibliography_style() -> None:
    """Bibliography labels that read well: "Sinkhorn 1964", "Dufossé & Uçar 2016",
    "Sander et al. 2022" (pybtex's alpha style gives "SABPeyre22"); entries sorted by author."""
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.unsrt import Style as Unsrt
    from pybtex.style.labels import BaseLabelStyle
    from pybtex.style.sorting.author_year_title import SortingStyle

    def last(person: Any) -> str:
        from pybtex.richtext import Text

        return str(Text.from_latex(" ".join(person.prelast_names + person.last_names)))

    class AuthorYearLabels(BaseLabelStyle):
        def format_labels(self, sorted_entries):  # type: ignore[override]
            seen: dict[str, int] = {}
            labels = []
            for e in sorted_entries:
                people = list(e.persons.get("author") or e.persons.get("editor") or [])
                etal = any(last(p) == "others" for p in people)
                people = [p for p in people if last(p) != "others"]
                if not people:
                    who = e.key
                elif etal:
                    who = f"{last(people[0])} et al."
                elif False:
                    who = e.key
                elif len(people) == 1:
                    who = last(people[0])
                elif len(people) == 2:
                    who = f"{last(people[0])} & {last(people[1])}"
                else:
                    who = f"{last(people[0])} et al."
                lab = f"{who} {e.fields.get('year', '')}".strip()
                seen[lab] = seen.get(lab, 0) + 1
                labels.append(lab)
            count: dict[str, int] = {}
            for lab in labels:
                if seen[lab] > 1:
                    count[lab] = count.get(lab, 0) + 1
                    yield lab + "abcdefghij"[count[lab] - 1]
                else:
                    yield lab

    class BookStyle(Unsrt):
        default_label_style = "book_author_year"
        default_sorting_style = "author_year_title"

    for group, name, cls in (("pybtex.style.labels", "book_author_year", AuthorYearLabels),
                             ("pybtex.style.formatting", "book", BookStyle)):
        try:
            register_plugin(group, name, cls)
        except Exception:  # already registered (a second build in the same process)
            pass
    assert SortingStyle  # the sorting plugin ships with pybtex


BENCH_HEAD = """# Benchmarks

The solver's speed against POT, the other peers and a plain PyTorch loop, as recorded by the
benchmark scripts of the repository (`benchmarks/`). [Chapter 2](02_sinkhorn.ipynb) shows a small
run of the same code; below are the recorded full runs, with the commands that produced them. This
page is generated from `benchmarks/README.md` by `bistochastic._sphinxext.benchmarks_page` (a test
keeps the two in sync); the recorded tables are set as tables, split or transposed to fit the page.

"""

_DENSE_COLS = ["n", "ε", "floor ms/it", "ours: iterations", "ours: ms/it", "ours: s",
               "plain loop: iterations", "plain loop: ms/it", "plain loop: s", "POT: iterations",
               "POT: ms/it", "POT: s", "POT / ours", "plain / ours", "ours / floor"]

#: Widest line of a code block on the page (the text column holds 88 characters of code).
_CODE_WIDTH = 88
#: Most columns of one table on the page (a wider one is split, its first column group repeated).
_TABLE_COLUMNS = 10
# a shell command: environment assignments, then the program
_COMMAND = re.compile(r"^([A-Z_]+=\S*\s+)*(\.venv/bin/python|python3?|bash|make|pip)\s")
# a row of the first benchmark tables (n, eps, then the floor): transposed, one column per n
_OLD_DENSE_ROW = re.compile(r"^\s*\d+\s+[\d.e-]+\s+\|")
_NUMBER = re.compile(r"^[-+]?\d[\d.e+-]*$")
# one "name value" cell of a one-line result ("floor 101.3 ms | plain/ours 6.52 | ...")
_NAME_VALUE = re.compile(r"^(.*?)\s+([-\d.e+]+(?: ms)?)$")


def _wrap_command(text: str) -> list[str]:
    """A shell command (continuation lines joined) broken into lines of at most ``_CODE_WIDTH``
    characters with backslash continuations, before options where possible."""
    words = text.replace("\\\n", " ").split()
    units: list[str] = []
    for w in words:  # an option and its values stay together
        if units and not w.startswith("--") and units[-1].startswith("--"):
            units[-1] += " " + w
        else:
            units.append(w)
    lines, cur = [], ""
    for u in units:
        indent = "" if not lines and not cur else "    "
        if cur and len(cur) + 1 + len(u) + 2 > _CODE_WIDTH:
            lines.append(cur + " \\")
            cur = "    " + u
        else:
            cur = (cur + " " + u) if cur else indent + u
    return lines + [cur]


def _wrap_text(line: str) -> list[str]:
    """A line of output kept as code, broken at spaces into lines of at most ``_CODE_WIDTH``
    characters (continuations indented)."""
    if len(line) <= _CODE_WIDTH:
        return [line]
    lead = line[:len(line) - len(line.lstrip())]
    return textwrap.wrap(line, _CODE_WIDTH, initial_indent="", subsequent_indent=lead + "    ",
                         break_on_hyphens=False, drop_whitespace=True) or [line]


# column names as set on the page: ratios with spaces (a narrow column breaks there), a soft
# hyphen in the one long word
_HEADER_NAMES = {"sprd": "spread", "ours/raw": "ours / raw", "POT/ours": "POT / ours",
                 "momentum": "momen\u00adtum"}


def _column_names(header: list[str], row: list[str]) -> list[str]:
    """Names of the columns of a ``|``-grouped table: a header group with more words than the
    row's group has values starts with a prefix ("ours its ms/it s" -> "ours its", "ours ms/it",
    ...); a spread column keeps its own name."""
    names: list[str] = []
    for hg, rg in zip(header, row):
        h, d = hg.split(), len(rg.split())
        if len(h) > d:
            pre, rest = " ".join(h[:len(h) - d]), h[len(h) - d:]
            names += [t if t in ("sprd", "spread") else f"{pre} {t}" for t in rest]
        else:
            names += h + [""] * (d - len(h))
    return [_HEADER_NAMES.get(n, n) for n in names]


def _grouped_table(header: str, rows: list[str]) -> list[str]:
    """A ``|``-grouped text table as Markdown tables: one row per text row, its first group
    repeated in each part when the columns are too many for one table."""
    hgroups = header.split("|")
    rgroups = [r.split("|") for r in rows]
    sizes = [len(g.split()) for g in rgroups[0]]
    names = _column_names(hgroups, rgroups[0])
    cells = [sum((g.split() for g in r), []) for r in rgroups]
    bounds, at = [], 0
    for size in sizes:
        bounds.append((at, at + size))
        at += size
    parts, cur = [], [bounds[0]]
    width = bounds[0][1]
    for b in bounds[1:]:
        if width + b[1] - b[0] > _TABLE_COLUMNS and len(cur) > 1:
            parts.append(cur)
            cur, width = [bounds[0]], bounds[0][1]
        cur.append(b)
        width += b[1] - b[0]
    parts.append(cur)
    out: list[str] = []
    for part in parts:
        cols = [c for lo, hi in part for c in range(lo, hi)]
        out.append("| " + " | ".join(names[c] for c in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in cells:
            out.append("| " + " | ".join(r[c] if c < len(r) else "" for c in cols) + " |")
        out.append("")
    return out


def _is_table(lines: list[str], i: int) -> int:
    """The number of data rows of a ``|``-grouped table whose header is ``lines[i]`` (0: none):
    a header has no number in it, and its rows have as many ``|`` as it has."""
    bars = lines[i].count("|")
    if bars == 0 or " | " not in lines[i] or any(_NUMBER.match(t) for t in lines[i].split()):
        return 0
    k = i + 1
    while k < len(lines) and lines[k].count("|") == bars and lines[k].strip():
        k += 1
    return k - i - 1


def _bench_block(lines: list[str]) -> list[str]:
    """One ``text`` block of the README, made narrow: commands broken before their options,
    result tables as Markdown tables (the first dense runs transposed: one column per n), other
    lines kept as code within the page's width. Nothing of the block is dropped."""
    out: list[str] = []
    pre: list[str] = []  # lines kept as code

    def flush():
        if pre:
            out.extend(["```text", *pre, "```", ""])
            pre.clear()

    dense: list[list[str]] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if _OLD_DENSE_ROW.match(ln):
            dense.append(ln.replace("|", " ").split())
            i += 1
            continue
        if dense:
            flush()
            out += _dense_table(dense)
            dense = []
        if _COMMAND.match(ln.strip()):
            cmd = ln.strip()
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            pre.extend(_wrap_command(cmd))
            i += 1
            continue
        if ln.strip().startswith("n ") and i + 1 < len(lines) and _OLD_DENSE_ROW.match(lines[i + 1]):
            i += 1  # the header of the first dense tables: the transposed table names its rows
            continue
        n_rows = _is_table(lines, i)
        if n_rows:
            flush()
            out += _grouped_table(ln, lines[i + 1:i + 1 + n_rows])
            i += 1 + n_rows
            continue
        if ln.startswith("## "):
            flush()
            out += ["", f"**{ln[3:].strip()}**", ""]
        elif ln.startswith("# "):
            flush()
            out.append(ln[2:].strip() + "  ")
        elif " | " in ln and len(ln) > _CODE_WIDTH:
            cells = [c.strip() for c in ln.split(" | ")]
            pairs = [_NAME_VALUE.match(c) for c in cells]
            if all(pairs):
                flush()
                out += ["| quantity | value |", "|---|---|"]
                out += [f"| {m.group(1)} | {m.group(2)} |" for m in pairs]
                out.append("")
            else:  # one cell per line
                pre.extend(_wrap_text(cells[0]))
                for c in cells[1:]:
                    pre.extend(_wrap_text("    " + c))
        elif ln.strip():
            pre.extend(_wrap_text(ln))
        else:
            flush()  # a blank line ends a block of code
        i += 1
    if dense:
        flush()
        out += _dense_table(dense)
    flush()
    return out


def _dense_table(rows: list[list[str]]) -> list[str]:
    out = ["| | " + " | ".join(f"n = {r[0]}" for r in rows) + " |",
           "|---|" + "---|" * len(rows)]
    for k, name in enumerate(_DENSE_COLS[1:], start=1):
        out.append(f"| {name} | " + " | ".join(r[k] if k < len(r) else "" for r in rows) + " |")
    return out + [""]


def benchmarks_page(readme: str) -> str:
    """The Benchmarks appendix from the text of ``benchmarks/README.md``."""
    body = readme.split("\n", 1)[1].lstrip("\n")  # drop the README's title
    out: list[str] = []
    lines = body.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```text":
            j = lines.index("```", i + 1)
            out += _bench_block(lines[i + 1: j])
            i = j + 1
        else:
            out.append(lines[i])
            i += 1
    return BENCH_HEAD + "\n".join(out)


def setup(app: Any) -> dict:
    _register_bibliography_style()
    app.connect("source-read", _source_read)
    # after the toctree collector (priority 500) has assigned the book-wide numbers
    app.connect("env-get-updated", _number_per_chapter, priority=900)
    app.connect("autodoc-process-docstring", _module_headings_to_rubrics)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
