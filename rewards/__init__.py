"""Rewards for GRPO on grounded AI-generated-image detection (docs/format.md, docs/rewards.md).

    from fxjax import rewards
    out = rewards.score(completions, targets, stage="alpha")   # numpy arrays keyed total/format/label/iou

Parsing stays on the host (output_format); the numbers are one jitted, vectorised function (reward_math).
This package imports nothing else of fxjax.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use (PEP 562): the parsing needs no jax, so `fxjax data check` and `--help` do not load it.
_EXPORTS = {
    **dict.fromkeys(("LABELS", "ParsedCompletion", "format_ok", "parse_box", "parse_completion", "render_completion",
                     "render_scaled_completion", "scale_boxes"), "output_format"),
    **dict.fromkeys(("box_iou", "reward_core"), "reward_math"),
    **dict.fromkeys(("next_power_of_two", "prepare_batch", "score"), "scoring"),
    **dict.fromkeys(("RewardWeights", "continuous_weights", "load_config", "load_stage"), "stages"),
}

__all__ = ["LABELS", "ParsedCompletion", "RewardWeights", "box_iou", "continuous_weights", "format_ok",
           "load_config", "load_stage", "next_power_of_two", "parse_box", "parse_completion", "prepare_batch", "render_completion",
           "render_scaled_completion", "reward_core", "scale_boxes", "score"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:  # the public names and submodules, not this module's own imports (as fxjax's)
    return sorted({name for name in globals() if not name.startswith("_")
                   and name not in ("annotations", "importlib", "Any")} | set(__all__))
