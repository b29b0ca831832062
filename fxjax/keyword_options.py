"""A command's options given as Python keywords (`ImageDetector(...)`, `evaluate(...)`), read by the command's
own parser: every check, default and spelling is the command's, and a bad value is a ValueError naming it
(argparse would have exited the caller's process, a notebook's kernel, with SystemExit).

A keyword is the option's name as the parsed arguments hold it (`--max-new-tokens` -> max_new_tokens, `--fresh`
-> fresh, `--no-progress` -> progress=False). Values: True / False for a switch, a list for an option that takes
several (a lone value is one of them), None to leave the command's default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from typing import Any, Collection, Mapping, Sequence

__all__ = ["command_arguments", "in_keyword_words"]


def _parsers(command: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """`fxjax`'s parser and its COMMAND's."""
    from fxjax.cli import build_parser, command_parser

    parser = build_parser()
    return parser, command_parser(parser, command)


def _options(parser: argparse.ArgumentParser, allowed: Collection[str] | None) -> dict[str, argparse.Action]:
    """The parser's options by keyword (their `dest`), those in `allowed` only when it is given."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest != "help" and (allowed is None or a.dest in allowed)}


def _mesh_text(value: Any) -> Any:
    """`mesh=` as --mesh takes it: a MeshConfig, a {axis: size} mapping or a jax Mesh as AXIS=N,...; a string
    as it is."""
    import jax

    from fxjax.device_mesh import AXES, MeshConfig

    if isinstance(value, MeshConfig):
        value = dict(zip(AXES, value.shape))
    elif isinstance(value, jax.sharding.Mesh):
        value = {a: int(value.shape[a]) for a in value.axis_names}
    if isinstance(value, Mapping):
        return ",".join(f"{axis}={size}" for axis, size in value.items())
    return value


def _words(key: str, value: Any, action: argparse.Action, caller: str) -> list[str]:
    """The command-line words of one keyword."""
    flag = max(action.option_strings, key=len)  # (the long spelling)
    if key == "mesh":
        value = _mesh_text(value)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise TypeError(f"{caller}: {key} is {value!r}; give True or False")
        return [flag] if value is (not action.default) else []  # (a store_false's default is True)
    several = action.nargs in ("+", "*")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not several and len(values) != 1:
        raise TypeError(f"{caller}: {key} takes one value, not {value!r}")
    if len(values) == 1:  # (one word: a value that starts with "-", a prompt, is a value, not a flag)
        return [f"{flag}={values[0]}"]
    dashed = next((v for v in values if str(v).startswith("-")), None)
    if dashed is not None:  # (the parser would read it as a flag)
        raise ValueError(f"{caller}: {key}: {dashed!r} starts with '-', which the command reads as a flag among "
                         f"several values")
    return [flag, *map(str, values)]


def command_arguments(command: str, words: Sequence[str], options: Mapping[str, Any], caller: str,
                      allowed: Collection[str] | None = None) -> argparse.Namespace:
    """`fxjax COMMAND WORDS --option value ...` as the command's parser reads it, `options` given as keywords
    (those in `allowed` only, when it is given: the rest of the command's options are the caller's to set).
    TypeError for an unknown keyword or a value of the wrong shape, ValueError with the parser's message for
    a value the command refuses."""
    parser, sub_parser = _parsers(command)
    known = _options(sub_parser, allowed)
    argv = [command, *words]
    for key, value in options.items():
        if key not in known:
            raise TypeError(f"{caller}: unknown option {key!r}; the options are {', '.join(known)} (those of "
                            f"`fxjax {command} --help`)")
        if value is not None:
            argv += _words(key, value, known[key], caller)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(argv)
    except SystemExit:
        why = said.getvalue().strip().splitlines()
        raise in_keyword_words(ValueError(f"{caller}: {why[-1] if why else 'invalid options'}"), command) from None


_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(=| (?=[A-Z][A-Z_]*\b))?")


def in_keyword_words(err: BaseException, command: str) -> BaseException:
    """`err`, raised by running COMMAND for a Python caller (`evaluate`, `ImageDetector`), its message in the
    caller's words: each of the command's flags as the keyword that sets it (`--fresh` -> `fresh=True`,
    `--no-progress` -> `progress=False`, `--model PATH` -> `model=PATH`, `--step` -> `step`). Changed in
    place where the message is the exception's one argument (its type and traceback kept); returned."""
    if len(err.args) != 1 or not isinstance(err.args[0], str):
        return err
    known = {flag: action for action in _parsers(command)[1]._actions for flag in action.option_strings}

    def keyword(match: re.Match) -> str:
        action = known.get(match.group(1))
        if action is None or action.dest == "help":
            return match.group(0)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{action.dest}={not action.default}"
        return f"{action.dest}=" if match.group(2) else action.dest

    err.args = (_FLAG.sub(keyword, err.args[0]),)
    return err
