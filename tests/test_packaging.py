"""A non-editable install: the wheel and the sdist built from the tracked files carry every module and
config of fxjax/, model/, train/, rewards/ and configs/ (mapped to fxjax.*), and the sdist the whole test
suite. CI installs editable, where a gap in pyproject's package mapping would not show."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"fxjax": "fxjax", "model": "fxjax/model", "train": "fxjax/train", "rewards": "fxjax/rewards",
          "configs": "fxjax/configs"}


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
              if f.split("/")[0] in MAPPED and f.endswith((".py", ".yaml"))}
    assert len(wanted) > 50 and sorted(wanted - in_wheel) == []
    with tarfile.open(tmp_path / "dist" / sdist_name) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = {f for f in files if f.startswith(("tests/", *[d + "/" for d in MAPPED])) or f == "tpu_setup.sh"}
    assert sorted(needed - in_sdist) == []
