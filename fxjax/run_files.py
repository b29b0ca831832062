"""A run directory on disk, without loading any weights: where its checkpoints are, which steps are
committed, and the run config each step saved (fxjax.train.run_loading loads the model of a step).

A run directory is a `fxjax sft` / `fxjax grpo` train.output_dir (holding checkpoints/) or a checkpoint
directory itself (holding the step folders). Each committed step `<dir>/<N>/` holds the train state and
the run's resolved config (fxjax.train.checkpointing). An in-progress save (`<N>.orbax-checkpoint-tmp-*`)
is not a step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Collection

__all__ = ["CONFIG_FILE", "METRICS_FILE", "REWARDS_KEY", "START_FILE", "START_LORA_DIR", "RunLoadError", "brief_error", "checkpoint_dir_of",
           "committed_steps", "read_run_config", "resolve_step", "saved_data_state",
           "describe_run", "expand_home", "fxjax_folder_hint", "is_adapter_not_model", "is_run_folder", "is_export_folder", "kept_stage_end_steps", "saved_run_kind", "start_step_text", "stage_end_step", "step_or_stage", "steps_text"]

CONFIG_FILE = Path("config") / "config.json"  # TrainCheckpointer's "config" item
METRICS_FILE = "metrics.jsonl"  # a run's log in its train.output_dir (fxjax.train.metrics writes it)
DATA_STATE_FILE = Path("data") / "data_state.json"  # its "data" item (the data position, GRPO's stage ends)
# CONFIG_FILE's key, beside the config's sections, of the reward values a GRPO run read from its reward file
# at the start (train.grpo_stages.reward_record): recorded for a resume to compare, not a config section
REWARDS_KEY = "rewards"
# A run that starts from another's LoRA (model.adapter, model.from_run) keeps that LoRA's shape in its checkpoint
# directory, as a PEFT adapter: loading the run needs the shape, and the folder it came from may move.
START_LORA_DIR = "start_lora"
START_FILE = "fxjax_start.json"  # in START_LORA_DIR: where the run started from, its base model and tokenizer


class RunLoadError(ValueError):
    """A run or step that cannot be loaded; the message names it and lists the steps that exist."""


def brief_error(err: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an error from orbax / TensorStore, without the multi-line TensorStore spec
    they append, for messages about a checkpoint that cannot be read."""
    text = str(err).split(" See full TensorStore details", 1)[0].split(" [tensorstore_spec=", 1)[0]
    text = text.strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first[:limit]}" + ("..." if len(first) > limit else "")


def checkpoint_dir_of(run: str | Path) -> Path:
    """The checkpoint directory of a run directory (its checkpoints/), or `run` itself when it holds steps."""
    run = Path(run)
    if not run.is_dir():
        raise RunLoadError(f"run directory {run} " + ("is a file; give the run's folder (its train.output_dir)"
                                                      if run.exists() else "does not exist"))
    if (run / "checkpoints").is_dir():
        return run / "checkpoints"
    if committed_steps(run) or any(p.name.split(".")[0].isdigit() for p in run.iterdir()):
        return run
    if run.name.isdigit() and (run / CONFIG_FILE).is_file():
        parent, step = run.parent, run.name  # (the advice for each way a run is named: the caller's is among them)
        raise RunLoadError(f"{run} is the checkpoint of step {step}, not a run: name the run's folder and the step "
                           f"apart (eval, detect, export: --run {parent} --step {step}; a training start: "
                           f"model.from_run={parent} with model.from_run_step={step}; info: fxjax info {parent})")
    hint = _checkpoints_inside(run) or _other_kind(run) or runs_inside(run)
    raise RunLoadError(f"{run} holds no checkpoints: expected {run / 'checkpoints'}/<step>/ (a fxjax sft/grpo "
                       f"train.output_dir) or <step>/ folders (a checkpoint.dir){hint}")


def _other_kind(folder: Path) -> str:
    """What a folder given as a run is instead, said for the error (the command-line way to give it)."""
    if is_adapter_not_model(folder):
        return (f"; {folder} is a PEFT adapter: give --model BASE_MODEL --adapter {folder} (eval, detect, "
                f"export), or model.adapter={folder} (a training config)")
    if is_export_folder(folder):
        return (f"; {folder} is the folder of an `fxjax export`: give --model {folder / 'merged'} (eval, detect), "
                f"or model.path={folder / 'merged'} (a training config)")
    if (folder / "config.json").is_file():
        return f"; {folder} is an HF model: give --model {folder} (eval, detect), or model.path={folder} (a training config)"
    return ""


def runs_inside(folder: Path) -> str:
    """The fxjax runs in a folder's subfolders (`fxjax demo`'s out: sft/ and grpo/), said for an error about
    the folder ("" for none)."""
    try:
        runs = [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "checkpoints").is_dir()]
    except OSError:
        return ""
    return f"; the runs in it: {', '.join(str(p) for p in runs[:5])}" if runs else ""


def _checkpoints_inside(run: Path) -> str:
    """Where a folder without checkpoints of its own holds some in a subfolder (a run whose checkpoint.dir
    lies in its output folder under another name), said for the error."""
    try:
        inside = [(p, steps) for p in sorted(run.iterdir()) if p.is_dir() and not p.name.startswith(".")
                  for steps in [committed_steps(p)] if steps]
    except OSError:
        return ""
    if not inside:
        return ""
    return ("; in it, checkpoints in " + ", ".join(f"{p} (steps {steps_text(steps)})" for p, steps in inside[:3])
            + ": a run with its own checkpoint.dir, give that folder")


def is_run_folder(folder: Path) -> bool:
    """An fxjax training run's folder (its checkpoints/), or a checkpoint.dir (committed <step>/ folders)."""
    return (folder / "checkpoints").is_dir() or bool(committed_steps(folder))


def is_adapter_not_model(folder: Path) -> bool:
    """A PEFT adapter's folder (adapter_config.json, no config.json), given where a model's belongs."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def is_export_folder(folder: Path) -> bool:
    """The folder of an `fxjax export` (its --out: merged/ and/or adapter/ in it, no model of its own, and no
    checkpoints: a run whose export.adapter_dir lies in its own folder is a run)."""
    return (not (folder / "config.json").is_file() and not (folder / "checkpoints").is_dir()
            and ((folder / "merged" / "config.json").is_file() or (folder / "adapter" / "adapter_config.json").is_file()))


def fxjax_folder_hint(folder: str | Path) -> str:
    """What an fxjax folder given where an HF checkpoint or a PEFT adapter belongs is, and how to load it from
    Python (" (...)"; "" for any other folder): a run, one step's checkpoint, or an `fxjax export` folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    if is_adapter_not_model(folder):
        return f" ({folder} is a PEFT adapter: load its base model with adapter={folder})"
    if is_export_folder(folder):
        return (f" ({folder} is the folder of an `fxjax export`: load {folder / 'merged'}, or the base model with "
                f"adapter={folder / 'adapter'})")
    if folder.name.isdigit() and (folder / CONFIG_FILE).is_file():
        return (f" ({folder} is the checkpoint of step {folder.name} of a run: "
                f"fxjax.train.run_loading.load_run({str(folder.parent)!r}, {folder.name}).model loads it)")
    if is_run_folder(folder):
        return (f" ({folder} is an fxjax run: fxjax.train.run_loading.load_run({str(folder)!r}, step).model loads "
                f"a step of it, the last without step; `fxjax export --run {folder}` writes one as HF)")
    return ""


def committed_steps(checkpoint_dir: str | Path) -> list[int]:
    """Steps with a committed checkpoint folder (orbax renames `<N>.orbax-checkpoint-tmp-*` to `<N>` only
    once every item is written)."""
    return sorted(int(p.name) for p in Path(checkpoint_dir).iterdir() if p.is_dir() and p.name.isdigit())


def steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def saved_run_kind(saved: Collection[str]) -> str:
    """"grpo" or "sft": the phase whose resolved config (a checkpoint's config.json, or the sections a config
    file and its --set give) this is."""
    return "grpo" if "grpo" in saved or "stages" in saved else "sft"


def read_run_config(checkpoint_dir: str | Path, step: int) -> tuple[Any, str]:
    """(SFTConfig or GRPOConfig, "sft" or "grpo") from the config the run saved with `step`."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train_config import from_dict

    path = Path(checkpoint_dir) / str(step) / CONFIG_FILE
    steps = committed_steps(checkpoint_dir)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunLoadError(f"the checkpoint of step {step} in {checkpoint_dir} is incomplete or corrupted: it has "
                           f"no {CONFIG_FILE}; steps that exist: {steps_text(steps)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunLoadError(f"the checkpoint of step {step} in {checkpoint_dir} is corrupted: {path} cannot be "
                           f"read ({err}); steps that exist: {steps_text(steps)}") from None
    if not isinstance(saved, dict):
        raise RunLoadError(f"{path}: not a run config (a JSON object); steps that exist: {steps_text(steps)}")
    kind = saved_run_kind(saved)
    saved = {k: v for k, v in saved.items() if k != REWARDS_KEY}  # (the config's sections only)
    saved = with_run_paths(saved, saved_data_state(Path(checkpoint_dir), step).get(RUN_CWD_KEY))
    try:
        return (grpo_from_dict(saved) if kind == "grpo" else from_dict(saved)), kind
    except ValueError as err:
        raise RunLoadError(f"{path}: the run's config does not load ({err})") from None


# Config keys that name files or folders a loaded run reads; a relative one is relative to the folder the
# run was started from (RUN_CWD_KEY in each checkpoint's data state). Not model.adapter nor model.from_run:
# the run's own copy of its start (START_LORA_DIR) stands in for them, recognised by the path as written
# (`kept_start`), which a rebased path would no longer be.
RUN_PATH_KEYS = (("model", "path"), ("data", "tokenizer"), ("data", "root"), ("data", "train_files"),
                 ("data", "eval_files"))
RUN_CWD_KEY = "cwd"


def with_run_paths(saved: dict, cwd: str | None) -> dict:
    """A saved run config whose relative paths (RUN_PATH_KEYS: `model.path: tiny`, as the user typed it)
    name what they named for the run: taken from `cwd`, the folder it was started from, where something is
    there (a run read from another folder found "no tokenizer.json in tiny"). Kept as written when the run
    recorded no folder or nothing is there (a project moved with its runs: relative to the current
    folder)."""
    if not cwd or not Path(cwd).is_dir():
        return saved

    def rebased(value: str) -> str:
        if not value or Path(value).is_absolute():
            return value
        there = Path(cwd) / value
        return str(there) if there.exists() else value

    return _with_paths_mapped(saved, RUN_PATH_KEYS, rebased)


def _with_paths_mapped(config: dict, keys, change: Callable[[str], str]) -> dict:
    """`config` (plain sections) with `change` applied to each path text of the `keys` (section, key) it has,
    one by one in a list of them (data.train_files); other values as they are."""
    def mapped(value):
        if isinstance(value, list):
            return [mapped(v) for v in value]
        return change(value) if isinstance(value, str) else value

    out = dict(config)
    for section, key in keys:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: mapped(out[section][key])}
    return out


def step_or_stage(text: str) -> int | str:
    """A `--step` value: a step number, or the name of a GRPO stage (its end's checkpoint)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text


def saved_data_state(checkpoint_dir: Path, step: int) -> dict:
    """The data state the checkpoint of `step` saved ({} when it is missing or unreadable)."""
    try:
        data = json.loads((checkpoint_dir / str(step) / DATA_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _data_state_stage_ends(checkpoint_dir: Path, step: int) -> list[tuple[str, int]] | None:
    """The stage ends the data state of `step` records (None: none recorded, or unreadable)."""
    ends = saved_data_state(checkpoint_dir, step).get("stage_ends")
    if isinstance(ends, list) and all(isinstance(e, list) and len(e) == 2 for e in ends):
        return [(str(name), int(end)) for name, end in ends]
    return None


def kept_stage_end_steps(checkpoint_dir: str | Path) -> set[int]:
    """Every stage end that the committed checkpoints in `checkpoint_dir` record as reached (at or before their
    own step): a run resumed with other stages keeps the ends its earlier stages reached (its own config knows
    only the new ones). An end a checkpoint only planned (a later stage's, under the stages of then) is none:
    kept, a step that ends no stage of the run would never have been pruned."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        return set()
    return {end for step in committed_steps(ckpt) for _, end in (_data_state_stage_ends(ckpt, step) or [])
            if end <= step}


def recorded_stage_ends(checkpoint_dir: Path, step: int) -> list[tuple[str, int]] | None:
    """[(stage, the step it ends at), ...] as the checkpoint of `step` records them (a GRPO run's data state;
    one written before fxjax recorded them: from its config's stages when they are in steps); None for an
    SFT run or a continuous schedule."""
    ends = _data_state_stage_ends(checkpoint_dir, step)
    if ends is not None:
        return ends
    cfg, kind = read_run_config(checkpoint_dir, step)
    if kind != "grpo" or cfg.grpo.schedule == "continuous" or any(s.steps is None for s in cfg.stages):
        return None
    return list(cfg.stage_ends())


def stage_end_step(checkpoint_dir: Path, stage: str, steps: list[int]) -> int:
    """The committed step at which the GRPO stage `stage` ended (read from the newest checkpoint), or a
    RunLoadError saying why there is none."""
    ends = recorded_stage_ends(checkpoint_dir, steps[-1])
    where = f"step {stage!r} (a stage's end): the run in {checkpoint_dir}"
    if not ends:
        raise RunLoadError(f"{where} has no reward stages (an SFT run, a continuous GRPO schedule, or a run from "
                           f"before fxjax recorded them when its stages are in epochs): give a step number; steps "
                           f"that exist: {steps_text(steps)}")
    listed = ", ".join(f"{name} ends at step {end}" for name, end in ends)
    found = [end for name, end in ends if name == stage]
    if not found:
        raise RunLoadError(f"{where} has no stage {stage!r} ({listed})")
    if len(found) > 1:
        raise RunLoadError(f"{where} runs stage {stage!r} more than once ({listed}): give the step number")
    end = found[0]
    if end > steps[-1]:
        raise RunLoadError(f"{where} has not finished stage {stage!r} (it ends at step {end}; the newest "
                           f"checkpoint is step {steps[-1]}); steps that exist: {steps_text(steps)}")
    if end not in steps:
        raise RunLoadError(f"{where} has no checkpoint of step {end}, where stage {stage!r} ended (deleted, or "
                           f"pruned by a run from before fxjax kept stage ends); steps that exist: "
                           f"{steps_text(steps)}")
    return end


def resolve_step(checkpoint_dir: str | Path, step: int | str | None) -> tuple[int, Any, str]:
    """(step, run config, "sft" or "grpo") of `step` (None: the newest committed one; a stage name: the
    checkpoint at that GRPO stage's end); reads no weights."""
    ckpt = Path(checkpoint_dir)
    steps = committed_steps(ckpt)
    if not steps:
        pending = sorted(p.name for p in ckpt.iterdir())
        raise RunLoadError(f"no committed checkpoint in {ckpt}" + (f" (only {', '.join(pending)})" if pending else ""))
    if isinstance(step, str):
        step = step_or_stage(step)  # (load_run(run, "300") is step 300)
    if isinstance(step, str):
        step = stage_end_step(ckpt, step, steps)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        pruned = (" (older than the newest: a run keeps only its newest checkpoints, checkpoint.keep, and one still "
                  "training there may have removed it since it was chosen)" if step < steps[-1] else "")
        raise RunLoadError(f"step {step} has no checkpoint in {ckpt}; steps that exist: {steps_text(steps)}{pruned}")
    cfg, kind = read_run_config(ckpt, step)
    return step, cfg, kind


def start_step_text(run: str | Path, step: int | str | None) -> str:
    """How a run's start at `step` of `run` (model.from_run_step) is said: "step 7 (its newest)", "step 40",
    "the end of stage beta (step 20)"; what cannot be read is left unsaid (loading it says what is wrong)."""
    try:
        if step is None:
            steps = committed_steps(checkpoint_dir_of(run))
            return f"step {steps[-1]} (its newest)" if steps else "its newest step"
        if isinstance(step_or_stage(str(step)), int):
            return f"step {step}"
        return f"the end of stage {step} (step {resolve_step(checkpoint_dir_of(run), step)[0]})"
    except (OSError, RunLoadError):
        return "its newest step" if step is None else f"the end of stage {step}"


def describe_run(run: str | Path) -> list[str]:
    """What `fxjax info RUN_DIR` prints of a training run, without loading weights: its kind and the
    committed steps (what `--step` takes, stage names included), where its model starts from, its LoRA,
    tokenizer and dtype, and the folder its relative paths are read from."""
    ckpt = checkpoint_dir_of(run).absolute()
    steps = committed_steps(ckpt)
    if not steps:
        raise RunLoadError(f"no committed checkpoint in {ckpt}")
    unreadable: list[str] = []
    for newest in reversed(steps):  # (the newest whose config reads: a damaged one is said, as a resume sets it aside)
        try:
            cfg, kind = read_run_config(ckpt, newest)
            break
        except RunLoadError as err:
            if newest == steps[0]:
                raise
            unreadable.append(f"step {newest}: {str(err).splitlines()[0]}")
    m, lora = cfg.model, cfg.lora
    lines = [f"{kind} run in {ckpt}", f"  checkpoints: step{'s' * (len(steps) > 1)} {steps_text(steps)} (--step N; "
                                      f"default the newest, {steps[-1]})"]
    lines += [f"  unreadable: {line} (described from step {newest}; a resume sets it aside)" for line in unreadable]
    ends = recorded_stage_ends(ckpt, newest)
    if ends:
        lines.append("  stage ends: " + ", ".join(f"{name} at step {end}" + ("" if end in steps else " (not reached yet)"
                                                                              if end > steps[-1] else " (no checkpoint)")
                                                 for name, end in ends) + " (--step STAGE)")
    if m.from_run is not None:
        start = f"the run {m.from_run} at {start_step_text(m.from_run, m.from_run_step)}"
    else:
        start = m.path or f"preset {m.preset}"
        start += f" with the adapter {m.adapter}" if m.adapter else ""
    lines.append(f"  model: {start}; compute {m.dtype}" + (f", weights stored in {m.param_dtype}" if m.param_dtype
                                                          and m.param_dtype != m.dtype else ""))
    if m.from_run is None and m.adapter is None:
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
        lines.append(f"  LoRA: r={lora.rank} alpha={lora.alpha:g} on {targets}")
    else:
        lines.append("  LoRA: the shape of the one it started from (kept in its checkpoints' start_lora/)")
    try:
        lines.append(f"  tokenizer: {cfg.tokenizer}")
    except (ValueError, OSError) as err:  # (a preset without data.tokenizer; a start run that is not here)
        lines.append(f"  tokenizer: not known here ({err}); eval, detect and export take --tokenizer")
    cwd = saved_data_state(ckpt, newest).get(RUN_CWD_KEY)
    if cwd:
        lines.append(f"  started from: {cwd} " + ("(its relative paths are read from there)" if Path(cwd).is_dir()
                                                 else "(gone: its relative paths are read from the current folder)"))
    return lines


# The keys that name files or folders, whose `~` is the home folder as in a shell (`output_dir: ~/runs` made a
# folder named "~" in the working folder; `--set key=~/x` is not expanded by the shell either)
PATH_KEYS = (("model", "path"), ("model", "adapter"), ("model", "from_run"), ("model", "preset"), ("data", "tokenizer"),
             ("data", "root"), ("data", "train_files"), ("data", "eval_files"), ("train", "output_dir"),
             ("checkpoint", "dir"), ("export", "adapter_dir"), ("export", "merged_dir"), ("grpo", "reward_config"))


def expand_home(config: dict) -> dict:
    """`config` (plain sections) with a leading ~ of every PATH_KEYS value expanded, as a shell would."""
    return _with_paths_mapped(config, PATH_KEYS, lambda value: os.path.expanduser(value) if value.startswith("~")
                              else value)
