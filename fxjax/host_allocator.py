"""Host memory on a CPU run: glibc's malloc made to keep what XLA frees, so steps stop re-zeroing it.

XLA:CPU allocates a program's temporary buffers afresh at each execution. glibc maps every block over
32 MB from the kernel and unmaps it when it is freed (and gives back the top of its heaps), so each
training step page-faults and zeroes the same memory again: 11.5% of a mid-size SFT step on a 2-core Zen 4
EPYC, 1 s of system time per 4.8 s step (bench/README.md, "Where the step's time goes on a CPU").

`keep_freed_memory()`, which the `fxjax` command calls before anything imports JAX, sets glibc's mallopt
options so that freed memory stays in the process for the next step: no mmap for large blocks
(M_MMAP_MAX 0), no trimming (M_TRIM_THRESHOLD -1) and one arena (M_ARENA_MAX 1: with several, a thread's
own arena is an mmapped heap that glibc unmaps once it is empty; measured, arena limits up to 8 kept the
gain on 2 cores and 16 lost it). Only when JAX will run on the CPU alone (JAX_PLATFORMS says cpu, or no
GPU / TPU plugin is installed), glibc is the allocator, no other is preloaded and no MALLOC_* /
GLIBC_TUNABLES setting says the user tuned it. The costs: the process keeps its peak host memory until it
exits (+17% for the demo's SFT), and every thread's allocations above glibc's per-thread cache share one
arena's lock, measured on 2 cores only (where it cost nothing visible). FXJAX_SYSTEM_MALLOC=1 leaves
malloc as it is. Options set after JAX started its threads do not help (those threads have their arenas
by then), hence the command line only: `import fxjax` in a program changes nothing, nor does
`fxjax.cli.main([...])` (a notebook's kernel would keep its peak memory for the user's own work too).

A preloaded tcmalloc (LD_PRELOAD) does the same and a little more (bench/README.md); `cpu_memory_note`
says which of these a run has, once per process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

OPT_OUT = "FXJAX_SYSTEM_MALLOC"  # "1": leave glibc's malloc as it is
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))
# Allocators a user may have preloaded instead (by the name of their library)
OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
_state: dict[str, object] = {"kept": False, "said": False, "cli": False}
MEASURED = "5-20% less step time on a 2-core CPU"


def jax_on_cpu_only(environ: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU alone, known before it is imported: JAX_PLATFORMS (or the older
    JAX_PLATFORM_NAME) names only "cpu", or neither is set and no GPU / TPU plugin is installed (the CUDA and
    ROCm plugins live in the `jax_plugins` namespace, the TPU runtime in `libtpu`)."""
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    named = [p.strip().lower() for p in platforms.split(",") if p.strip()]
    if named:
        return all(p == "cpu" for p in named)
    return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def preloaded_allocator(environ: Mapping[str, str], maps: Path = Path("/proc/self/maps")) -> str | None:
    """The name of another allocator's library this process has loaded (tcmalloc, jemalloc, mimalloc), from
    /proc/self/maps, or from LD_PRELOAD (spaces or colons between libraries, as ld.so reads it) where that
    cannot be read."""
    try:
        loaded = maps.read_text()
    except OSError:
        loaded = " ".join(Path(p).name for p in environ.get("LD_PRELOAD", "").replace(":", " ").split())
    return next((name for name in OTHER_ALLOCATORS if name in loaded), None)


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's malloc to keep freed memory (see the module docstring) when this process will run JAX on
    the CPU, with glibc's malloc, before JAX is imported, and not opted out (FXJAX_SYSTEM_MALLOC=1).
    Returns whether it did."""
    environ = os.environ if environ is None else environ
    _state["cli"] = True
    if (opted_out(environ) or "jax" in sys.modules or not sys.platform.startswith("linux")
            or preloaded_allocator(environ) is not None or not jax_on_cpu_only(environ)):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such function, and no mallopt options)
    except (OSError, AttributeError):
        return False
    _state["kept"] = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    return bool(_state["kept"])


def opted_out(environ: Mapping[str, str]) -> bool:
    """FXJAX_SYSTEM_MALLOC=1, or the user tuned glibc's malloc themselves (MALLOC_*_ variables, or
    GLIBC_TUNABLES naming glibc.malloc): theirs is kept."""
    return (environ.get(OPT_OUT, "") not in ("", "0") or any(k.startswith("MALLOC_") for k in environ)
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""))


def cpu_memory_note(platform: str, environ: Mapping[str, str] | None = None) -> str | None:
    """One line for a run on `platform` about its host allocator, or None (not a CPU, another allocator
    preloaded, or malloc left as the user set it): that malloc keeps freed memory (and how not to), or how
    a run could."""
    environ = os.environ if environ is None else environ
    if platform != "cpu" or preloaded_allocator(environ) is not None or opted_out(environ):
        return None
    if _state["kept"]:
        return (f"host memory: glibc's malloc keeps what XLA frees, so steps do not re-zero it ({MEASURED}; "
                f"the process keeps its peak memory; {OPT_OUT}=1 leaves malloc as it is)")
    how = ("set JAX_PLATFORMS=cpu (a GPU or TPU plugin is installed, so the `fxjax` command could not know the "
           "run is on the CPU)" if _state["cli"] and not jax_on_cpu_only(environ) else
           "start it with the `fxjax` command in a shell, which sets glibc's malloc to keep what XLA frees before "
           "JAX starts (from Python, fxjax.cli.main([...]) included, the process's malloc is left as it is)")
    return f"tip: a CPU run's steps take {MEASURED} when freed host memory is kept: {how}, or preload tcmalloc"


def say_cpu_memory_note(platform: str, say: Callable[[str], None]) -> None:
    """`say` the note, once per process (a demo runs SFT and GRPO in one process)."""
    note = None if _state["said"] else cpu_memory_note(platform)
    if note is not None:
        _state["said"] = True
        say(note)
