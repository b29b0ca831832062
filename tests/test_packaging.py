"""A non-editable install: the wheel and the sdist built from the tracked files carry every module and
config of fxjax/, model/, train/, rewards/ and configs/ (mapped to fxjax.*), and the sdist the whole test
suite. CI installs editable, where a gap in pyproject's package mapping would not show."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"fxjax": "fxjax", "model": "fxjax/model", "train": "fxjax/train", "rewards": "fxjax/rewards",
          "configs": "fxjax/configs", "docs": "fxjax/docs"}


def tracked() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_wheel_and_sdist_carry_every_module_and_config(tmp_path):
    files = tracked()
    source = tmp_path / "src"
    for f in files:  # a copy of the checkout: the build writes build/ and *.egg-info where it runs
        (source / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, source / f)
    built = {}
    for kind in ("wheel", "sdist"):  # one process each (in one, the sdist landed in the wheel's work folder)
        build = f"import sys; from setuptools import build_meta as b; print('BUILT', b.build_{kind}(sys.argv[1]))"
        result = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("BUILT ")]
        built[kind] = line.split()[1]
    wheel_name, sdist_name = built["wheel"], built["sdist"]
    in_wheel = set(zipfile.ZipFile(tmp_path / "dist" / wheel_name).namelist())
    wanted = {MAPPED[f.split("/")[0]] + f[len(f.split("/")[0]):] for f in files
              if f.split("/")[0] in MAPPED and f.endswith((".py", ".yaml", ".md"))}  # (docs/*.md: `fxjax docs`)
    assert len(wanted) > 50 and sorted(wanted - in_wheel) == []
    # `fxjax docs` in the installed wheel prints the wheel's docs (there is no repository beside it)
    site = tmp_path / "site"
    zipfile.ZipFile(tmp_path / "dist" / wheel_name).extractall(site)
    probe = "import fxjax.commands.docs as d; print(d.DOCS_DIR); print(' '.join(d.topics()))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(site)}, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    docs_dir, names = result.stdout.splitlines()
    assert docs_dir == str(site / "fxjax" / "docs")
    assert names.split() == sorted(Path(f).stem for f in files if f.startswith("docs/") and f.endswith(".md")) + [
        "readme"]  # (the README: from the wheel's metadata, tests/test_layering.py)
    with tarfile.open(tmp_path / "dist" / sdist_name) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    # (the suite reads docs/ and bench/ too: tests/test_data_check.py docs/data.md, tests/test_plan.py bench/plan.py)
    needed = {f for f in files if f.startswith(("tests/", "docs/", "bench/", *[d + "/" for d in MAPPED]))
              or f == "tpu_setup.sh"}
    assert sorted(needed - in_sdist) == []


def test_no_dependency_floor_is_below_what_the_other_dependencies_require():
    """A floor in pyproject.toml lower than one the installed dependencies themselves demand is a promise
    the install never keeps (jax>=0.6 beside flax 0.12.8, which needs jax>=0.10): every `name>=v` of ours
    is at least the highest floor the other runtime dependencies put on that name."""
    import tomllib
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.version import Version

    ours = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    names = {r.name.lower().replace("_", "-") for r in ours}
    floors: dict[str, list[tuple[Version, str]]] = {}
    for dep in names:
        for text in requires(dep) or []:
            req = Requirement(text)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            for spec in req.specifier:
                if spec.operator == ">=" and req.name.lower().replace("_", "-") in names:
                    floors.setdefault(req.name.lower().replace("_", "-"), []).append((Version(spec.version), dep))
    too_low = []
    for r in ours:
        for spec in r.specifier:
            name = r.name.lower().replace("_", "-")
            if spec.operator == ">=" and floors.get(name):
                need, by = max(floors[name])
                if Version(spec.version) < need:
                    too_low.append(f"{r.name}>={spec.version}, but {by} requires {name}>={need}")
    assert floors.get("jax"), "no dependency's floor on jax was found: the check reads nothing"
    assert not too_low, too_low


def _installed_closure(names) -> set[str]:
    """The distributions `names` install, with what each requires at run time (no extras), normalised."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    norm = lambda n: n.lower().replace("_", "-")  # noqa: E731
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            texts = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in texts:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def test_everything_fxjax_imports_or_its_readme_example_needs_installs_with_it():
    """`pip install fxjax` (no test extra) brings every third-party package our modules import, and jinja2,
    which transformers' apply_chat_template in the README's Python example needs and transformers itself
    leaves optional (CI had it only through torch, of the test extra)."""
    import ast
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    declared = [Requirement(r).name for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    closure = _installed_closure(declared)
    owners = packages_distributions()
    imported = set()
    for folder in MAPPED:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {(a.name.split(".")[0], path.name) for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add((node.module.split(".")[0], path.name))
    missing = sorted({(top, where, tuple(owners[top])) for top, where in imported
                      if top in owners and top != "fxjax" and not {d.lower().replace("_", "-") for d in owners[top]} & closure})
    assert len(imported) > 20 and not missing, missing
    assert "jinja2" in closure
