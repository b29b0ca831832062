"""A GRPO run that learns nothing, said while it runs.

A group whose G completions all get the same reward has advantages of 0 and adds nothing to the gradient;
when every group of a step is such a group, the step trains on nothing. From a start that has not learned
the answer format (a fresh LoRA on the base model, a short SFT), every completion runs to
grpo.max_completion_length, fails the format and scores the same, step after step: the run spent its
hours learning nothing, and only a panel of its report showed it. This watch says so in the log after
`QUIET_STEPS` such steps in a row, once a streak.
"""

from __future__ import annotations

from typing import Callable, Mapping

__all__ = ["QUIET_STEPS", "SignalWatch"]

QUIET_STEPS = 5  # steps in a row with no group of differing rewards before the log says so


class SignalWatch:
    """`after_step(step, values)` with each step's logged values (zero_std_group_fraction, truncated_fraction)."""

    def __init__(self, say: Callable[[str], None], steps: int = QUIET_STEPS):
        self.say, self.steps = say, steps
        self._streak: list[tuple[int, float]] = []  # (step, truncated fraction) of the quiet steps in a row

    def after_step(self, step: int, values: Mapping[str, float]) -> None:
        if not values["zero_std_group_fraction"] >= 1.0:  # (NaN: no group at all; never quiet)
            self._streak = []
            return
        self._streak.append((step, float(values.get("truncated_fraction", 0.0))))
        if len(self._streak) != self.steps:
            return
        first, last = self._streak[0][0], self._streak[-1][0]
        truncated = all(t >= 1.0 for _, t in self._streak)
        why = (" every completion ran to grpo.max_completion_length (truncated_fraction 1.0): the policy has not "
               "learned the answer format; start GRPO from an SFT run that has (model.from_run, or model.adapter), "
               "or give SFT more steps" if truncated else
               " either the policy answers these prompts alike, right or wrong, and has nothing left to learn from "
               "them, or its samples are too alike to compare (grpo.temperature, grpo.num_generations), or the "
               "rewards cannot tell them apart (docs/rewards.md)")
        self.say(f"grpo: warning: steps {first}-{last}: in every group the completions got equal rewards "
                 f"(zero_std_group_fraction 1.0), so these updates had no reward signal (at most the KL term's pull, "
                 f"grpo.beta);{why}")
