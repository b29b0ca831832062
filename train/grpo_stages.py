"""The reward stages of a GRPO run: the weights each sampling step scores with, and what the start says
of them (each stage's reward, weights that are probably a slip, settings that run otherwise than they read).

Stages follow `stages` in order (alpha, beta, gamma by default, each for its steps or epochs); with
`grpo.schedule=continuous` the reward config's continuous section gives w_iou(t) over train.steps
(`fxjax.rewards.stages`, ../shared/REFERENCE.md)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from fxjax import rewards
from fxjax.config_mapping import ConfigError, dotted_keys
from fxjax.grpo_config import GRPOConfig, read_reward_config
from fxjax.rewards.stages import ConfigLike
from fxjax.train.reward_funcs import load_reward_funcs
from fxjax.train.run_setup import evaluates

__all__ = ["reward_record", "say_stage_weights", "stage_weights", "stages_in_steps", "trained_stage_ends",
           "weights_metrics"]


def stage_weights(cfg: GRPOConfig, step: int, reward_config: ConfigLike = None) -> tuple[str, rewards.RewardWeights]:
    """(stage name, reward weights) of the sampling step numbered `step` (0-based; its num_iterations updates
    share them), from `reward_config` (a run's values read at its start; None: the file grpo.reward_config
    names, read now)."""
    config = cfg.grpo.reward_config if reward_config is None else reward_config
    if cfg.grpo.schedule == "continuous":
        return "continuous", rewards.continuous_weights(step, cfg.total_steps, config)
    _, stage = cfg.stage_at(step)
    return stage.name, rewards.load_stage(stage.name, config)


def trained_stage_ends(recorded: Sequence[tuple[str, int]] | None, planned: Sequence[tuple[str, int]],
                       resumed_at: int, say: Callable[[str], None]) -> list[tuple[str, int]]:
    """The stage ends a run resumed at step `resumed_at` records in its checkpoints: those its checkpoint
    `recorded` up to that step (the stages those steps were trained under, whatever this config calls them:
    a resume that renamed them put the new names on checkpoints trained under the old, and `--step gamma`
    picked the model that had finished alpha), then this config's `planned` ones after it."""
    if recorded is None:
        return list(planned)
    done = [(name, end) for name, end in recorded if end <= resumed_at]
    if done != [(name, end) for name, end in planned if end <= resumed_at]:
        say(f"warning: the stages ended by step {resumed_at} keep the names and ends they were trained under "
            f"({', '.join(f'{n} at step {e}' for n, e in done) or 'none'}), whatever the stages list now says; "
            "fxjax eval, detect and export's --step STAGE find them so")
    return done + [(name, end) for name, end in planned if end > resumed_at]


def reward_record(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A reward config's values (`rewards.load_config`) as flat dotted keys (`stages.beta.w_iou: 1.5`): what
    each GRPO checkpoint records as its config's `rewards` section, so that a resume names the one weight an
    edit of the file changed (the path alone, grpo.reward_config, stays the same through an edit)."""
    return dotted_keys(values, prefix)


def stages_in_steps(cfg: GRPOConfig, records: int, say: Callable[[str], None]) -> GRPOConfig:
    """cfg with the stages given in epochs turned into steps over the `records` training prompts (said)."""
    resolved = cfg.with_stage_steps(records)
    for given, stage in zip(cfg.stages, resolved.stages):
        if given.epochs is not None:
            say(f"grpo: stage {given.name}: {given.epochs:g} epoch(s) of {records} prompts at "
                f"{cfg.data.batch_size} a step = {stage.steps} steps")
    return resolved


def weights_metrics(w: rewards.RewardWeights, funcs: Sequence = ()) -> dict[str, float]:
    """A step's `weights/*`: the stage's six, and each reward term of the user's own (grpo.reward_funcs),
    so that a step's logged means and weights give its total."""
    return {**{f"weights/{name}": value for name, value in dataclasses.asdict(w).items()},
            **{f"weights/{func.name}": func.weight for func in funcs}}


def say_stage_weights(cfg: GRPOConfig, steps_total: int, say: Callable[[str], None],
                      reward_config: ConfigLike = None) -> None:
    """The reward of each stage, one line each, and what in its weights is probably a slip
    (`rewards.stages.weight_warnings`); notes on settings that run otherwise than they read. `reward_config`
    as `stage_weights`'s."""
    from fxjax.rewards.stages import describe_weights, weight_warnings

    g = cfg.grpo
    own_terms = any(func.weight != 0 for func in g.reward_funcs)  # (they vary where the paper's terms cannot)
    if g.schedule == "continuous":
        first = stage_weights(cfg, 0, reward_config)[1]
        last = stage_weights(cfg, max(steps_total - 1, 0), reward_config)[1]
        say(f"grpo: continuous schedule: {describe_weights(first)} at step 1, w_iou {last.w_iou:g} at step "
            f"{steps_total}")
        for text in weight_warnings(first, own_terms):
            say(f"warning: the continuous schedule: {text}")
        if cfg.stages != GRPOConfig().stages:
            say(f"note: grpo.schedule=continuous: the stages list ({', '.join(s.name for s in cfg.stages)}) is not "
                f"used (the weights follow the reward config's continuous section over train.steps)")
    else:
        start = 0
        for (name, end) in cfg.stage_ends():
            weights = rewards.load_stage(name, g.reward_config if reward_config is None else reward_config)
            say(f"grpo: stage {name} (steps {start + 1}-{end}): {describe_weights(weights)}")
            for text in weight_warnings(weights, own_terms):
                say(f"warning: stage {name}: {text}")
            start = end
    for func in g.reward_funcs:
        say(f"grpo: reward term of your own in every stage: {func.weight:+g} x {func.name} ({func.function}), "
            f"logged as reward/{func.name}")
    if g.loss_type == "luspo" and g.importance_sampling_level != "sequence":
        say("note: grpo.loss_type luspo with importance_sampling_level token: its paper (and TRL's warning) use "
            "sequence")
    if g.importance_sampling_level == "sequence" and g.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        say(f"note: importance_sampling_level sequence with grpo.loss_type {g.loss_type}: that loss sums per-token "
            f"terms, so each sequence weighs as its length (TRL warns too); GSPO's setup is loss_type grpo")
    if evaluates(cfg) and cfg.eval.max_new_tokens > g.max_completion_length:
        say(f"note: eval.max_new_tokens {cfg.eval.max_new_tokens} is above grpo.max_completion_length "
            f"{g.max_completion_length}: the held-out evaluation may decode longer than any rollout (its time "
            f"grows with it); --set eval.max_new_tokens={g.max_completion_length} to match")


def read_rewards(cfg: GRPOConfig) -> tuple[dict, tuple]:
    """(the reward config's values, the user's reward functions), read once at the start, before the model
    loads (a bad file or function name costs seconds): every step scores with these values and every
    checkpoint records them, so an edit of the file during the run changes nothing, and a resume after one
    says which weight changed. Each stage must have weights in the file."""
    g = cfg.grpo
    reward_values = read_reward_config(g.reward_config)
    if g.schedule == "continuous":
        stage_weights(cfg, 0, g.reward_config)  # (its error names the file)
    else:
        from fxjax.rewards.stages import missing_stage

        for i, stage in enumerate(cfg.stages):  # (a bad reward file: load_config's own error, naming it)
            problem = missing_stage(stage.name, g.reward_config)
            if problem:
                raise ConfigError(f"stages[{i}].name: {problem}")
    return reward_values, load_reward_funcs(g.reward_funcs)  # (each process imports them)
