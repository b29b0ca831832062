"""Multi-process (multi-host) start-up: jax.distributed.initialize driven by config or environment.

Call `initialize()` first thing, before any JAX computation (it must run before JAX's backends start).
Settings come from, in order of precedence: keyword arguments, a config mapping/`DistributedConfig`,
then the environment:

    FXJAX_COORDINATOR (or JAX_COORDINATOR_ADDRESS)   host:port of process 0's coordinator
    FXJAX_NUM_PROCESSES (or JAX_NUM_PROCESSES)       number of processes
    FXJAX_PROCESS_ID (or JAX_PROCESS_ID)             this process's id, 0 .. num_processes - 1
    FXJAX_LOCAL_DEVICE_COUNT                         CPU only: simulated devices in this process

With none of these set, `initialize()` looks for the cluster environments that JAX's own
`jax.distributed.initialize()` detects (`detect_cluster`: Open MPI's mpirun, SLURM, a Cloud TPU pod or
multislice) and, when one names more than one process, calls `jax.distributed.initialize()` without
arguments so that JAX fills in the coordinator, process count and id. It logs one line saying what it found
("fxjax.distributed: SLURM (4 processes) detected; joining via jax.distributed.initialize()"); set
FXJAX_NO_AUTO_DISTRIBUTED=1 to stay a single process. Explicit settings always win over detection.
With one process it does nothing but apply `local_device_count`. On CPU the cross-process collectives run
over gloo. After it, `fxjax.device_mesh.make_mesh` spans every process's
devices, `fxjax.from_pretrained(..., mesh=mesh)` loads onto the global mesh (each process reads from the
files only the regions of each tensor its devices hold) and `fxjax.save_pretrained` gathers one tensor at a time and writes
from process 0.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

import jax

from fxjax.host_exchange import DistributedError, check_process_count

ENV_VARS: dict[str, tuple[str, ...]] = {
    "coordinator_address": ("FXJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FXJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("FXJAX_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_count": ("FXJAX_LOCAL_DEVICE_COUNT",),
    "initialization_timeout": ("FXJAX_INITIALIZATION_TIMEOUT",),
}
PROXY_VARS = ("grpc_proxy", "https_proxy", "http_proxy")  # what gRPC reads, in its order
NO_PROXY_VARS = ("no_grpc_proxy", "no_proxy")


NO_AUTO_ENV = "FXJAX_NO_AUTO_DISTRIBUTED"  # "1": never join a detected cluster by itself
# All of these must be set for JAX's SLURM detection (jax._src.clusters.slurm_cluster) to take over.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# mpirun/mpiexec set it; JAX's Open MPI detection reads the coordinator's address from it.
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
# GKE TPU pods list the slice's workers in one of these (JAX reads them in this order).
TPU_HOSTS_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")

_LOG = logging.getLogger(__name__)




@dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None  # CPU: number of (simulated) devices of this process
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 300  # seconds to wait for every process to join

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DistributedConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DistributedError(f"unknown distributed setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistributedConfig":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, keys in ENV_VARS.items():
            for key in keys:
                if environ.get(key):
                    raw = environ[key]
                    if name == "coordinator_address":
                        values[name] = raw
                    else:
                        try:
                            values[name] = int(raw)
                        except ValueError:
                            raise DistributedError(f"{key}={raw!r} is not an integer") from None
                    break
        return cls(**values)

    @property
    def multi_process(self) -> bool:
        return (self.num_processes or 1) > 1

    def validate(self, cluster: bool = False) -> "DistributedConfig":
        """Checked settings (`cluster`: a cluster environment was detected, whose count and id JAX reads:
        a coordinator address alone is then what to join at, as jax.distributed.initialize takes it)."""
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
            # (JAX's own parse failed with an IndexError deep inside; an IPv6 address needs its brackets)
            if not host or bare_ipv6 or not port.isdigit() or not 0 < int(port) < 65536:
                variable = ENV_VARS["coordinator_address"][0]
                raise DistributedError(f"coordinator_address {self.coordinator_address!r} ({variable}) must be "
                                       f"HOST:PORT, process 0's host and a free port every process can reach "
                                       f"(e.g. {host or self.coordinator_address}:8476)")
        if self.initialization_timeout < 1:
            raise DistributedError(f"initialization_timeout must be >= 1 second, got {self.initialization_timeout}")
        if self.num_processes is not None and self.num_processes < 1:
            raise DistributedError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.local_device_count is not None and self.local_device_count < 1:
            raise DistributedError(f"local_device_count must be >= 1, got {self.local_device_count}")
        coordinator_only = self.process_id is None and self.coordinator_address is not None
        if self.num_processes is None and (self.process_id is not None or (coordinator_only and not cluster)):
            # (explicit settings skip cluster detection, so without a count every process would run alone)
            given = [f"{n} ({ENV_VARS[n][0]})" for n in ("coordinator_address", "process_id")
                     if getattr(self, n) is not None]
            raise DistributedError(f"{' and '.join(given)} set without num_processes "
                                   f"({ENV_VARS['num_processes'][0]}): set it too, or none of them to let a "
                                   "cluster be detected (a coordinator alone joins a SLURM or Open MPI job at it)")
        if self.multi_process:
            missing = [n for n in ("coordinator_address", "process_id") if getattr(self, n) is None]
            if missing:
                raise DistributedError(
                    f"{self.num_processes} processes need {' and '.join(missing)} (set "
                    + ", ".join(ENV_VARS[n][0] for n in missing) + " or pass them)")
            if not 0 <= self.process_id < self.num_processes:
                raise DistributedError(f"process_id {self.process_id} is not in [0, {self.num_processes})")
        return self


def resolve(config: DistributedConfig | Mapping[str, Any] | None = None, *,
            environ: Mapping[str, str] | None = None, **overrides) -> DistributedConfig:
    """Environment (`environ`, default os.environ), overridden by `config`, overridden by non-None keyword
    arguments."""
    merged = DistributedConfig.from_env(environ)
    if config is not None:
        given = config if isinstance(config, DistributedConfig) else DistributedConfig.from_dict(config)
        merged = replace(merged, **{f.name: getattr(given, f.name) for f in fields(given)
                                    if getattr(given, f.name) != getattr(DistributedConfig(), f.name)})
    merged = replace(merged, **{k: v for k, v in overrides.items() if v is not None})
    cluster = coordinator_joins_cluster(merged, os.environ if environ is None else environ)
    return merged.validate(cluster=cluster)


def coordinator_joins_cluster(cfg: DistributedConfig, environ: Mapping[str, str]) -> bool:
    """A coordinator address is the only explicit setting, in a cluster its variables describe (SLURM, Open
    MPI; a TPU pod, found through its metadata server, is not looked for here): the cluster's join at that
    address, JAX reading the count and id from the cluster's variables (as jax.distributed.initialize does
    given JAX_COORDINATOR_ADDRESS alone; fxjax refused it)."""
    return (cfg.coordinator_address is not None and cfg.num_processes is None and cfg.process_id is None
            and detect_cluster(environ) is not None and not opted_out(environ))


def _count(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise DistributedError(f"{key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{key}={raw!r} is not an integer") from None


def detect_cluster(environ: Mapping[str, str], *, cloud_tpu_vm: bool = False,
                   tpu_metadata_processes: int | None = None) -> str | None:
    """The multi-process cluster `environ` describes, as "<name> (<n> processes)", or None for one process.

    The same environments, in the same order, as JAX's cluster detection (jax._src.clusters), so that a
    `jax.distributed.initialize()` without arguments finds what this found:
    Open MPI (mpirun: OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE), SLURM (SLURM_JOB_ID, SLURM_NTASKS, ...),
    then, on a Cloud TPU VM only (`cloud_tpu_vm`), a GKE TPU pod (TPU_WORKER_HOSTNAMES or
    TPU_PROCESS_ADDRESSES, times MEGASCALE_NUM_SLICES) or a TPU VM pod whose process count JAX read from
    the metadata server (`tpu_metadata_processes`). An environment with one process is no cluster: JAX
    would start a one-process runtime for nothing.
    """
    if OMPI_URI in environ:
        n = _count(environ, "OMPI_COMM_WORLD_SIZE")
        return f"Open MPI ({n} processes)" if n > 1 else None
    if all(key in environ for key in SLURM_VARS):
        n = _count(environ, "SLURM_NTASKS")
        return f"SLURM ({n} processes)" if n > 1 else None
    if not cloud_tpu_vm:
        return None
    hosts = next((environ[key] for key in TPU_HOSTS_VARS if key in environ), None)
    if hosts is not None:
        n = len(hosts.split(",")) * _count(environ, "MEGASCALE_NUM_SLICES", default=1)
        return f"GKE TPU pod ({n} processes)" if n > 1 else None
    if tpu_metadata_processes is not None and tpu_metadata_processes > 1:
        return f"Cloud TPU pod ({tpu_metadata_processes} processes)"
    return None


def _on_cloud_tpu_vm() -> bool:
    # Set by JAX at import when libtpu and TPU chips are present (jax._src.cloud_tpu_init).
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _tpu_metadata_processes() -> int | None:
    """A TPU VM pod's process count as JAX's own detection reads it from the metadata server (workers x
    slices); None when that detection does not apply or fails (then nothing is joined automatically)."""
    try:
        from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster

        return GceTpuCluster.get_process_count() if GceTpuCluster.is_env_present() else None
    except Exception as err:  # a private JAX API or an unreachable metadata server: no auto-join
        _LOG.debug("Cloud TPU metadata detection failed: %r", err)
        return None


def auto_detect(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(the cluster to join or None, the one line to log) for a run with no explicit process settings."""
    environ = os.environ if environ is None else environ
    cloud_tpu_vm = _on_cloud_tpu_vm()
    probe = cloud_tpu_vm and not any(key in environ for key in TPU_HOSTS_VARS) and not (
        OMPI_URI in environ or all(key in environ for key in SLURM_VARS))
    found = detect_cluster(environ, cloud_tpu_vm=cloud_tpu_vm,
                           tpu_metadata_processes=_tpu_metadata_processes() if probe else None)
    return found, describe(found, environ)


def describe(found: str | None, environ: Mapping[str, str]) -> str:
    """The log line for a detection result (`found` from detect_cluster)."""
    if found is None:
        return "fxjax.distributed: single process (no cluster environment found)"
    if opted_out(environ):
        return (f"fxjax.distributed: {found} detected, but {NO_AUTO_ENV}={environ[NO_AUTO_ENV]}: "
                "staying a single process")
    return f"fxjax.distributed: {found} detected; joining via jax.distributed.initialize()"


def slurm_gpu_note(environ: Mapping[str, str]) -> str | None:
    """A warning when SLURM gives this node more GPUs than tasks and nothing says which a process takes:
    JAX's SLURM detection then gives each process the one GPU of its SLURM_LOCALID (jax.distributed's
    local_device_ids), so one task a node on 8 GPUs trained on 1 of them, quietly (mesh.data -1 takes the
    devices there are). None otherwise (JAX_LOCAL_DEVICE_IDS set, no SLURM, no GPU count)."""
    if not all(key in environ for key in SLURM_VARS) or environ.get("JAX_LOCAL_DEVICE_IDS", "").strip():
        return None
    gpus = re.match(r"\s*(\d+)", environ.get("SLURM_GPUS_ON_NODE", ""))
    tasks = re.match(r"\s*(\d+)", environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", ""))
    if gpus is None or tasks is None or int(gpus.group(1)) <= int(tasks.group(1)):
        return None
    gpus, tasks = int(gpus.group(1)), int(tasks.group(1))
    hint = (f"or, one task a node, export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(gpus)))}" if tasks == 1 else
            "or give each task its GPUs in JAX_LOCAL_DEVICE_IDS")
    return (f"fxjax.distributed: warning: SLURM gives this node {gpus} GPUs and {tasks} task(s), and JAX gives each "
            f"process only the GPU of its SLURM_LOCALID: {gpus - tasks} GPU(s) here would sit idle; run one task "
            f"per GPU (srun --ntasks-per-node={gpus} --gpus-per-node={gpus}, no --gpus-per-task: bound to a task, "
            f"its GPU is device 0, not its SLURM_LOCALID), {hint}")


def opted_out(environ: Mapping[str, str]) -> bool:
    """FXJAX_NO_AUTO_DISTRIBUTED set to anything but "" or "0"."""
    return environ.get(NO_AUTO_ENV, "").strip() not in ("", "0")


def _explicit(cfg: DistributedConfig) -> bool:
    return any(v is not None for v in (cfg.coordinator_address, cfg.num_processes, cfg.process_id))


def initialize(config: DistributedConfig | Mapping[str, Any] | None = None, *,
               coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None,
               environ: Mapping[str, str] | None = None,
               log: Callable[[str], None] | None = None) -> DistributedConfig:
    """Start JAX's multi-process runtime if more than one process is configured or detected; returns
    the settings (after a detected join: the process count and id JAX chose).

    Explicit settings (arguments, config, FXJAX_*/JAX_* variables) decide alone. Without any, a detected
    cluster (`detect_cluster`) is joined unless FXJAX_NO_AUTO_DISTRIBUTED=1. One line says what was found:
    to `log` if given, else printed to stderr when joining or opting out, and logged at INFO level otherwise.
    `environ` (default os.environ) is read for FXJAX_NO_AUTO_DISTRIBUTED and the cluster variables.
    Idempotent: a second call once initialised does nothing.
    """
    environ = os.environ if environ is None else environ
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    cfg = resolve(config, environ=environ, coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id, local_device_count=local_device_count)
    if jax.distributed.is_initialized():
        return cfg
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    if cfg.local_device_count is not None and forced and int(forced.group(1)) != cfg.local_device_count:
        say(f"note: distributed.local_device_count={cfg.local_device_count} (or FXJAX_LOCAL_DEVICE_COUNT) replaces "
            f"XLA_FLAGS' --xla_force_host_platform_device_count={forced.group(1)}: {cfg.local_device_count} CPU "
            f"device(s) a process")
    if cfg.local_device_count is not None and jax.config.jax_num_cpu_devices != cfg.local_device_count:
        try:
            jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
        except RuntimeError as err:  # the backend already runs: fine if it has that many devices
            if jax.local_device_count() != cfg.local_device_count:
                raise DistributedError(
                    f"local_device_count={cfg.local_device_count} must be set before JAX starts its backends "
                    f"(it runs with {jax.local_device_count()} device(s)): {err}") from None
    at = cfg.coordinator_address if coordinator_joins_cluster(cfg, environ) else None
    if _explicit(cfg) and at is None:
        if not cfg.multi_process:
            return cfg
        # said on every process before JAX waits: a peer that never comes ends in an abort after the timeout
        # (a C++ stack trace naming none of these), so the settings to check are on screen first
        say(join_line(cfg, environ))
        if idle_gpus := slurm_gpu_note(environ):
            say(idle_gpus)
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, initialization_timeout=cfg.initialization_timeout)
        check_process_count(cfg.initialization_timeout)
        return cfg
    found, line = auto_detect(environ)
    joining = found is not None and not opted_out(environ)
    if at is not None:
        line += f" at the coordinator {at} given ({' or '.join(ENV_VARS['coordinator_address'])})"
    if log is not None:
        log(line)
    elif found is not None:  # a join (or a refused one) is worth seeing in every run's output
        print(line, file=sys.stderr, flush=True)
    else:
        _LOG.info(line)
    if not joining:
        return cfg
    if idle_gpus := slurm_gpu_note(environ):
        say(idle_gpus)
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout,
                               **({"coordinator_address": at} if at is not None else {}))
    check_process_count(cfg.initialization_timeout)  # (the count JAX read from this host's cluster variables)
    # The count and id JAX chose, read without starting a backend (callers may still configure JAX).
    from jax._src.distributed import global_state

    return replace(cfg, num_processes=getattr(global_state, "num_processes", None),
                   process_id=getattr(global_state, "process_id", None))


def join_line(cfg: DistributedConfig, environ: Mapping[str, str]) -> str:
    """What an explicit join is about to do, and a proxy that may reroute the coordinator's gRPC."""
    host = cfg.coordinator_address.rpartition(":")[0].strip("[]")
    line = (f"fxjax.distributed: process {cfg.process_id} of {cfg.num_processes} joining at "
            f"{cfg.coordinator_address}; waiting up to {cfg.initialization_timeout} s for all {cfg.num_processes} "
            f"(distributed.initialization_timeout, FXJAX_INITIALIZATION_TIMEOUT); if it times out, check that "
            f"every process started with the same count, its own id, and this address")
    proxy = next((key for key in PROXY_VARS if environ.get(key)), None)
    bypass = {h.strip().strip("[]") for key in NO_PROXY_VARS for h in environ.get(key, "").split(",") if h.strip()}
    bypassed = "*" in bypass or any(host == h or (h.startswith(".") and host.endswith(h)) for h in bypass)
    if proxy is not None and not bypassed:
        line += (f"\nfxjax.distributed: note: {proxy} is set and no_proxy does not name {host}: gRPC may send the "
                 f"coordinator's traffic through the proxy (a join that fails with 'UNIMPLEMENTED ... 404'); "
                 f"add it: export no_proxy={host},$no_proxy")
    return line


def shutdown() -> None:
    """Leave the multi-process run `initialize` joined (jax.distributed.shutdown); nothing when none was."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


__all__ = ["DistributedConfig", "DistributedError", "ENV_VARS", "NO_AUTO_ENV", "auto_detect", "describe",
           "detect_cluster", "opted_out", "initialize", "resolve", "shutdown"]
