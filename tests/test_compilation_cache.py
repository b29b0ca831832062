"""fxjax/compilation_cache.py: the `fxjax` command's persistent XLA compilation cache (where it goes, what
turns it off, the user's own JAX setting kept), and that JAX does cache a program there when the command set
it up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fxjax.compilation_cache import DEFAULT_MAX_BYTES, use_compilation_cache
from launch import subprocess_env


def test_the_default_directory_and_bound_and_what_keeps_or_turns_them_off(tmp_path, capsys, monkeypatch):
    env = {"HOME": str(tmp_path / "home")}
    assert use_compilation_cache(env) == str(tmp_path / "home" / ".cache" / "fxjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "home" / ".cache" / "fxjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(DEFAULT_MAX_BYTES)

    env = {"HOME": "/h", "XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_COMPILATION_CACHE_MAX_SIZE": "1000"}
    assert use_compilation_cache(env) == str(tmp_path / "xdg" / "fxjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == "1000"  # the user's bound stays

    monkeypatch.setenv("HOME", str(tmp_path))  # (what ~ means)
    env = {"FXJAX_COMPILATION_CACHE": "~/my-cache"}
    assert use_compilation_cache(env) == str(tmp_path / "my-cache") and (tmp_path / "my-cache").is_dir()

    env = {"JAX_COMPILATION_CACHE_DIR": "/theirs", "FXJAX_COMPILATION_CACHE": "/ours"}
    assert use_compilation_cache(env) == "/theirs" and env == {"JAX_COMPILATION_CACHE_DIR": "/theirs",
                                                                "FXJAX_COMPILATION_CACHE": "/ours"}
    # a folder that cannot be made: said once, and no cache (JAX warned at every program, keeping nothing)
    env = {"FXJAX_COMPILATION_CACHE": "/proc/fxjax-cache"}
    assert use_compilation_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env
    assert "compiling without a persistent cache: cannot use /proc/fxjax-cache" in capsys.readouterr().err
    for off in ("off", "0", "False", "none", "no"):
        env = {"FXJAX_COMPILATION_CACHE": off, "HOME": "/h"}
        assert use_compilation_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env


@pytest.mark.parametrize("opt_out", [False, True])
def test_the_command_sets_the_cache_before_jax_starts_and_jax_writes_to_it(tmp_path, opt_out):
    """In a fresh process: `cli.main` points JAX at the cache (before jax is imported: JAX reads its
    variables at import) and a compiled program lands in it; FXJAX_COMPILATION_CACHE=off leaves JAX
    without one."""
    script = (
        "import os, sys\n"
        "from fxjax import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'jax' not in sys.modules\n"
        "import jax\n"
        "jax.jit(lambda x: x * 2 + 1)(3.0).block_until_ready()\n"
        "print('cache:', jax.config.jax_compilation_cache_dir)\n"
    )
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                         FXJAX_COMPILATION_CACHE="off" if opt_out else "")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cache = tmp_path / "xdg" / "fxjax" / "xla"
    if opt_out:
        assert "cache: None" in out.stdout and not cache.exists()
    else:
        assert f"cache: {cache}" in out.stdout
        assert any(p.is_file() for p in cache.rglob("*")), "JAX wrote nothing to the cache"
