"""Reading a safetensors file with errors that name it.

safetensors raises its own SafetensorError ("Error while deserializing header: ...") without the file's
path, and it is not a ValueError, so a truncated shard or adapter reached the user as a traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError, safe_open

__all__ = ["open_safetensors"]


@contextlib.contextmanager
def open_safetensors(path: str | Path, error: type[Exception] = ValueError) -> Iterator:
    """`safe_open(path, framework="numpy")`; a file it cannot read (header or tensor data, also while the
    block reads tensors) raises `error` naming the file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except SafetensorError as err:
        if "does not contain tensor" in str(err):  # (the index names a tensor of another file: it is stale)
            raise error(f"{path}: {err}, though model.safetensors.index.json says it does: the index is stale "
                        "(written for other files); copy or export the checkpoint again") from None
        raise error(f"{path}: not a readable safetensors file ({err}); the file is truncated or corrupted: "
                    "copy or export it again") from None
