"""What changed between the config a checkpoint recorded and the config a run resumes it with.

    check_resume_config(saved_cfg, cfg.to_dict(), log)   # one warning line per changed section

A resumed run restores the LoRA parameters, optimiser state, step and data position; a config that
differs in what produced them (model, LoRA, optimiser, data) or in the run's length (train.steps or
train.epochs: the total step count, hence the learning-rate schedule) continues a different run than the
one that was saved. That is allowed (lengthening a run is common) but never silent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from fxjax.config_sections import DataSection, ModelSection

__all__ = ["WATCHED", "changed_keys", "check_resume_config"]


def _keys_but(section, *left_out: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(section) if f.name not in left_out)


# section -> the keys compared (None: all of them), and what a change there means for the resumed run.
# Left out: how the same model is computed (remat, the attention kernel, scan or loop: the same numbers,
# to rounding) and what the training stream does not depend on (held-out files, decode checks, reader
# threads, prefetch depth); a warning for those said the base model or the data stream had changed.
WATCHED: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "model": (_keys_but(ModelSection, "remat", "remat_vision", "attention", "scan_layers"), "the base model"),
    "lora": (None, "the adapters"),
    "optim": (None, "the optimiser or its schedule"),
    "data": (_keys_but(DataSection, "eval_files", "check_decode", "read_threads", "prefetch_buffer_size"),
             "the data stream"),
    "train": (("steps", "epochs"), "the step count, so the learning-rate schedule"),
}


START_KEYS = ("adapter", "from_run", "from_run_step")  # the model keys that say where the LoRA started


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _same_items(saved: Any, current: Any) -> bool:
    """Two lists of mappings (GRPO's stages) are the same when their items hold the same values, a key one
    lacks counting as null: a checkpoint written before a key was added (a stage's `epochs`) is not a
    change."""
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current) \
            and all(isinstance(x, Mapping) for x in (*saved, *current)):
        return all(not changed_keys(a, b) for a, b in zip(saved, current))
    return saved == current


def changed_keys(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None,
                 keys: tuple[str, ...] | None = None) -> list[str]:
    """`key: old -> new` for each key of a section whose value differs (all keys, or only `keys`); a section
    that is not a mapping (GRPO's list of stages) is compared whole."""
    if not isinstance(saved or {}, Mapping) or not isinstance(current or {}, Mapping):
        return [] if _same_items(saved, current) else [f"{_show(saved)} -> {_show(current)}"]
    saved, current = dict(saved or {}), dict(current or {})
    names = keys if keys is not None else sorted(set(saved) | set(current))
    return [f"{k}: {_show(saved.get(k))} -> {_show(current.get(k))}" for k in names if saved.get(k) != current.get(k)]


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], log: Callable[[str], None],
                        watched: Mapping[str, tuple[tuple[str, ...] | None, str]] = WATCHED) -> list[str]:
    """Log a warning for each watched section in which `current` (the resolved config of this run, as
    `cfg.to_dict()`) differs from `saved` (the one the checkpoint recorded); returns the warnings."""
    warnings = []
    for section, (keys, meaning) in watched.items():
        changes = changed_keys(saved.get(section), current.get(section), keys)
        start = [c for c in changes if section == "model" and c.split(":")[0] in START_KEYS]
        if start:  # not the base model: where the LoRA started, which the checkpoint's LoRA has replaced
            changes = [c for c in changes if c not in start]
            warnings.append("warning: resuming with another start than the checkpoint's (" + "; ".join(
                f"model.{c}" for c in start) + "): a resumed run goes on from its checkpoint's LoRA, so this "
                "changes nothing; another train.output_dir starts a new run from it")
        if changes:
            warnings.append(f"warning: resuming with a different {section} config than the checkpoint's "
                            f"({meaning} changed): " + "; ".join(f"{section}.{c}" if not c.startswith(("[", "{"))
                                                                else f"{section}: {c}" for c in changes))
    for line in warnings:
        log(line)
    return warnings
