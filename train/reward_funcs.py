"""Reward terms of the user's own (`grpo.reward_funcs`), as TRL's GRPOTrainer takes `reward_funcs`.

    grpo:
      reward_funcs:
        - {name: brevity, function: "my_rewards:brevity", weight: 0.5}

    # my_rewards.py, in the working folder or on PYTHONPATH (every process of a multi-process run imports it)
    def brevity(completions, *, label, boxes, record, **kwargs):
        return [-len(c) / 1000 for c in completions]

A function gets the step's completions (this process's rows: each prompt's G completions in a row: the
decoded text, special tokens kept, `<|box_start|>` and the format's tags included; as `completions=`, as
TRL passes them, to a function written as TRL calls one: a `completions` parameter, or `completion_ids` or
`prompts` first (the completions then go to its **kwargs); else as its first argument, whatever its name) and,
as keyword arguments aligned with them, each completion's prompt's `label` ("real" / "generated"),
`boxes` (its true boxes, float [n, 4] in the pixels of the image the model saw, as the completion's),
`captions` (its true regions' captions, a list aligned with `boxes`), `tags` (the record's image-level
tags, a list) and `record` (the record's file:line); and, if it takes them (by name, or **kwargs), where
training is, for reward shaping over the run as TRL's `trainer_state` allows: `step` (the sampling step,
1-based, as metrics.jsonl numbers it) and `stage` (its reward stage's name: alpha, beta, gamma, or
"continuous"); TRL's `completion_ids` (each completion's token ids, through its EOS) if it takes them; and,
as TRL passes a dataset's columns, the records' other top-level keys (a `solution`, a `difficulty`: the
value as the JSONL line holds it, None for a record without the key) to a function that names them or
takes **kwargs. A name above wins over a record key of the same name, and TRL's `prompts` are not given
(the prompts are images with the dataset's question). It returns one finite number per completion. The step's total reward,
from which the group advantages are computed, gains weight x that number in every stage; the raw number is
logged as `reward/<name>` for each completion (completions.jsonl) and as `reward/<name>_mean` / `_std` for
the step (metrics.jsonl).
"""

from __future__ import annotations

import importlib
import inspect
import json
import numbers
import os
import sys
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fxjax.config_mapping import ConfigError

__all__ = ["COLUMNS", "RewardFunc", "add_reward_funcs", "attach_record_columns", "load_reward_funcs"]

COLUMNS = ("label", "boxes", "captions", "tags", "record")  # the keyword arguments a function gets
PROGRESS = ("step", "stage")  # given to a function that takes them (by name or **kwargs): where training is
TRL_KEYWORDS = ("completion_ids",)  # TRL's, given to a function that takes them (by name or **kwargs)
# names that are never a record column (a record key of one of these names is not given)
# (and TRL's own: it passes no dataset column named prompt, completion or completion_ids either)
RESERVED = frozenset(COLUMNS + PROGRESS + TRL_KEYWORDS + ("completions", "prompts", "prompt", "completion"))


def _call_problem(function, keywords: tuple[str, ...], by_name: bool) -> str | None:
    """Why `function` cannot take a step's completions (by name: `by_name`), the COLUMNS keywords and the
    other `keywords` it takes (a wrong signature was found only after the model had loaded, compiled and
    sampled its first step), None when it can."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # (a builtin or C function without one: called as it is)
        return None
    try:
        signature.bind(*(() if by_name else ([],)), **({"completions": []} if by_name else {}),
                       **dict.fromkeys(COLUMNS + keywords))
    except TypeError as err:
        return str(err)
    return None


def _parameters(function) -> list[inspect.Parameter]:
    """`function`'s parameters; none for one without a signature (a builtin or C function: called as it is)."""
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return []


def _names_completions(function) -> bool:
    """Whether `function` is written as TRL calls one, every argument by name: it has a parameter named
    `completions`, or its first is another of TRL's (`completion_ids`, `prompts`; the completions then go to
    its **kwargs). Else the completions are its first argument, whatever its name (`lambda c, **kwargs`)."""
    parameters = _parameters(function)
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    first = next((p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
    return "completions" in named or (first is not None and first.name in ("completion_ids", "prompts"))


def _takes_prompts(function) -> bool:
    parameters = _parameters(function)
    return bool(parameters) and parameters[0].name == "prompts"


def _keywords_taken(function, offered: tuple[str, ...]) -> tuple[str, ...]:
    """The `offered` keywords (PROGRESS, TRL_KEYWORDS) `function` takes: those it names, all with **kwargs
    (none without a signature). Only to those: a function written before they existed, without **kwargs,
    keeps working."""
    if _has_var_keyword(function):
        return offered
    named = {p.name for p in _parameters(function) if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return tuple(k for k in offered if k in named)


@dataclass(frozen=True)
class RewardFunc:
    name: str
    function: Callable[..., Sequence[float]]
    weight: float
    spec: str  # "module:name", for messages
    progress: tuple[str, ...] = ()  # the PROGRESS keywords it takes
    trl: tuple[str, ...] = ()  # the TRL_KEYWORDS it takes
    by_name: bool = False  # the completions given as `completions=` (it names them), else first
    named: tuple[str, ...] = ()  # the other names it takes: record columns, checked by attach_record_columns
    takes_any: bool = False  # it has **kwargs: every record column
    columns: tuple[str, ...] = ()  # the record columns it gets (attach_record_columns)
    lines: "RecordLines | None" = None  # where each training record's line is, to read its columns from

    def __call__(self, completions: list[str], columns: Mapping[str, Any], progress: Mapping[str, Any] | None,
                 completion_ids: Sequence[Sequence[int]] | None):
        keywords = {k: progress[k] for k in self.progress if progress and k in progress}
        if self.columns:  # (read from the records' lines for each call: values of the function's own)
            keywords.update(self.lines.columns(columns["record"], self.columns))
        if "completion_ids" in self.trl and completion_ids is not None:
            keywords["completion_ids"] = [list(ids) for ids in completion_ids]  # (a copy each: the function's own)
        if self.by_name:
            return self.function(completions=completions, **columns, **keywords)
        return self.function(completions, **columns, **keywords)


def _import_user_module(name: str):
    """`name` imported; one not found is looked for in the working folder too, as `python script.py` there
    would find it (the `fxjax` command's sys.path does not hold that folder). The folder goes last on
    sys.path: a file of the user's there never shadows an installed package (fxjax's own included)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != name.partition(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def load_reward_funcs(sections: Sequence, where: str = "grpo.reward_funcs") -> tuple[RewardFunc, ...]:
    """Each section's function imported (before the model loads, so a wrong name costs seconds): an import
    that fails or a name that is not a callable is a ConfigError naming the entry."""
    out = []
    for i, section in enumerate(sections):
        module_name, _, attr = section.function.partition(":")
        try:
            module = _import_user_module(module_name)
        except Exception as err:  # noqa: BLE001 - whatever the user's module raises on import, said with its entry
            raise ConfigError(f"{where}[{i}].function: cannot import {module_name!r} ({type(err).__name__}: {err}); "
                              f"it must be importable where the run runs: a module in the working folder "
                              f"({os.getcwd()}) or on PYTHONPATH") from None
        function = getattr(module, attr, None)
        if not callable(function):
            raise ConfigError(f"{where}[{i}].function: {module_name} has no function {attr!r}")
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise ConfigError(f"{where}[{i}].function: {section.function} is an async function; fxjax calls reward "
                              f"functions as plain functions (TRL awaits async ones): define it with def, not async "
                              f"def")
        progress, trl, by_name = _keywords_taken(function, PROGRESS), _keywords_taken(function, TRL_KEYWORDS), \
            _names_completions(function)
        named = _other_names(function, by_name)
        problem = _call_problem(function, progress + trl + named, by_name)
        if problem:
            if _takes_prompts(function) and "'prompts'" in problem:  # (TRL's first argument: never given here)
                problem = ("it takes TRL's `prompts` (without a default); fxjax gives none, the prompts being images "
                           "with the dataset's question")
            raise ConfigError(f"{where}[{i}].function: {section.function} cannot be called as a reward function is "
                              f"({problem}): define it as def {attr}(completions, *, {', '.join(COLUMNS)}) (and "
                              f"{', '.join(PROGRESS + TRL_KEYWORDS)} if it wants them) or def {attr}(completions, "
                              f"**kwargs)")
        out.append(RewardFunc(section.name, function, float(section.weight), section.function, progress, trl, by_name,
                              named, _has_var_keyword(function)))
    return tuple(out)


def _other_names(function, by_name: bool) -> tuple[str, ...]:
    """The parameters `function` names beyond the completions and the RESERVED keywords: record columns."""
    parameters = _parameters(function)
    if not by_name and parameters and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                             inspect.Parameter.POSITIONAL_OR_KEYWORD):
        parameters = parameters[1:]  # (the completions, whatever its name, positional-only too)
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return tuple(p.name for p in named if p.name not in RESERVED)


class RecordLines:
    """Where each training record's JSON line is (file, byte offset, length), and the keys the records
    have: a step's columns are read from the lines of its records only, so nothing of the dataset stays in
    memory over the run (a 2 GB file of records held as Python objects took about 9 GB)."""

    def __init__(self, records: Sequence):
        from fxjax.data.records import record_lines

        self.spans: dict[str, tuple[str, int, int]] = {}
        keys: set[str] = set()
        for source, file, offset, raw in record_lines(records):  # (one line in memory at a time)
            self.spans[source] = (file, offset, len(raw))
            keys.update(map(str, json.loads(raw)))  # (load_records read it as a JSON object)
        self.keys = tuple(sorted(keys - RESERVED))

    def columns(self, sources: Sequence[str], names: Sequence[str]) -> dict[str, list]:
        """{name: [the value of each source's record (None where it has no such key)]}."""
        from fxjax.data.records import line_at

        objects = {source: json.loads(line_at(*self.spans[source])) for source in dict.fromkeys(sources)}
        return {name: [objects[source].get(name) for source in sources] for name in names}


def attach_record_columns(funcs: Sequence[RewardFunc], records: Sequence,
                          where: str = "grpo.reward_funcs") -> tuple[RewardFunc, ...]:
    """`funcs` with the record columns each takes (TRL passes a dataset's columns): those it names, or all
    with **kwargs, of the training records (`records`: their `source`s, file:line; `RecordLines`). A named
    column without a default that no record has is a ConfigError naming the entry and the keys there are."""
    if not any(f.named or f.takes_any for f in funcs):
        return tuple(funcs)
    lines = RecordLines(records)
    keys = lines.keys
    out = []
    for i, func in enumerate(funcs):
        required = _required(func.function)
        missing = [n for n in func.named if n not in keys and n in required]
        if missing:
            raise ConfigError(f"{where}[{i}].function: {func.spec} takes {', '.join(map(repr, missing))}, which no "
                              f"training record has (their other keys: {', '.join(keys) or 'none'}); give it a "
                              f"default, or add the key to the records")
        columns = tuple(keys) if func.takes_any else tuple(n for n in func.named if n in keys)
        out.append(dataclasses.replace(func, columns=columns, lines=lines if columns else None))
    return tuple(out)


def _has_var_keyword(function) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(function))


def _required(function) -> set[str]:
    return {p.name for p in _parameters(function) if p.default is inspect.Parameter.empty}


def _numbers(raw: Any, func: RewardFunc, n: int, records: Sequence[str]) -> np.ndarray:
    """A function's values as float64, when they are one int or float per completion (a string that reads
    as a number, or a bool, was taken as one without a word)."""
    where = f"grpo.reward_funcs {func.name} ({func.spec})"
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
        raise ValueError(f"{where} returned a {type(raw).__name__}: give a list of {n} numbers, one per completion")
    values = np.asarray(raw)  # (a list, a numpy or jax array)
    if values.shape != (n,):
        got = f"{values.size} values" if values.ndim == 1 else f"an array of shape {values.shape}"
        raise ValueError(f"{where} returned {got} for {n} completions: give one number per completion")
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    for i, value in enumerate(raw):  # (strings, bools, None, objects: the first named)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
            raise ValueError(f"{where} returned {value!r} for completion {i} (of {records[i]}): give a number"
                             + (" (TRL's None, for a completion the term does not apply to: give 0 here)"
                                if value is None else ""))
    return np.asarray(list(raw), np.float64)


def add_reward_funcs(scores: dict[str, np.ndarray], funcs: Sequence[RewardFunc], completions: Sequence[str],
                     targets: Sequence[Mapping[str, Any]], metas: Sequence[Mapping[str, Any]],
                     num_generations: int, progress: Mapping[str, Any] | None = None,
                     completion_ids: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """`scores` (rewards.score's, one value per completion) with each function's values under its name and
    weight x them added to "total". `progress`: the step's PROGRESS values, each given to the functions
    that take it; `completion_ids`: each completion's token ids through its EOS, for those that take them.
    A function that raises, or returns other than one finite number per
    completion, is an error naming it (a NaN total would train on nothing, silently)."""
    if not funcs:
        return scores
    n = len(completions)
    columns = {"label": [t["label"] for t in targets for _ in range(num_generations)],  # (COLUMNS, in order)
               "boxes": [np.asarray(t["boxes"], np.float64) for t in targets for _ in range(num_generations)],
               "captions": [list(m["captions"]) for m in metas for _ in range(num_generations)],
               "tags": [list(m["tags"]) for m in metas for _ in range(num_generations)],
               "record": [m["source"] for m in metas for _ in range(num_generations)]}
    out = dict(scores)
    total = np.asarray(out["total"], np.float64).copy()
    for func in funcs:
        try:
            raw = func(list(completions), columns, progress, completion_ids)
        except (Exception, SystemExit) as err:  # (a sys.exit in the function: not the run's exit status)
            # (a function written for TRL's conversational data reads c[0]["content"]: here c is the text)
            trl = (" (each completion is a str here, the decoded text, not TRL's list of messages: c, not "
                   "c[0]['content'])" if isinstance(err, TypeError) and "string indices" in str(err) else "")
            raise RuntimeError(f"grpo.reward_funcs {func.name} ({func.spec}) failed on {n} completions: "
                               f"{type(err).__name__}: {err}{trl}") from err
        values = _numbers(raw, func, n, columns["record"])
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ValueError(f"grpo.reward_funcs {func.name} ({func.spec}) returned {values[bad]} for completion "
                             f"{bad} (of {columns['record'][bad]}): give a finite number")
        out[func.name] = values
        total += func.weight * values
    out["total"] = total
    return out
