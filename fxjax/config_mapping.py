"""Strict mapping of parsed YAML onto typed, frozen dataclasses, and the error it raises (`ConfigError`).

An unknown key, a value of the wrong type or a value outside its allowed choices is a `ConfigError` that names
the key by its dotted path (``optim.learning_rate: expected a number, got 'fast'``). `build_config` builds
every run config this way (fxjax.train_config's SFTConfig, fxjax.grpo_config's GRPOConfig) and the sections
check their values with `check_positive`; `to_plain` turns a config back into the plain dict a checkpoint
records.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import re
import types
import typing
from pathlib import PurePath
from typing import Any, Literal, Mapping

import yaml

__all__ = ["ConfigError", "SEED_LIMIT", "as_written", "build_config", "check_positive", "check_seed", "dotted_keys",
           "load_yaml", "to_plain", "type_name"]


class ConfigError(ValueError):
    """A config value that is unknown, mistyped or out of range; the message starts with its dotted key."""


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error: PyYAML keeps the last, so a
    second `data:` section appended to a copied config would silently replace the first."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice in one mapping (lines {seen[key]} and {line}); the second "
                            f"would replace the first", key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_NoDuplicateKeysLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

# Integers as a config means them (YAML 1.2's core schema): decimal, 0x hex or 0o octal. YAML 1.1, PyYAML's,
# read `steps: 010` as 8 (octal) and `steps: 20:30` as 1230 (base 60) without a word.
_INT_TAG = "tag:yaml.org,2002:int"
_NoDuplicateKeysLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_NoDuplicateKeysLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), list("-+0123456789"))


def _integer(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0x", "0o")):
        return int(text[2:], 16 if text[1] == "x" else 8)
    return int(text, 10)  # "010" is ten


_NoDuplicateKeysLoader.add_constructor(_INT_TAG, _integer)


def load_yaml(text: str) -> Any:
    """yaml.safe_load that refuses a key given twice in one mapping (yaml.YAMLError naming both lines) and
    reads integers as YAML 1.2 does (010 is ten, 20:30 a string, not YAML 1.1's 8 and 1230)."""
    return yaml.load(text, Loader=_NoDuplicateKeysLoader)


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def as_written(value: Any) -> str:
    """A config value as one would write it after --set key= (null, true, [a, b]): how every message that
    shows a config value shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_written(v) for v in value) + "]"
    return str(value)


def check_positive(value, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")


# Seeds reach numpy (non-negative only), grain and nnx.Rngs (int64): one range every seed fits.
SEED_LIMIT = 2**32


def check_seed(value, where: str) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{where}: a seed must be in [0, 2**32), got {value}")


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):  # (not its class's name: StageSection says nothing to a YAML writer)
            return f"a list of mappings, each with the keys {_keys_of(item)}"
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, type_name(item))
    if dataclasses.is_dataclass(tp):
        return f"a mapping with the keys {_keys_of(tp)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _keys_of(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _takes_text(tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_text(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return any(isinstance(arg, str) for arg in typing.get_args(tp))
    return tp is str


def _got(value: Any, tp) -> str:
    """`value` as the error shows it, with why a YAML boolean where text was meant is one."""
    if isinstance(value, bool) and _takes_text(tp):
        return (f"{value!r} (YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote the "
                f"text, e.g. 'no')")
    return repr(value)


def _convert(value: Any, tp, where: str) -> Any:
    """value (from YAML) -> tp, or ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {_got(value, tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise ConfigError(f"{where}: must be {type_name(tp)}, got {_got(value, tp)}")
        return value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            one = f" (a list of one: [{value}])" if isinstance(value, str) and item is str else ""
            raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}{one}")
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_got(value, tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, where)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover


_ROOT: contextvars.ContextVar = contextvars.ContextVar("the config class being built", default=None)


def _key_paths(cls, prefix: str = "") -> dict[str, list[str]]:
    """Each key name of a config class's tree -> the dotted paths that take it (`stages[i].steps`)."""
    paths: dict[str, list[str]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        paths.setdefault(f.name, []).append(prefix + f.name)
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        if dataclasses.is_dataclass(inner):
            for name, more in _key_paths(inner, prefix + f.name + ("[i]." if inner is not tp else ".")).items():
                paths.setdefault(name, []).extend(more)
    return paths


# Hugging Face Trainer's and peft's names that are other names here, for an unknown key's error (a name
# that is some section's key here, such as learning_rate, is found by itself): RunConfig.FOREIGN_KEYS
HF_TRAINER_KEYS: dict[str, str] = {
    "per_device_train_batch_size": "here data.batch_size: a micro-batch's examples over all devices "
                                   "(per device x devices)",
    "gradient_accumulation_steps": "here optim.grad_accum: micro-batches of data.batch_size per update, "
                                   "as Hugging Face's",
    "max_steps": "here train.steps", "num_train_epochs": "here train.epochs",
    "save_steps": "here checkpoint.every", "save_total_limit": "here checkpoint.keep",
    "logging_steps": "here train.log_every", "eval_steps": "here eval.every",
    "lr_scheduler_type": "here optim.schedule", "resume_from_checkpoint": "here checkpoint.resume",
    "bf16": "here model.dtype: bfloat16", "r": "here lora.rank", "lora_r": "here lora.rank",
    "lora_alpha": "here lora.alpha", "lora_dropout": "here lora.dropout", "adam_beta1": "here optim.b1",
    "adam_beta2": "here optim.b2", "adam_epsilon": "here optim.eps",
    "model_name_or_path": "here model.path", "torch_dtype": "here model.dtype", "shuffle_dataset": "here data.shuffle",
    "gradient_checkpointing": "here model.remat (full by default; none: off)", "save_strategy": "here checkpoint.every",
    "per_device_eval_batch_size": "here eval.batch_size: examples a batch over all devices",
    **dict.fromkeys(("eval_strategy", "evaluation_strategy"), "here eval.every (steps; 0: none but eval.at_start "
                                                              "and eval.at_end)"),
    "lora_target_modules": "here lora.target_modules", "use_peft": "here the LoRA is always on (the lora section)",
    "report_to": "here metrics.jsonl, and TensorBoard events with train.tensorboard",
    "disable_dropout": "here lora.dropout: 0 (the model has no other dropout)",
    "use_liger_kernel": "not supported: the loss is fxjax's chunked cross-entropy (train.loss_chunk)",
}


def unknown_key_hint(root, where: str, key: str, names: list[str]) -> str:
    """Where an unknown `key` of section `where` may belong (config class `root`): the path of that name
    elsewhere in the config (a flat TRL-style file's `beta` is `grpo.beta`), what another tool's name is
    here (the root class's FOREIGN_KEYS: `save_steps` is checkpoint.every), or a close spelling in the
    section (`names`); "" when none."""
    paths = _key_paths(root) if root is not None else {}
    foreign = getattr(root, "FOREIGN_KEYS", {})
    prefixes = getattr(root, "FOREIGN_PREFIXES", {})
    here = f"{where}.{key}" if where else key
    elsewhere = [p for p in paths.get(key, []) if p != here]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere)}?"
    if key in foreign:
        return foreign[key]
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    if prefix is not None:
        return prefixes[prefix]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
    return f"did you mean {where + '.' if where else ''}{close[0]}?" if close else ""


def _unknown_keys(keys: list[str], where: str, names: list[str]) -> ConfigError:
    """The error for keys a section does not take, all of them at once, each with where it may belong
    (`unknown_key_hint`)."""
    root = _ROOT.get()

    def hint(key: str) -> str:
        said = unknown_key_hint(root, where, key, names)
        return f" ({said})" if said else ""

    named = [(f"{where}.{k}" if where else k) + hint(k) for k in keys]
    if len(named) == 1:
        key, _, said = named[0].partition(" (")
        return ConfigError(f"{key}: unknown key{' (' + said if said else ''}; {where or 'the config'} takes {names}")
    return ConfigError(f"unknown keys: {'; '.join(named)}; {where or 'the config'} takes {names}")


def build_config(cls, data: Any, where: str):
    if where:
        return _build_config(cls, data, where)
    token = _ROOT.set(cls)  # (the root: an unknown key's hint looks for its name in the whole config)
    try:
        return _build_config(cls, data, where)
    finally:
        _ROOT.reset(token)


def _build_config(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):  # (a section may say what it is instead: NOT_A_MAPPING)
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}{getattr(cls, 'NOT_A_MAPPING', '')}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(map(str, set(data) - set(names)))  # (str: a YAML key may be a number)
    if unknown:
        raise _unknown_keys(unknown, where, names)
    # other spellings a section takes for a value (VALUE_ALIASES: key -> ((given, meant), ...)), compared by
    # type and value, so that true is not 1
    aliases = getattr(cls, "VALUE_ALIASES", {})
    data = {k: next((meant for given, meant in aliases.get(k, ()) if type(v) is type(given) and v == given), v)
            for k, v in data.items()}
    # null for a list-valued key is the empty list (a YAML `key:` with nothing after it reads as null).
    values = {k: () if v is None and typing.get_origin(hints[k]) is tuple
              else _converted(cls, k, v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from None


def _converted(cls, key: str, value: Any, tp, where: str) -> Any:
    """`_convert`, its error followed by the section's word on that key where it has one (VALUE_HINTS: key ->
    what a value of another tool's meaning is here)."""
    try:
        return _convert(value, tp, where)
    except ConfigError as err:
        hint = getattr(cls, "VALUE_HINTS", {}).get(key)
        if hint is None:
            raise
        raise ConfigError(f"{err} ({hint})") from None


def dotted_keys(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves under flat dotted keys (`{"optim": {"learning_rate": 1e-4}}` ->
    `{"optim.learning_rate": 1e-4}`), `prefix` before each."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_plain(obj) -> Any:
    """A config as plain data (what YAML and JSON hold): sections as mappings, tuples and lists as lists, paths
    as text (a config built in code may hold a list or a Path where a YAML one holds a list or a text)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def checked_config(cfg, expected: type, taker: str, built_by: str):
    """A run config built in code, converted and checked key by key as a YAML one is (`build_config`, then
    its `validate`, with a leading ~ of its paths expanded): run_sft and run_grpo took what `from_dict` would
    have refused (a negative learning rate, a dtype that is no dtype, a list of stages that reached the
    checkpoint's JSON only after training) and an error named no key. A config of another type than
    `expected` is a TypeError naming the function (`taker`) and how to build one (`built_by`): run_sft trained
    SFT on a GRPOConfig and recorded the run as GRPO's."""
    from fxjax.run_files import expand_home

    if type(cfg) is not expected:
        got = "a dict" if isinstance(cfg, Mapping) else f"a {type(cfg).__name__}"
        article = "an" if expected.__name__[0] in "AEFHILMNORSX" else "a"  # (as the letter's name is said)
        raise TypeError(f"{taker} takes {article} {expected.__name__}, got {got}: build one with {built_by}")
    return build_config(expected, expand_home(to_plain(cfg)), "").validate()
