"""Rewards for GRPO on grounded AI-generated-image detection (docs/format.md, docs/rewards.md).

    from fxjax import rewards
    out = rewards.score(completions, targets, stage="alpha")   # numpy arrays keyed total/format/label/iou

Parsing stays on the host (output_format); the numbers are one jitted, vectorised function (reward_math).
This package imports nothing else of fxjax.
"""

from .output_format import (LABELS, ParsedCompletion, format_ok, parse_box, parse_completion, render_completion,
                            render_scaled_completion, scale_boxes)
from .reward_math import box_iou, reward_core
from .scoring import next_power_of_two, prepare_batch, score
from .stages import RewardWeights, continuous_weights, load_config, load_stage

__all__ = ["LABELS", "ParsedCompletion", "RewardWeights", "box_iou", "continuous_weights", "format_ok",
           "load_config", "load_stage", "next_power_of_two", "parse_box", "parse_completion", "prepare_batch", "render_completion",
           "render_scaled_completion", "reward_core", "scale_boxes", "score"]
