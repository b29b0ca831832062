"""fxjax/compilation_cache.py: the `fxjax` command's persistent XLA compilation cache (where it goes, when it
is on by default, what turns it off, the user's own JAX setting), and that JAX does cache a program there
when the command set it up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fxjax.compilation_cache import DEFAULT_MAX_BYTES, use_compilation_cache
from launch import subprocess_env


def test_on_by_default_for_a_gpu_or_tpu_with_a_bound_and_what_moves_or_turns_it_off(tmp_path, capsys, monkeypatch):
    env = {"HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "tpu"}
    assert use_compilation_cache(env) == str(tmp_path / "home" / ".cache" / "fxjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "home" / ".cache" / "fxjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(DEFAULT_MAX_BYTES)
    assert not (tmp_path / "home").exists()  # nothing made before JAX writes an entry (`--help` leaves none)

    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cuda", "JAX_COMPILATION_CACHE_MAX_SIZE": "1000"}
    assert use_compilation_cache(env) == str(tmp_path / "xdg" / "fxjax" / "xla")
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == "1000"  # the user's bound stays

    # a CPU alone: none by default (XLA:CPU refuses its own entries on some CPUs); a folder given turns it on
    env = {"HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    assert use_compilation_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env
    monkeypatch.setenv("HOME", str(tmp_path))  # (what ~ means)
    env = {"FXJAX_COMPILATION_CACHE": "~/my-cache", "JAX_PLATFORMS": "cpu"}
    assert use_compilation_cache(env) == str(tmp_path / "my-cache") == env["JAX_COMPILATION_CACHE_DIR"]
    # a bucket: JAX writes it through etils, which needs gcsfs; without it JAX warned at every compile and
    # kept nothing: said once, and no cache
    import importlib.util

    from fxjax import compilation_cache

    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(compilation_cache.importlib.util, "find_spec",
                            lambda name: (object() if installed else None) if name == "gcsfs" else real_find_spec(name))
        env = {"FXJAX_COMPILATION_CACHE": "gs://bucket/xla"}
        assert use_compilation_cache(env) == ("gs://bucket/xla" if installed else None)
    assert "gs://bucket/xla needs gcsfs (pip install gcsfs" in capsys.readouterr().err
    monkeypatch.setattr(compilation_cache.importlib.util, "find_spec", real_find_spec)

    # the user's JAX_COMPILATION_CACHE_DIR is used; FXJAX_COMPILATION_CACHE, when given, wins over it; neither
    # gets a bound of ours (JAX's bounded cache cannot write into a folder an unbounded writer shares: the
    # suite's own helpers and the CLI shared one, and every CLI compile warned and kept nothing); off removes it
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "theirs"), "JAX_PLATFORMS": "cpu"}
    assert use_compilation_cache(env) == str(tmp_path / "theirs") and "JAX_COMPILATION_CACHE_MAX_SIZE" not in env
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "theirs"), "FXJAX_COMPILATION_CACHE": str(tmp_path / "ours")}
    assert use_compilation_cache(env) == str(tmp_path / "ours") == env["JAX_COMPILATION_CACHE_DIR"]
    assert "JAX_COMPILATION_CACHE_MAX_SIZE" not in env
    for off in ("off", "0", "False", "none", "no"):
        env = {"FXJAX_COMPILATION_CACHE": off, "JAX_PLATFORMS": "tpu", "JAX_COMPILATION_CACHE_DIR": "/theirs"}
        assert use_compilation_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env

    # a folder that cannot be written: said once, and no cache (JAX warned at every program, keeping nothing)
    (tmp_path / "a-file").write_text("")
    env = {"FXJAX_COMPILATION_CACHE": str(tmp_path / "a-file" / "xla"), "JAX_COMPILATION_CACHE_DIR": "/theirs"}
    assert use_compilation_cache(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env
    assert f"compiling without a persistent cache: {tmp_path / 'a-file' / 'xla'} cannot be written" \
        in capsys.readouterr().err


def test_the_default_folder_is_bounded_and_jax_keeps_access_times_there(tmp_path):
    """The folder a GPU or TPU run gets by default, end to end with JAX (here on the CPU, the settings made
    as for a TPU): entries and their access-time files (the 16 GiB bound's LRU; JAX needs filelock)."""
    script = (
        "import os\n"
        "from fxjax.compilation_cache import use_compilation_cache\n"
        "env = dict(os.environ, JAX_PLATFORMS='tpu')\n"
        "print('cache:', use_compilation_cache(env))\n"
        "os.environ.update({k: env[k] for k in ('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE')})\n"
        "import jax\n"
        "jax.jit(lambda x: x * 2 + 1)(3.0).block_until_ready()\n"
        "print('bound:', jax.config.jax_compilation_cache_max_size)\n"
    )
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("FXJAX_COMPILATION_CACHE")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cache = tmp_path / "xdg" / "fxjax" / "xla"
    assert f"cache: {cache}" in out.stdout and f"bound: {DEFAULT_MAX_BYTES}" in out.stdout
    entries = list(cache.glob("*-cache"))
    assert entries and all(e.with_name(e.name.removesuffix("-cache") + "-atime").is_file() for e in entries)
    assert "Error writing persistent compilation cache" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("setting", ["folder", "cpu default", "off"])
def test_the_command_sets_the_cache_before_jax_starts_and_jax_writes_to_it(tmp_path, setting):
    """In a fresh process on the CPU: `cli.main` points JAX at FXJAX_COMPILATION_CACHE (before jax is
    imported: JAX reads its variables at import) and a compiled program lands there; with nothing set a CPU
    run has no cache; off leaves JAX without one."""
    script = (
        "import os, sys\n"
        "from fxjax import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'jax' not in sys.modules\n"
        "import jax\n"
        "jax.jit(lambda x: x * 2 + 1)(3.0).block_until_ready()\n"
        "print('cache:', jax.config.jax_compilation_cache_dir)\n"
    )
    cache = tmp_path / "cache"
    if setting == "folder":  # an entry an unbounded JAX program wrote (no access-time file beside it)
        cache.mkdir()
        (cache / "jit_other-0123456789abcdef-cache").write_bytes(b"entry")
    value = {"folder": str(cache), "cpu default": "", "off": "off"}[setting]
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                         FXJAX_COMPILATION_CACHE=value)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    if setting == "folder":
        assert f"cache: {cache}" in out.stdout
        assert "Error writing persistent compilation cache" not in out.stderr, out.stderr[-2000:]
        assert len(list(cache.glob("*-cache"))) > 1, "JAX wrote nothing to the cache"
    else:
        assert "cache: None" in out.stdout and not (tmp_path / "xdg").exists()
