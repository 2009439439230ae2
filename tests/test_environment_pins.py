"""environment.yml (conda/Binder) and pyproject.toml (pip) must pin the same versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(reqs) -> dict[str, str]:
    out = {}
    for r in reqs:
        r = r.strip()
        if r.startswith("-e") or not r:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", r)
        assert m, f"not an exact pin: {r!r} (every dependency is pinned with ==)"
        out[_norm(m.group(1))] = m.group(3)
    return out


def pyproject_pins() -> dict[str, str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _parse(proj["dependencies"])
    for extra in proj.get("optional-dependencies", {}).values():
        pins.update(_parse(extra))
    return pins


def environment_pins() -> tuple[dict[str, str], dict]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return _parse(pip), env


def test_same_pins_in_environment_yml_and_pyproject():
    py = pyproject_pins()
    env, _ = environment_pins()
    assert py == env, (
        f"only in pyproject: {sorted(set(py) - set(env))}; only in environment.yml: "
        f"{sorted(set(env) - set(py))}; different versions: "
        f"{ {k: (py[k], env[k]) for k in set(py) & set(env) if py[k] != env[k]} }"
    )


def test_python_and_torch_pins():
    _, env = environment_pins()
    assert "python=3.11" in env["dependencies"]
    assert pyproject_pins()["torch"] == "2.13.0"
    # the Makefile installs torch first with the same exact pin (an unpinned resolve pulls CUDA wheels)
    assert '"torch==2.13.0"' in (ROOT / "Makefile").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text()


def test_installed_versions_match_the_pins():
    from importlib.metadata import PackageNotFoundError, version

    wrong = {}
    for name, pin in pyproject_pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            wrong[name] = (pin, "not installed")
            continue
        if got.split("+")[0] != pin:
            wrong[name] = (pin, got)
    assert not wrong, f"installed versions differ from the pins: {wrong} (run `make setup` afresh)"
