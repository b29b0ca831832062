"""What changed between the config a checkpoint recorded and the config a run resumes it with.

    check_resume_config(saved_cfg, cfg.to_dict(), log)   # one warning line per changed section

A resumed run restores the LoRA parameters, optimiser state, step and data position; a config that
differs in what produced them (model, LoRA, optimiser, data) or in the run's length (train.steps or
train.epochs: the total step count, hence the learning-rate schedule) continues a different run than the
one that was saved. That is allowed (lengthening a run is common) but never silent; a change of the LoRA's
scale (lora.alpha, lora.use_rslora), which would make the restored adapter another model, is refused
(`check_lora_scale`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from fxjax.config_mapping import ConfigError, as_written
from fxjax.config_sections import DataSection, ModelSection

__all__ = ["WATCHED", "Watched", "changed_keys", "check_lora_scale", "check_resume_config", "different_config"]


@dataclass(frozen=True)
class Watched:
    """A part of the config a resume compares with the checkpoint's: the `keys` of `section` (None: all of
    them), and the warning a change there gets (`{changes}`: "section.key: old -> new; ...")."""

    section: str
    keys: tuple[str, ...] | None
    warning: str


def different_config(section: str, meaning: str) -> str:
    """The warning of a changed section: `meaning` is what the change means for the resumed run."""
    return f"warning: resuming with a different {section} config than the checkpoint's ({meaning} changed): {{changes}}"


def _keys_but(section, *left_out: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(section) if f.name not in left_out)


START_KEYS = ("adapter", "from_run", "from_run_step")  # the model keys that say where the LoRA started

# What a resume compares, in the order its warnings are said. Left out: how the same model is computed
# (remat, the attention kernel, scan or loop: the same numbers, to rounding) and what the training stream
# does not depend on (held-out files, decode checks, reader threads, prefetch depth); a warning for those
# said the base model or the data stream had changed. Where the LoRA started is not the base model: the
# checkpoint's LoRA has replaced it.
WATCHED: tuple[Watched, ...] = (
    Watched("model", START_KEYS, "warning: resuming with another start than the checkpoint's ({changes}): a "
                                 "resumed run goes on from its checkpoint's LoRA, so this changes nothing; another "
                                 "train.output_dir starts a new run from it"),
    Watched("model", _keys_but(ModelSection, "remat", "remat_vision", "attention", "scan_layers", *START_KEYS),
            different_config("model", "the base model")),
    Watched("lora", None, different_config("lora", "the adapters")),
    Watched("optim", None, different_config("optim", "the optimiser or its schedule")),
    Watched("data", _keys_but(DataSection, "eval_files", "check_decode", "read_threads", "prefetch_buffer_size"),
            different_config("data", "the data stream")),
    Watched("train", ("steps", "epochs"), different_config("train", "the step count, so the learning-rate schedule")),
)


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
        return [] if _same_items(saved, current) else [f"{as_written(saved)} -> {as_written(current)}"]
    saved, current = dict(saved or {}), dict(current or {})
    names = keys if keys is not None else sorted(set(saved) | set(current))
    return [f"{k}: {as_written(saved.get(k))} -> {as_written(current.get(k))}" for k in names if saved.get(k) != current.get(k)]


SCALE_KEYS = ("alpha", "use_rslora")  # the LoRA's scale: alpha / r, or alpha / sqrt(r) with rsLoRA


def check_lora_scale(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """ConfigError when the LoRA's scale differs from the checkpoint's (`where`: which checkpoint): the saved
    B and A restore as they are and the scale multiplies their update, so the resumed model would not be
    the one trained (a resume with lora.alpha 16 for 32 took a step-12 loss of 10.8 for 7.5, with only
    a warning). Another rank or other targets fail in the restore itself (arrays of other shapes). A run
    started from an adapter or another run (model.adapter, model.from_run) takes its LoRA's shape and scale
    from that start (its kept copy), not from the lora section: there the section changes nothing."""
    started = [(c.get("model") or {}) for c in (saved, current)]
    if "lora" not in saved or any(m.get("adapter") or m.get("from_run") for m in started):
        return
    changes = changed_keys(saved.get("lora"), current.get("lora"), SCALE_KEYS)
    if changes:
        raise ConfigError(f"{'; '.join('lora.' + c for c in changes)}: the checkpoint of {where} was trained with the "
                          "former, and the LoRA's scale multiplies its saved update, so the resumed model would not "
                          "be the one trained: resume with the checkpoint's value (another scale needs a new run, in "
                          "another train.output_dir)")


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], log: Callable[[str], None],
                        watched: Sequence[Watched] = WATCHED) -> list[str]:
    """Log a warning for each watched part in which `current` (the resolved config of this run, as
    `cfg.to_dict()`) differs from `saved` (the one the checkpoint recorded); returns the warnings."""
    warnings = []
    for part in watched:
        if part.section not in saved:  # a checkpoint written before the section was recorded (GRPO's rewards)
            continue
        changes = changed_keys(saved.get(part.section), current.get(part.section), part.keys)
        if changes:
            warnings.append(part.warning.format(changes="; ".join(
                f"{part.section}: {c}" if c.startswith(("[", "{")) else f"{part.section}.{c}" for c in changes)))
    for line in warnings:
        log(line)
    return warnings
