"""The book's generated pages: API module list, index of results, benchmarks appendix."""

import collections
import re
from pathlib import Path

from bistochastic import _sphinxext

ROOT = Path(__file__).resolve().parents[1]


def test_api_lists_every_public_module():
    import bistochastic as bs

    mods = _sphinxext.public_modules()
    assert mods[0] == "bistochastic.sinkhorn"
    for name in bs.__all__:
        obj = getattr(bs, name)
        if hasattr(obj, "__file__"):
            assert obj.__name__ in mods
    text = _sphinxext.api_markdown()
    assert all(f".. automodule:: {m}" in text for m in mods)


def test_theorem_index_finds_labelled_results(tmp_path):
    (tmp_path / "01_a.md").write_text(
        "# 1. A\n\n```{prf:theorem} Big one\n:label: thm-a\n\nx\n```\n\n"
        ":::{prf:lemma} Small\n:label: lem-b\n\ny\n:::\n\n```{prf:proof}\nz\n```\n")
    text = _sphinxext.theorem_index_markdown(tmp_path)
    assert "{prf:ref}`thm-a`" in text and "{prf:ref}`lem-b`" in text
    assert text.count("{prf:ref}") == 2  # proofs are not results
    assert "Big one" in text and "Small" in text  # titles are listed


def test_results_and_figures_are_numbered_per_chapter():
    # Sphinx's book-wide numbers (no numbered toctree): figures 1-3 and propositions 1-2 in
    # page order across three pages
    glob = {"book/00_preface": {"figure": {"f0": (1,)}},
            "book/03_x": {"figure": {"b": (3,), "a": (2,)}, "proposition": {"p": (1,)}},
            "book/09b_y": {"proposition": {"q": (2,)}},
            "book/notation": {"table": {"t": (1,)}}}
    titles = {"book/00_preface": "Preface", "book/03_x": "3. Max entropy",
              "book/09b_y": "9b. The trade-off", "book/notation": "Notation"}
    out = _sphinxext.renumber_per_chapter(glob, titles)
    assert out["book/03_x"]["figure"] == {"a": ("3", 1), "b": ("3", 2)}  # page order kept
    assert out["book/03_x"]["proposition"] == {"p": ("3", 1)}
    assert out["book/09b_y"]["proposition"] == {"q": ("9b", 1)}
    assert out["book/00_preface"]["figure"] == {"f0": (1,)}  # no chapter number: no prefix
    assert out["book/notation"]["table"] == {"t": (1,)}
    assert _sphinxext.chapter_number("15. Sinkhorn attention") == "15"
    assert _sphinxext.chapter_number("Conclusion") is None


def test_module_headings_become_rubrics():
    lines = ["Intro.", "", "Conventions", "-----------", "text"]
    _sphinxext._module_headings_to_rubrics(None, "module", "m", None, None, lines)
    assert ".. rubric:: Conventions" in lines and "-----------" not in lines


def test_benchmarks_appendix_matches_the_readme():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    page = (ROOT / "book" / "benchmarks.md").read_text()
    assert page == _sphinxext.benchmarks_page(readme), (
        "book/benchmarks.md is stale: regenerate it with "
        "bistochastic._sphinxext.benchmarks_page(benchmarks/README.md)")


def test_benchmarks_page_is_narrow():
    page = _sphinxext.benchmarks_page((ROOT / "benchmarks" / "README.md").read_text())
    in_code = False
    for line in page.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:
            assert len(line) <= 88, line  # code blocks must not scroll sideways


def test_benchmarks_page_keeps_every_recorded_number():
    """Every number of every text block of the README (commands, outputs, tables) reaches the
    page: the appendix reformats the records, it must not drop any of them."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    page = _sphinxext.benchmarks_page(readme)
    blocks = re.findall(r"^```text\n(.*?)^```", readme, flags=re.S | re.M)
    assert len(blocks) > 20
    page_numbers = collections.Counter(re.findall(r"(?<![\w.])\d[\d.]*(?:e[-+]?\d+)?", page))
    for block in blocks:
        for num in set(re.findall(r"(?<![\w.])\d[\d.]*(?:e[-+]?\d+)?", block)):
            assert page_numbers[num] > 0, (num, block[:200])


def test_benchmarks_page_sets_grouped_tables_and_wraps_commands():
    lines = [
        "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 PYTHONPATH=lib "
        ".venv/bin/python \\",
        "    benchmarks/bench_sinkhorn.py --sizes 1024 4096 --eps 0.01 0.002 --raw --threads-list 1 2 "
        "--json benchmarks/results/x.json",
        "## n = 1024",
        "    n    eps thr  momentum | ours its    ms/it       s  sprd | raw ms/it  sprd | ours/raw "
        "| POT its    ms/it        s  sprd | POT/ours",
        " 1024   0.01   1   default |       16    1.264   0.020  1.05 |     0.690  1.06 |     1.83 "
        "|     120    6.065    0.728  1.06 |    35.99",
        "   method |    its |    min s spread |  x ours",
        "     ours |     16 |    0.027   1.23 |    1.00",
    ]
    out = _sphinxext._bench_block(lines)
    text = "\n".join(out)
    code = text.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert all(len(ln) <= 88 for ln in code) and code[0].startswith("MALLOC_")
    assert " ".join(ln.rstrip(" \\").strip() for ln in code).split() == (
        " ".join(lines[:2]).replace("\\", "").split())  # every word, in order
    assert "**n = 1024**" in text
    # 16 columns: split in two tables of at most 10, the key columns repeated
    assert ("| n | eps | thr | momen\u00adtum | ours its | ours ms/it | ours s | spread | raw ms/it "
            "| spread |") in text
    assert ("| n | eps | thr | momen\u00adtum | ours / raw | POT its | POT ms/it | POT s | spread "
            "| POT / ours |") in text
    assert "| 1024 | 0.01 | 1 | default | 1.83 | 120 | 6.065 | 0.728 | 1.06 | 35.99 |" in text
    assert "| method | its | min s | spread | x ours |" in text
    assert "| ours | 16 | 0.027 | 1.23 | 1.00 |" in text


def test_phase_diagram_figure_and_caption(tmp_path):
    from bistochastic import explorer

    tp = explorer.homogeneity_phase(ns=(4, 8), taus=(0.3, 1.0, 3.0, 10.0), batch=2)
    cp = explorer.cooling_phase(rates=(0.05, 0.3), N=6, K=5, eps_min=0.3, n_eps=4)
    out = tmp_path / "phase.png"
    text = _sphinxext.phase_markdown(out, tp, cp)
    assert out.stat().st_size > 5_000
    assert text.startswith("```{figure} " + _sphinxext.PHASE_IMAGE)
    assert ":name: fig-conclusion-phase" in text and ":alt: " in text
    # the caption says what each region means and names the chapters that measured them
    for words in ("Homogeneity Trap", "outruns", "tracks it", "Chapter 4", "Chapter 12",
                  "Chapter 13"):
        assert words in text, words
    conclusion = (ROOT / "book" / "17_conclusion.md").read_text()
    assert _sphinxext.PHASE_MARKER in conclusion
