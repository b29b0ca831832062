"""The SFT run configuration: YAML mapped onto typed, frozen dataclasses.

    cfg = load_sft_config("configs/recipes/paper_3b_sft.yaml",
                          overrides=["model.path=/models/Qwen2.5-VL-3B-Instruct", "train.steps=100"])
    cfg.train.epochs          # None: the --set of train.steps replaced the recipe's 3 epochs
    cfg.to_dict()             # the resolved config (what a checkpoint records)

Every section is a frozen dataclass (fxjax.config_sections). Loading is strict (fxjax.config_mapping): an
unknown key, a value of the wrong type or a value outside its allowed choices is a `ConfigError` that names
the key by its dotted path (``optim.learning_rate: expected a number, got 'fast'``). ``--set key=value``
overrides parse the value as a YAML scalar/list (``train.steps=20``, ``data.train_files=[a.jsonl, b.jsonl]``,
``lora=null``).

An override replaces what the file chose, keys that go with it included (the tables below, as data):
``--set train.steps=1000`` over a file with ``train.epochs: 3`` clears ``train.epochs`` (EXCLUSIVE_KEYS);
``--set model.path=DIR`` lets a ``data.tokenizer`` that named the old model follow the new one
(DEFAULTS_TO); ``--set data.eval_files=[]`` turns periodic evaluation and the one at the start off (OFF_WITHOUT). Each such
consequence is reported as a note (``load_sft_config(..., log=print)``).

This module imports nothing of train/ (the dependency points the other way).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import yaml

from fxjax.config_mapping import (HF_TRAINER_KEYS, ConfigError, as_written, build_config, load_yaml, to_plain,
                                  type_name, unknown_key_hint)
from fxjax.config_sections import (CheckpointSection, DataSection, DistributedSection, EvalSection, ExportSection,
                                   LoRASection, MeshSection, ModelSection, OptimSection, TrainSection)
from fxjax.run_files import expand_home

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS_TO",
    "EXCLUSIVE_KEYS",
    "OFF_WITHOUT",
    "SFTConfig",
    "apply_overrides",
    "base_model_section",
    "from_dict",
    "from_run_chain",
    "load_sft_config",
]


def from_run_chain(cfg):
    """The saved configs of the runs `cfg` started from (model.from_run), followed run to run, nearest
    first. Where a run's own model.from_run is gone, its kept record (run_start.start_from_kept_copy: the
    base model and tokenizer it started from) ends the chain, as loading the run does."""
    from fxjax.run_files import RunLoadError, checkpoint_dir_of, resolve_step
    from fxjax.run_start import start_from_kept_copy

    seen = set()
    while cfg.model.from_run is not None and cfg.model.from_run not in seen:
        seen.add(cfg.model.from_run)
        ckpt = checkpoint_dir_of(cfg.model.from_run).absolute()
        cfg = resolve_step(ckpt, cfg.model.from_run_step)[1]
        try:
            cfg = start_from_kept_copy(cfg, ckpt, False, None)
        except RunLoadError:  # no record kept (an older run): what it names, read only if asked for
            pass
        yield cfg


def base_model_section(cfg):
    """The model section that names the run's base model: its own, or for a run started from another run
    (model.from_run, no model.path), that run's, followed run to run; None when a run on the way cannot be
    read (loading the model then says why)."""
    from fxjax.run_files import RunLoadError

    m = cfg.model
    try:
        for earlier in from_run_chain(cfg) if m.path is None else ():
            m = earlier.model
            if m.path is not None:
                break
    except (OSError, RunLoadError):
        return None
    return m


@dataclass(frozen=True)
class RunConfig:
    """The sections every run config has (SFTConfig; fxjax.grpo_config.GRPOConfig adds `grpo` and `stages`),
    their checks section by section and across sections, the plain dict, and the derived paths."""

    FOREIGN_KEYS: ClassVar[dict[str, str]] = HF_TRAINER_KEYS  # (an unknown key's hint: fxjax.config_mapping)

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)

    def validate_sections(self, skip: tuple[str, ...] = ()) -> None:
        """Each section's own checks (named by its key), then the checks across sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if f.name not in skip and hasattr(section, "validate"):
                section.validate(f.name)
        if self.eval.every and not self.data.eval_files:
            raise ConfigError(f"eval.every: periodic evaluation (every {self.eval.every} steps) needs "
                              f"data.eval_files; give them, or set eval.every=0")
        if self.eval.at_start and not self.data.eval_files:  # (at_end is on by default: without files, off)
            raise ConfigError("eval.at_start: an evaluation before training needs data.eval_files; give them, "
                              "or set eval.at_start=false")
        self._refuse_urls()
        self._refuse_export_over_run_files()
        if self.model.preset is not None and self.data.tokenizer is None:
            raise ConfigError(f"data.tokenizer: a preset model (model.preset={self.model.preset}) has no "
                              f"tokenizer; set data.tokenizer to a directory with tokenizer.json")

    def _refuse_export_over_run_files(self) -> None:
        """The end-of-run export replaces its folder whole: refuse one that is, or holds, a file or folder
        the run reads or writes (its checkpoints, what it starts from, its data)."""
        kept = [*self.input_paths(), ("train.output_dir", self.train.output_dir),
                ("checkpoint.dir", str(self.checkpoint_dir))]
        for key in ("adapter_dir", "merged_dir"):
            target = getattr(self.export, key)
            if not target:
                continue
            folder = Path(target).resolve()
            for name, path in kept:
                if path and (folder == Path(path).resolve() or folder in Path(path).resolve().parents):
                    what = "is" if folder == Path(path).resolve() else "holds"
                    raise ConfigError(f"export.{key}: {target} {what} {name} ({path}); the export at the end "
                                      "replaces its folder whole: write to another folder")
        adapter, merged = self.export.adapter_dir, self.export.merged_dir
        if adapter and merged and (Path(merged).resolve() == Path(adapter).resolve()
                                   or Path(merged).resolve() in Path(adapter).resolve().parents):
            # the adapter is written first, then the merged checkpoint replaces its folder whole
            raise ConfigError(f"export.adapter_dir: {adapter} is, or is inside, export.merged_dir ({merged}), "
                              "which the merged export replaces whole after the adapter is written: give the "
                              "adapter a folder of its own")

    def input_paths(self) -> list[tuple[str, str | None]]:
        """(key, path) of every file or folder the run reads (a list key once per entry)."""
        return [("model.path", self.model.path), ("model.adapter", self.model.adapter),
                ("model.from_run", self.model.from_run), ("data.tokenizer", self.data.tokenizer),
                *(("data.train_files", f) for f in self.data.train_files),
                *(("data.eval_files", f) for f in self.data.eval_files)]

    def _refuse_urls(self) -> None:
        """A gs:// or s3:// path would be read as a local folder named "gs:" (the metrics, the export and
        the checkpoints' bookkeeping use local files): an error naming the key, before anything is written."""
        paths = [*self.input_paths(), ("train.output_dir", self.train.output_dir),
                 ("checkpoint.dir", self.checkpoint.dir), ("export.adapter_dir", self.export.adapter_dir),
                 ("export.merged_dir", self.export.merged_dir)]
        for key, value in paths:
            if isinstance(value, str) and "://" in value:
                raise ConfigError(f"{key}: {value} is a URL; fxjax reads and writes local paths only (mount the "
                                  f"bucket, e.g. with gcsfuse, and give the mounted path)")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **sections):
        """A copy with `sections` replaced, each by its section's dataclass or by a mapping of some of its keys
        (merged into the section as it is: `cfg.replace(train={"steps": 5})` keeps train's other keys; it had
        replaced the whole section with the dict, its output_dir then the default). Checked where it runs
        (run_sft / run_grpo check a config built in code as a YAML one)."""
        merged = {name: dataclasses.replace(getattr(self, name), **value) if isinstance(value, Mapping) else value
                  for name, value in sections.items()}
        return dataclasses.replace(self, **merged)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.output_dir) / "checkpoints"

    @property
    def tokenizer(self) -> str:
        """data.tokenizer, else model.path; a run started from another run (model.from_run, neither set) has
        that run's, followed run to run (GRPO from a GRPO run from an SFT run)."""
        tok = self.data.tokenizer or self.model.path
        if tok is None:
            tok = next((t for c in from_run_chain(self) if (t := c.data.tokenizer or c.model.path)), None)
        if tok is None:
            raise ConfigError("data.tokenizer: a preset model has no tokenizer; give a directory with tokenizer.json")
        return tok


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    """The `fxjax sft` config: the run sections (configs/sft.yaml lists every key)."""

    def validate(self) -> "SFTConfig":
        self.validate_sections()
        return self


def from_dict(data: Mapping[str, Any]) -> SFTConfig:
    """A plain mapping (parsed YAML, sections as keys) -> validated SFTConfig (a leading ~ of a path is the
    home folder, as in a file `load_sft_config` reads)."""
    return build_config(SFTConfig, expand_home(dict(data)) if isinstance(data, Mapping) else data, "").validate()


# ---- --set overrides ------------------------------------------------------------------------------

# Keys of which a config sets one at most: a --set of one (to a value other than null) clears the others
# unless they are --set too, so an override replaces the file's choice instead of clashing with it.
EXCLUSIVE_KEYS: tuple[tuple[str, ...], ...] = (
    ("train.steps", "train.epochs"),
    ("model.path", "model.preset"),
)
# The same for the keys of a list's items (a GRPO stage takes steps or epochs): `--set stages[1].epochs=1`
# clears that stage's steps.
EXCLUSIVE_ITEM_KEYS: tuple[tuple[str, ...], ...] = (("steps", "epochs"),)
# key -> the key its null value stands for (data.tokenizer: null means model.path's tokenizer). When an
# override changes the latter alone, the former keeps meaning the same thing: one that named the old model
# follows the new one (becomes null), and a null one whose source is cleared keeps the old value.
DEFAULTS_TO: dict[str, str] = {"data.tokenizer": "model.path"}
# key -> the key whose run a null value means when that one is set (data.tokenizer: null with model.from_run
# is that run's tokenizer), so clearing DEFAULTS_TO's source then keeps the null.
NULL_FOLLOWS_RUN: dict[str, str] = {"data.tokenizer": "model.from_run"}
# key -> settings that need it: when an override leaves the key empty (null or []), those settings that
# the overrides do not give themselves take these values, which turn the feature off.
OFF_WITHOUT: dict[str, dict[str, Any]] = {"data.eval_files": {"eval.every": 0, "eval.at_start": False}}


_INDEXED = re.compile(r"(\w+)\[(\d+)\]")


def _split_part(part: str) -> tuple[str, int | None]:
    """One part of a dotted key: `stages` -> ("stages", None), `stages[1]` -> ("stages", 1)."""
    m = _INDEXED.fullmatch(part)
    return (m.group(1), int(m.group(2))) if m else (part, None)


def _section_class(parts: Sequence[str], key: str, root=None):
    """The dataclass that holds the last part of a dotted key (`stages[1].steps`: an element of a list of
    sections); ConfigError naming the valid keys if unknown."""
    cls = root or SFTConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[:i + 1])
        name, index = _split_part(part)
        names = [f.name for f in dataclasses.fields(cls)]
        if name not in names:
            section = ".".join(parts[:i])
            said = unknown_key_hint(root or SFTConfig, section, name, names)  # (what a config file's key is told)
            raise ConfigError(f"{where}: unknown key (in --set {key}=...{'; ' + said if said else ''}); "
                              f"{section or 'the config'} takes {names}")
        hint = typing.get_type_hints(cls)[name]
        if index is not None:
            item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
            if not dataclasses.is_dataclass(item):
                raise ConfigError(f"{where}: {name} is not a list of sections ({type_name(hint)}); cannot set {key}")
            hint = item
        if i == len(parts) - 1:
            return cls
        cls = hint
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: is not a section (a value: {type_name(cls)}); cannot set {key}")
    raise AssertionError("unreachable")  # pragma: no cover


def _get_dotted(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        name, index = _split_part(part)
        if not isinstance(node, Mapping):
            return None
        node = node.get(name)
        if index is not None:
            node = node[index] if isinstance(node, list) and index < len(node) else None
    return node


def _default_items(holder, name: str) -> list | None:
    """The default of the list of sections `name` of the dataclass `holder`, as plain mappings."""
    f = next(f for f in dataclasses.fields(holder) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return to_plain(f.default_factory())
    return None if f.default is dataclasses.MISSING else to_plain(f.default)


def _set_dotted(data: dict, key: str, value: Any, root=None) -> None:
    parts = key.split(".")
    _section_class(parts, key, root)
    node = data
    for i, part in enumerate(parts):
        name, index = _split_part(part)
        last = i == len(parts) - 1
        if index is None:
            if last:
                node[name] = value
                return
            child = node.get(name)
            if child is None:
                child = node[name] = {}
        else:  # an element of a list the config gives (`stages[1]`): the list must hold it
            items = node.get(name)
            if items is None:  # not in the file: the list's default (GRPO's alpha, beta, gamma)
                items = node[name] = _default_items(_section_class(parts[:i + 1], key, root), name)
            if not isinstance(items, list) or index >= len(items):
                count = len(items) if isinstance(items, list) else 0
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: the config's {name} list has {count} item(s)"
                                  + (f" ({name}[0] to {name}[{count - 1}])" if count else "")
                                  + f"; to set the whole list: --set '{name}=[...]'")
            if last:
                items[index] = value
                return
            child = items[index]
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a mapping, got {child!r}")
        node = child


def _parse_override(item: str, root=None) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.learning_rate=2e-4)")
    parts = key.split(".")
    holder = _section_class(parts, key, root)
    text = raw.strip()
    if _takes_text(holder, _split_part(parts[-1])[0]) and text not in ("", "null", "Null", "NULL", "~") and text[0] not in "'\"":
        # a string key takes the text as written: YAML would cut a prompt at " #" (a comment) and turn
        # 2025-01-01 into a date; quote the value to have it read as YAML
        return key, text
    try:
        value = load_yaml(raw) if text else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({err})") from None
    return key, value


def _takes_text(holder, name: str) -> bool:
    """Whether the key `name` of the dataclass `holder` is a string (or a string or null)."""
    if not dataclasses.is_dataclass(holder):
        return False
    hint = typing.get_type_hints(holder).get(name)
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and set(typing.get_args(hint)) == {str, type(None)})


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, str)) and not value)


def apply_overrides(data: Mapping[str, Any] | None, overrides: Sequence[str],
                    notes: list[str] | None = None, root=None) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a parsed config mapping (copied).

    Besides the keys given, an override changes the keys that go with it (EXCLUSIVE_KEYS, DEFAULTS_TO,
    OFF_WITHOUT); each such change is appended to `notes` as a sentence naming the keys."""
    import copy

    before = copy.deepcopy(dict(data or {}))
    out = copy.deepcopy(before)
    parsed = [_parse_override(item, root) for item in overrides]
    given = {key: value for key, value in parsed}  # the last --set of a key wins
    notes = notes if notes is not None else []

    def derive(key: str, value: Any, why: str) -> None:
        old = _get_dotted(out, key)
        if old != value:
            _set_dotted(out, key, value, root)
            notes.append(f"{key}: {as_written(old)} -> {as_written(value)} ({why})")

    for key, value in parsed:
        _set_dotted(out, key, value, root)
    for group in EXCLUSIVE_KEYS:
        chosen = [k for k in group if k in given and given[k] is not None]
        for key in chosen[:1]:
            for other in group:
                if other not in given:
                    derive(other, None, f"--set {key} replaces it")
    for key, value in given.items():  # the same within a list's item: stages[1].steps replaces its epochs
        prefix, _, name = key.rpartition(".")
        group = next((g for g in EXCLUSIVE_ITEM_KEYS if name in g), ())
        if _INDEXED.search(prefix) and value is not None:
            for other in group:
                if other != name and f"{prefix}.{other}" not in given:
                    derive(f"{prefix}.{other}", None, f"--set {key} replaces it")
    for key, source in DEFAULTS_TO.items():
        if key in given or _get_dotted(before, source) == _get_dotted(out, source):
            continue
        old_key, old_source = _get_dotted(before, key), _get_dotted(before, source)
        # (a key that named the old source stays when the overrides cleared the source, e.g. for a preset)
        if old_key is not None and old_key == old_source and _get_dotted(out, source) is not None:
            derive(key, None, f"it named the old {source}; null follows the new {source}")
        elif old_key is None and old_source is not None and _get_dotted(out, source) is None \
                and _get_dotted(out, NULL_FOLLOWS_RUN.get(key, "")) is None:
            derive(key, old_source, f"null meant {source}, which the overrides cleared")
    for key, dependents in OFF_WITHOUT.items():
        if key in given and _empty(given[key]):
            for dependent, off in dependents.items():
                if dependent not in given:
                    derive(dependent, off, f"--set {key}={as_written(given[key])} leaves nothing for it; "
                                           f"--set {dependent} to choose")
    return out


def shipped_run_configs() -> dict[str, Path]:
    """The run configs fxjax ships (its configs/ folder, installed as fxjax/configs): name -> file, e.g. "sft",
    "grpo", "recipes/paper_3b_sft" (the model presets and reward stages are not run configs)."""
    from fxjax.presets import CONFIG_DIR

    return {p.relative_to(CONFIG_DIR).with_suffix("").as_posix(): p
            for p in sorted(CONFIG_DIR.rglob("*.yaml")) if p.parent.name != "models" and p.name != "rewards.yaml"}


def config_read(path: str | Path) -> str:
    """Which file `--config path` read, where the name was not the file's path: "the config fxjax ships,
    FILE" or "read FILE" (a file of yours named after a shipped config wins); "" where it was."""
    from fxjax.presets import CONFIG_DIR

    read = config_file(path)
    if read == Path(path):
        return ""
    return f"the config fxjax ships, {read}" if CONFIG_DIR in read.parents else f"read {read}"


def config_file(path: str | Path) -> Path:
    """The file `--config` names: a path, else the name of a shipped run config (`--config sft`, `--config
    recipes/paper_3b_sft`, or its path in the repository, `configs/sft.yaml`: usable where the repository's
    configs/ is not, after `pip install`); a missing one is an error listing the shipped names."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix != ".yaml" and p.with_name(p.name + ".yaml").is_file():  # (your ./sft.yaml before fxjax's sft)
        return p.with_name(p.name + ".yaml")
    shipped = shipped_run_configs()
    name = str(path).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    # configs/sft.yaml, as the README and --help write it, where the repository's configs/ is not (pip install)
    if name.startswith("configs/") and name.removeprefix("configs/") in shipped and not p.exists():
        return shipped[name.removeprefix("configs/")]
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give the YAML file")
    raise ConfigError(f"config file {p} not found (from {Path.cwd()}); or name one that fxjax ships: "
                      + ", ".join(f"--config {n}" for n in shipped))


def read_yaml_config(path: str | Path | None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parsed top-level mapping of a config file (merged over `base`; `config_file`: a path or a shipped
    config's name); errors name the file."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = config_file(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory; give the YAML file")
        try:
            loaded = load_yaml(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: invalid YAML ({err})") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start}); a config is a YAML file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data.update(loaded or {})
    return data


def load_config_as(cls, path: str | Path | None = None, overrides: Sequence[str] = (),
                   base: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None):
    """YAML file (optional) + ``key=value`` overrides -> a validated config of dataclass `cls` (SFTConfig,
    GRPOConfig): one loader for every run config."""
    read = config_file(path) if path is not None else None
    data = read_yaml_config(read, base)
    notes: list[str] = []
    if read is not None and read != Path(path):
        notes.append(f"--config {path}: {config_read(path)}")
    resolved = expand_home(apply_overrides(data, overrides, notes, root=cls))
    for note in notes:
        (log or _logger.info)(f"note: {note}")
    return build_config(cls, resolved, "").validate()


def load_sft_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                    base: Mapping[str, Any] | None = None,
                    log: Callable[[str], None] | None = None) -> SFTConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated SFTConfig.

    Relative paths in the file stay as written (relative to the working directory). `log` receives a
    note for each key an override changed besides the keys it names (default: the logging module).
    """
    return load_config_as(SFTConfig, path, overrides, base=base, log=log)
