"""Imports point one way: model, rewards -> fxjax core -> train -> the app layer (CLI, demo, commands).

Every import statement in the installed packages (function-local ones included, relative ones resolved)
is checked against the layer table below; a test also proves the checker catches a violation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folder in the repository -> the import package it installs as (pyproject's package-dir mapping).
PACKAGE_DIRS = {"fxjax": "fxjax", "model": "fxjax.model", "train": "fxjax.train", "rewards": "fxjax.rewards"}

# Layer of a module: the longest matching prefix wins; anything else under fxjax is the core.
LAYER_OF_PREFIX = {
    "fxjax.model": "model",
    "fxjax.rewards": "rewards",
    "fxjax.train": "train",
    "fxjax.cli": "app",
    "fxjax.__main__": "app",  # python -m fxjax: the CLI
    "fxjax.demo": "app",
    "fxjax.demo_model": "app",  # the demo's base model (only the demo builds it)
    "fxjax.demo_summary": "app",  # the demo's closing lines
    "fxjax.selfcheck": "app",
    "fxjax.detector": "app",  # `fxjax detect` from Python (it drives the command's resolution)
    "fxjax.evaluate": "app",  # `fxjax eval` from Python (it runs the command)
    "fxjax.keyword_options": "app",  # a command's options as Python keywords (read by its parser)
    "fxjax.commands": "app",
    "fxjax": "core",
}

# What each layer may import (of ours).
ALLOWED = {
    "model": {"model"},
    "rewards": {"rewards"},
    "core": {"model", "rewards", "core"},
    "train": {"model", "rewards", "core", "train"},
    "app": {"model", "rewards", "core", "train", "app"},
}


def layer_of(module: str) -> str | None:
    if module != "fxjax" and not module.startswith("fxjax."):
        return None
    best = max((p for p in LAYER_OF_PREFIX if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF_PREFIX[best]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    package = PACKAGE_DIRS[rel.parts[0]]
    parts = [package] + list(rel.parts[1:])
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `source`, relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from fxjax import train` imports the sub-package fxjax.train.
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            out.append((node.lineno, target))
    return out


def violations(files) -> list[str]:
    found = []
    for path in files:
        module = module_name(path)
        source_layer = layer_of(module)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            # Bare top-level names that an installed fxjax never provides: the old, shadowable imports.
            if target.split(".")[0] in ("model", "train", "rewards"):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {target!r} (use fxjax.{target})")
                continue
            target_layer = layer_of(target)
            if target_layer is None:
                continue
            # `from fxjax import x` where x is not a module resolves to fxjax itself (core).
            if target_layer not in ALLOWED[source_layer]:
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} ({source_layer}) imports {target} "
                             f"({target_layer})")
    return found


def package_files():
    for folder in PACKAGE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_imports_point_one_way():
    bad = violations(package_files())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_checker_catches_a_core_module_importing_train():
    # Fake sources parsed as if they were those modules (nothing is written into the repository).
    source = "def f():\n    from fxjax.train.sft import run_sft\n"
    found = [t for _, t in imported_modules(source, "fxjax.device_mesh", False)]
    assert "fxjax.train.sft" in found
    assert layer_of("fxjax.device_mesh") == "core" and layer_of("fxjax.train.sft") == "train"
    assert "train" not in ALLOWED["core"]
    model_source = "from fxjax.device_mesh import put\n"
    targets = [t for _, t in imported_modules(model_source, "fxjax.model.lora", False)]
    assert any(layer_of(t) == "core" for t in targets) and "core" not in ALLOWED["model"]
    relative = "from ..train import step\n"
    targets = [t for _, t in imported_modules(relative, "fxjax.data.pipeline", False)]
    assert "fxjax.train" in targets


def test_user_files_named_model_train_rewards_do_not_shadow_fxjax(tmp_path):
    for name in ("model", "train", "rewards"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py was imported')\n")
    script = tmp_path / "use_fxjax.py"
    script.write_text(textwrap.dedent("""
        import fxjax
        from fxjax.model import Qwen25VL
        from fxjax.model.generate import greedy_generate
        from fxjax.train.sft import run_sft
        from fxjax import rewards
        assert callable(fxjax.from_pretrained) and callable(rewards.score)
        print("ok")
    """))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    # `fxjax selfcheck` (import, forward, decoding, export) run from that directory: this is also the
    # selfcheck's own test
    check = subprocess.run([sys.executable, "-c", "import sys; from fxjax.cli import main; "
                            f"sys.exit(main(['selfcheck', '--workdir', {str(tmp_path / 'check')!r}]))"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-2000:]


@pytest.mark.parametrize("name", ["model", "train", "rewards"])
def test_no_top_level_package_of_that_name_is_installed(name, tmp_path):
    run = subprocess.run([sys.executable, "-c", f"import importlib.util as u; print(u.find_spec({name!r}))"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "None", run.stdout


def test_a_non_editable_install_carries_its_configs(tmp_path):
    """`pip install .` (not -e) from a copy of the repository: the model presets and the reward stages,
    which live in configs/, come with the package (fxjax/configs) and load from outside the repository."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "fxjax", "model", "train", "rewards", "configs", "docs"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    code = ("import fxjax, fxjax.presets as p; from fxjax import rewards; "
            "assert fxjax.__file__.startswith(%r), fxjax.__file__; "
            "print(p.load_preset('tiny').text.hidden_size, p.load_preset('3b').text.hidden_size); "
            "print(rewards.score(['<think>x</think>\\n<verdict>real</verdict>'], [{'label': 'real'}], "
            "stage='gamma')['total'][0]); "
            # `fxjax docs readme`: no README beside the package, the one in its metadata
            "from fxjax.commands import docs; t = docs.topics(); "
            "print(sorted(t), docs.section(docs.text_of(t['readme']), 'from trl', 'readme').splitlines()[0])"
            ) % str(site)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].split() + lines[1].split() == ["64", "2048", "2.0"]  # gamma: -1 + 2 x IoU 1 + 0.5 + 0.5
    assert lines[2] == "['data', 'demo_tuning', 'format', 'readme', 'rewards'] ### Coming from TRL", lines


def test_every_public_name_and_subpackage_resolves_after_a_bare_import():
    """`import fxjax` imports no jax; each name of fxjax.__all__ then loads from its module, and the
    subpackages the README writes as attributes (fxjax.rewards.score, fxjax.distributed.initialize) work."""
    code = ("import sys, fxjax; assert 'jax' not in sys.modules; "
            "missing = [n for n in fxjax.__all__ if getattr(fxjax, n, None) is None]; assert not missing, missing; "
            "assert callable(fxjax.rewards.score) and callable(fxjax.distributed.initialize); "
            "assert callable(fxjax.model.lora.remove_lora) and fxjax.remove_lora is fxjax.model.lora.remove_lora; "
            # fxjax.data's modules by name, as the README writes fxjax.data.prompts.serving_prompt
            "assert callable(fxjax.data.prompts.serving_prompt); import pathlib; "
            "mods = {p.stem for p in pathlib.Path(fxjax.data.__file__).parent.glob('*.py')} - {'__init__'}; "
            "assert mods == set(fxjax.data._SUBMODULES) and mods <= set(dir(fxjax.data)), mods; "
            # dir(): the public names and the subpackages, not the package's own imports (a notebook's listing)
            "d = dir(fxjax); assert {'rewards', 'model', 'data', 'train', *fxjax.__all__} <= set(d), d; "
            "assert not {'annotations', 'TYPE_CHECKING', 'lazy_exports'} & set(d), d; "
            "r = dir(fxjax.rewards); assert set(fxjax.rewards.__all__) <= set(r), r; "  # (its own copy of __dir__)
            "assert not {'annotations', 'importlib', 'Any', '_EXPORTS'} & set(r), r; "
            "print(len(fxjax.__all__))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and int(run.stdout) >= 19, run.stderr[-2000:]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        __import__("fxjax").nope
