"""The book pipeline's own guarantees, each shown failing when it should:

* a .md out of sync with its .ipynb fails the pairing check;
* a changed printed number fails nbval strict;
* a chapter whose cell raises makes the build exit non-zero and name the chapter and the cell;
* every chapter has a parameters cell with the profile, seed and device, and a profile entry;
* a float glued at full precision fails nbval under the variant instruction set of `make test`
  (and the same float glued through bs.book.glue passes), and `make test` runs both passes;
* the package-only tests import nothing but the package's runtime; `import bistochastic` loads no
  plotting or notebook package;
* repository-facing buttons follow the one setting `repository.url`; the Colab cell is idempotent
  and in sync with the config.
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


# ------------------------------------------------------------ reproducibility on another CPU

def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


def _variant_env() -> dict[str, str]:
    """The instruction-set variant `make test` runs nbval under (NBVAL_VARIANT in the Makefile)."""
    m = re.search(r"^NBVAL_VARIANT \?= (.+)$", _makefile(), re.M)
    assert m, "the Makefile defines NBVAL_VARIANT"
    env = dict(kv.split("=", 1) for kv in m.group(1).split())
    assert "ATEN_CPU_CAPABILITY" in env, "the variant forces at least torch's instruction set"
    return env


# every variable that forces an instruction set; the native runs must have none of them
_VARIANT_KEYS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "NPY_DISABLE_CPU_FEATURES", "MKL_ENABLE_INSTRUCTIONS")


def _env(variant: dict[str, str] | None = None) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in _VARIANT_KEYS}
    env.update(BOOK_PROFILE="ci", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT / "lib"))
    env.update(variant or {})
    return env


# float32 normal draws come from a vectorised kernel: their last bits depend on the instruction set,
# and a sum of 1e5 of them shows it in the 5th significant digit (about -244.56 here either way)
_PROBE = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "x = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float32)\n"
    "total = float(x.sum())\n"
)


def _probe_notebook(path: Path) -> None:
    """Cell 0 computes the float, cell 1 glues it at full precision (myst_nb.glue), cell 2 through
    bs.book.glue (4 significant digits). One notebook: one kernel per run."""
    sources = [_PROBE,
               'from myst_nb import glue as full_glue\nfull_glue("total", total, display=False)\n',
               'from bistochastic.book import glue\nglue("total_rounded", total)\n']
    cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": src, "id": f"c{i}"} for i, src in enumerate(sources)]
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    path.write_text(json.dumps(nb, indent=1))


def test_the_nbval_variant_pass_catches_a_full_precision_glue(tmp_path):
    """The check can fail: a float glued at full precision differs in its last digits under the
    variant instruction set, and `make test`'s second nbval pass reports it; the same float glued
    through bs.book.glue (4 significant digits) passes both passes."""
    variant = _variant_env()
    value = "print(repr(float(torch.randn(100_000, generator=torch.Generator().manual_seed(0)).sum())))"
    here, there = (
        subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1); " + value],
                       capture_output=True, text=True, env=_env(v), check=True).stdout.strip()
        for v in (None, variant)
    )
    if here == there:
        pytest.skip(f"{variant} does not change float32 normal draws on this CPU ({here})")
    assert bs.book.round_sig(float(here)) == bs.book.round_sig(float(there)), (here, there)

    nbp = tmp_path / "probe.ipynb"
    _probe_notebook(nbp)
    record = ("import sys, nbformat\nfrom nbclient import NotebookClient\n"
              "nb = nbformat.read(sys.argv[1], as_version=4)\n"
              "NotebookClient(nb, kernel_name='python3', timeout=300).execute()\n"
              "nbformat.write(nb, sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", record, str(nbp)], env=_env(), check=True, timeout=600,
                   capture_output=True, cwd=tmp_path)
    cells = json.loads(nbp.read_text())["cells"]
    glued = cells[1]["outputs"][0]["data"]["application/papermill.record/text/plain"]
    assert glued == here, "the recorded golden holds the full-precision float"

    def nbval(env):
        cmd = [sys.executable, "-m", "pytest", "--nbval", str(nbp), "--nbval-current-env", "-p",
               "no:cacheprovider", "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
               "-q", "-rf", "--rootdir", str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)

    native = nbval(_env())
    assert native.returncode == 0, native.stdout[-3000:]
    other = nbval(_env(variant))
    assert other.returncode == 1, other.stdout[-3000:]
    summary = other.stdout.split("short test summary")[-1]
    assert "1 failed, 2 passed" in summary and "probe.ipynb::Cell 1 " in summary, other.stdout[-3000:]
    assert f"'{here}'" in other.stdout and f"'{there}'" in other.stdout


def test_make_test_runs_nbval_on_every_chapter_natively_and_under_the_variant():
    out = subprocess.run(["make", "-n", "test", "STAMP="], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    variant = re.search(r"^NBVAL_VARIANT \?= (.+)$", _makefile(), re.M).group(1)
    nbval = [line for line in out.splitlines() if "--nbval book/ " in line]
    assert len(nbval) == 2, nbval
    assert sum(variant in line for line in nbval) == 1
    assert "-j2" in out and "test-nbval test-nbval-variant" in out, "the two passes run side by side"
    assert "test-core-install" in out or "core-venv" in out


# ------------------------------------------------------------ the package alone

def _core_tests() -> list[Path]:
    m = re.search(r"^CORE_TESTS\s*:=((?:.*\\\n)*.*)$", _makefile(), re.M)
    return [ROOT / p for p in m.group(1).replace("\\\n", " ").split()]


# what the package-only venv has besides the package's own requirements
# the standard library, the runtime dependencies, and the test tools of the package-only venv
_CORE_OK = set(sys.stdlib_module_names) | {"torch", "numpy", "scipy", "pytest", "hypothesis",
                                           "bistochastic"}


def test_core_tests_import_only_the_package_and_its_runtime():
    import ast

    core = _core_tests()
    assert core and all(p.exists() for p in core), core
    assert ROOT / "tests" / "test_sinkhorn.py" in core, "the solver tests run against the package alone"
    for path in core:
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: what must import in the package-only venv
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in _CORE_OK, f"{path.name} imports {name} at module level"


def test_every_test_file_is_core_or_needs_the_book():
    core = {p.name for p in _core_tests()}
    book_only = {"test_pipeline.py", "test_environment_pins.py", "test_rendered_pages.py",
                 "test_stats_book.py", "test_book_pages.py", "test_plotting.py", "test_explorer.py",
                 "test_fused.py",  # torch only, but compile-heavy (run once, not twice)
                 "test_triton.py"}  # needs Triton (the [test] extra), absent from a core install
    for p in sorted((ROOT / "tests").glob("test_*.py")):
        assert p.name in core or p.name in book_only, (
            f"{p.name}: add it to CORE_TESTS in the Makefile if it needs only the package "
            "(torch, numpy, scipy, pytest, hypothesis), else to book_only here")


def test_import_bistochastic_loads_no_plotting_or_notebook_package():
    code = ("import sys, bistochastic\n"
            "bad = [m for m in ('matplotlib', 'seaborn', 'IPython', 'myst_nb', 'yaml', 'ot') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=120)


# ------------------------------------------------------------ buttons and the Colab cell

def _config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text())


def test_no_repository_url_renders_no_repository_or_launch_button():
    cfg = _config()
    assert (cfg.get("repository") or {}).get("url", "") == "", "the default names no repository"
    staged = pipeline.staged_config(cfg)
    assert "repository" not in staged
    assert not any(staged["html"].get(k) for k in ("use_repository_button", "use_issues_button",
                                                    "use_edit_page_button"))
    assert not {"binderhub_url", "colab_url", "jupyterhub_url", "thebe"} & set(staged["launch_buttons"])
    assert staged["execute"]["execute_notebooks"] == "off"
    assert staged["sphinx"]["local_extensions"] == {"book_pages": "_ext/"}


def test_a_repository_url_turns_every_button_on_with_the_right_path():
    cfg = _config()
    cfg["repository"] = {**(cfg.get("repository") or {}), "url": "https://github.com/org/book/"}
    staged = pipeline.staged_config(cfg)
    assert staged["repository"]["url"] == "https://github.com/org/book"
    assert staged["repository"]["path_to_book"] == "", "chapters are book/NN.ipynb from the root"
    assert staged["html"]["use_repository_button"] and staged["html"]["use_issues_button"]
    assert staged["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    assert staged["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    cfg["repository"]["url"] = "https://gitlab.com/org/book"
    assert "colab_url" not in pipeline.staged_config(cfg)["launch_buttons"], "Colab opens GitHub only"


def test_colab_cell_is_inserted_once_and_refreshed_when_the_url_changes(tmp_path):
    import yaml

    d = tmp_path / "book"
    d.mkdir()
    src = (ROOT / "book" / f"{PREFACE}.md").read_text()
    plain = re.sub(r"```\{code-cell\}[^\n]*\n:tags: \[remove-cell\]\n\n"
                   + re.escape(pipeline.COLAB_MARK) + r"\n.*?\n```\n\n", "", src, flags=re.S)
    (d / f"{PREFACE}.md").write_text(plain)
    cfg = tmp_path / "_config.yml"
    cfg.write_text(yaml.safe_dump({"repository": {"url": "https://github.com/org/book", "branch": "dev"}}))
    assert pipeline.colab_cell(None, d, cfg) == [d / f"{PREFACE}.md"]
    once = (d / f"{PREFACE}.md").read_text()
    assert pipeline.colab_cell(None, d, cfg) == [], "idempotent"
    assert once.count(pipeline.COLAB_MARK) == 1
    first = once.index("```{code-cell}")
    assert once.index(pipeline.COLAB_MARK) < once.index(":tags: [parameters]")
    assert once[first:].startswith("```{code-cell} ipython3\n:tags: [remove-cell]\n")
    assert '"https://github.com/org/book", "dev"' in once
    cfg.write_text(yaml.safe_dump({"repository": {"url": "https://github.com/org/new", "branch": "main"}}))
    assert pipeline.colab_cell(None, d, cfg) == [d / f"{PREFACE}.md"]
    again = (d / f"{PREFACE}.md").read_text()
    assert again.count(pipeline.COLAB_MARK) == 1 and '"https://github.com/org/new", "main"' in again
    assert again.replace('"https://github.com/org/new", "main"', '"https://github.com/org/book", "dev"') == once


def test_colab_cell_does_nothing_outside_colab_and_installs_in_colab(tmp_path):
    src = pipeline.colab_cell_source("https://github.com/org/book", "main", "2.13.0")
    # outside Colab: no effect at all
    subprocess.run([sys.executable, "-c", src], check=True, timeout=60)
    # in Colab (simulated: google.colab imported, subprocess.run recorded instead of run)
    fake = ("import sys, types, subprocess\n"
            "sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
            "calls = []\n"
            "subprocess.run = lambda cmd, check: calls.append(cmd)\n"
            + src + "\nprint(calls)\n")
    out = subprocess.run([sys.executable, "-c", fake], capture_output=True, text=True, check=True).stdout
    assert "'torch==2.13.0', '--index-url', 'https://download.pytorch.org/whl/cpu'" in out
    assert "https://raw.githubusercontent.com/org/book/main/requirements/book.txt" in out
    assert "bistochastic[book] @ git+https://github.com/org/book@main" in out


def test_committed_colab_cells_match_the_config(tmp_path):
    d = tmp_path / "book"
    shutil.copytree(ROOT / "book", d, ignore=shutil.ignore_patterns("*.ipynb"))
    with_cell = [md.name for md in pipeline.chapters(book=d) if pipeline.COLAB_MARK in md.read_text()]
    assert with_cell, "the chapters carry the Colab install cell"
    changed = pipeline.colab_cell([n[:-3] for n in with_cell], d)
    assert changed == [], f"re-run `python scripts/book.py colab-cell` (URL or pin changed): {changed}"
