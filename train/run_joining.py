"""Joining a run's processes before anything is built: each checks what its host sees (LoRA trained, no
other run's checkpoints, the export and run folders writable), they agree on the outcome and on one config,
and on one shared checkpoint folder, so that a check failing on one host stops every process with its error.

    main, say = join_run("sft", cfg, log)   # first in fxjax.train.sft / grpo, then train.run_setup
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from fxjax import distributed, host_exchange
from fxjax.config_mapping import ConfigError, dotted_keys
from fxjax.file_modes import require_folder_renames, require_writable
from fxjax.run_files import CONFIG_FILE, committed_steps, saved_run_kind
from fxjax.train import faults
from fxjax.train.export import check_export_targets
from fxjax.train.preemption import held_signal, hold_stop_signals
from fxjax.train.resume import other_phase_message

__all__ = ["check_same_config", "check_shared_folder", "comparable_config", "join_run",
           "refuse_new_run_over_checkpoints", "refuse_other_phases_checkpoints"]


def refuse_other_phases_checkpoints(name: str, cfg) -> None:
    """A run resuming in the checkpoint directory of the other phase is refused before it writes anything
    there (keep_start_lora's copy of its start came before `resume_run`'s check, and left the other run's
    folder claiming a start it never had): the newest step whose saved config reads decides."""
    directory = cfg.checkpoint_dir
    if not cfg.checkpoint.resume or not directory.is_dir():
        return
    for step in reversed(committed_steps(directory)):
        try:
            saved = json.loads((directory / str(step) / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # (restore_latest reports an unreadable step and falls back past it)
        if isinstance(saved, dict):
            if saved_run_kind(saved) != name:
                raise ConfigError(other_phase_message(name, directory, saved_run_kind(saved), step))
            return


def join_run(name: str, cfg, log: Callable[[str], None] | None) -> tuple[bool, Callable[[str], None]]:
    """Join the multi-process run (cfg.distributed), check the config trains LoRA, and return (this is
    process 0, the console logger: `log` or stderr on process 0, silent elsewhere)."""
    distributed.initialize({k: v for k, v in vars(cfg.distributed).items() if v is not None})
    if host_exchange.joined():  # (several processes; no backend started: a failing peer must not be waited for)
        hold_stop_signals()  # (a preemption notice while the model loads: kept for the loop, not dropped)
    faults.point("joined", 0, held_signal)
    try:
        _check_start(name, cfg)
        failure = None
    except Exception as err:  # noqa: BLE001 (any error: the peers must hear of it before the backends start)
        failure = err
    # Each host checks what it sees (its folders, its copy of a file): the processes agree before going on,
    # so that a check failing on one host stops every process with that error (the others would wait for it
    # in JAX's backend start-up, minutes, and then fail with a timeout that names nothing)
    every = (host_exchange.allgather_json("fxjax.start-checks", {"error": None if failure is None else str(failure),
                                                               "config": comparable_config(cfg)})
             if host_exchange.joined() else [])  # (one process: no exchange, and no backend started for it)
    if failure is not None:
        raise failure
    for process, report in enumerate(every):
        if report["error"] is not None:
            raise host_exchange.PeerFailed(process, report["error"])
    if every:
        check_same_config([report["config"] for report in every])
    if host_exchange.joined() and jax.process_count() > 1:
        check_shared_folder(cfg.checkpoint_dir, "checkpoint.dir", cfg.checkpoint.shared_folder_wait)
    if jax.process_index() != 0:
        return False, lambda text: None
    return True, log or (lambda text: print(text, file=sys.stderr, flush=True))


def check_shared_folder(directory: Path, key: str, wait_s: float) -> None:
    """Every process sees the file process 0 writes in `directory` (within `wait_s` seconds, for a network file
    system's caches: checkpoint.shared_folder_wait), else a ConfigError on every process naming those that do
    not. Each process writes its
    part of a checkpoint there: on disks of their own, the first save waited 10 minutes in orbax and then
    failed, hours into a run."""
    me = jax.process_index()
    sent: dict[str, str] = {}
    if me == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(".fxjax-shared-check-*"):  # (left by a start killed mid-check)
                stale.unlink(missing_ok=True)
            name = f".fxjax-shared-check-{secrets.token_hex(8)}"
            (directory / name).write_text("process 0 wrote this to check that every process sees the folder\n")
            sent = {"name": name}
        except OSError as err:
            sent = {"error": f"{key}: {directory}: process 0 cannot write there: {err}"}
    first = host_exchange.allgather_json("fxjax.shared-folder", sent)[0]  # (after process 0 wrote)
    if "error" in first:
        raise ConfigError(first["error"])
    path = directory / first["name"]
    deadline = time.monotonic() + wait_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = host_exchange.allgather_json("fxjax.shared-folder-seen", path.exists())
    if me == 0:
        path.unlink(missing_ok=True)
    blind = [p for p, ok in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f"{key}: process(es) {', '.join(map(str, blind))} of {len(seen)} do not see the file "
                          f"process 0 wrote in {directory}: every process writes its part of each checkpoint there, so it must "
                          f"be one folder all hosts share (NFS, Filestore, gcsfuse), at the same path on each; on "
                          f"disks of their own the first checkpoint would wait 10 minutes and fail (they waited "
                          f"{wait_s:g} s for it: checkpoint.shared_folder_wait)")


# What may differ between the processes of a run: each one's place in it; the data files, whose records every
# process compares itself (fxjax.train.batching's check_same_records: the same records under another path on
# another host are the same data); and the run's folders, which must be one shared folder whatever each host
# calls it (check_shared_folder: it names the processes that do not see process 0's file).
PER_PROCESS_KEYS = ("distributed.", "data.train_files", "data.eval_files", "data.root", "train.output_dir",
                    "checkpoint.dir")


def comparable_config(cfg) -> dict[str, Any]:
    """The resolved config as flat dotted keys (JSON values), less PER_PROCESS_KEYS."""
    flat = dotted_keys(json.loads(json.dumps(cfg.to_dict(), default=str)))
    return {k: v for k, v in flat.items() if not k.startswith(PER_PROCESS_KEYS)}


def check_same_config(configs: list[dict[str, Any]]) -> None:
    """Every process runs the config process 0 runs: one started with another --set trained its devices'
    copies of the weights otherwise (a learning rate: silently), or made other collectives (a LoRA rank: an
    abort in gloo) or another number of steps (a hang in JAX's shutdown barrier), none named. A ConfigError on
    every process naming the keys that differ and each process's value."""
    keys = sorted({k for c in configs for k in c if any(c.get(k, "<unset>") != configs[0].get(k, "<unset>")
                                                        for c in configs)})
    if not keys:
        return
    said = "; ".join(f"{k}: " + ", ".join(f"{c.get(k, '<unset>')!r} on process {p}" for p, c in enumerate(configs))
                     for k in keys[:5]) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "")
    raise ConfigError(f"the processes of the run were given different configs ({said}): start every process with "
                      "the same --config and --set (only distributed.*, the data files' and the run folders' paths may "
                      "differ)")


def _check_start(name: str, cfg) -> None:
    """What join_run checks before a run starts (each process, on what its host sees)."""
    if not cfg.lora.enabled:  # (an adapter or a run to start from is trained all the same: no exception)
        raise ConfigError(f"lora.enabled: {name.upper()} trains LoRA adapters only; set lora.enabled=true")
    refuse_new_run_over_checkpoints(cfg)
    refuse_other_phases_checkpoints(name, cfg)
    check_export_targets(cfg.export, cfg.checkpoint_dir)
    require_writable(cfg.train.output_dir, "train.output_dir")
    require_writable(cfg.checkpoint_dir, "checkpoint.dir")
    require_folder_renames(cfg.checkpoint_dir, "checkpoint.dir")


def refuse_new_run_over_checkpoints(cfg) -> None:
    """checkpoint.resume false in a checkpoint directory that holds steps is an error: the new run's saves
    would prune the old steps (max_to_keep) and then meet one of their numbers, and an export or `--run`
    afterwards would read a mix of the two runs."""
    directory = cfg.checkpoint_dir
    if cfg.checkpoint.resume or not directory.is_dir():
        return
    steps = committed_steps(directory)
    if steps:
        raise ConfigError(f"checkpoint.resume: false, but {directory} holds the checkpoints of an earlier run "
                          f"(steps {', '.join(map(str, steps))}); a new run there would prune them and collide "
                          f"with their step numbers: give it its own train.output_dir (or checkpoint.dir), or "
                          f"remove them, or resume")
