"""The book pipeline's own guarantees, each shown failing when it should:

* a .md out of sync with its .ipynb fails the pairing check;
* a changed printed number fails nbval strict;
* a chapter whose cell raises makes the build exit non-zero and name the chapter and the cell;
* every chapter has a parameters cell with the profile, seed and device, and a profile entry.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import book as pipeline  # noqa: E402

import bistochastic as bs  # noqa: E402

PREFACE = "00_preface"


@pytest.fixture
def book_copy(tmp_path):
    d = tmp_path / "book"
    d.mkdir()
    for ext in (".md", ".ipynb"):
        shutil.copyfile(ROOT / "book" / f"{PREFACE}{ext}", d / f"{PREFACE}{ext}")
    return d


def test_pairing_check_passes_on_the_committed_book():
    assert pipeline.check_pairing() == []


def test_pairing_check_detects_an_edited_md(book_copy):
    assert pipeline.check_pairing(book_copy) == []
    md = book_copy / f"{PREFACE}.md"
    text = md.read_text()
    assert "SEED = 0" in text
    md.write_text(text.replace("SEED = 0", "SEED = 1"))
    problems = pipeline.check_pairing(book_copy)
    assert len(problems) == 1 and "out of sync" in problems[0]


def test_pairing_check_detects_an_edited_ipynb_input(book_copy):
    nbp = book_copy / f"{PREFACE}.ipynb"
    nb = json.loads(nbp.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["source"] = ["# edited in the notebook only\n"] + list(cell["source"])
    nbp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    assert any("out of sync" in p for p in pipeline.check_pairing(book_copy))


def test_pairing_check_detects_a_missing_partner(book_copy):
    (book_copy / f"{PREFACE}.ipynb").unlink()
    assert any("no paired .ipynb" in p for p in pipeline.check_pairing(book_copy))


def test_every_chapter_has_parameters_and_a_profile_entry():
    chs = pipeline.chapters()
    assert chs, "the book has chapters"
    for md in chs:
        text = md.read_text()
        assert re.search(r"```\{code-cell\}[^\n]*\n:tags: \[parameters\]\n", text), f"{md.name}: no parameters cell"
        assert 'PROFILE = os.environ.get("BOOK_PROFILE", "ci")' in text, md.name
        assert "SEED = " in text and 'DEVICE = "auto"' in text, md.name
        for prof in bs.profiles.PROFILES:
            sizes = bs.profiles.sizes(md.stem, prof)
            assert sizes, f"{md.stem}: empty {prof} profile"
        assert set(bs.profiles.sizes(md.stem, "ci")) == set(bs.profiles.sizes(md.stem, "full")), md.stem


def test_nbval_fails_when_a_printed_number_changes(tmp_path):
    nbp = tmp_path / f"{PREFACE}.ipynb"
    nb = json.loads((ROOT / "book" / f"{PREFACE}.ipynb").read_text())
    changed = False
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and "sigma_2 = " in "".join(out["text"]):
                text = "".join(out["text"])
                out["text"] = [re.sub(r"sigma_2 = (\d)\.(\d)", lambda m: f"sigma_2 = {m.group(1)}.{(int(m.group(2)) + 1) % 10}", text)]
                changed = out["text"][0] != text
    assert changed, "the preface prints sigma_2"
    nbp.write_text(json.dumps(nb, indent=1))
    cmd = [sys.executable, "-m", "pytest", "--nbval", str(nbp), "--nbval-current-env", "-p", "no:cacheprovider",
           "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), "-q", "--rootdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**__import__("os").environ, "BOOK_PROFILE": "ci", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 failed" in proc.stdout and "sigma_2" in proc.stdout


def test_build_fails_and_names_the_chapter_and_cell(tmp_path):
    src = (ROOT / "book" / f"{PREFACE}.md").read_text()
    header = src.split("\n---\n", 1)[0] + "\n---\n"
    broken = header + (
        "\n# Broken\n\n```{code-cell} ipython3\nx = 1\n```\n\n"
        "```{code-cell} ipython3\nraise RuntimeError('boom in a chapter')\n```\n"
    )
    (tmp_path / "99_broken.md").write_text(broken)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "book.py"), "execute", "--book-dir", str(tmp_path), "--chapters", "99"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "CHAPTER FAILED" in proc.stdout and "99_broken.md" in proc.stdout
    assert "cell 2" in proc.stdout and "RuntimeError: boom in a chapter" in proc.stdout
