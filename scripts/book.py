#!/usr/bin/env python
"""The book pipeline: execute chapters with papermill, re-record golden outputs, check pairing,
stage and render the HTML with Jupyter Book 1.

Run through the Makefile (``make book``, ``make chapter CH=03 PROFILE=full``, ``make record``,
``make test``); every sub-command is also usable directly:

    python scripts/book.py execute [--profile ci] [--chapters 01 02]
    python scripts/book.py record  [--chapters 01]        # ci profile, CPU, writes book/*.ipynb
    python scripts/book.py check-pairing
    python scripts/book.py stage   --source executed|golden [--profile ci]
    python scripts/book.py html                            # renders _build/stage into _build/html
    python scripts/book.py colab-cell [--chapters 00 01]   # Colab install cell in the .md sources
    python scripts/book.py check-core-env                  # in a package-only venv (make test)

Never renders a stale cache: ``execute`` always runs every selected chapter from a fresh kernel,
and ``html`` renders the staged notebooks with execution off and ``--all`` (no incremental reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BUILD = ROOT / "_build"
# Keys that papermill and nbclient add to executed notebooks; never part of the golden files.
_VOLATILE_CELL_KEYS = ("papermill", "execution", "ExecuteTime")
_VOLATILE_NB_KEYS = ("papermill",)


def chapters(selection: list[str] | None = None, book: Path | None = None) -> list[Path]:
    """Chapter sources: ``book/*.md`` with a jupytext kernelspec header, optionally filtered by prefix."""
    found = []
    for md in sorted((book or BOOK).glob("*.md")):
        head = md.read_text(encoding="utf-8").split("\n---", 1)[0]
        if "kernelspec:" in head:
            found.append(md)
    if selection:
        sel = [s.strip() for s in selection if s.strip()]
        # "09" selects 09_dsm_vs_softmax, not 09b_tradeoff; a full stem selects exactly that chapter
        def hit(stem: str, s: str) -> bool:
            return stem == s or stem.startswith(s + "_")

        chosen = [p for p in found if any(hit(p.stem, s) for s in sel)]
        missing = [s for s in sel if not any(hit(p.stem, s) for p in chosen)]
        if missing:
            sys.exit(f"error: no chapter matches {missing}; chapters are {[p.stem for p in found]}")
        return chosen
    return found


def _jupytext(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", *args], check=True, cwd=ROOT)


def _stable_ids(nb_path: Path) -> None:
    """Cell ids derived from position and source, so that re-recording does not churn them."""
    import hashlib

    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb.get("cells", [])):
        src = "".join(cell.get("source", ""))
        cell["id"] = f"c{i:03d}-" + hashlib.sha1(src.encode("utf-8")).hexdigest()[:8]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _strip_volatile(nb_path: Path) -> None:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for k in _VOLATILE_NB_KEYS:
        nb.get("metadata", {}).pop(k, None)
    for cell in nb.get("cells", []):
        for k in _VOLATILE_CELL_KEYS:
            cell.get("metadata", {}).pop(k, None)
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def execute(profile: str, selection: list[str] | None, out_dir: Path, *, cpu_only: bool = False,
            book: Path | None = None) -> int:
    """Execute chapters from scratch into ``out_dir/book``. Returns the number of failed chapters."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    dest = out_dir / "book"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    dest.mkdir(parents=True)
    env_backup = dict(os.environ)
    os.environ["BOOK_PROFILE"] = profile
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    failed, timings = [], {}
    try:
        for md in chapters(selection, book):
            nb_in = dest / f"{md.stem}.ipynb"
            _jupytext("--to", "ipynb", "--output", str(nb_in), str(md))
            sources = [c["source"] for c in json.loads(nb_in.read_text())["cells"]]
            t0 = time.perf_counter()
            print(f"[book] executing {_rel(md)} (profile={profile})", flush=True)
            try:
                pm.execute_notebook(
                    str(nb_in), str(nb_in), kernel_name="python3", cwd=str(dest),
                    progress_bar=False, log_output=False, request_save_on_cell_execute=False,
                )
            except PapermillExecutionError as exc:
                # papermill prepends an error banner to the output file: read the input's cells
                src = sources[exc.cell_index] if 0 <= exc.cell_index < len(sources) else ""
                first = "".join(src).strip().splitlines()[:1]
                print(
                    f"[book] CHAPTER FAILED: {_rel(md)}: cell {exc.cell_index} "
                    f"(execution count {exc.exec_count}) raised {exc.ename}: {exc.evalue}\n"
                    f"[book]   cell starts with: {first[0] if first else ''!r}",
                    flush=True,
                )
                failed.append(md.stem)
                continue
            except Exception as exc:  # kernel death, timeout, ...
                print(f"[book] CHAPTER FAILED: {_rel(md)}: {type(exc).__name__}: {exc}", flush=True)
                failed.append(md.stem)
                continue
            timings[md.stem] = round(time.perf_counter() - t0, 1)
            _strip_volatile(nb_in)
            print(f"[book]   ok in {timings[md.stem]} s", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    if failed:
        print(f"[book] {len(failed)} chapter(s) failed: {', '.join(failed)}", flush=True)
    return len(failed)


def _out_dir(kind: str, profile: str, selection: list[str] | None) -> Path:
    """Per-selection output folder, so that runs of different chapters never clobber each other."""
    tag = profile if not selection else profile + "-" + "-".join(sorted(selection))
    return BUILD / kind / tag


def record(selection: list[str] | None) -> int:
    """Re-record golden outputs: execute under ``ci`` on the CPU and write ``book/NN.ipynb``."""
    out = _out_dir("record", "ci", selection)
    nfail = execute("ci", selection, out, cpu_only=True)
    if nfail:
        print("[book] nothing recorded: fix the failing chapters first", flush=True)
        return nfail
    for md in chapters(selection):
        golden = BOOK / f"{md.stem}.ipynb"
        shutil.copyfile(out / "book" / f"{md.stem}.ipynb", golden)
        _stable_ids(golden)
        # re-derive inputs from the .md so that the pair is byte-for-byte in sync
        _jupytext("--to", "ipynb", "--update", "--output", str(golden), str(md))
        print(f"[book] recorded {_rel(golden)}", flush=True)
    return 0


def check_pairing(book: Path | None = None) -> list[str]:
    """Deterministic pairing check (not timestamps): regenerate each .ipynb's inputs from its .md,
    keeping outputs, and compare bytes. Returns a list of problems."""
    book = book or BOOK
    problems = []
    mds = chapters(book=book)
    stems = {p.stem for p in mds}
    for nb in sorted(book.glob("*.ipynb")):
        if nb.stem not in stems:
            problems.append(f"{_rel(nb)} has no paired .md")
    with tempfile.TemporaryDirectory() as tmp:
        for md in mds:
            nb = book / f"{md.stem}.ipynb"
            if not nb.exists():
                problems.append(f"{_rel(md)} has no paired .ipynb (run `make record CH={md.stem.split('_')[0]}`)")
                continue
            regen = Path(tmp) / nb.name
            shutil.copyfile(nb, regen)
            _jupytext("--to", "ipynb", "--update", "--output", str(regen), str(md))
            if regen.read_bytes() != nb.read_bytes():
                problems.append(
                    f"{_rel(md)} and {_rel(nb)} are out of sync "
                    f"(edit the .md, then `make record CH={md.stem.split('_')[0]}`)"
                )
    return problems


def _mathjax_dir() -> Path:
    import mathjax  # django-static-mathjax

    d = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (d / "tex-mml-chtml.js").exists():
        sys.exit(f"error: MathJax bundle not found under {d}")
    return d


BINDER_URL = "https://mybinder.org"
COLAB_URL = "https://colab.research.google.com"


def staged_config(cfg: dict) -> dict:
    """The config that renders the book: execution off, the book's Sphinx helper (book_pages.py),
    and the repository-facing buttons derived from the one setting ``repository.url``.

    Empty ``repository.url`` (the default): no repository, issue, Binder or Colab button (and no
    ``repository`` section, so no link to a repository). Set: repository and issue buttons, Binder
    (builds ``environment.yml``) and, for GitHub, Colab (runs the notebook's install cell), all
    pointing to ``book/NN_name.ipynb`` on ``repository.branch``.
    """
    import copy

    cfg = copy.deepcopy(cfg)
    cfg["execute"]["execute_notebooks"] = "off"
    cfg["exclude_patterns"] = ["_build", "**/.ipynb_checkpoints", "_md_sources", "_ext"]
    sph = cfg.setdefault("sphinx", {})
    sph.setdefault("local_extensions", {})["book_pages"] = "_ext/"
    # the theme's colour mode: left empty, pydata-sphinx-theme logs "Got invalid theme mode" as a
    # console error on a reader's first visit
    sph.setdefault("config", {}).setdefault("html_context", {}).setdefault("default_mode", "light")
    repo = cfg.get("repository") or {}
    url = (repo.get("url") or "").strip().rstrip("/")
    html = cfg.setdefault("html", {})
    launch = cfg.setdefault("launch_buttons", {})
    for key in ("binderhub_url", "colab_url", "jupyterhub_url", "thebe"):
        launch.pop(key, None)
    if not url:
        cfg.pop("repository", None)
        for key in ("use_repository_button", "use_issues_button", "use_edit_page_button"):
            html[key] = False
        return cfg
    repo["url"] = url
    cfg["repository"] = repo
    html["use_repository_button"] = True
    html["use_issues_button"] = True
    launch["binderhub_url"] = BINDER_URL
    if url.startswith("https://github.com/"):
        launch["colab_url"] = COLAB_URL
    return cfg


def stage(source: str, profile: str) -> Path:
    """Assemble ``_build/stage``: config with execution off, the notebooks to render, static files."""
    import yaml

    st = BUILD / "stage"
    if st.exists():
        shutil.rmtree(st)
    (st / "book").mkdir(parents=True)
    cfg = staged_config(yaml.safe_load((ROOT / "_config.yml").read_text()))
    (st / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (st / "_ext").mkdir()
    shutil.copyfile(ROOT / "scripts" / "book_pages.py", st / "_ext" / "book_pages.py")
    shutil.copyfile(ROOT / "_toc.yml", st / "_toc.yml")
    shutil.copyfile(ROOT / "references.bib", st / "references.bib")
    if (ROOT / "_static").exists():
        shutil.copytree(ROOT / "_static", st / "_static")
    # MathJax goes to the output root through html_extra_path (Jupyter Book would inject every .js
    # under _static as a <script> tag).
    shutil.copytree(_mathjax_dir(), st / "_extra" / "mathjax")
    chs = {p.stem for p in chapters()}
    (st / "_md_sources" / "book").mkdir(parents=True)
    for md in sorted(BOOK.glob("*.md")):
        if md.stem not in chs:  # plain pages (bibliography, ...)
            shutil.copyfile(md, st / "book" / md.name)
        else:  # offered for download next to the .ipynb (book_pages.py)
            shutil.copyfile(md, st / "_md_sources" / "book" / md.name)
    src_dir = BUILD / "exec" / profile / "book" if source == "executed" else BOOK
    for stem in sorted(chs):
        nb = src_dir / f"{stem}.ipynb"
        if not nb.exists():
            sys.exit(f"error: {nb} is missing; run the {'execute' if source == 'executed' else 'record'} step")
        shutil.copyfile(nb, st / "book" / nb.name)
    for extra in ("figures", "verdicts"):
        if (BOOK / extra).exists():
            shutil.copytree(BOOK / extra, st / "book" / extra)
    return st


def html() -> int:
    st = BUILD / "stage"
    out = BUILD / "html"
    if out.exists():
        shutil.rmtree(out)
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(st), "--path-output", str(ROOT), "--all", "-W", "-n", "--keep-going"]
    print("[book] jupyter-book " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        print(f"[book] jupyter-book build failed (exit {rc})", flush=True)
    elif not (out / "index.html").exists():
        print("[book] jupyter-book exited 0 but _build/html/index.html is missing", flush=True)
        rc = 1
    return rc


COLAB_MARK = "# Google Colab only: install CPU torch and the book's library (scripts/book.py colab-cell)"


def colab_cell_source(url: str, branch: str, torch_pin: str) -> str:
    """The install cell for Colab: a no-op anywhere else (the pinned environment has everything).

    CPU torch at the book's pin from PyTorch's CPU index, then the library with its ``[book]`` extra
    (glue needs myst-nb) from the repository, constrained to the book's pins."""
    url = url.strip().rstrip("/")
    return f"""{COLAB_MARK}
import sys

if "google.colab" in sys.modules:
    import subprocess

    REPO, BRANCH = {json.dumps(url)}, {json.dumps(branch)}
    if not REPO:
        raise RuntimeError("this copy of the book names no repository (_config.yml: repository.url); "
                           "install the library yourself: see the README")
    RAW = REPO.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/" + BRANCH
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["torch=={torch_pin}", "--index-url", "https://download.pytorch.org/whl/cpu"],
                   check=True)
    subprocess.run(pip + ["-c", RAW + "/requirements/book.txt",
                          f"bistochastic[book] @ git+{{REPO}}@{{BRANCH}}"], check=True)"""


def _colab_block(source: str) -> str:
    return "```{code-cell} ipython3\n:tags: [remove-cell]\n\n" + source + "\n```\n"


def colab_cell(selection: list[str] | None, book: Path | None = None,
               config: Path | None = None) -> list[Path]:
    """Insert (or refresh) the Colab install cell as the first code cell of each selected chapter's
    ``.md``. Idempotent: a chapter that already has the current cell is left byte-for-byte
    unchanged; one with an older cell (another URL or pin) gets it replaced. Returns the changed
    files (their ``.ipynb`` must then be re-recorded: ``make record CH=NN``)."""
    import re

    import yaml

    cfg = yaml.safe_load((config or ROOT / "_config.yml").read_text())
    repo = cfg.get("repository") or {}
    pins = (ROOT / "requirements" / "book.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)", pins, re.M).group(1)
    block = _colab_block(colab_cell_source(repo.get("url") or "", repo.get("branch") or "main",
                                           torch_pin))
    existing = re.compile(r"```\{code-cell\}[^\n]*\n:tags: \[remove-cell\]\n\n"
                          + re.escape(COLAB_MARK) + r"\n.*?\n```\n", re.S)
    changed = []
    for md in chapters(selection, book):
        text = md.read_text(encoding="utf-8")
        if existing.search(text):
            new = existing.sub(lambda _m: block, text, count=1)
        else:
            i = text.find("```{code-cell}")
            if i < 0:
                continue
            new = text[:i] + block + "\n" + text[i:]
        if new != text:
            md.write_text(new, encoding="utf-8")
            changed.append(md)
    return changed


# Distributions that only the extras may bring: a plain `pip install .` must install none of them.
EXTRA_ONLY = ("matplotlib", "seaborn", "ipython", "ipykernel", "jupyter-book", "myst-nb", "jupytext",
              "papermill", "sphinx", "nbval", "pot", "selenium", "pytest", "hypothesis", "pandas")
# Modules that ``import bistochastic`` (and its submodules, plotting aside) must not load.
EXTRA_MODULES = ("matplotlib", "seaborn", "IPython", "myst_nb", "yaml", "ot", "pandas")


def check_core_env() -> list[str]:
    """Run in a venv holding only ``pip install .`` (no extras): what a user's project gets.
    Returns the problems: an extra-only distribution installed, the package imported from the
    source tree instead of the install, or a plotting/book module loaded by the import."""
    import importlib
    import re
    from importlib import metadata

    problems = []
    installed = {re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "")).lower() for d in metadata.distributions()}
    for name in EXTRA_ONLY:
        if name in installed:
            problems.append(f"`pip install .` installed {name}, which only an extra may bring")
    if "bistochastic" not in installed:
        problems.append("bistochastic is not installed in this environment")
    bs = importlib.import_module("bistochastic")
    where = Path(bs.__file__).resolve()
    if ROOT / "lib" in where.parents:
        problems.append(f"bistochastic was imported from the source tree ({where}), not the install")
    for mod in ("sinkhorn", "birkhoff", "spectral", "noise", "models", "fixed_point", "anneal",
                "tasks", "bench", "stats", "book", "profiles"):
        importlib.import_module(f"bistochastic.{mod}")
    loaded = [m for m in EXTRA_MODULES if m in sys.modules]
    if loaded:
        problems.append(f"`import bistochastic` loaded {loaded} (import them lazily)")
    print(f"[core] bistochastic {bs.__version__} from {where.parent}; "
          f"{len(installed)} distributions installed")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("execute", help="execute chapters from scratch with papermill")
    p.add_argument("--profile", default=os.environ.get("BOOK_PROFILE", "ci"), choices=["ci", "full"])
    p.add_argument("--chapters", nargs="*", default=None)
    p.add_argument("--book-dir", type=Path, default=None, help="folder of chapter sources (default: book/)")
    p = sub.add_parser("record", help="re-record golden outputs (ci profile, CPU)")
    p.add_argument("--chapters", nargs="*", default=None)
    p = sub.add_parser("check-pairing", help="fail when a .md and its .ipynb are out of sync")
    p.add_argument("--book-dir", type=Path, default=None)
    p = sub.add_parser("stage", help="assemble _build/stage for rendering")
    p.add_argument("--source", choices=["executed", "golden"], required=True)
    p.add_argument("--profile", default="ci", choices=["ci", "full"])
    sub.add_parser("html", help="render _build/stage into _build/html")
    p = sub.add_parser("list", help="list chapters")
    p = sub.add_parser("colab-cell", help="insert/refresh the Colab install cell in chapter .md sources")
    p.add_argument("--chapters", nargs="*", default=None)
    p.add_argument("--book-dir", type=Path, default=None)
    sub.add_parser("check-core-env", help="in a venv with only `pip install .`: no extras installed or loaded")
    args = ap.parse_args(argv)

    if args.cmd == "execute":
        sel = args.chapters or None
        out = _out_dir("exec", args.profile, sel) if args.book_dir is None else BUILD / "exec-custom"
        return 1 if execute(args.profile, sel, out, book=args.book_dir) else 0
    if args.cmd == "record":
        return 1 if record(args.chapters or None) else 0
    if args.cmd == "check-pairing":
        probs = check_pairing(args.book_dir)
        for p_ in probs:
            print(f"[pairing] {p_}")
        print(f"[pairing] {len(chapters(book=args.book_dir))} chapter pair(s) checked, {len(probs)} problem(s)")
        return 1 if probs else 0
    if args.cmd == "stage":
        stage(args.source, args.profile)
        return 0
    if args.cmd == "html":
        return html()
    if args.cmd == "colab-cell":
        changed = colab_cell(args.chapters or None, args.book_dir)
        for md in changed:
            print(f"[colab] updated {_rel(md)} (re-record it: make record CH={md.stem.split('_')[0]})")
        print(f"[colab] {len(changed)} chapter(s) changed")
        return 0
    if args.cmd == "check-core-env":
        probs = check_core_env()
        for p_ in probs:
            print(f"[core] {p_}")
        return 1 if probs else 0
    if args.cmd == "list":
        for c in chapters():
            print(c.stem)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
