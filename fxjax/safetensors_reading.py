"""Reading a safetensors file with errors that name it.

safetensors raises its own SafetensorError ("Error while deserializing header: ...") without the file's
path, and it is not a ValueError, so a truncated shard or adapter reached the user as a traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError, safe_open

__all__ = ["dtype_name", "open_safetensors", "stored_dtypes_by_name"]


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


_NUMPY_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}


def dtype_name(safetensors_dtype: str) -> str:
    """numpy's (ml_dtypes') name of a safetensors header dtype ("BF16" -> "bfloat16"; others as given, lower-case)."""
    return _NUMPY_NAMES.get(safetensors_dtype, safetensors_dtype.lower())


def stored_dtypes_by_name(files: dict[str, Path], error: type[Exception] = ValueError) -> dict[str, str]:
    """tensor name -> its dtype, from the safetensors headers of `files` (name -> file; nothing read)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    found = {}
    for file, names in by_file.items():
        with open_safetensors(file, error) as f:
            found.update((name, dtype_name(str(f.get_slice(name).get_dtype()))) for name in names)
    return found
