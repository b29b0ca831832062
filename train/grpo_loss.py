"""GRPO math as TRL 1.16.0's ``GRPOTrainer`` does it: group advantages and the clipped policy loss.

Two pure functions, jit-friendly (every string/None/int option is a Python value, so jit them with
those as static arguments or close over them):

- `group_advantages` mirrors the ``sum_then_normalize`` branch of
  ``GRPOTrainer._generate_and_score_completions`` (rewards -> advantages).
- `grpo_loss` mirrors ``GRPOTrainer._compute_loss`` (log-probs -> loss of one micro-batch, metrics).

tests/test_grpo_loss.py runs TRL's own code on the same tensors and compares values and gradients.

Conventions (the caller's side of the contract):

- Rows are grouped per prompt as in TRL and HF ``generate(num_return_sequences=G)``: rows g*G .. g*G+G-1
  are the G completions of prompt g.
- ``mask`` [B, T] is 1 at completion tokens that take part in the loss, 0 at padding.
  ``mask_truncated_completions`` is the caller's job, as in TRL, where it happens before the loss: zero
  the whole mask row of every completion that did not end with EOS, *before* counting ``num_items``. A
  zero row adds nothing to the loss or the gradient (its log-probs are not even read, so NaN/inf
  padding there is harmless), but it still counts as a sequence for ``grpo``/``sapo``/``luspo``
  (the mean over rows) and ``dr_grpo`` (B * max_completion_length), as in TRL.
- The loss is that of one micro-batch exactly as TRL's ``compute_loss`` returns it: the gradient of an
  optimizer step is the SUM over its micro-batches. ``gradient_accumulation_steps`` divides the
  ``grpo``/``bnpo``/``dr_grpo``/``sapo``/``luspo`` losses as TRL does; ``dapo``/``cispo`` instead divide
  by ``num_items``.
- ``num_items`` (``dapo``/``cispo`` only): the number of mask-1 tokens of the whole optimizer step's
  global batch, i.e. summed over every process and every accumulation micro-batch, counted after the
  truncation masking. TRL 1.16 divides by ``num_items_in_batch / num_processes * GA / steps_per_generation``
  per process, where ``num_items_in_batch`` counts the tokens of the whole generation batch of all
  processes, and DDP then averages over processes; with a global JAX batch this is the same loss as
  ``sum / num_items`` with ``num_items = num_items_in_batch * GA / steps_per_generation`` (= the global
  token count when steps_per_generation == GA, TRL's default).
- Processes: with a global (sharded) batch, ``grpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` and ``luspo``
  equal TRL's per-process loss averaged over processes when each process holds the same number of rows.
  ``bnpo`` does not: TRL divides by each process's own token count ("local batch"), we by the tokens of
  the batch passed in; call `grpo_loss` once per process shard and average to reproduce TRL there.

Not supported (TRL features outside this function): ``vespo``, ``top_entropy_quantile`` (entropy
mask), ``off_policy_mask_threshold``, vLLM importance-sampling correction, the entropy bonus, MoE aux
loss, ``multi_objective_aggregation="normalize_then_sum"``. TRL's ``entropy`` metric needs the
per-token entropies, which this function does not receive; the caller logs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LOSS_TYPES", "SCALE_REWARDS", "group_advantages", "grpo_loss"]

# "grpo" family: hard PPO clip of the ratio. cispo/sapo: other surrogates TRL 1.16 ships that cost a line.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = CLIPPED_LOSS_TYPES + ("cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
# TRL adds this to the std before dividing (grpo_trainer.py, `advantages / (std_rewards + 1e-4)`).
STD_EPSILON = 1e-4


def _scale_rewards_mode(scale_rewards: str | bool) -> str:
    # GRPOConfig.__post_init__ maps True -> "group" and False -> "none"; the trainer only sees strings.
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} (or True/False), got {scale_rewards!r}")
    return mode


def _nanstd(x: jax.Array, axis: int | None) -> jax.Array:
    """trl.trainer.utils.nanstd: Bessel-corrected std ignoring NaN; NaN when fewer than two values."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    variance = jnp.nanmean((x - mean) ** 2, axis=axis)
    count = jnp.sum(~jnp.isnan(x), axis=axis)
    correction = jnp.where(count > 1, count / jnp.maximum(count - 1, 1), jnp.nan)
    return jnp.sqrt(variance * correction)


def group_advantages(rewards: jax.Array, num_generations: int, scale_rewards: str | bool = "group") -> jax.Array:
    """Advantages [N] float32 from rewards [N] grouped per prompt (G = ``num_generations`` rows each).

    ``(r - group mean) / (std + 1e-4)``; std (Bessel-corrected, as torch.std) is per group for
    ``"group"``, over the whole batch for ``"batch"``; ``"none"`` only centres. A group whose rewards are
    all equal gets exactly 0 (TRL computes ``r - mean`` in floating point and can leave ~1e-5 there when
    the mean of equal values rounds, which its division by std + 1e-4 can turn into an advantage of about
    5e-3: eight float32 rewards of 3.224 give 0.0047 in TRL; the exact zero is the intent).
    G = 1 (or a batch of one under ``"batch"``) gives 0, as TRL, which uses a zero std there.
    A NaN reward is TRL's "unscorable" completion: it is left out of its group's mean and std and gets
    advantage 0.
    """
    mode = _scale_rewards_mode(scale_rewards)
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    if num_generations < 1 or rewards.shape[0] % num_generations:
        raise ValueError(
            f"rewards has {rewards.shape[0]} rows, not a multiple of num_generations={num_generations}: "
            "every prompt must keep its whole group")
    grouped = rewards.reshape(-1, num_generations)
    centered = grouped - jnp.nanmean(grouped, axis=1, keepdims=True)
    # Exactly zero where a group's (scorable) rewards are all equal, whatever the rounding of the mean.
    all_equal = jnp.nanmax(grouped, axis=1, keepdims=True) == jnp.nanmin(grouped, axis=1, keepdims=True)
    centered = jnp.where(all_equal, 0.0, centered).reshape(-1)
    if mode == "none":
        advantages = centered
    else:
        if mode == "group":
            std = (_nanstd(grouped, axis=1) if num_generations > 1 else jnp.zeros(grouped.shape[0]))
            std = jnp.repeat(std, num_generations)
        else:
            std = _nanstd(rewards, axis=None) if rewards.shape[0] > 1 else jnp.zeros(())
        advantages = centered / (std + STD_EPSILON)
    # torch.nan_to_num(nan=0.0): unscorable rows (and an all-NaN group) get 0, +-inf become finite extremes.
    return jnp.nan_to_num(advantages, nan=0.0)


def _masked_row_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """TRL's ``masked_seq_mean``: one value per row; NaN for a row with no tokens (dropped by nanmin/nanmax)."""
    if x.shape[1] == 1:  # sequence level: already one value per row
        return x[:, 0]
    count = mask.sum(-1)
    return jnp.where(count > 0, (x * mask).sum(-1) / jnp.maximum(count, 1.0), jnp.nan)


def _global_masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """TRL's ``global_masked_mean``: token-weighted mean; at sequence level a plain mean over ALL rows."""
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _check_options(loss_type, importance_sampling_level, beta, ref_logps, max_completion_length, num_items,
                   gradient_accumulation_steps):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r} (vespo is not supported)")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference policy's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its fixed normaliser)")
    if loss_type in ("dapo", "cispo") and num_items is None:
        raise ValueError(f"loss_type={loss_type!r} needs num_items: the mask-1 token count of the optimizer "
                         "step's whole global batch (all processes, all accumulation micro-batches)")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: jax.Array | float | None = None,
    gradient_accumulation_steps: int = 1,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (train mode) on given log-probs: ``(loss, metrics)``.

    Args (defaults are GRPOConfig's):
      logps: [B, T] policy log-probs of the completion tokens (the gradient flows through these).
      old_logps: [B, T] log-probs of the policy that sampled (``num_iterations > 1``), or None for the
        detached ``logps`` (TRL's num_iterations == 1: ratio 1 with a non-zero gradient).
      ref_logps: [B, T] reference-policy log-probs; may be None when ``beta == 0``.
      advantages: [B] (or [B, T]) from `group_advantages`.
      mask: [B, T] 1 at completion tokens; truncated completions already zeroed by the caller.
      loss_type: grpo | bnpo | dr_grpo | dapo | luspo | cispo | sapo (not vespo).
      epsilon_low, epsilon_high: the clip range [1 - low, 1 + high]; epsilon_high None means epsilon_low
        (for cispo epsilon_high is the absolute cap on the ratio, as in TRL).
      delta: two-sided clipping (INTELLECT-2): the unclipped term's ratio is capped at delta; the clipped
        term's ratio was clipped from the uncapped one. Also in the clip metrics, as TRL.
      beta: weight of the k3 KL ``exp(ref - logp) - (ref - logp) - 1``; with ``use_bias_correction_kl``
        (TRL 1.16's default: True) the KL is multiplied by the importance ratio first.
      importance_sampling_level: "token", or "sequence" (GSPO: exp of the row's masked mean log-ratio).
      max_completion_length: dr_grpo's normaliser B * max_completion_length.
      num_items: dapo/cispo normaliser, see the module docstring.
      gradient_accumulation_steps: TRL divides the non-dapo losses by it (its ``current_gradient_accumulation_steps``).

    Metrics (TRL's names, masked means over tokens, over rows at sequence level): "kl" (beta != 0),
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
    "clip_ratio/high_max" (clipped loss types), "cispo_clip_ratio" (cispo).
    """
    _check_options(loss_type, importance_sampling_level, beta, ref_logps, max_completion_length, num_items,
                   gradient_accumulation_steps)
    if epsilon_high is None:
        epsilon_high = epsilon_low
    dtype = jnp.promote_types(jnp.asarray(logps).dtype, jnp.float32)
    if logps.ndim != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps and mask must both be [B, T], got {logps.shape} and {mask.shape}")
    for name, other in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if other is not None and other.shape != logps.shape:
            raise ValueError(f"{name} has shape {other.shape}, logps has {logps.shape}")
    advantages = jnp.asarray(advantages, dtype)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if advantages.shape[0] != logps.shape[0]:
        raise ValueError(f"advantages has {advantages.shape[0]} rows, logps has {logps.shape[0]}")

    mask_bool = jnp.asarray(mask) != 0
    mask = mask_bool.astype(dtype)

    def tokens(x):
        # Padding positions are multiplied by 0 everywhere in TRL; reading them as 0 keeps non-finite padding
        # (a truncated row's garbage) from turning 0 * inf into NaN, and changes nothing for finite input.
        return jnp.where(mask_bool, jnp.asarray(x, dtype), 0.0)

    logps = tokens(logps)
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else tokens(old_logps)

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))[:, None]
    coef_1 = jnp.exp(log_weights)

    if beta != 0.0:
        ref_logps = tokens(ref_logps)
        per_token_kl = jnp.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        clamped = jax.lax.stop_gradient(jnp.minimum(coef_1, epsilon_high))
        per_token_loss = -clamped * advantages * logps
    elif loss_type == "sapo":
        temperatures = jnp.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -jax.nn.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    else:
        coef_2 = jnp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)
        per_token_loss = -jnp.minimum(coef_1 * advantages, coef_2 * advantages)

    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked_loss = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        loss = (masked_loss.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean() / gradient_accumulation_steps
    elif loss_type == "bnpo":
        loss = masked_loss.sum() / jnp.maximum(mask.sum(), 1.0) / gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        loss = masked_loss.sum() / (per_token_loss.shape[0] * max_completion_length) / gradient_accumulation_steps
    elif loss_type in ("dapo", "cispo"):
        loss = masked_loss.sum() / jnp.maximum(jnp.asarray(num_items, dtype), 1.0)
    else:  # luspo
        loss = masked_loss.sum(-1).mean() / gradient_accumulation_steps

    metrics: dict[str, Any] = {}
    if beta != 0.0:
        metrics["kl"] = _global_masked_mean(per_token_kl, mask)
    if loss_type in CLIPPED_LOSS_TYPES:
        # coef_1 here is the delta-capped ratio, as in TRL's metrics.
        low = ((coef_1 < 1 - epsilon_low) & (advantages < 0)).astype(dtype)
        high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).astype(dtype)
        region = jnp.maximum(low, high)
        metrics["clip_ratio/low_mean"] = _global_masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _global_masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _global_masked_mean(region, mask)
        metrics["clip_ratio/low_min"] = jnp.nanmin(_masked_row_mean(low, mask))
        metrics["clip_ratio/high_max"] = jnp.nanmax(_masked_row_mean(high, mask))
    elif loss_type == "cispo":
        clipped = ((coef_1 > epsilon_high) & (advantages > 0)).astype(dtype)
        metrics["cispo_clip_ratio"] = _global_masked_mean(clipped, mask)
    metrics = {key: jax.lax.stop_gradient(value) for key, value in metrics.items()}
    return loss, metrics
