"""What `fxjax report` draws of a run: its panels, each a title, a y label and the metrics.jsonl keys it
plots (`fxjax.commands.report` draws them). SFT and GRPO have fixed panels; a GRPO run's reward terms of
the user's own (grpo.reward_funcs, logged as `reward/<name>_mean` beside `weights/<name>`) get a panel of
their own, found in the records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["GRPO_PANELS", "Line", "Panel", "SFT_PANELS", "STEP_LABELS", "own_terms_panel", "panels_for"]


@dataclass(frozen=True)
class Line:
    kind: str  # "train" or "eval"
    key: str
    label: str
    smooth: bool = True  # train series: thin raw line + thick moving average


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    unit_interval: bool = False  # values in [0, 1]: fixed y range
    log_scale: bool = False  # a logarithmic y axis when the values are positive and span more than 20x
    # when every value is 0 the panel says nothing: left out, and named in the subtitle with this reason
    when_all_zero: str | None = None
    timing: bool = False  # wall-clock values: they differ from run to run (a report can leave them out)


# GRPO's step is a generation batch, and grpo.num_iterations optimiser updates are made on each
STEP_LABELS = {"sft": "optimiser step", "grpo": "GRPO step (one generation batch)"}

HELD_OUT_LINES = (Line("eval", "format_rate", "format rate"), Line("eval", "verdict_accuracy", "verdict accuracy"),
                  Line("eval", "mean_iou", "mean IoU on generated images"))

SFT_PANELS = (
    Panel("Loss", "cross-entropy (nats / target token)",
          (Line("train", "loss", "training"), Line("eval", "loss", "held-out")), log_scale=True),
    Panel("Learning rate", "learning rate", (Line("train", "learning_rate", "learning rate", smooth=False),)),
    Panel("Gradient norm", "global L2 norm (before clipping)", (Line("train", "grad_norm", "gradient norm"),),
          log_scale=True),
    Panel("Held-out generation (greedy)", "rate, or IoU (0 to 1)", HELD_OUT_LINES, unit_interval=True),
    Panel("Throughput", "tokens / s (prompt and target)", (Line("train", "tokens_per_s", "tokens per second"),),
          timing=True),
)

# The weights of the paper's reward that can change between stages (the *_minus ones are drawn in the
# start's log line; the four here are what a stage's total is made of where every answer is right)
WEIGHT_LINES = (Line("train", "weights/w_iou", "w_iou (x R_G)", smooth=False),
                Line("train", "weights/label_plus", "label_plus (right verdict)", smooth=False),
                Line("train", "weights/format_plus", "format_plus (right format)", smooth=False),
                Line("train", "weights/base", "base", smooth=False))

GRPO_PANELS = (
    Panel("Total reward (its weights change with the stage)", "reward over the step's completions",
          (Line("train", "reward/total_mean", "mean"), Line("train", "reward/total_std", "std"))),
    Panel("Reward components", "mean over the step's completions (0 to 1)",
          (Line("train", "reward/format_mean", "format (= format rate)"),
           Line("train", "reward/label_mean", "label (= verdict accuracy)"),
           Line("train", "reward/iou_relaxed_mean", "IoU term R_G, what w_iou multiplies (real images 1)"),
           Line("train", "reward/iou_mean", "raw matched IoU (real images 1)")), unit_interval=True),
    Panel("Reward weights of the stage", "weight", WEIGHT_LINES),
    Panel("Mean IoU on generated images", "matched IoU of the rollouts (0 to 1)",
          (Line("train", "mean_iou_generated", "mean IoU, generated images"),), unit_interval=True),
    Panel("KL to the base model", "k3 estimate (nats / token)", (Line("train", "kl", "KL"),), log_scale=True),
    Panel("Completion length", "tokens", (Line("train", "completion_length_mean", "mean"),
                                          Line("train", "completion_length_max", "longest", smooth=False))),
    Panel("Groups without signal; truncated completions", "share of the step's groups / completions (0 to 1)",
          (Line("train", "zero_std_group_fraction", "groups whose rewards are all equal (advantage 0)"),
           Line("train", "truncated_fraction", "completions without EOS within max_completion_length")),
          unit_interval=True),
    Panel("Policy entropy", "nats / completion token", (Line("train", "entropy", "mean token entropy"),)),
    Panel("Learning rate", "learning rate", (Line("train", "learning_rate", "learning rate", smooth=False),)),
    Panel("Gradient norm", "global L2 norm (before clipping)", (Line("train", "grad_norm", "gradient norm"),),
          log_scale=True),
    Panel("GRPO loss", "loss (TRL's: the clipped surrogate + beta x KL)", (Line("train", "loss", "loss"),)),
    Panel("Clipped importance ratios", "share of completion tokens (0 to 1)",
          (Line("train", "clip_ratio/region_mean", "clipped (either side)"),
           Line("train", "clip_ratio/low_mean", "below 1 - epsilon"),
           Line("train", "clip_ratio/high_mean", "above 1 + epsilon_high")), unit_interval=True,
          when_all_zero="all 0: nothing clipped, as with grpo.num_iterations 1, where the ratio is 1"),
    Panel("Time per step", "seconds (held-out evaluations and saves not included)",
          (Line("train", "step_time", "step"), Line("train", "rollout_time", "sampling and scoring"),
           Line("train", "update_time", "update(s)")), timing=True),
    Panel("Held-out evaluation (greedy)", "rate, or IoU (0 to 1)", HELD_OUT_LINES, unit_interval=True),
)


def own_terms(records: Sequence[dict]) -> list[str]:
    """The names of the reward terms of the user's own (grpo.reward_funcs) the records log, in the order
    first logged."""
    from fxjax.rewards.scoring import KEYS as SCORE_KEYS  # (not at the top: `fxjax --help` loads no jax)

    names: list[str] = []
    for r in records:
        for key in r:
            if key.startswith("reward/") and key.endswith("_mean"):
                name = key[len("reward/"):-len("_mean")]
                if name not in SCORE_KEYS and name not in names:
                    names.append(name)
    return names


def _last_weight(records: Sequence[dict], name: str) -> float | None:
    values = [r[f"weights/{name}"] for r in records if isinstance(r.get(f"weights/{name}"), (int, float))]
    return float(values[-1]) if values and math.isfinite(values[-1]) else None


def own_terms_panel(records: Sequence[dict]) -> Panel | None:
    """A panel of the raw means of the user's reward terms (None: the run has none), each named with its
    weight (the total gains weight x the mean); their values are the user's, on a scale of their own."""
    lines = []
    for name in own_terms(records):
        weight = _last_weight(records, name)
        lines.append(Line("train", f"reward/{name}_mean", name + ("" if weight is None else f" (weight {weight:g})")))
    if not lines:
        return None
    return Panel("Reward terms of your own (grpo.reward_funcs)", "mean over the step's completions", tuple(lines))


def panels_for(kind: str, records: Sequence[dict]) -> tuple[Panel, ...]:
    """The panels a report of a `kind` ("sft" or "grpo") run may draw (those without values are left out
    by the drawing, and named)."""
    if kind != "grpo":
        return SFT_PANELS
    own = own_terms_panel(records)
    if own is None:
        return GRPO_PANELS
    return (*GRPO_PANELS[:2], own, *GRPO_PANELS[2:])  # (beside the paper's terms)
