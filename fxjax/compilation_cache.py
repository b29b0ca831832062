"""The `fxjax` command's persistent XLA compilation cache.

A run that starts again (a resume after a preemption, the same config run once more, `fxjax eval` after
training) loads its compiled programs from disk instead of compiling them again: on a TPU or GPU a 3B-72B
train step takes one to two minutes to compile (README, "Compile and memory plan"), and a preempted pod
pays that at every restart.

`use_compilation_cache()`, called by `cli.main` before anything imports JAX, points JAX's own setting
(JAX_COMPILATION_CACHE_DIR) at $FXJAX_COMPILATION_CACHE, or by default at <$XDG_CACHE_HOME or ~/.cache>/
fxjax/xla, and bounds it at 16 GiB (JAX deletes the least recently used entries beyond;
JAX_COMPILATION_CACHE_MAX_SIZE sets another bound). A JAX_COMPILATION_CACHE_DIR of the user's is left as it
is; FXJAX_COMPILATION_CACHE=off (or 0, false, no, none) compiles every time. What JAX does with it: it
caches programs that took at least jax_persistent_cache_min_compile_time_secs (1 s) to compile, keyed by
the program, its compile options, the jax / jaxlib version and the devices, so a changed model, mesh or
upgrade compiles afresh; on a GPU it keeps XLA's autotuning results there too. Code that calls
`fxjax.train.run_sft` / `run_grpo` itself sets JAX's option itself (this module changes nothing unless
called).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import MutableMapping

__all__ = ["CACHE_VARIABLE", "DEFAULT_MAX_BYTES", "OFF_VALUES", "use_compilation_cache"]

CACHE_VARIABLE = "FXJAX_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")
DEFAULT_MAX_BYTES = 16 * 2**30


def default_directory(environ: MutableMapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "fxjax" / "xla"


def use_compilation_cache(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set JAX's persistent compilation cache in `environ` (the process's environment: JAX reads it when
    it is imported, so call this before). Returns the cache directory in use, None when off."""
    choice = environ.get(CACHE_VARIABLE, "").strip()
    if choice.lower() in OFF_VALUES and choice:
        return None
    if environ.get("JAX_COMPILATION_CACHE_DIR"):  # the user's own JAX setting: theirs, as it is
        return environ["JAX_COMPILATION_CACHE_DIR"]
    directory = str(Path(choice).expanduser()) if choice else str(default_directory(environ))
    try:  # (JAX would warn at every program it compiles, and keep nothing)
        Path(directory).mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as err:
        print(f"fxjax: compiling without a persistent cache: cannot use {directory} ({err}); set "
              f"{CACHE_VARIABLE}=DIR for another folder, or ={OFF_VALUES[0]}", file=sys.stderr)
        return None
    environ["JAX_COMPILATION_CACHE_DIR"] = directory
    environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(DEFAULT_MAX_BYTES))
    return directory
