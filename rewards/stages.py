"""Reward weights: the stage presets alpha / beta / gamma and the continuous schedule (docs/rewards.md).

The presets live in configs/rewards.yaml and nowhere else: one owner for the stage weights.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

# the repository's configs/ next to rewards/, or fxjax/configs next to fxjax/rewards in an installed wheel
CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "rewards.yaml"
STAGES = ("alpha", "beta", "gamma")
RELAXATIONS = ("paper", "authors")

@dataclass(frozen=True)
class RewardWeights:
    """total = base + w_iou * R_G + (label ok ? label_plus : label_minus) + (format ok ? format_plus : format_minus)."""

    base: float
    w_iou: float
    label_plus: float
    label_minus: float
    format_plus: float
    format_minus: float

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, float(getattr(self, f.name)))

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "RewardWeights":
        names = [f.name for f in fields(cls)]
        unknown = set(m) - set(names)
        missing = set(names) - set(m)
        if unknown or missing:
            raise ValueError(f"reward weights: {_key_problems(sorted(map(str, unknown)), sorted(missing))}")
        values = {k: _number(m[k], f"reward weights: {k}") for k in names}  # (as a reward file's are checked)
        _check_signs(values, "reward weights")
        return cls(**values)

    def as_array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.float64)


WeightsLike = Union[RewardWeights, Mapping[str, Any]]
# a reward config: its YAML file's path (None: configs/rewards.yaml), or its values as `load_config` returns
# them (what a GRPO run reads once at its start and scores every step with, so that an edit of the file
# during the run changes nothing until the run is resumed, and then with a warning)
ConfigLike = Union[str, Path, Mapping[str, Any], None]
MAPPING_NAME = "the reward config given as a mapping"


TOP_KEYS = ("relaxation", "eta", "power", "stages", "continuous")
CONTINUOUS_KEYS = ("w_iou_start", "w_iou_end", "base", "label_plus", "label_minus", "format_plus", "format_minus")


def _load_yaml(path: str, parse: Optional[Callable[[str], Any]] = None) -> dict:
    """The checked reward config at `path`, read again when the file changed (an edit between two runs of
    one process, a notebook's, was ignored) and copied, so that a caller's change to the dict is its own.
    `parse`: text -> values (default yaml.safe_load; one that raises yaml.YAMLError for what it refuses)."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None  # (_read_yaml says what is wrong)
    return copy.deepcopy(_read_yaml(path, stamp, parse))


@functools.lru_cache(maxsize=8)
def _read_yaml(path: str, stamp: int | None, parse: Optional[Callable[[str], Any]]) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            cfg = (parse or yaml.safe_load)(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"reward config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, not text
        raise ValueError(f"reward config {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"reward config {path}: invalid YAML ({err})") from None
    _check_config(cfg, path)
    return cfg


def _number(value: Any, where: str) -> float:
    """`value` as a finite float, or a ValueError naming `where` (a string that reads as one counts: YAML
    reads `1e-3` as a string)."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not np.isfinite(number):
        raise ValueError(f"{where}: must be a finite number, got {value!r}")
    return number


def _check_config(cfg: Any, path: str) -> None:
    """The whole reward config, key by key: a misspelt key (`etta`, `relaxtion`) was ignored and its default
    used without a word, a bad value found only when a step scored its first batch."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("stages"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'stages' key")
    unknown = sorted(str(k) for k in cfg if k not in TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; a reward config has {', '.join(TOP_KEYS)}")
    if cfg.get("relaxation", "paper") not in RELAXATIONS:
        raise ValueError(f"{path}: relaxation must be one of {RELAXATIONS}, got {cfg['relaxation']!r}")
    for key in ("eta", "power"):
        if key in cfg and not _number(cfg[key], f"{path}: {key}") > 0:
            raise ValueError(f"{path}: {key}: must be positive, got {cfg[key]!r}")
    sections = [(f"stages.{name}", weights, [f.name for f in fields(RewardWeights)])
                for name, weights in cfg["stages"].items()]
    if "continuous" in cfg:
        sections.append(("continuous", cfg["continuous"], list(CONTINUOUS_KEYS)))
    for where, section, names in sections:
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {where}: expected a mapping of {', '.join(names)}, got {section!r}")
        unknown, missing = sorted(map(str, set(section) - set(names))), sorted(set(names) - set(section))
        if unknown or missing:
            raise ValueError(f"{path}: {where}: {_key_problems(unknown, missing)}")
        values = {name: _number(section[name], f"{path}: {where}.{name}") for name in names}
        _check_signs(values, f"{path}: {where}")


def _check_signs(values: dict[str, float], where: str) -> None:
    """A weight of the wrong sign trains the opposite of what it means, without any error: a penalty written
    as `label_minus: 1.0` (the *_minus values are added as written) rewards a wrong verdict as much as a
    right one. Equal plus and minus (0 and 0: the term left out) are allowed."""
    for term, what in (("label", "verdict"), ("format", "answer format")):
        plus, minus = values[f"{term}_plus"], values[f"{term}_minus"]
        if minus > plus:
            fix = (f"the *_minus values are added as written, so a penalty is negative: {term}_minus: {-minus:g}"
                   if -minus < plus else  # (else the two look swapped: negating the minus would not do)
                   f"swapped? {term}_plus: {minus:g}, {term}_minus: {plus:g}")
            raise ValueError(f"{where}.{term}_minus ({minus:g}) is above {term}_plus ({plus:g}): a wrong {what} "
                             f"would score more than a right one ({fix})")
    for name in ("w_iou", "w_iou_start", "w_iou_end"):
        if name in values and values[name] < 0:
            raise ValueError(f"{where}.{name}: must be >= 0 (a negative weight rewards boxes away from the "
                             f"artefacts), got {values[name]:g}")


def config_name(config: ConfigLike) -> str:
    """What an error calls the reward config: its file, or that it was given as a mapping."""
    return MAPPING_NAME if isinstance(config, Mapping) else str(config or CONFIG_PATH)


def load_config(path: ConfigLike = None, parse: Optional[Callable[[str], Any]] = None) -> dict:
    """The reward config: `path`, else configs/rewards.yaml (`CONFIG_PATH`), checked key by key (`parse`:
    the file's text -> values, as `_load_yaml`'s); a mapping (what `load_config` returned before) is checked
    and copied."""
    if isinstance(path, Mapping):
        values = copy.deepcopy(dict(path))
        _check_config(values, MAPPING_NAME)
        return values
    if path is None:
        if not CONFIG_PATH.is_file():
            raise FileNotFoundError(f"{CONFIG_PATH}: reward presets not found (fxjax installed without its "
                                    "configs/; reinstall it, or pass the YAML path)")
        path = CONFIG_PATH
    return _load_yaml(str(Path(path).resolve()), parse)


def load_stage(stage: str, config: ConfigLike = None) -> RewardWeights:
    """The preset weights of stage "alpha", "beta" or "gamma"."""
    problem = missing_stage(stage, config)
    if problem:
        raise ValueError(problem)
    return RewardWeights.from_mapping(load_config(config)["stages"][stage])  # (load_config checked its values)


def missing_stage(stage: str, config: ConfigLike = None) -> Optional[str]:
    """Why the reward config has no stage `stage` (naming the file and its stages), None when it has one."""
    stages = load_config(config)["stages"]
    if stage in stages:
        return None
    hint = ("; the continuous schedule is not a stage: grpo.schedule=continuous with train.steps"
            if stage == "continuous" else "")
    return f"no reward stage {stage!r} in {config_name(config)} (its stages: {', '.join(stages)}){hint}"


def describe_weights(w: RewardWeights) -> str:
    """One line of a stage's reward: `total = base + w_iou x R_G + verdict +a/-b + format +c/-d`."""
    return (f"total = {w.base:g} + {w.w_iou:g} x R_G + verdict {w.label_plus:+g}/{w.label_minus:+g} "
            f"+ format {w.format_plus:+g}/{w.format_minus:+g} (right/wrong)")


def weight_warnings(w: RewardWeights, other_terms: bool = False) -> list[str]:
    """What in valid weights is probably a slip (said at the run's start, not refused: GRPO ranks completions
    within a group, so a positive *_minus below its *_plus still prefers the right answer): a penalty written
    positive, and a reward that cannot vary (every completion scores the same: advantages 0, nothing learnt),
    unless `other_terms` (reward terms of the user's own with a weight: the paper's terms all 0 is then how
    one trains on those alone)."""
    out = [f"{term}_minus {getattr(w, term + '_minus'):+g} is positive: a wrong {what} earns a reward (the *_minus "
           f"values are added as written; a penalty is negative)"
           for term, what in (("label", "verdict"), ("format", "answer format")) if getattr(w, term + "_minus") > 0]
    if w.w_iou == 0 and w.label_plus == w.label_minus and w.format_plus == w.format_minus and not other_terms:
        out.append("every completion scores the same (w_iou 0, each *_plus equal to its *_minus): the advantages "
                   "are 0 and the stage learns nothing")
    return out


def continuous_weights(t: float, T: float, config: ConfigLike = None) -> RewardWeights:
    """The continuous schedule of the reward config's `continuous` section: w_iou(t) runs linearly from
    w_iou_start to w_iou_end over T steps (t clipped to [0, T]; the shipped config: 0.5 + 0.5 * t / T, the
    ICLR version's w_G); base, label and format weights as that section gives them."""
    cfg = load_config(config)
    if "continuous" not in cfg:
        raise ValueError(f"{config_name(config)}: no 'continuous' section, which the continuous schedule "
                         f"(grpo.schedule=continuous) reads its weights from ({', '.join(CONTINUOUS_KEYS)})")
    c = cfg["continuous"]
    if not T > 0:
        raise ValueError(f"total steps T must be positive, got {T}")
    frac = min(max(float(t) / float(T), 0.0), 1.0)
    w = float(c["w_iou_start"]) + (float(c["w_iou_end"]) - float(c["w_iou_start"])) * frac
    rest = {k: c[k] for k in ("base", "label_plus", "label_minus", "format_plus", "format_minus")}
    return RewardWeights(w_iou=w, **rest)


def resolve_weights(stage: Optional[str] = "alpha", weights: Optional[WeightsLike] = None,
                    step: Optional[float] = None, total_steps: Optional[float] = None,
                    config: ConfigLike = None) -> RewardWeights:
    """`weights` when given, else the stage preset, else the continuous schedule at step / total_steps."""
    if weights is not None:
        return weights if isinstance(weights, RewardWeights) else RewardWeights.from_mapping(weights)
    if stage == "continuous":
        if step is None or total_steps is None:
            raise ValueError("stage='continuous' needs step and total_steps")
        return continuous_weights(step, total_steps, config)
    return load_stage(stage, config)


def _key_problems(unknown: list[str], missing: list[str]) -> str:
    """"unknown keys [...]", "missing keys [...]" or both: only the ones there are."""
    return ", ".join(f"{what} keys {keys}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys)
