"""Resuming a run: the newest checkpoint that restores (a damaged one set aside), each process's data
position, and the checks that the run continues as the one saved (the same phase, process count, rows a
process reads, and mesh).

    resumed = resume_run("sft", checkpointer, state, iterator, cfg, log, rows_per_batch=rows)
    if resumed is not None: check_resume_mesh(resumed.data_state.get("mesh"), mesh, log)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax

from fxjax.config_mapping import ConfigError
from fxjax.host_exchange import allgather_json
from fxjax.run_files import RUN_CWD_KEY, RUN_PATH_KEYS, RunLoadError, brief_error, saved_run_kind
from fxjax.train.resume_check import WATCHED, check_lora_scale, check_resume_config
from fxjax.train.step import TrainState

__all__ = ["Resumed", "check_resume_mesh", "checkpoint_data_state", "mesh_record", "other_phase_message",
           "per_process_state", "process_rows_per_batch", "restore_iterator", "restore_latest", "resume_run"]


def restore_latest(checkpointer, state: TrainState, log: Callable[[str], None]):
    """(state, data_state, saved_config, step) from the newest checkpoint that restores, or None when the
    directory holds none. A checkpoint that fails to restore (truncated or corrupted files) is reported with
    its step, set aside (renamed ``<step>.unreadable-<n>``, so the run can write that step again) and the
    next older one is tried; if none restores, RunLoadError (the newest's error) and nothing is renamed.

    Several processes decide together: they must see the same steps (one shared folder), and a step counts as
    restored only when every process restored it (a host that cannot read it would otherwise resume from an
    older step than the others, or wait for them forever)."""
    steps = sorted(checkpointer.all_steps(), reverse=True)
    seen = allgather_json("fxjax.checkpoint-steps", steps)
    if any(other != steps for other in seen):
        listed = "; ".join(f"process {p}: {', '.join(map(str, other)) or 'none'}" for p, other in enumerate(seen))
        raise ConfigError(f"checkpoint.dir: the processes see different checkpoints in {checkpointer.directory} "
                          f"({listed}); every host must read and write one shared folder (a network or cloud file "
                          "system), or the run cannot resume as one")
    if not steps:
        return None
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    first_error, first_text = None, None
    broken = []
    for i, step in enumerate(steps):
        error = None
        try:
            restored = checkpointer.restore(template, step)
        except ConfigError:  # another run's settings (array shapes): not a damaged checkpoint to set aside
            raise
        except Exception as err:  # orbax raises many types for damaged files; the message says which
            error = err
        outcomes = allgather_json("fxjax.checkpoint-restored", None if error is None else brief_error(error))
        failed = [(p, text) for p, text in enumerate(outcomes) if text is not None and p != jax.process_index()]
        if error is None and not failed:
            for bad in broken:
                log(f"warning: set the unreadable checkpoint of step {bad} aside as {checkpointer.set_aside(bad)}")
            return restored
        text = brief_error(error) if error is not None else f"process {failed[0][0]} could not restore it: {failed[0][1]}"
        first_error, first_text = first_error or error, first_text or text
        broken.append(step)
        log(f"warning: the checkpoint of step {step} in {checkpointer.directory} cannot be restored ({text}); "
            + (f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"))
    raise RunLoadError(f"no checkpoint in {checkpointer.directory} restores (steps {', '.join(map(str, steps))}; "
                       f"the newest: {first_text}). Nothing was renamed. To train from the start, move "
                       f"{checkpointer.directory} away (or set checkpoint.dir to another folder)") from first_error


def per_process_state(state: dict, rows_per_batch: int) -> dict:
    """What a checkpoint stores for data iterators that differ by process (each reads its own rows):
    ``{"process_count": n, "processes": [the state of process 0, ..., of process n - 1], "rows_per_batch":
    [how many rows of each global batch each process reads]}``; every process calls it (a host-only
    exchange, `fxjax.host_exchange.allgather_json`) and process 0 writes it."""
    every = allgather_json("iterator-state", {"state": state, "rows": int(rows_per_batch)})
    return {"process_count": jax.process_count(), "processes": [p["state"] for p in every],
            "rows_per_batch": [p["rows"] for p in every]}


def restore_iterator(iterator, saved: dict, where, rows_per_batch: int | None = None) -> None:
    """Set `iterator` to its saved position: this process's entry of a `per_process_state`, or a state
    saved once for every process (iterators that read the same data everywhere). A per-process state of
    another process count, or of another number of rows a process reads of each batch (`rows_per_batch`,
    this run's), cannot be continued exactly: error. (A process's position counts the rows it has read:
    with more rows a batch on another mesh split, the same position is fewer batches, and the run would
    train on batches again; with fewer, skip some.)"""
    if "processes" not in saved:
        iterator.set_state(saved)
        return
    count, states = int(saved["process_count"]), saved["processes"]
    if count != jax.process_count() or len(states) != count:
        raise ConfigError(f"{where}: the data iterator state was saved by {count} process(es) but this run has "
                          f"{jax.process_count()}; each process reads its own rows, so the run resumes exactly "
                          f"only with {count} process(es) (the same mesh.data x mesh.fsdp split); or start a "
                          "new run from it with model.from_run")
    me = jax.process_index()
    saved_rows = saved.get("rows_per_batch")  # states saved before it was recorded have none
    if saved_rows is not None and rows_per_batch is not None and int(saved_rows[me]) != rows_per_batch:
        raise ConfigError(f"{where}: process {me} read {saved_rows[me]} row(s) of each global batch when the checkpoint "
                          f"was saved and reads {rows_per_batch} on this mesh; its saved data position counts its own "
                          "rows, so the run would not continue with the batches it left off at. Resume on the mesh "
                          "split it was saved on (the same mesh.data x mesh.fsdp over the processes: the checkpoint's "
                          "data/data_state.json records it), or start a new run from it with model.from_run")
    iterator.set_state(states[me])


def process_rows_per_batch(data_cfg) -> int:
    """How many rows of each global batch this process's data pipeline reads (its `batch_rows`, or all)."""
    return data_cfg.batch_size if data_cfg.batch_rows is None else len(data_cfg.batch_rows)


class Resumed(NamedTuple):
    state: TrainState
    data_state: dict  # what the loop saved next to the state (iterator position, shape floors, stage, ...)
    step: int


def resume_run(name: str, checkpointer, state: TrainState, iterator, cfg, log: Callable[[str], None],
               watched=WATCHED, recorded: Mapping[str, Any] | None = None,
               rows_per_batch: int | None = None) -> Resumed | None:
    """Continue from the newest restorable checkpoint (see `restore_latest`): the state, the data iterator's
    position and a check of the saved config against `recorded` (what the run's checkpoints record: its
    config as a dict, GRPO's with its reward values; default `cfg.to_dict()`; `check_resume_config`). None:
    fresh run."""
    restored = restore_latest(checkpointer, state, log) if cfg.checkpoint.resume else None
    if restored is None:
        return None
    state, data_state, saved_cfg, step = restored
    saved_kind = saved_run_kind(saved_cfg)
    if saved_kind != name:  # the same state layout would restore, and then continue the other phase's count
        raise ConfigError(other_phase_message(name, checkpointer.directory, saved_kind, step))
    now = cfg.to_dict() if recorded is None else dict(recorded)
    try:
        restore_iterator(iterator, data_state["iterator"], checkpointer.directory / str(step), rows_per_batch)
    except ConfigError:
        saved_batch, batch = (saved_cfg.get("data") or {}).get("batch_size"), now["data"]["batch_size"]
        same_processes = int(data_state["iterator"].get("process_count", jax.process_count())) == jax.process_count()
        if saved_batch is None or saved_batch == batch or not same_processes:
            raise
        # (the rows a process reads changed with the batch, not with the mesh the error would blame)
        raise ConfigError(f"data.batch_size: the checkpoint of step {step} in {checkpointer.directory} was saved with "
                          f"data.batch_size={saved_batch} and this run has {batch}; the saved data position counts "
                          f"each process's rows of a batch, so the run cannot continue where it stopped: set "
                          f"data.batch_size={saved_batch}, or start a new run from it with model.from_run") from None
    check_lora_scale(saved_cfg, now, f"step {step} in {checkpointer.directory}")
    check_resume_config(saved_cfg, as_saved_where_same(saved_cfg, now, data_state.get(RUN_CWD_KEY)), log, watched)
    warn_paths_read_elsewhere(saved_cfg, now, data_state.get(RUN_CWD_KEY), log)
    extra = f" (stage {data_state['stage']})" if "stage" in data_state else ""
    log(f"{name}: resumed from step {step}{extra} in {checkpointer.directory}")
    return Resumed(state, data_state, step)


def as_saved_where_same(saved: Mapping[str, Any], now: Mapping[str, Any], saved_cwd: str | None) -> dict:
    """`now` with each input path of the run (RUN_PATH_KEYS) that names what the saved one named, but written
    otherwise, written as saved: `load_run(...).config` gives a run's paths back absolute (`model.path:
    tiny-qwen` is /work/tiny-qwen there), and re-running it warned that "the base model changed". Relative
    paths resolve against the folder the run started in (`saved_cwd`) and the current one."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in now.items()}
    started = Path(saved_cwd) if saved_cwd else Path.cwd()

    def resolved(value, root: Path) -> list:
        return [str((root / v).resolve()) if isinstance(v, str) else v
                for v in (value if isinstance(value, (list, tuple)) else [value])]

    for section, key in RUN_PATH_KEYS:
        then, current = (saved.get(section) or {}).get(key), (out.get(section) or {}).get(key)
        if then is not None and current is not None and then != current and \
                resolved(then, started) == resolved(current, Path.cwd()):
            out[section][key] = then
    return out


def warn_paths_read_elsewhere(saved: Mapping[str, Any], now: Mapping[str, Any], saved_cwd: str | None,
                              log: Callable[[str], None]) -> list[str]:
    """A warning for each relative path of the run's inputs (RUN_PATH_KEYS) written the same as when the run
    started but resumed from another folder, where it names another file or folder while the one it named
    then is still there: a run resumed from another project folder trained on with that folder's base model
    (another model's weights, the loss back at a fresh model's) with no word, its config unchanged as text."""
    if not saved_cwd or Path(saved_cwd).resolve() == Path.cwd().resolve():
        return []
    said = []
    for section, key in RUN_PATH_KEYS:
        value = (saved.get(section) or {}).get(key)
        if value != (now.get(section) or {}).get(key) or value is None:
            continue  # (another value: check_resume_config's to say)
        for path in value if isinstance(value, list) else [value]:
            if not isinstance(path, str) or Path(path).is_absolute():
                continue
            then, here = Path(saved_cwd) / path, Path(path).absolute()
            if then.exists() and then.resolve() != here.resolve():
                said.append(f"warning: {section}.{key}: {path} is read from {Path.cwd()} now, {here}; the run "
                            f"started in {saved_cwd}, where it is {then}, still there: if they differ, the run "
                            f"goes on with other inputs (run it from {saved_cwd}, or give the path absolute)")
    for line in said:
        log(line)
    return said


def checkpoint_data_state(iterator: dict, shape_floor: dict, skipped: int, mesh, **extra) -> dict:
    """What a checkpoint holds beside the train state (SFT's and GRPO's, and the tests' multi-process writer):
    each process's data position (`per_process_state`), the batch-shape floor, the skipped updates, the mesh
    it was saved on (`check_resume_mesh`), the working directory (the run's relative paths resolve against
    it: `fxjax.run_files.RUN_CWD_KEY`) and `extra` (GRPO: the stage and the stage ends)."""
    return {"iterator": iterator, "shape_floor": shape_floor, "skipped": skipped, "mesh": mesh_record(mesh),
            RUN_CWD_KEY: os.getcwd(), **extra}


def mesh_record(mesh) -> dict[str, int]:
    """The mesh's axis sizes, saved with each checkpoint (the loops' data state) for `check_resume_mesh`."""
    return {axis: int(size) for axis, size in mesh.shape.items()}


def check_resume_mesh(saved: dict | None, mesh, log: Callable[[str], None]) -> None:
    """Warn when a run resumes on another split of the devices than the one its checkpoint was saved on
    (checkpoints before fxjax recorded it: no check; another process count is refused before this). The run
    continues (the state is resharded onto the new mesh), but its sums run over other splits of the rows or
    the weights (a batch shard's padding and loss, fsdp's and tensor's partial sums), and with several
    processes each may now build other rows of a batch than before (as many: `restore_iterator` refuses
    another number): it is not bit for bit the run that
    would have gone on uninterrupted, and a test comparing the two would fail without saying why. (The
    dcn_* factors only reorder devices within these sizes: not compared.)"""
    now = mesh_record(mesh)
    if saved is not None and dict(saved) != now:
        log(f"warning: resuming on mesh {now}, but the checkpoint was saved on mesh {dict(saved)}: the run "
            f"continues, its sums split over other rows or weights, so it is not bit for bit the run it "
            f"would have been on the saved mesh")


def other_phase_message(name: str, directory: Path, saved_kind: str, step: int) -> str:
    article = "an" if saved_kind == "sft" else "a"
    return (f"{directory} holds the checkpoints of {article} {saved_kind} run (newest: step {step}), not of a {name} "
            "run; give this run its own train.output_dir / checkpoint.dir"
            + (f" (GRPO from that SFT run: model.from_run={directory})" if name == "grpo" else ""))
