"""One pin file for the book, ranges for the package, and every consumer in line with both.

* ``requirements/book.txt`` pins every direct dependency of the book exactly (``==``);
* ``pyproject.toml`` declares ranges (no ``==``), each satisfied by its pin, and covers 3.10-3.13;
* ``environment.yml`` (conda/Binder) and the ``Makefile`` install from the pin file, never from a
  second copy of the versions, and the book's venv is rebuilt when the pin file changes.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "requirements" / "book.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pin_lines() -> list[tuple[str, str, str]]:
    """``(name, version, marker)`` of every pin (marker ``""`` when the pin applies everywhere)."""
    out = []
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*(?:;\s*(.+))?", line)
        assert m, f"{PINS.name}: not an exact pin: {line!r} (the book pins every dependency with ==)"
        out.append((_norm(m.group(1)), m.group(2), m.group(3) or ""))
    return out


def book_pins() -> dict[str, str]:
    return {name: ver for name, ver, _ in _pin_lines()}


def test_pins_with_markers_match_the_package_markers():
    # a platform-limited pin (triton: Linux wheels only) must be limited in pyproject.toml alike
    declared = {_norm(r.name): r.marker for reqs in package_requirements().values() for r in reqs}
    for name, _, marker in _pin_lines():
        want = Marker(marker) if marker else None
        assert str(declared[name] or "") == str(want or ""), (name, declared[name], marker)


def package_requirements() -> dict[str, list[Requirement]]:
    """``{"": runtime, "plot": [...], ...}`` without the package's references to its own extras."""
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": proj["dependencies"], **proj.get("optional-dependencies", {})}
    return {k: [Requirement(r) for r in v if _norm(Requirement(r).name) != "bistochastic"]
            for k, v in groups.items()}


def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_the_pin_file_pins_exactly_the_packages_the_package_declares():
    pins = book_pins()
    declared = {_norm(r.name) for reqs in package_requirements().values() for r in reqs}
    assert set(pins) == declared, (
        f"only in {PINS.name}: {sorted(set(pins) - declared)}; "
        f"only in pyproject.toml: {sorted(declared - set(pins))}"
    )


def test_package_declares_ranges_that_the_book_pins_satisfy():
    pins = book_pins()
    for group, reqs in package_requirements().items():
        for r in reqs:
            ops = {s.operator for s in r.specifier}
            assert "==" not in ops and "===" not in ops, f"pyproject [{group}] {r}: a range, not a pin"
            assert r.specifier, f"pyproject [{group}] {r}: give a lower bound"
            assert r.specifier.contains(Version(pins[_norm(r.name)]), prereleases=True), (
                f"pyproject [{group}] {r} excludes the book's pin {pins[_norm(r.name)]}")


def test_runtime_needs_no_plotting_or_book_package():
    runtime = {_norm(r.name) for r in package_requirements()[""]}
    assert runtime == {"torch", "numpy", "scipy"}, runtime
    plot = {_norm(r.name) for r in package_requirements()["plot"]}
    assert {"matplotlib", "seaborn"} <= plot
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "bistochastic[plot]" in proj["optional-dependencies"]["book"]


def test_python_range_of_the_package_and_of_the_book():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = SpecifierSet(proj["requires-python"])
    for ok in ("3.10", "3.11", "3.12", "3.13"):
        assert Version(ok) in spec, f"requires-python {spec} must cover {ok}"
    assert Version("3.9") not in spec and Version("3.14") not in spec
    # the book (goldens, environment.yml, the Makefile's venv) is pinned to one interpreter
    make = (ROOT / "Makefile").read_text()
    book_py = re.search(r"^BOOK_PYTHON\s*:=\s*(\S+)", make, re.M).group(1)
    assert f"python={book_py}" in environment()["dependencies"]
    assert Version(book_py) in spec


def test_environment_yml_installs_from_the_pin_file_with_cpu_torch():
    deps = environment()["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-r requirements/book.txt" in pip
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip, (
        "Binder resolves torch on PyPI otherwise, which pulls the CUDA wheels")
    assert any(re.fullmatch(r"-e \.(\[[a-z,]+\])?", p) for p in pip)
    assert not [p for p in pip if "==" in p], "versions belong in requirements/book.txt only"
    conda_pkgs = [d for d in deps if isinstance(d, str)]
    assert all(re.fullmatch(r"python=[0-9.]+|pip", d) for d in conda_pkgs), conda_pkgs


def test_makefile_installs_the_pins_and_rebuilds_when_they_change():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^PINS\s*:=\s*requirements/book\.txt$", make, re.M)
    assert re.search(r"^\$\(STAMP\):.*\$\(PINS\)", make, re.M), "the venv stamp must depend on the pins"
    # torch first, with the pin read from the file (an unpinned resolve pulls the CUDA wheels)
    assert re.search(r"^TORCH_PIN\s*=.*\$\(PINS\)", make, re.M)
    assert '"torch==$(TORCH_PIN)"' in make
    assert "-r $(PINS)" in make
    assert "torch==2" not in make, "no second copy of the torch version"
    assert "torch" in book_pins()


def test_installed_versions_match_the_pins():
    from importlib.metadata import PackageNotFoundError, version

    wrong = {}
    for name, pin, marker in _pin_lines():
        if marker and not Marker(marker).evaluate():
            continue  # not for this platform
        try:
            got = version(name)
        except PackageNotFoundError:
            wrong[name] = (pin, "not installed")
            continue
        if got.split("+")[0] != pin:
            wrong[name] = (pin, got)
    assert not wrong, f"installed versions differ from the pins: {wrong} (rebuild the venv: make setup)"
