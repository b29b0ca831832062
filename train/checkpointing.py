"""Training checkpoints with orbax's CheckpointManager.

A checkpoint of step N is one orbax step directory ``<dir>/<N>/`` with three items:

* ``state``: the train state as a flat mapping of arrays (LoRA parameters, optimiser state, step, RNG key
  data), saved asynchronously (the arrays are copied off the device before `save` returns; the writes
  and the atomic commit run in the background while training goes on);
* ``data``: the grain iterator state (JSON; every process's own, `resume.per_process_state`, written by
  process 0), so resuming continues with exactly the next batch;
* ``config``: the resolved run config (SFT or GRPO; JSON), for the record and for the resume checks
  (`train.resume_check`).

Orbax writes a step into a temporary directory and renames it into place only when every item is
complete, so a process killed mid-save (SIGKILL, OOM, preemption without grace) leaves at most a
``*.orbax-checkpoint-tmp-*`` directory that `latest_step()` ignores and the next manager removes: the
last good checkpoint is never spoiled. The last `keep` checkpoints are kept, and those of the steps in
`preserve` (a GRPO run's stage ends) whatever comes after them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from fxjax.config_mapping import ConfigError
from fxjax.device_mesh import barrier
from fxjax.run_files import CONFIG_FILE, DATA_STATE_FILE, committed_steps
from fxjax.train import faults
from fxjax.train.checkpoint_layout import LayoutError, saved_layout, to_current_layout

logger = logging.getLogger(__name__)

__all__ = ["TrainCheckpointer", "flatten_tree", "unflatten_tree"]

_RESUME_HINT = "Resume it with its own settings, or start this run in another train.output_dir / checkpoint.dir"


def _layout_difference(err: LayoutError, where: Path) -> str:
    """"it lacks [...] and holds [...] (...)": a LayoutError's text without the checkpoint's path and preamble."""
    return (str(err).removeprefix(f"{where}: ")
            .removeprefix("the checkpoint's state does not match this run's: "))


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_tree(tree) -> dict[str, Any]:
    """A pytree -> {"a.b.0.c": leaf}; the names are stable for a given tree structure."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        name = ".".join(_key_name(p) for p in path) or "value"
        if name in out:
            raise ValueError(f"two leaves flatten to the name {name!r}")
        out[name] = leaf
    return out


def unflatten_tree(template, flat: Mapping[str, Any]):
    """Inverse of `flatten_tree` against a template of the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in paths:
        name = ".".join(_key_name(p) for p in path) or "value"
        if name not in flat:
            raise KeyError(f"checkpoint lacks {name!r}")
        leaves.append(flat[name])
    return jax.tree_util.tree_unflatten(treedef, leaves)


class CheckpointSaveError(OSError):
    """A background checkpoint save failed; the run stops (the CLI says it in one line, as any OSError)."""


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save from each of its threads (the item writer, the commit, the
    finalize thread and, after the run has stopped, a metadata writer that finds its executor shut down),
    each with its whole traceback: some 180 lines that buried the one line in which the run says what failed,
    where, and what to do (`TrainCheckpointer.check_saved`). Each such record keeps its message and gains the
    exception's type and text; the traceback goes to this module's logger at DEBUG level (shown with debug
    logging on, for an orbax error that is not a full disk). Records of other loggers and orbax's records
    without an exception pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR and "orbax" in Path(record.pathname).parts:
            logger.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            err, message = record.exc_info[1], record.getMessage()
            said = type(err).__name__ if str(err) in message else f"{type(err).__name__}: {err}"
            record.msg, record.args = f"{message} ({said})", None
            record.exc_info, record.exc_text = None, None
        return True


def _shorten_orbax_errors() -> None:
    """Install `_OneLineOrbaxErrors` on absl's logger (orbax logs through it), once per process."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in absl_logger.filters):
        absl_logger.addFilter(_OneLineOrbaxErrors())


class _DataStateHandler(ocp.JsonCheckpointHandler):
    """JSON handler for the iterator state; the `save` fault point (train.faults) sits in its write."""

    def __init__(self, filename: str):
        super().__init__(filename)

    async def _save_fn(self, x, directory):
        faults.point("save", int(x.get("step", -1)))  # a crash here leaves this checkpoint half written
        faults.write_error(int(x.get("step", -1)))
        await super()._save_fn(x, directory)


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class _DataStateSave(ocp.args.CheckpointArgs):
    item: Mapping[str, Any]


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class _DataStateRestore(ocp.args.CheckpointArgs):
    item: Any = None


class TrainCheckpointer:
    """Save / restore (train state, data iterator state, config) with a CheckpointManager."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 preserve: Iterable[int] = ()):
        """`keep`: the newest checkpoints kept; `preserve`: steps whose checkpoints are kept besides them
        (GRPO's stage ends), never pruned however many come after."""
        self.directory = Path(directory).absolute()
        preserve = sorted({int(s) for s in preserve})
        policy = ocp.checkpoint_managers.LatestN(n=keep)
        if preserve:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [policy, ocp.checkpoint_managers.CustomSteps(preserve)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._pending: int | None = None  # the step of the last save started (check_saved)
        _shorten_orbax_errors()
        ignore_io_left_behind()  # (a failed save's writes, as a failed restore's reads)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": _DataStateHandler(DATA_STATE_FILE.name),
                           "config": ocp.JsonCheckpointHandler(CONFIG_FILE.name)})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
        """Start saving `state` (any pytree of arrays) for `step`; returns once the arrays are copied."""
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(flatten_tree(state)),
                                    data=_DataStateSave({"step": int(step), **dict(data_state)}),
                                    config=ocp.args.JsonSave(dict(config))),
            force=True)
        self._pending = int(step) if saved else self._pending
        return bool(saved)

    def wait(self) -> None:
        """Block until every pending save is committed."""
        self.manager.wait_until_finished()

    def check_saved(self, step: int) -> None:
        """Raise now, after update `step`, if the last background save has failed (a full disk, say): orbax
        raises it only at the next save, a whole checkpoint.every of training later, all of it then lost."""
        if self._pending is None or self.manager.is_saving_in_progress():
            return
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()  # (finished: returns at once, or raises what the save raised)
        except Exception as err:  # whatever the write raised
            on_disk = committed_steps(self.directory)  # (the manager's own list leaves out a step whose end failed)
            if pending in on_disk:  # written and committed; orbax failed after (removing an older checkpoint, say)
                raise CheckpointSaveError(
                    f"the checkpoint of step {pending} was written to {self.directory}, but saving it failed after "
                    f"(removing older checkpoints or writing their metadata: {type(err).__name__}: {err}); stopped "
                    f"after step {step}; fix the folder and run the same command again to resume from step "
                    f"{max(on_disk)}, the newest there") from err
            good = self.manager.latest_step()
            raise CheckpointSaveError(
                f"the checkpoint of step {pending} could not be saved to {self.directory} ({type(err).__name__}: "
                f"{err}); stopped after step {step}; the last good checkpoint is " +
                (f"step {good}" if good is not None else "none yet") +
                ": free space (or fix the folder) and run the same command again to resume from it") from err

    def restore(self, template, step: int | None = None) -> tuple[Any, dict, dict, int]:
        """(state, data_state, config, step) of `step` (default: the latest). `template` is a pytree of the
        state's structure whose leaves are arrays or jax.ShapeDtypeStruct with shardings (restored onto them)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = {k: _abstract(v) for k, v in flatten_tree(template).items()}
        # A checkpoint of the other decoder layout (looped vs scan_layers) restores in its own names and is
        # converted (train.checkpoint_layout); any other difference in names is an error naming them.
        saved = getattr(self.manager.item_metadata(step)["state"], "tree", None)
        try:
            layout = None if saved is None else saved_layout(abstract, set(saved), str(self.directory / str(step)))
        except LayoutError as err:  # other LoRA targets or model: another run's settings, not a damaged file
            raise ConfigError(f"the checkpoint of step {step} in {self.directory} was written with other model or "
                              f"LoRA settings than this run's{self._settings(step)}: "
                              f"{_layout_difference(err, self.directory / str(step))}. "
                              f"{_RESUME_HINT}") from None
        if saved is not None:
            self._check_shapes(layout or abstract, saved, step)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(layout or abstract), data=_DataStateRestore(),
                                          config=ocp.args.JsonRestore()))
        flat = restored["state"] if layout is None else to_current_layout(abstract, restored["state"])
        state = unflatten_tree(template, flat)
        data = dict(restored["data"])
        data.pop("step", None)
        return state, data, dict(restored["config"]), step

    def _check_shapes(self, abstract: Mapping[str, Any], saved: Mapping[str, Any], step: int) -> None:
        """A checkpoint written with other LoRA or model settings (another rank, other target modules)
        holds arrays of other shapes: an error naming the first of them and the settings it was saved with,
        raised before orbax's own (a long traceback)."""
        shapes = {k: tuple(saved[k].shape) for k in abstract if getattr(saved.get(k), "shape", None) is not None}
        bad = [(k, shapes[k], tuple(v.shape)) for k, v in abstract.items() if k in shapes and shapes[k] != v.shape]
        if not bad:
            return
        name, was, now = bad[0]
        raise ConfigError(f"the checkpoint of step {step} in {self.directory} was written with other model or "
                          f"LoRA settings than this run's{self._settings(step)}: {len(bad)} array(s) differ in "
                          f"shape, e.g. {name} {was} there, {now} here. {_RESUME_HINT}")

    def _settings(self, step: int) -> str:
        """" (its lora: rank 2, target_modules all-linear)" from the step's saved config ("" if unreadable)."""
        try:
            lora = json.loads((self.directory / str(step) / CONFIG_FILE).read_text()).get("lora")
            return f" (its lora: rank {lora.get('rank')}, target_modules {lora.get('target_modules')})" if lora else ""
        except (OSError, ValueError, AttributeError):
            return ""

    def set_aside(self, step: int) -> Path:
        """Rename the directory of a checkpoint that does not restore to ``<step>.unreadable-<n>`` (kept for
        inspection, never deleted) so the run can write that step again; every process waits for it."""
        source = self.directory / str(int(step))
        n = 0
        while (target := self.directory / f"{int(step)}.unreadable-{n}").exists():
            n += 1
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        barrier(f"fxjax-set-aside-{int(step)}")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.close()


def ignore_io_left_behind() -> None:
    """Quiet what a failed restore or save leaves behind. A restore that fails on one array leaves the reads
    of the others running; when the process exits (the run's own error printed), Python collected them and
    printed each one's fate: "Future exception was never retrieved" (asyncio's logger), "Exception ignored
    in: <coroutine ... _read_array_index_and_device_put>" and "RuntimeError: Event loop is closed" (through
    sys.unraisablehook), up to thousands of lines of TensorStore specs below the error, in some runs and not
    others (by timing), some from TensorStore's threads while the error is still on its way. A failed save
    leaves writes behind alike: a TensorStore thread that wakes orbax's closed loop at exit printed the
    closed-loop traceback after the run's one-line error, in one run of many (through sys.excepthook or the
    unraisable hook: TensorStore calls PyErr_Print and PyErr_WriteUnraisable). From the first checkpointer
    on (a run's, or `fxjax.train.run_loading`'s restore), exactly those are dropped: orbax's coroutines,
    the closed loop (off the main thread, for sys.excepthook: the main thread's own error still prints), and
    never-retrieved futures of orbax's or TensorStore's reads (whose errors are the restore's own, already
    reported); another asyncio error of the process still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "_fxjax_drops_left_behind_io", False):
        return

    def hook(unraisable) -> None:
        error, source = unraisable.exc_value, getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
        if _closed_loop(error) or "/orbax/" in source:
            return
        previous(unraisable)

    previous_excepthook = sys.excepthook

    def excepthook(kind, error, traceback) -> None:
        if _closed_loop(error) and threading.current_thread() is not threading.main_thread():
            return
        previous_excepthook(kind, error, traceback)

    hook._fxjax_drops_left_behind_io = True
    sys.unraisablehook, sys.excepthook = hook, excepthook
    logging.getLogger("asyncio").addFilter(lambda record: not _left_behind_read(str(record.msg)))


def _closed_loop(error: BaseException | None) -> bool:
    """Whether `error` is asyncio's refusal to schedule on a closed event loop (orbax's, after the run)."""
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _left_behind_read(message: str) -> bool:
    """Whether an asyncio log message is a never-retrieved future or task of orbax's or TensorStore's reads."""
    return (message.split("\n", 1)[0].endswith("exception was never retrieved")
            and any(word in message for word in ("orbax", "OCDBT", "tensorstore", "TensorStore")))


def _abstract(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    arr = np.asarray(leaf)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
