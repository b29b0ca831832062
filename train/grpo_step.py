"""The jitted GRPO computations on a scored generation batch: completion log-probs and the update.

A `GroupBatch` holds one step's P prompts x G completions as full sequences (prompt, then completion),
split into A micro-batches of whole groups (leading axis A). Each micro-batch carries the packed vision
inputs of its own prompts only, and every completion row points at its prompt's image features, so the
vision encoder runs once per image per pass and the gradient through the vision LoRA sums over the G
completions of each image.

Only the completion tokens in the loss reach the lm_head: the host packs their positions into slots
(`CompletionSlots`, one block per batch shard, so each device gathers from its own rows), the hidden
states that predict them are gathered and the lm_head runs on chunks of them (a rematerialised scan, as
the SFT loss), and the log-probs go back to the [R, N] completion grid (0 at the other positions, which
every loss term masks out). With a 152k vocabulary the lm_head is most of an update's work, and the padding
after EOS is often half the grid. The lm_head runs in float32
whatever the compute dtype (RL ratios need the precision: a bf16 logit near 20 has a step of 0.125), on
logits / temperature as TRL does.

    logps_fn = make_logps_fn(graphdef, ...)          # (params, base, rest, batch) -> (old, ref) log-probs
    step_fn = make_grpo_step(graphdef, tx, ...)      # (state, base, rest, batch) -> (state, metrics)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fxjax.model.inputs import ModelInputs
from fxjax.model.generate import init_cache
from fxjax.model.kv_cache import repeat_rows
from fxjax.model.lora import LORA_PARAMS, lora_disabled
from fxjax.train.grpo_loss import grpo_loss
from fxjax.train.optimizer import keep_if_finite
from fxjax.train.remat import with_remat
from fxjax.train.step import RNG_IMPL, OnMesh, TrainState, reseed_rest

__all__ = ["CompletionSlots", "GroupBatch", "LossOptions", "completion_logps", "make_grpo_step", "make_logps_fn"]


class CompletionSlots(NamedTuple):
    """The completion tokens in the loss, packed per batch shard: [S, n] each (S batch shards, whose rows
    are the S contiguous blocks of the R rows). Slot j of shard s is the token ``target[s, j]`` at
    ``grid[s, j]`` (= row in the shard * N + k) of that shard's [R / S, N] completion grid. Padding slots
    have grid = R / S * N (past the grid: their results are dropped)."""

    grid: jax.Array  # [S, n] int32
    target: jax.Array  # [S, n] int32


class GroupBatch(NamedTuple):
    # Without `completions`: [A, R, Lp + N] full sequences (R = rows of a micro-batch). With them
    # (shared prompts): [A, P, Lp], each prompt once, its G completions in rows p * G .. p * G + G - 1.
    # Vision [A, slots, ...], or [A, S, slots, ...] packed per batch shard (build_group_batch's batch_shards).
    inputs: ModelInputs
    completion_ids: jax.Array  # [A, R, N] int32 sampled tokens (pad after EOS)
    completion_mask: jax.Array  # [A, R, N] float32 1 at tokens in the loss (through EOS; 0 for masked rows)
    advantages: jax.Array  # [A, R] float32
    old_logps: jax.Array | None  # [A, R, N] log-probs of the sampling policy (num_iterations > 1), else None
    ref_logps: jax.Array | None  # [A, R, N] reference (LoRA off) log-probs (beta > 0), else None
    slots: CompletionSlots | None = None  # [A, S, n]: the tokens whose log-probs are computed; None: all R x N
    completions: ModelInputs | None = None  # [A, R, N] the completion tokens as model inputs (shared prompts)


@dataclass(frozen=True)
class LossOptions:
    """The static options of the GRPO loss (TRL's names); see fxjax.train.grpo_loss.grpo_loss."""

    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.04
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    max_completion_length: int = 512
    temperature: float = 1.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


def float32_logits(model, hidden: jax.Array) -> jax.Array:
    """lm_head in float32 on [C, D] hidden states: the weights upcast, and a LoRA on the lm_head (when a user
    targets it; all-linear leaves it out) added in float32 unrounded, when enabled (the reference policy
    disables it)."""
    h = hidden.astype(jnp.float32)
    if model.lm_head is None:
        return h @ model.embed_tokens.embedding[...].astype(jnp.float32).T
    head = model.lm_head
    out = h @ head.kernel[...].astype(jnp.float32)
    if head.bias is not None:
        out = out + head.bias[...].astype(jnp.float32)
    if head.lora is not None and head.lora.enabled:
        out = out + head.lora(hidden).astype(jnp.float32)  # (the update is computed in float32, as PEFT)
    return out


def completion_logps(model, inputs: ModelInputs, completion_ids: jax.Array, *, temperature: float, chunk: int,
                     slots: CompletionSlots | None = None, completions: ModelInputs | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) [R, N] of the completion tokens under softmax(logits / temperature).

    Without `completions`, inputs are the full sequences [R, Lp + N]: the hidden state at Lp - 1 + k
    predicts completion token k. With them, inputs are the P prompts [P, Lp] (left-padded) and
    `completions` the R = P x G completions [R, N] (see `predicting_states`). With `slots` only the packed
    tokens are computed (0 elsewhere); without, every one of the R x N."""
    rows, n = completion_ids.shape
    predicting = predicting_states(model, inputs, n, completions)  # [R, N, D]
    if slots is None:
        logps, entropy = _chunked_logps(model, predicting.reshape(1, rows * n, -1),
                                        completion_ids.reshape(1, rows * n), temperature, chunk)
        return logps.reshape(rows, n), entropy.reshape(rows, n)
    shards = slots.grid.shape[0]
    per_shard = predicting.reshape(shards, rows // shards * n, -1)  # each shard's rows
    gathered = jax.vmap(lambda h, i: jnp.take(h, i, axis=0, mode="clip"))(per_shard, slots.grid)  # [S, n, D]
    logps, entropy = _chunked_logps(model, gathered, slots.target, temperature, chunk)
    grid = jnp.zeros((shards, rows // shards * n), jnp.float32)
    unpack = jax.vmap(lambda g, i, v: g.at[i].set(v, mode="drop"))
    return (unpack(grid, slots.grid, logps).reshape(rows, n), unpack(grid, slots.grid, entropy).reshape(rows, n))


def predicting_states(model, inputs: ModelInputs, n: int, completions: ModelInputs | None = None) -> jax.Array:
    """The final hidden states [R, N, D] that predict the N completion tokens of each row.

    Full sequences (`completions` None): one forward of every row's prompt and completion. Shared prompts:
    each of the P prompts runs through the decoder once, writing its keys and values, which its G
    completions then attend to (the sampler's prefill and KV cache, here differentiated: the gradient
    reaching a prompt's positions sums over its G completions). Completion token 0 is predicted by the
    prompt's last position (the last column: prompts are left-padded), token k > 0 by completion position
    k - 1. The attention sees the same keys as the full sequence's; the prompt's tokens are computed once
    instead of G times."""
    if completions is None:
        hidden, _ = model.hidden_states(inputs)
        prompt_len = hidden.shape[1] - n
        return hidden[:, prompt_len - 1: prompt_len - 1 + n]
    prompts, prompt_len = inputs.input_ids.shape
    g = completions.input_ids.shape[0] // prompts
    prompt_hidden, cache = model.hidden_states(inputs, init_cache(model, prompts, prompt_len + n))
    completion_hidden, _ = model.hidden_states(completions, repeat_rows(cache, g))
    last = jnp.repeat(prompt_hidden[:, -1:], g, axis=0)  # [R, 1, D]
    return jnp.concatenate([last, completion_hidden[:, :-1]], axis=1)


def _chunked_logps(model, hidden: jax.Array, targets: jax.Array, temperature: float, chunk: int
                   ) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) [S, T] of targets [S, T] from hidden [S, T, D], `chunk` tokens of each shard
    at a time (the shard axis stays a batch axis, so a sharded S stays on its devices)."""
    shards, total = targets.shape
    chunk = max(1, min(int(chunk), total))
    n_chunks = -(-total // chunk)
    pad = n_chunks * chunk - total
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))

    @jax.checkpoint
    def body(_, x):
        h, tgt = x  # [S, chunk, D], [S, chunk]
        logits = float32_logits(model, h.reshape(shards * chunk, -1)) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp_all, tgt.reshape(-1, 1), axis=-1)[:, 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return None, (picked.reshape(shards, chunk), entropy.reshape(shards, chunk))

    xs = (hidden.reshape(shards, n_chunks, chunk, -1).swapaxes(0, 1),
          targets.reshape(shards, n_chunks, chunk).swapaxes(0, 1))
    _, (logps, entropy) = jax.lax.scan(body, None, xs)  # [n_chunks, S, chunk]
    unchunk = lambda x: x.swapaxes(0, 1).reshape(shards, -1)[:, :total]  # noqa: E731
    return unchunk(logps), unchunk(entropy)


def _index(tree, i):
    return jax.tree.map(lambda x: None if x is None else x[i], tree, is_leaf=lambda x: x is None)


def make_logps_fn(graphdef, *, opts: LossOptions, loss_chunk: int, need_old: bool, need_ref: bool,
                  in_shardings=None, out_shardings=None):
    """Jitted (params, base, rest, batch) -> (old_logps or None, ref_logps or None), each [A, R, N], no
    gradient: the sampling policy's log-probs (LoRA on) and the reference's (LoRA off)."""

    def run(params, base, rest, batch: GroupBatch):
        model = nnx.merge(graphdef, params, base, rest)

        def one(i):
            inputs = _index(batch.inputs, i)
            ids, slots, completions = batch.completion_ids[i], _index(batch.slots, i), _index(batch.completions, i)
            old = ref = None
            if need_old:
                old, _ = completion_logps(model, inputs, ids, temperature=opts.temperature, chunk=loss_chunk,
                                          slots=slots, completions=completions)
            if need_ref:
                with lora_disabled(model):
                    ref, _ = completion_logps(model, inputs, ids, temperature=opts.temperature, chunk=loss_chunk,
                                              slots=slots, completions=completions)
            return old, ref

        outs = [one(i) for i in range(batch.completion_ids.shape[0])]
        stack = lambda xs: None if xs[0] is None else jnp.stack(xs)  # noqa: E731
        return stack([o for o, _ in outs]), stack([r for _, r in outs])

    if in_shardings is None:
        return jax.jit(run)
    return jax.jit(run, in_shardings=in_shardings, out_shardings=out_shardings)


def make_grpo_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, *, opts: LossOptions,
                   loss_chunk: int, remat: str | None, remat_vision: str | None, state_shardings=None,
                   base_shardings=None, rest_shardings=None, batch_shardings=None):
    """The jitted update (state, base, rest, batch) -> (state, metrics); `state` is donated.

    The micro-batches' losses are TRL's per-micro-batch losses (divided by A, or by the step's token count
    for dapo) and their gradients are summed: one optimiser step on the whole generation batch. A
    non-finite loss or gradient leaves the parameters and optimiser state unchanged (metrics "finite")."""

    def step(state: TrainState, base, rest, batch: GroupBatch):
        n_micro = batch.completion_ids.shape[0]
        num_items = jnp.sum(batch.completion_mask)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL), state.step)

        def micro(params, base_, rest_, i):
            # LoRA dropout masks are a pure function of (seed, step, micro-batch), as in the SFT step.
            model = nnx.merge(graphdef, params, base_, reseed_rest(rest_, jax.random.fold_in(step_key, i)))
            inputs = _index(batch.inputs, i)
            mask = batch.completion_mask[i]

            def loss_fn(model):
                with_remat(model, remat, remat_vision)
                logps, entropy = completion_logps(model, inputs, batch.completion_ids[i],
                                                  temperature=opts.temperature, chunk=loss_chunk,
                                                  slots=_index(batch.slots, i),
                                                  completions=_index(batch.completions, i))
                loss, metrics = grpo_loss(
                    logps, None if batch.old_logps is None else batch.old_logps[i],
                    None if batch.ref_logps is None else batch.ref_logps[i], batch.advantages[i], mask,
                    loss_type=opts.loss_type, epsilon_low=opts.epsilon_low, epsilon_high=opts.epsilon_high,
                    delta=opts.delta, beta=opts.beta, use_bias_correction_kl=opts.use_bias_correction_kl,
                    importance_sampling_level=opts.importance_sampling_level,
                    max_completion_length=opts.max_completion_length, num_items=num_items,
                    gradient_accumulation_steps=n_micro, sapo_temperature_pos=opts.sapo_temperature_pos,
                    sapo_temperature_neg=opts.sapo_temperature_neg)
                tokens = jnp.maximum(jnp.sum(mask), 1.0)
                metrics = dict(metrics, entropy=jax.lax.stop_gradient(jnp.sum(entropy * mask) / tokens))
                return loss, metrics

            (loss, metrics), grads = nnx.value_and_grad(
                loss_fn, argnums=nnx.DiffState(0, LORA_PARAMS), has_aux=True)(model)
            return loss, metrics, grads

        totals = None
        grads_sum = jax.tree.map(jnp.zeros_like, state.params)
        loss_sum = jnp.zeros((), jnp.float32)
        for i in range(n_micro):  # A is small (grad_accum); unrolled keeps the step simple to read
            loss, metrics, grads = micro(state.params, base, rest, i)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            loss_sum = loss_sum + loss
            metrics = {k: v / n_micro for k, v in metrics.items()}
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        grad_norm = optax.tree.norm(grads_sum)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads_sum, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(state.step + 1, keep(new_params, state.params),
                               keep_if_finite(finite, new_opt, state.opt_state),
                               state.rng)
        out = dict(totals, loss=loss_sum, grad_norm=grad_norm, finite=finite,
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
        return new_state, out

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = jax.sharding.NamedSharding(state_shardings.step.mesh, jax.sharding.PartitionSpec())
    # traced and run under the mesh (OnMesh): the model pins activations' batch axis
    return OnMesh(jax.jit(step, in_shardings=(state_shardings, base_shardings, rest_shardings, batch_shardings),
                          out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
                  state_shardings.step.mesh)


