"""Model presets: YAML files in configs/models mapped onto the typed model config.

Light to import (no jax): the command line lists the presets in its help and errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fxjax.config_mapping import ConfigError, build_config, load_yaml

if TYPE_CHECKING:
    from fxjax.model.config import Qwen25VLConfig

# fxjax/configs where a wheel ships it, else the repository's configs/ (a checkout or an editable install;
# never another package's top-level configs/ in site-packages). rewards/stages.py finds rewards.yaml the same
# way (it imports nothing of ours).
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = _HERE / "configs" if (_HERE / "configs" / "models").is_dir() else _HERE.parent / "configs"
PRESET_DIR = CONFIG_DIR / "models"


class PresetError(ValueError):
    pass


def preset_names() -> list[str]:
    """The shipped presets, smallest first: named sizes ("3b", "72b") by size after any other name."""

    def order(name: str):
        size = re.fullmatch(r"(\d+(?:\.\d+)?)b", name)
        return (1, float(size.group(1)), name) if size else (0, 0.0, name)

    return sorted((p.stem for p in PRESET_DIR.glob("*.yaml")), key=order)


def config_from_yaml_dict(data: dict[str, Any], where: str) -> Qwen25VLConfig:
    """A preset's mapping -> the model config, every value checked against its field's type (as the run
    configs are: fxjax.config_mapping): `rms_norm_eps: 1e-6`, which YAML reads as a string, becomes a number,
    and a scalar `eos_token_id` is an error naming the key (it went into the model and config.json as given)."""
    from fxjax.model.config import Qwen25VLConfig

    try:
        return build_config(Qwen25VLConfig, data, "")
    except ConfigError as err:
        raise PresetError(f"{where}: {err}") from None


def load_preset(name_or_path: str | Path) -> Qwen25VLConfig:
    """A preset name (tiny, 3b, 7b, 32b, 72b) or a path to a YAML file of the same shape."""
    path = Path(name_or_path)
    named = not path.suffix and len(path.parts) == 1  # a bare name, not a path
    if named:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        what = f"model preset {str(name_or_path)!r} not found" if named else f"{path} does not exist"
        raise PresetError(f"{what}; presets: {', '.join(preset_names())} (or the path of a preset YAML)")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise PresetError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(data, dict) or not data:  # (an empty file read as every default: a 7B-sized model)
        raise PresetError(f"{path}: a model preset is a mapping of the model's settings (vision:, text:, ...), "
                          f"got {'an empty file' if data is None or data == {} else type(data).__name__}")
    run_sections = sorted({"model", "train", "data", "lora", "stages", "grpo"} & set(data))
    if run_sections and not {"vision", "text"} & set(data):  # (`fxjax info configs/sft.yaml`)
        raise PresetError(f"{path}: a run config ({', '.join(run_sections)}), not a model preset (vision:, text:, "
                          "...): describe its model by its model.path or model.preset")
    return config_from_yaml_dict(data, str(path))
