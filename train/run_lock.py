"""One run at a time in a run's folders: `locked_run_dirs(cfg)` holds an advisory lock (flock) on
`<train.output_dir>/.fxjax-run.lock` while a run trains, and on `.<name>.fxjax-run.lock` beside its
checkpoint folder (not in it: the checkpoint directory holds steps only), wherever that folder is.

Two runs in one folder (a second launch while the first still runs, a retry script that did not wait)
write the same step numbers into one checkpoint directory and one metrics.jsonl: each prunes the other's
checkpoints and a resume afterwards reads a mix of the two. The second is refused at its start, naming the
first. The kernel drops a flock when its process ends, however it ends (SIGKILL included), so a lock is
never left behind. Process 0 of a multi-process run takes it (every process of one run shares the
folders); a file system without flock (some network mounts) runs unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from fxjax.config_mapping import ConfigError

__all__ = ["EVAL_LOCK_FILE", "LOCK_FILE", "locked_eval_folders", "locked_run_dirs", "training_now"]

LOCK_FILE = ".fxjax-run.lock"


def _holder(path: Path) -> str:
    """What the lock file says of the run that holds it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "a process that has not written its name yet"


_RUN_BUSY = ("another fxjax run is training in {folder} ({holder}); two runs there would prune and overwrite each "
             "other's checkpoints: wait for it to end, or give this run its own train.output_dir / checkpoint.dir")


def _lock(folder: Path, path: Path, key: str, say: Callable[[str], None], busy: str = _RUN_BUSY,
          what: str = "run") -> int | None:
    """`path` opened and flock-ed for `folder` (None where the file system has no flock, or the lock file is
    another user's, read-only to us); `busy`: the error when another process holds it (its {folder} and
    {holder} filled in)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # (a folder shared by a group: the file of the user who ran there first)
        say(f"warning: {folder} cannot be locked ({err.strerror}): nothing stops a second {what} from writing there")
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{key}: " + busy.format(folder=folder, holder=_holder(path))) from None
    except OSError as err:
        os.close(fd)
        say(f"warning: {folder} cannot be locked ({err.strerror}): nothing stops a second {what} from writing there")
        return None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n"
             .encode("utf-8"))
    return fd


@contextlib.contextmanager
def _holding(locks: list[tuple[Path, Path, str, str, str]], say: Callable[[str], None]) -> Iterator[None]:
    """Each (folder, lock file, key, busy message, what) of `locks` flock-ed for the `with` block (`_lock`);
    the lock files, and folders, this created go again if the block fails (`_remove_what_is_left_empty`)."""
    fds: list[int] = []
    made: list[Path] = []  # lock files and folders created here
    try:
        for folder, path, key, busy, what in locks:
            new = [p for p in (path, *path.parents) if not p.exists()]
            fd = _lock(folder, path, key, say, busy, what)
            if fd is not None:
                fds.append(fd)
                made += [p for p in new if p not in made]
        yield
    except BaseException:
        _remove_what_is_left_empty(made, {path for _, path, *_ in locks})
        raise
    finally:
        for fd in fds:
            os.close(fd)  # (closing the last descriptor of the open file drops its flock)


@contextlib.contextmanager
def locked_run_dirs(cfg, enabled: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of the run's output folder and checkpoint folder for the `with` block (enabled: this
    is process 0); ConfigError naming the other run when one holds either."""
    locks = []
    if enabled and os.name == "posix":
        output, checkpoints = Path(cfg.train.output_dir).resolve(), Path(cfg.checkpoint_dir).resolve()
        # the checkpoint folder's own lock always, also where it lies in the output folder (the default): a run
        # of another output folder given this one's checkpoints as its checkpoint.dir takes that lock
        locks = [(output, output / LOCK_FILE, "train.output_dir", _RUN_BUSY, "run"),
                 (checkpoints, checkpoints.with_name(f".{checkpoints.name}{LOCK_FILE}"), "checkpoint.dir", _RUN_BUSY,
                  "run")]
    with _holding(locks, say):
        yield


def training_now(folder: str | Path) -> str | None:
    """What the run training in `folder` (a train.output_dir, or a checkpoint folder) says of itself while it
    holds its lock (`fxjax info`: a run still training, or one that ended); None when no run holds it."""
    import fcntl

    folder = Path(folder).resolve()
    for path in (folder / LOCK_FILE, folder.with_name(f".{folder.name}{LOCK_FILE}"),
                 folder / f".checkpoints{LOCK_FILE}"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return None


EVAL_LOCK_FILE = ".fxjax-eval.lock"
_EVAL_BUSY = ("another fxjax eval is writing in {folder} ({holder}); two there would append to one "
              "predictions.jsonl, a mix of both: wait for it to end, or give this one its own --out")


@contextlib.contextmanager
def locked_eval_folders(folders: list[str | Path], say: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of each folder `fxjax eval` writes in (its --out; with several --step values, also each
    step's subfolder, which a one-step eval may be given as its --out) for the `with` block: a second eval
    there appended its predictions to the first's and both said they wrote theirs (ConfigError now, naming
    the first). The lock files (and folders) this eval created go again if it fails."""
    locks = [(folder, folder / EVAL_LOCK_FILE, "--out", _EVAL_BUSY, "eval")
             for folder in dict.fromkeys(Path(given).resolve() for given in folders)  # (`--step 3 3`: once)
             ] if os.name == "posix" else []
    with _holding(locks, say):
        yield


def _remove_what_is_left_empty(made: list[Path], lock_files: set[Path]) -> None:
    """A run (or eval) refused after taking its locks (an invalid record, a config error found late) left a
    new output folder holding nothing but its lock file. The lock files it created go (while still locked: a run
    starting now that opened one is refused as before, one that opens the path afterwards makes its own
    file), then the folders it created, deepest first, where nothing else is in them."""
    for path in made:
        if path in lock_files:
            with contextlib.suppress(OSError):
                path.unlink()
    for path in sorted((p for p in made if p not in lock_files), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # (not empty: the run wrote there, or another run locks it now)
            path.rmdir()
