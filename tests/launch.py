"""Running `fxjax` CLI commands as separate processes in tests: one process, or two joined by a JAX
coordinator on localhost (gloo collectives, one CPU device each); and which records each process decoded
(tests/decode_trace.py) against the one-process stream; what a run's jax.profiler trace holds
(train.profile_steps); the environment every such process gets."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from numerics import free_port

# The tests' programs are tiny: XLA's optimisation work costs far more compile time than it saves at run time.
# conftest.py puts these settings in the pytest process's environment and `subprocess_env` in every process a
# test starts, so every result is checked (against HF, TRL, one device, an uninterrupted run) under the same
# ones. JAX_DISABLE_MOST_OPTIMIZATIONS: LLVM at -O0 (a third of the suite's time). The fusion emitters off:
# XLA:CPU's older loop emitters for fused ops (the 8-device sharding worker: 32 -> 18 s for one mesh, 2 AMD
# EPYC cores).
# FXJAX_COMPILATION_CACHE off: no cache under ~/.cache (it would carry programs from one suite run to the next);
# the suite run's own cache instead (`suite_cache_env`), or one a test gives (`subprocess_env(compilation_cache=...)`).
COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "FXJAX_COMPILATION_CACHE": "off"}
COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


SUITE_CACHE_VARIABLE = "FXJAX_TEST_SUITE_CACHE"  # (conftest.py sets it: the suite run's XLA cache folder)


def suite_cache_env(run_id: str) -> dict[str, str]:
    """JAX's variables for the suite run's persistent XLA cache (a folder under the system's temporary folder
    named by the run's id), which the pytest processes and every process `subprocess_env` describes share: a
    program many tests compile (the tiny model's SFT step, its decoding) compiles once a suite run (the suite
    10:52 -> 9:52, 2 Intel Xeon cores). It keeps the programs that took at least 0.2 s to compile: the large
    ones are the point."""
    import tempfile

    folder = str(Path(tempfile.gettempdir()) / "fxjax-suite-xla" / run_id)
    return {SUITE_CACHE_VARIABLE: folder, "JAX_COMPILATION_CACHE_DIR": folder,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def subprocess_env(xla_flags: str = "", *, compilation_cache: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a process a test starts: CPU only, the tests' compile settings, XLA_FLAGS
    = those + `xla_flags` (not this process's own XLA_FLAGS: a device count given to pytest is not the
    subprocess's), no armed fault (FXJAX_FAULT), `extra` on top. With `compilation_cache`, a persistent XLA
    cache there that keeps every program (the runs of a test module then compile each program once); without, the
    suite run's cache (conftest.py) when there is one."""
    env = {**COMPILE_ENV, **os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{COMPILE_XLA_FLAGS} {xla_flags}".strip(),
           "FXJAX_COMPILATION_CACHE": "off"}  # (whatever the developer's shell says: see COMPILE_ENV)
    env.pop("FXJAX_FAULT", None)
    if compilation_cache is None and env.get(SUITE_CACHE_VARIABLE):  # (the suite run's cache: conftest.py)
        env["FXJAX_COMPILATION_CACHE"] = env[SUITE_CACHE_VARIABLE]
    if compilation_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache), FXJAX_COMPILATION_CACHE=str(compilation_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return {**env, **extra}


def launch_two(args: list[str], env: dict, log_prefix: Path,
               entry: tuple[str, ...] = ("-m", "fxjax.cli")) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start `python <entry> *args` (default the fxjax CLI) as processes 0 and 1 of a 2-process run; logs
    <prefix>-<rank>-*.log."""
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        penv = {**env, "FXJAX_COORDINATOR": f"localhost:{port}", "FXJAX_NUM_PROCESSES": "2",
                "FXJAX_PROCESS_ID": str(rank), "FXJAX_LOCAL_DEVICE_COUNT": "1"}
        log = Path(f"{log_prefix}-{rank}-{time.time_ns()}.log")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *entry, *args], env=penv, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs, logs


def wait_all(procs, logs, *, timeout: float, until: str | None = None) -> list[int]:
    """Wait for every process to exit; with `until`, SIGKILL all of them once rank 0 printed it."""
    start = time.time()
    try:
        if until is not None:
            while until not in logs[0].read_text():
                if any(p.poll() is not None for p in procs) or time.time() - start > timeout:
                    raise AssertionError("\n".join(log.read_text()[-2000:] for log in logs))
                time.sleep(0.05)
            for proc in procs:
                os.killpg(proc.pid, signal.SIGKILL)
        # A process that fails leaves its peer blocked in a collective: stop waiting at the first failure.
        while any(p.poll() is None for p in procs) and time.time() - start < timeout:
            if any(p.poll() not in (None, 0) for p in procs) and until is None:
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [p.returncode for p in procs]


def stream_sources(data_config, n: int) -> list[tuple[int, str]]:
    """(epoch, record source) of the first `n` examples of the one-process stream of `data_config`."""
    from fxjax.data.pipeline import DataPipeline

    it = iter(DataPipeline(data_config))
    out = []
    while len(out) < n:
        out += [(m["epoch"], m["source"]) for m in next(it)["meta"]]
    return out[:n]


def decoded_sources(path: Path) -> list[tuple[int, str]]:
    """(epoch, record source) of every example a process decoded: its tests/decode_trace.py log."""
    return [(int(epoch), source) for epoch, source in (line.split(" ", 1) for line in path.read_text().splitlines())]


def traced_events(run_dir: Path) -> list[dict]:
    """The events of the run's jax.profiler trace (train.profile_steps), of its one trace."""
    (trace,) = (run_dir / "profile").glob("plugins/profile/*/*.trace.json.gz")
    assert len(list(trace.parent.glob("*.xplane.pb"))) == 1  # what TensorBoard's profile plugin reads
    return json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]


def traced_step_calls(events: list[dict]) -> int:
    """Calls of the jitted train step in a trace: its outermost `PjitFunction(step)` spans (each call shows
    as two nested ones)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "PjitFunction(step)")
    calls, end = 0, float("-inf")
    for start, stop in spans:
        if start >= end:
            calls, end = calls + 1, stop
    return calls
