"""fxjax_export.json: what an `fxjax export` folder is an export of (the run, its step and stage, the base
model, and the LoRA that run continued), read wherever an export is loaded; written by
fxjax.train.export.write_export_record. Here, in the core, so that loading an adapter from Python
(fxjax.from_pretrained(..., adapter=)) reads it as the command line does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_RECORD_FILE", "json_file", "read_export_record"]

EXPORT_RECORD_FILE = "fxjax_export.json"


def json_file(path: Path) -> Any:
    """The JSON value in `path` (None when there is no such file); a malformed file is an error naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_export_record(directory: str | Path) -> dict[str, Any]:
    """What `write_export_record` left in `directory` ({} when nothing: an export older than the record, or
    another tool's folder)."""
    record = json_file(Path(directory) / EXPORT_RECORD_FILE)
    return record if isinstance(record, dict) else {}
