"""fxjax_export.json: what an `fxjax export` folder is an export of (the run, its step and stage, the base
model, and the LoRA that run continued), read wherever an export is loaded; written by
fxjax.train.export.write_export_record. Here, in the core, so that loading an adapter from Python
(fxjax.from_pretrained(..., adapter=)) reads it as the command line does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_RECORD_FILE", "OtherBaseWarning", "json_file", "other_base_note", "read_export_record"]

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


class OtherBaseWarning(UserWarning):
    """An adapter loaded onto a base model other than the one it was trained on (`other_base_note`)."""


def other_base_note(adapter: str | Path, model: str | Path) -> str:
    """"" unless the adapter in `adapter` names a local base folder it was trained on (its fxjax_export.json's
    base_model, else adapter_config.json's base_model_name_or_path) other than `model`: then what to know.
    The names are compared, not the weights (a copy elsewhere is said too; a Hub id or a preset is no folder
    to compare)."""
    trained_on = read_export_record(adapter).get("base_model")
    if not isinstance(trained_on, str):
        config = json_file(Path(adapter) / "adapter_config.json")
        trained_on = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if not isinstance(trained_on, str) or not Path(trained_on).is_dir():
            return ""
        where = "adapter_config.json's base_model_name_or_path"
    else:  # (written absolute for a folder; a preset's name is no folder, whatever folder here has that name)
        where = "its fxjax_export.json"
        if not Path(trained_on).is_absolute():
            return ""
    if Path(trained_on).resolve() == Path(model).resolve() or _looks_copied(Path(trained_on), Path(model)):
        return ""
    return f"{adapter} was trained on {trained_on} ({where}), not {model}: if these weights differ, its answers " \
           "mean nothing"


def _looks_copied(a: Path, b: Path, sample: int = 1 << 16) -> bool:
    """Whether folder `b` holds a copy of the checkpoint in `a` (a project copied elsewhere): the same
    config.json and weight files of the same sizes whose first, middle and last `sample` bytes agree; another
    seed's model of one config differs there. Never reads a whole weight file (a 72B one is 145 GB)."""
    def fingerprint(folder: Path) -> list | None:
        files = sorted(folder.glob("model*.safetensors"))
        if not (folder / "config.json").is_file() or not files:
            return None
        parts: list = [(folder / "config.json").read_bytes()]
        for file in files:
            size = file.stat().st_size
            with open(file, "rb") as f:
                for at in (0, max(size // 2 - sample // 2, 0), max(size - sample, 0)):
                    f.seek(at)
                    parts.append((file.name, size, f.read(sample)))
        return parts

    try:
        first = fingerprint(a)
        return first is not None and first == fingerprint(b)
    except OSError:
        return False
