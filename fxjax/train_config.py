"""The SFT run configuration: YAML mapped onto typed, frozen dataclasses.

    cfg = load_sft_config("configs/recipes/paper_3b_sft.yaml",
                          overrides=["model.path=/models/Qwen2.5-VL-3B-Instruct", "train.steps=100"])
    cfg.train.epochs          # None: the --set of train.steps replaced the recipe's 3 epochs
    cfg.to_dict()             # the resolved config (what a checkpoint records)

Every section is a frozen dataclass. Loading is strict: an unknown key, a value of the wrong type or a
value outside its allowed choices is a `ConfigError` that names the key by its dotted path
(``optim.learning_rate: expected a number, got 'fast'``). ``--set key=value`` overrides parse the value
as a YAML scalar/list (``train.steps=20``, ``data.train_files=[a.jsonl, b.jsonl]``, ``lora=null``).

An override replaces what the file chose, keys that go with it included (the tables below, as data):
``--set train.steps=1000`` over a file with ``train.epochs: 3`` clears ``train.epochs`` (EXCLUSIVE_KEYS);
``--set model.path=DIR`` lets a ``data.tokenizer`` that named the old model follow the new one
(DEFAULTS_TO); ``--set data.eval_files=[]`` turns periodic evaluation off (OFF_WITHOUT). Each such
consequence is reported as a note (``load_sft_config(..., log=print)``).

This module imports nothing of train/ (the dependency points the other way).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DEFAULTS_TO",
    "DistributedSection",
    "EXCLUSIVE_KEYS",
    "EvalSection",
    "ExportSection",
    "LoRASection",
    "MeshSection",
    "ModelSection",
    "OFF_WITHOUT",
    "OptimSection",
    "REMAT_POLICIES",
    "SFTConfig",
    "TrainSection",
    "apply_overrides",
    "from_dict",
    "load_sft_config",
]


class ConfigError(ValueError):
    """A config value that is unknown, mistyped or out of range; the message starts with its dotted key."""


# Names accepted by model.remat / model.remat_vision (see train.remat).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclass(frozen=True)
class ModelSection:
    """The base model: an HF checkpoint directory (`path`) or a preset with random init (`preset`)."""

    path: str | None = None  # HF Qwen2.5-VL directory (config.json + safetensors)
    preset: str | None = None  # tiny, 3b, 7b, 32b, 72b or a preset YAML; random init with init_seed
    init_seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] | None = None  # base weights' storage dtype (default: dtype)
    remat: str = "full"  # rematerialisation policy of the decoder layers (REMAT_POLICIES)
    remat_vision: str | None = None  # ... of the vision blocks (default: the same as remat)
    # attention kernel (fxjax.model.attention): auto = splash on TPU, cudnn on an NVIDIA GPU in bfloat16, else xla
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # decoder layers stacked and run under scan (fxjax.model.scan): compile time independent of depth; the
    # same numbers, checkpoints and adapters as the loop (false)
    scan_layers: bool = False
    adapter: str | None = None  # start from this PEFT adapter directory instead of fresh LoRA weights
    from_run: str | None = None  # or from a fxjax run directory (e.g. the SFT run): its base model and LoRA
    from_run_step: int | None = None  # ... at this step (null: its newest checkpoint)

    def validate(self, where: str) -> None:
        if self.from_run is not None:
            if self.adapter is not None:
                raise ConfigError(f"{where}.from_run: starts from that run's LoRA; set {where}.adapter=null")
            if self.path is not None or self.preset is not None:
                raise ConfigError(f"{where}.from_run: the base model is that run's; set {where}.path=null and "
                                  f"{where}.preset=null")
        elif (self.path is None) == (self.preset is None):
            raise ConfigError(f"{where}: set exactly one of model.path (an HF checkpoint directory), model.preset "
                              f"(random init) and model.from_run (a fxjax run directory)")
        elif self.from_run_step is not None:
            raise ConfigError(f"{where}.from_run_step: only with {where}.from_run")
        for name in ("remat", "remat_vision"):
            value = getattr(self, name)
            if value is not None and value not in REMAT_POLICIES:
                raise ConfigError(f"{where}.{name}: must be one of {list(REMAT_POLICIES)}, got {value!r}")


@dataclass(frozen=True)
class LoRASection:
    """LoRA adapters (model.lora.LoRAConfig); enabled = false trains nothing but is refused by `sft`."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    use_rslora: bool = False
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    init_seed: int = 0  # seed of the A matrices

    def validate(self, where: str) -> None:
        _positive(self.rank, f"{where}.rank")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class MeshSection:
    """Device mesh axis sizes (fxjax.sharding.MeshConfig); one may be -1 (the rest of the devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Of data / fsdp, the factor that crosses TPU slices (multislice) or GPU hosts over the slow network;
    # data / dcn_data and fsdp / dcn_fsdp devices stay on the fast interconnect. 1: nothing crosses.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    # A global batch that does not divide over data x fsdp is an error; true replicates it on every batch
    # device instead (each computes the whole batch: wasted hardware, warned on every run).
    allow_replicated_batch: bool = False


@dataclass(frozen=True)
class DistributedSection:
    """Multi-process start-up (fxjax.distributed); unset values come from FXJAX_* / JAX_* variables."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None


@dataclass(frozen=True)
class DataSection:
    """Training/eval data; most fields pass through to fxjax.data.DataConfig."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    tokenizer: str | None = None  # directory with tokenizer.json (null: model.path; a preset needs one)
    root: str | None = None
    allow_absolute_paths: bool = False  # accept absolute image paths in the records (a dataset you trust)
    format: Literal["auto", "native", "swift"] = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    check_decode: bool = True
    min_pixels: int = 3136
    max_pixels: int = 12845056
    max_length: int = 8192
    length_buckets: tuple[int, ...] = ()
    long_samples: Literal["truncate", "drop"] = "truncate"
    prompts: Literal["auto", "templates", "record"] = "auto"
    system_prompt: str | None = None
    batch_size: int = 1  # global micro-batch (examples per forward pass, all processes together)
    shuffle: bool = True
    seed: int = 0
    worker_count: int = 0
    read_threads: int = 2
    prefetch_buffer_size: int = 8

    def validate(self, where: str) -> None:
        if not self.train_files:
            raise ConfigError(f"{where}.train_files: give at least one JSONL file")
        for name in ("min_pixels", "max_pixels", "max_length", "batch_size"):
            _positive(getattr(self, name), f"{where}.{name}")


@dataclass(frozen=True)
class OptimSection:
    """optax AdamW with linear warmup then cosine (or constant / linear) decay, global-norm clipping and
    gradient accumulation (grad_accum micro-batches per update, scanned inside the one jitted step)."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05  # of the total steps (ignored when warmup_steps is set)
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0  # the decay ends at learning_rate * min_lr_ratio
    max_grad_norm: float | None = 1.0  # None: no clipping
    grad_accum: int = 1

    def validate(self, where: str) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"{where}.learning_rate: must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"{where}.max_grad_norm: must be positive or null, got {self.max_grad_norm}")
        _positive(self.grad_accum, f"{where}.grad_accum")


@dataclass(frozen=True)
class TrainSection:
    steps: int | None = None  # optimiser updates; or give epochs
    epochs: float | None = None  # passes over train_files (rounded up to whole updates)
    seed: int = 0  # dropout and anything else random in the step
    loss_chunk: int = 256  # target tokens per lm_head chunk of the cross-entropy
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip the update
    output_dir: str = "runs/sft"
    log_every: int = 1  # metrics.jsonl / progress bar interval (steps)
    progress_bar: bool = True
    tensorboard: bool = True  # write TensorBoard events when a writer is installed

    def validate(self, where: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"{where}: set exactly one of train.steps and train.epochs")
        if self.steps is not None:
            _positive(self.steps, f"{where}.steps")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"{where}.epochs: must be positive, got {self.epochs}")
        _positive(self.loss_chunk, f"{where}.loss_chunk")
        _positive(self.log_every, f"{where}.log_every")


@dataclass(frozen=True)
class CheckpointSection:
    dir: str | None = None  # default: <train.output_dir>/checkpoints
    every: int = 500  # save every N steps (and always at the end); 0: only at the end
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True
    resume: bool = True  # continue from the latest checkpoint in dir when there is one

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be >= 0, got {self.every}")
        _positive(self.keep, f"{where}.keep")


@dataclass(frozen=True)
class EvalSection:
    every: int = 0  # evaluate every N steps (0: only at_start / at_end)
    at_start: bool = False
    at_end: bool = True
    max_examples: int | None = None  # first N held-out examples (None: all)
    batch_size: int = 8
    generate: bool = True  # greedy decoding -> format rate, verdict accuracy, mean IoU
    max_new_tokens: int = 512

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be >= 0, got {self.every}")
        _positive(self.batch_size, f"{where}.batch_size")
        _positive(self.max_new_tokens, f"{where}.max_new_tokens")


@dataclass(frozen=True)
class ExportSection:
    merged_dir: str | None = None  # write base + LoRA merged as an HF checkpoint at the end
    adapter_dir: str | None = None  # write the LoRA adapter as a PEFT adapter directory at the end


def _run_start(run: str, step: int | None):
    """(config, step) of the run a `model.from_run` config starts from (reads its saved config only)."""
    from fxjax.run_files import checkpoint_dir_of, resolve_step

    step, cfg, _ = resolve_step(checkpoint_dir_of(run), step)
    return cfg, step


@dataclass(frozen=True)
class RunConfig:
    """The sections every run config has (SFTConfig; fxjax.grpo_config.GRPOConfig adds `grpo` and `stages`),
    their checks section by section and across sections, the plain dict, and the derived paths."""

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
        if self.model.preset is not None and self.data.tokenizer is None:
            raise ConfigError(f"data.tokenizer: a preset model (model.preset={self.model.preset}) has no "
                              f"tokenizer; set data.tokenizer to a directory with tokenizer.json")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def replace(self, **sections):
        return dataclasses.replace(self, **sections)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.output_dir) / "checkpoints"

    @property
    def tokenizer(self) -> str:
        tok = self.data.tokenizer or self.model.path
        if tok is None and self.model.from_run is not None:
            from_run = _run_start(self.model.from_run, self.model.from_run_step)[0]
            tok = from_run.data.tokenizer or from_run.model.path
        if tok is None:
            raise ConfigError("data.tokenizer: a preset model has no tokenizer; give a directory with tokenizer.json")
        return tok


@dataclass(frozen=True)
class SFTConfig(RunConfig):
    """The `fxjax sft` config: the run sections (configs/sft.yaml lists every key)."""

    def validate(self) -> "SFTConfig":
        self.validate_sections()
        return self


# ---- strict typed mapping --------------------------------------------------------------------------

_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _positive(value, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _type_name(item))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


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
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
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
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key; {where or 'the config'} takes {names}")
    # null for a list-valued key is the empty list (a YAML `key:` with nothing after it reads as null).
    values = {k: () if v is None and typing.get_origin(hints[k]) is tuple
              else _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from None


def _to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def from_dict(data: Mapping[str, Any]) -> SFTConfig:
    """A plain mapping (parsed YAML) -> validated SFTConfig."""
    return _build(SFTConfig, data, "").validate()


# ---- --set overrides ------------------------------------------------------------------------------

# Keys of which a config sets one at most: a --set of one (to a value other than null) clears the others
# unless they are --set too, so an override replaces the file's choice instead of clashing with it.
EXCLUSIVE_KEYS: tuple[tuple[str, ...], ...] = (
    ("train.steps", "train.epochs"),
    ("model.path", "model.preset"),
)
# key -> the key its null value stands for (data.tokenizer: null means model.path's tokenizer). When an
# override changes the latter alone, the former keeps meaning the same thing: one that named the old model
# follows the new one (becomes null), and a null one whose source is cleared keeps the old value.
DEFAULTS_TO: dict[str, str] = {"data.tokenizer": "model.path"}
# key -> settings that need it: when an override leaves the key empty (null or []), those settings that
# the overrides do not give themselves take these values, which turn the feature off.
OFF_WITHOUT: dict[str, dict[str, Any]] = {"data.eval_files": {"eval.every": 0}}


def _section_class(parts: Sequence[str], key: str, root=None):
    """The dataclass that holds the last part of a dotted key; ConfigError naming the valid keys if unknown."""
    cls = root or SFTConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[:i + 1])
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            section = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"{where}: unknown key (in --set {key}=...); {section} takes {names}")
        if i == len(parts) - 1:
            return cls
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: is not a section (a value: {_type_name(cls)}); cannot set {key}")
    raise AssertionError("unreachable")  # pragma: no cover


def _get_dotted(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _set_dotted(data: dict, key: str, value: Any, root=None) -> None:
    parts = key.split(".")
    _section_class(parts, key, root)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a mapping, got {child!r}")
        node = child
    node[parts[-1]] = value


def _parse_override(item: str, root=None) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.learning_rate=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({err})") from None
    _section_class(key.split("."), key, root)
    return key, value


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
            notes.append(f"{key}: {_show(old)} -> {_show(value)} ({why})")

    for key, value in parsed:
        _set_dotted(out, key, value, root)
    for group in EXCLUSIVE_KEYS:
        chosen = [k for k in group if k in given and given[k] is not None]
        for key in chosen[:1]:
            for other in group:
                if other not in given:
                    derive(other, None, f"--set {key} replaces it")
    for key, source in DEFAULTS_TO.items():
        if key in given or _get_dotted(before, source) == _get_dotted(out, source):
            continue
        old_key, old_source = _get_dotted(before, key), _get_dotted(before, source)
        if old_key is not None and old_key == old_source:
            derive(key, None, f"it named the old {source}; null follows the new {source}")
        elif old_key is None and old_source is not None and _get_dotted(out, source) is None:
            derive(key, old_source, f"null meant {source}, which the overrides cleared")
    for key, dependents in OFF_WITHOUT.items():
        if key in given and _empty(given[key]):
            for dependent, off in dependents.items():
                if dependent not in given:
                    derive(dependent, off, f"--set {key}={_show(given[key])} leaves nothing for it; "
                                           f"--set {dependent} to choose")
    return out


def _show(value: Any) -> str:
    """A value as one would write it after --set key=."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def read_yaml_config(path: str | Path | None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parsed top-level mapping of a config file (merged over `base`); errors name the file."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: invalid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data.update(loaded or {})
    return data


def load_config_as(cls, path: str | Path | None = None, overrides: Sequence[str] = (),
                   base: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None):
    """YAML file (optional) + ``key=value`` overrides -> a validated config of dataclass `cls` (SFTConfig,
    GRPOConfig): one loader for every run config."""
    data = read_yaml_config(path, base)
    notes: list[str] = []
    resolved = apply_overrides(data, overrides, notes, root=cls)
    for note in notes:
        (log or _logger.info)(f"note: {note}")
    return _build(cls, resolved, "").validate()


def load_sft_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                    base: Mapping[str, Any] | None = None,
                    log: Callable[[str], None] | None = None) -> SFTConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated SFTConfig.

    Relative paths in the file stay as written (relative to the working directory). `log` receives a
    note for each key an override changed besides the keys it names (default: the logging module).
    """
    return load_config_as(SFTConfig, path, overrides, base=base, log=log)
