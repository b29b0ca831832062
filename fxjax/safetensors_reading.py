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
        raise error(f"{path}: not a readable safetensors file ({err}); the file is truncated or corrupted: "
                    "copy or export it again") from None
