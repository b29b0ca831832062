"""Where a training run started from (model.adapter, model.from_run) and its own copy of that LoRA.

A run keeps the LoRA it started from in its checkpoint folder (START_LORA_DIR, written by
train.run_setup.keep_start_lora, with START_FILE naming the start): the copy gives the LoRA's shape when the
run is loaded or resumed, whether the start's folder is gone, moved or holds another adapter since.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from fxjax.run_files import (RUN_CWD_KEY, START_FILE, START_LORA_DIR, RunLoadError, committed_steps,
                             saved_data_state)

__all__ = ["adapter_config_changes", "kept_start", "resumes_from_kept_start", "start_from_kept_copy"]


def resumes_from_kept_start(cfg) -> bool:
    """Whether a run config resumes (checkpoint.resume) with its own start kept in its checkpoint folder
    (START_LORA_DIR, written by train.run_setup.keep_start_lora, naming the start the config does:
    `kept_start`) and a committed checkpoint to resume from. Then model.adapter / model.from_run may be gone
    (train.run_setup.resumed_start uses the copy). False without a readable copy, for a copy kept for another
    start (an earlier run in the same directory), and without a checkpoint: a run that stopped before its
    first one trained nothing from the copy, and a from_run start's newest step may have moved on since (the
    copy would have restarted it from the step it copied, silently)."""
    directory = Path(cfg.checkpoint_dir)
    return (bool(cfg.checkpoint.resume) and kept_start(cfg, directory) is not None
            and bool(committed_steps(directory)))


def kept_start(cfg, checkpoint_dir: Path) -> dict | None:
    """START_FILE of the copy in `checkpoint_dir` when it names the start `cfg` does: the same model.adapter,
    or model.from_run and from_run_step, compared as resolved paths or as the config wrote them (a relative
    path after the project moved). None without a readable copy, for a copy kept for another start, or for
    a run that starts from no LoRA."""
    m = cfg.model
    if m.adapter is None and m.from_run is None:
        return None
    try:
        start = json.loads((Path(checkpoint_dir) / START_LORA_DIR / START_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(start, dict):
        return None

    def names(key, value):  # the value as recorded (resolved then) or as given
        if value is None:
            return start.get(key) is None
        return str(Path(value).resolve()) == start.get(key) or value == start.get(f"{key}_given")

    same = (names("adapter", m.adapter) and names("from_run", m.from_run)
            and (m.from_run is None or m.from_run_step == start.get("from_run_step")))
    return start if same else None


def _as_started(value: str, checkpoint_dir: Path) -> Path:
    """A start's folder (model.adapter, model.from_run) as the run read it: a relative one from the folder the
    run was started from, where it is there and not here (a run read from another folder noted its start
    "is not here" though it was where the run read it)."""
    path = Path(value)
    if path.is_absolute():
        return path
    steps = committed_steps(checkpoint_dir) if checkpoint_dir.is_dir() else []
    cwd = saved_data_state(checkpoint_dir, steps[-1]).get(RUN_CWD_KEY) if steps else None
    return Path(cwd) / path if cwd and (Path(cwd) / path).is_dir() else path


def start_from_kept_copy(cfg, checkpoint_dir: Path, moved_base: bool, log: Callable[[str], None] | None):
    """The run's config with its own copy of the LoRA it started from (run_setup.keep_start_lora) in place of
    model.adapter / model.from_run: the copy gives the LoRA's shape (rank, alpha, rslora, dropout, targets),
    the checkpoint its values. The copy stands in whenever it names this start (`kept_start`), also when
    that folder is still there (it may hold another adapter since, of the same rank and targets but another
    alpha: LoRA scaled other than it trained), and whatever copy there is when the folder is not here
    (moved, or another machine; the config's path may be relative to where it trained). A from_run run's
    base model and tokenizer were the other run's: the copy names them (moved_base: model.path was given
    anew, and the tokenizer follows it). Used when a run is loaded (`load_run`, export, eval, detect) and
    when it resumes (run_setup.resumed_start, only for the start the copy was kept for)."""
    m = cfg.model
    starts = [(key, value) for key, value in (("model.adapter", m.adapter), ("model.from_run", m.from_run))
              if value is not None]
    if not starts:
        return cfg
    key, value = starts[0]
    copy = checkpoint_dir / START_LORA_DIR
    start = kept_start(cfg, checkpoint_dir)
    found = _as_started(value, checkpoint_dir)
    if found.is_dir():
        if start is None:  # no copy (a run from before fxjax kept one) or one of another start: the folder
            return dataclasses.replace(cfg, model=dataclasses.replace(m, **{key.split(".")[1]: str(found)}))
        if log is not None and key == "model.adapter":
            changed = adapter_config_changes(found, copy)
            if changed:
                log(f"model.adapter {value} now holds another adapter than the run started from ({changed}): "
                    f"the run's copy in {copy} gives the LoRA's shape")
    else:
        try:
            start = json.loads((copy / START_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunLoadError(f"the run in {checkpoint_dir} was trained from {key}={value}, which does not "
                               f"exist here, and the run keeps no copy of that LoRA's shape ({copy}: runs trained "
                               f"before fxjax kept one); put it back where the run read it") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunLoadError(f"{copy / START_FILE}: cannot be read ({err}); {key}={value} does not exist here "
                               f"either") from None
        if log is not None:
            log(f"{key}={value} is not here: the LoRA's shape from the run's copy in {copy}")
    changes: dict[str, Any] = {"adapter": str(copy), "from_run": None, "from_run_step": None}
    data = cfg.data
    if m.from_run is not None and not moved_base:
        changes.update(path=start.get("path"), preset=start.get("preset"), init_seed=start.get("init_seed", 0))
    if m.from_run is not None and data.tokenizer is None and not moved_base:
        data = dataclasses.replace(data, tokenizer=start.get("tokenizer"))
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **changes), data=data)


# what of a PEFT adapter_config.json sets the LoRA's shape and scaling
_SHAPE_KEYS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern")


def adapter_config_changes(adapter: Path, copy: Path) -> str:
    """"lora_alpha 64 there, 4 in the run's copy; ...": the shape keys in which the adapter folder's
    adapter_config.json differs from the run's copy ("" when they agree or one cannot be read)."""
    try:
        there, kept = (json.loads((d / "adapter_config.json").read_text(encoding="utf-8")) for d in (adapter, copy))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ""

    def shape(value):  # PEFT writes target_modules as a list or a set's list, in any order
        return sorted(value) if isinstance(value, list) else value

    return "; ".join(f"{key} {there.get(key)} there, {kept.get(key)} in the run's copy" for key in _SHAPE_KEYS
                     if shape(there.get(key)) != shape(kept.get(key)))
