"""The optimiser: optax AdamW on the LoRA parameters with warmup + decay and global-norm clipping.

The optimiser state mirrors the LoRA parameter tree (see make_optimizer), so each moment can take its
parameter's sharding (train.run_setup.opt_state_shardings). Gradient accumulation is not an optax wrapper here: the jitted step scans its grad_accum micro-batches
and applies one update (see train.step), so one optimiser step = one checkpointed step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from fxjax.config_sections import OptimSection

__all__ = ["make_optimizer", "make_schedule", "warmup_steps"]


def warmup_steps(cfg: OptimSection, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(int(cfg.warmup_steps), total_steps)
    return min(int(math.ceil(cfg.warmup_ratio * total_steps)), total_steps)


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine / linear decay to learning_rate * min_lr_ratio
    at total_steps (or constant). Step 0 of the schedule is the first update."""
    total_steps = max(1, int(total_steps))
    warm = warmup_steps(cfg, total_steps)
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay = max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    # warmup: lr at update i (0-based) is peak * (i + 1) / warm, so the first update is not wasted at 0
    ramp = optax.linear_schedule(peak / warm, peak, max(1, warm - 1)) if warm > 1 else optax.constant_schedule(peak)
    return optax.join_schedules([ramp, after], [warm])


def make_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    # Per parameter leaf, not optax.flatten: a flat state is one vector that cannot follow the parameters'
    # shardings, so every device would hold all the moments (~5 GB fp32 at 72B with rank 32). Flattening
    # compiled faster; the sharded state is what scales.
    return optax.chain(*parts), schedule


def keep_if_finite(finite, new_opt_state, old_opt_state):
    """The optimiser state after an update that may have been non-finite (and so not applied): the old
    moments and Adam count where it was, but the learning-rate schedule's count always advanced, as a
    torch scheduler steps on a skipped update, so the rate used stays the one logged for the step."""
    def pick(new, old):
        if isinstance(new, optax.ScaleByScheduleState):
            return new
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(pick, new_opt_state, old_opt_state, is_leaf=is_schedule)
