"""Files fxjax writes get the mode a user expects: 0666 minus the umask (0644 with the usual umask 022).

safetensors 0.8's `save_file` and `tempfile.mkstemp` create files as 0600, which other users of a shared
machine (or a serving process under another account) cannot read; everything fxjax writes goes through
`make_readable` or `save_safetensors` instead. `require_writable` checks, before anything slow, that a
command's output can be written at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable, Mapping

__all__ = ["current_umask", "make_readable", "replace_whole", "require_writable", "save_safetensors",
           "write_json_whole"]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (/proc/self/status, Linux >= 4.7):
    setting it to read it back would race file creation in other threads (async checkpoint writers)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give a regular file the mode a plain `open(path, "w")` would have: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~current_umask())


def save_safetensors(tensors: Mapping, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """safetensors.numpy.save_file, then the usual file mode."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    make_readable(path)


def nearest_existing(path: str | Path) -> Path:
    """`path` (absolute) or its nearest parent that exists: where a folder not made yet would be made."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def require_writable(path: str | Path, what: str) -> None:
    """ValueError naming `what` when `path` cannot be created or written: its nearest existing folder is
    checked, so the error comes before a model loads or a run trains, not at its first write."""
    folder = nearest_existing(path)
    if not folder.is_dir():
        where = "is" if folder == Path(path).absolute() else f"lies under {folder}, which is"
        raise NotADirectoryError(f"{what}: {path} {where} a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path} cannot be written ({folder} is not writable)")
    import tempfile

    try:  # (root passes os.access everywhere, also where nothing can be created: /proc, a full quota)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{what}: {path} cannot be written (a file in {folder} could not be created: "
                         f"{err.strerror or err})") from None



def require_folder_renames(path: str | Path, what: str) -> None:
    """ValueError naming `what` when a folder cannot be renamed where `path` is (its nearest existing folder):
    orbax writes each checkpoint into a temporary folder and renames it when complete, which a gcsfuse mount
    refuses unless told to (--rename-dir-limit): the run failed at its first checkpoint, hours in."""
    import tempfile

    folder = nearest_existing(path)
    made = Path(tempfile.mkdtemp(prefix=".fxjax-rename-check-", dir=folder))
    moved = made.with_name(made.name + "-renamed")
    try:
        os.rename(made, moved)
    except OSError as err:
        os.rmdir(made)
        raise ValueError(f"{what}: {path}: a folder cannot be renamed in {folder} ({err.strerror or err}), and each "
                         f"checkpoint is written to a temporary folder renamed when complete; on gcsfuse, mount with "
                         f"--rename-dir-limit (e.g. 200000) or use a bucket with hierarchical namespace") from None
    os.rmdir(moved)


def replace_whole(path: str | Path, write: Callable[[IO[str]], None]) -> None:
    """`path` replaced by what `write(file)` writes, through a hidden sibling that is synced and then renamed
    over it: a reader sees the old file or the new one, never half of one, and a failed write leaves the old
    file and no sibling. The new file gets the usual mode (`make_readable`)."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_whole(path: str | Path, obj) -> None:
    """`obj` as indented JSON in `path`, replaced whole (`replace_whole`): a dashboard polling eval's
    metrics.json never reads half of one."""
    import json

    replace_whole(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))
