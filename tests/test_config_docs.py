"""The YAML files under configs/ tell the truth: a "defaults" file lists every field of its config class
with the code's default value, and every recipe loads and validates.

A new config is one line in a table below: DEFAULTS for a file that documents a config class's defaults,
RECIPES for a complete run config with the loader that validates it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from fxjax.grpo_config import GRPOConfig, load_grpo_config
from fxjax.train_config import SFTConfig, load_sft_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# file under configs/ -> the config class whose every field (with its default) it documents
DEFAULTS: dict[str, type] = {
    "sft.yaml": SFTConfig,
    "grpo.yaml": GRPOConfig,
}
# file under configs/ -> the loader that must accept it as it is
RECIPES: dict[str, typing.Callable] = {
    "recipes/paper_3b_sft.yaml": load_sft_config,
    "recipes/paper_3b_grpo.yaml": load_grpo_config,
}
# YAML files under configs/ that are neither, and the test that checks them
OTHERS = {
    "rewards.yaml": "tests/test_rewards.py (the reward stage presets)",
    "models/": "tests/test_presets_cli.py (model presets)",
}


def plain(value):
    """A default as YAML writes it: tuples as lists, nested dataclasses as mappings."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def same(documented, default) -> bool:
    if isinstance(default, bool) or isinstance(documented, bool):  # True == 1 in Python; not here
        return type(documented) is type(default) and documented == default
    if isinstance(default, float) and isinstance(documented, int):
        return float(documented) == default  # `alpha: 32` documents 32.0
    return type(documented) is type(default) and documented == default


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def documentation_problems(cls: type, documented, where: str = "", defaults=None) -> list[str]:
    """What a parsed YAML mapping gets wrong about `cls`'s fields and defaults (walks nested dataclasses).

    `defaults`: the instance whose values are the defaults (a section's default as its parent builds it,
    e.g. GRPOConfig's train section with output_dir runs/grpo); None: the class's own field defaults."""
    if not isinstance(documented, dict):
        return [f"{where or 'the file'}: expected a mapping, got {documented!r}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{where}{key}: not a field of {cls.__name__}" for key in sorted(set(documented) - set(fields))]
    for name, field in fields.items():
        key = where + name
        default = default_of(field) if defaults is None else getattr(defaults, name)
        if name not in documented:
            problems.append(f"{key}: missing")
        elif dataclasses.is_dataclass(hints[name]):
            problems += documentation_problems(hints[name], documented[name], key + ".",
                                               None if default is dataclasses.MISSING else default)
        elif default is dataclasses.MISSING:
            problems.append(f"{key}: has no default to document")
        elif not same(documented[name], plain(default)):
            problems.append(f"{key}: documented {documented[name]!r}, the code's default is "
                            f"{plain(default)!r}")
    return problems


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_files_document_every_field_with_its_default(name):
    documented = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    problems = documentation_problems(DEFAULTS[name], documented)
    assert not problems, f"configs/{name} disagrees with {DEFAULTS[name].__name__}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_load_and_validate(name):
    RECIPES[name](CONFIGS / name)


def test_every_yaml_under_configs_is_checked():
    covered = set(DEFAULTS) | set(RECIPES)
    for path in sorted(CONFIGS.rglob("*.y*ml")):
        rel = path.relative_to(CONFIGS).as_posix()
        assert rel in covered or any(rel == o or (o.endswith("/") and rel.startswith(o)) for o in OTHERS), \
            f"configs/{rel} is in no table of {__file__}: add it to DEFAULTS, RECIPES or OTHERS"


@dataclasses.dataclass(frozen=True)
class Inner:
    n: int = 3
    flag: bool = False


@dataclasses.dataclass(frozen=True)
class Outer:
    rate: float = 1e-4
    files: tuple[str, ...] = ()
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_the_walker_finds_what_a_file_gets_wrong():
    def check(text: str) -> list[str]:
        return documentation_problems(Outer, yaml.safe_load(text))

    assert check("rate: 1.0e-4\nfiles: []\ninner: {n: 3, flag: false}") == []
    assert check("rate: 1e-4\nfiles: [a]\ninner: {n: 3, flag: 0, x: 1}") == [
        "rate: documented '1e-4', the code's default is 0.0001",  # YAML 1.1 reads 1e-4 as a string
        "files: documented ['a'], the code's default is []",
        "inner.x: not a field of Inner",
        "inner.flag: documented 0, the code's default is False",
    ]
    assert check("rate: 1.0e-4\ninner:") == ["files: missing", "inner.: expected a mapping, got None"]
