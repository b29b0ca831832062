"""Multi-process (multi-host) start-up: jax.distributed.initialize driven by config or environment.

Call `initialize()` first thing, before any JAX computation (it must run before JAX's backends start).
Settings come from, in order of precedence: keyword arguments, a config mapping/`DistributedConfig`,
then the environment:

    FXJAX_COORDINATOR (or JAX_COORDINATOR_ADDRESS)   host:port of process 0's coordinator
    FXJAX_NUM_PROCESSES (or JAX_NUM_PROCESSES)       number of processes
    FXJAX_PROCESS_ID (or JAX_PROCESS_ID)             this process's id, 0 .. num_processes - 1
    FXJAX_LOCAL_DEVICE_COUNT                         CPU only: simulated devices in this process

With one process (or none configured) it does nothing but apply `local_device_count`. On CPU the
cross-process collectives run over gloo. After it, `fxjax.sharding.make_mesh` spans every process's
devices, `fxjax.from_pretrained(..., mesh=mesh)` loads onto the global mesh (each process reads each
tensor and keeps only its shards) and `fxjax.save_pretrained` gathers one tensor at a time and writes
from process 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import jax

ENV_VARS: dict[str, tuple[str, ...]] = {
    "coordinator_address": ("FXJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FXJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("FXJAX_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_count": ("FXJAX_LOCAL_DEVICE_COUNT",),
}


class DistributedError(RuntimeError):
    pass


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

    def validate(self) -> "DistributedConfig":
        if self.num_processes is not None and self.num_processes < 1:
            raise DistributedError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.local_device_count is not None and self.local_device_count < 1:
            raise DistributedError(f"local_device_count must be >= 1, got {self.local_device_count}")
        if self.multi_process:
            missing = [n for n in ("coordinator_address", "process_id") if getattr(self, n) is None]
            if missing:
                raise DistributedError(
                    f"{self.num_processes} processes need {' and '.join(missing)} (set "
                    + ", ".join(ENV_VARS[n][0] for n in missing) + " or pass them)")
            if not 0 <= self.process_id < self.num_processes:
                raise DistributedError(f"process_id {self.process_id} is not in [0, {self.num_processes})")
        return self


def resolve(config: DistributedConfig | Mapping[str, Any] | None = None, **overrides) -> DistributedConfig:
    """Environment, overridden by `config`, overridden by non-None keyword arguments."""
    merged = DistributedConfig.from_env()
    if config is not None:
        given = config if isinstance(config, DistributedConfig) else DistributedConfig.from_dict(config)
        merged = replace(merged, **{f.name: getattr(given, f.name) for f in fields(given)
                                    if getattr(given, f.name) != getattr(DistributedConfig(), f.name)})
    merged = replace(merged, **{k: v for k, v in overrides.items() if v is not None})
    return merged.validate()


def initialize(config: DistributedConfig | Mapping[str, Any] | None = None, *,
               coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> DistributedConfig:
    """Start JAX's multi-process runtime if more than one process is configured; returns the settings.

    Idempotent: a second call once initialised does nothing.
    """
    cfg = resolve(config, coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_count=local_device_count)
    if jax.distributed.is_initialized():
        return cfg
    if cfg.local_device_count is not None and jax.config.jax_num_cpu_devices != cfg.local_device_count:
        try:
            jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
        except RuntimeError as err:  # the backend already runs: fine if it has that many devices
            if jax.local_device_count() != cfg.local_device_count:
                raise DistributedError(
                    f"local_device_count={cfg.local_device_count} must be set before JAX starts its backends "
                    f"(it runs with {jax.local_device_count()} device(s)): {err}") from None
    if not cfg.multi_process:
        return cfg
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, initialization_timeout=cfg.initialization_timeout)
    return cfg


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_main_process() -> bool:
    return jax.process_index() == 0


__all__ = ["DistributedConfig", "DistributedError", "ENV_VARS", "initialize", "resolve", "shutdown",
           "is_main_process"]
