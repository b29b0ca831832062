"""The `fxjax` command's persistent XLA compilation cache.

A run that starts again (a resume after a preemption, the same config run once more, `fxjax eval` after
training) loads its compiled programs from disk instead of compiling them again: the 3B-72B train steps
of the README's compile plan take one to two minutes to compile on XLA:CPU (GPU and TPU compile times are
not measured here), and a preempted run pays that at every restart.

`use_compilation_cache()`, called by `cli.main` before anything imports JAX, sets JAX's own variables
(JAX reads them when it is imported):

* where: $FXJAX_COMPILATION_CACHE (a folder, or a URL such as gs://bucket/xla that JAX writes through
  etils), else a JAX_COMPILATION_CACHE_DIR the user set, else <$XDG_CACHE_HOME or ~/.cache>/fxjax/xla
  when JAX will run on a GPU or TPU. On a CPU alone the default is no cache: a CPU compiles the demo's
  programs in seconds, and on some CPUs (Intel with AVX-512) XLA:CPU refuses every entry it reads back,
  logging an error each time (jax-ml/jax#38445); FXJAX_COMPILATION_CACHE=DIR turns it on there.
* how much: the default folder is bounded at 16 GiB, the least recently used entries deleted beyond
  (JAX_COMPILATION_CACHE_MAX_SIZE for another bound). A folder the user names gets no bound of ours (JAX's
  default: none): JAX's bounded cache keeps an access-time file beside each entry and cannot write at all
  into a folder that holds entries an unbounded writer left without one (every compile then warns and
  keeps nothing), and a folder the user names may be shared with their own JAX programs.
* FXJAX_COMPILATION_CACHE=off (or 0, false, no, none): no cache, JAX_COMPILATION_CACHE_DIR removed too.

What JAX does with it: it caches the programs that took at least jax_persistent_cache_min_compile_time_secs
(1 s) to compile, keyed by the program, its compile options, the jax / jaxlib version and the devices (a
changed model, mesh or upgrade compiles afresh); on a GPU it keeps XLA's autotuning results there too. In
a multi-process run process 0 writes the entries and every process reads them, so the folder must be one
they share (a network mount, a bucket): on disks of their own the other processes compile at every start.
A program with cuDNN attention on more than one device never hits (its custom partitioning puts a
per-process pointer in the key, jax-ml/jax#21159). Code that calls `fxjax.train.sft.run_sft` /
`fxjax.train.grpo.run_grpo` itself sets JAX's options itself (this module changes nothing unless called).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import MutableMapping

from fxjax.host_allocator import jax_on_cpu_only

__all__ = ["CACHE_VARIABLE", "DEFAULT_MAX_BYTES", "OFF_VALUES", "default_directory", "use_compilation_cache"]

CACHE_VARIABLE = "FXJAX_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")
DEFAULT_MAX_BYTES = 16 * 2**30


def default_directory(environ: MutableMapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "fxjax" / "xla"


def use_compilation_cache(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set JAX's persistent compilation cache in `environ` (the process's environment; call this before
    JAX is imported). Returns the cache folder in use, None for none."""
    choice = environ.get(CACHE_VARIABLE, "").strip()
    if choice.lower() in OFF_VALUES and choice:
        environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        return None
    ours = False
    if choice:
        directory = choice if "://" in choice else str(Path(choice).expanduser())
    elif environ.get("JAX_COMPILATION_CACHE_DIR"):  # the user's own JAX setting
        directory = environ["JAX_COMPILATION_CACHE_DIR"]
    elif jax_on_cpu_only(environ):
        return None
    else:
        directory, ours = str(default_directory(environ)), True
    if directory.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        # (JAX would warn "Please install gcsfs" at every program it compiles, and keep nothing)
        print(f"fxjax: compiling without a persistent cache: {directory} needs gcsfs (pip install gcsfs; "
              f"tpu_setup.sh installs it)", file=sys.stderr)
        environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        return None
    if "://" not in directory and not _can_write(Path(directory)):
        # (JAX would warn at every program it compiles, and keep nothing)
        print(f"fxjax: compiling without a persistent cache: {directory} cannot be written; set "
              f"{CACHE_VARIABLE}=DIR for another folder, or ={OFF_VALUES[0]}", file=sys.stderr)
        environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        return None
    environ["JAX_COMPILATION_CACHE_DIR"] = directory
    if ours:  # (only fxjax writes there, always bounded: see the module's docstring)
        environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(DEFAULT_MAX_BYTES))
    return directory


def _can_write(directory: Path) -> bool:
    """Whether `directory` can be made or written to, judged by its nearest existing folder (nothing is
    made here: `fxjax --help` and `fxjax report`, which compile nothing, leave no folder behind)."""
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            return False
        existing = existing.parent
    return (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
            and not os.statvfs(existing).f_flag & os.ST_RDONLY)  # (root passes os.access on a read-only mount)
