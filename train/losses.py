"""Token cross-entropy on the assistant span without materialising [batch, length, vocab] logits.

Labels follow HF: ``labels[b, t]`` is the token at position t, -100 outside the assistant span; the
hidden state at position t predicts ``labels[b, t + 1]``. Only the supervised positions need the lm_head
at all, so the host gathers them first (`loss_targets`): ``index[b, j]`` is the position whose hidden
state predicts ``target[b, j]``, ``weight[b, j]`` is 1 for a real target and 0 for padding. Then
`chunked_cross_entropy` runs the lm_head matmul and the log-softmax one chunk of targets at a time in a
`lax.scan` whose body is rematerialised: at most [batch, chunk, vocab] float32 logits exist at once,
forward or backward.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fxjax.data.examples import IGNORE_INDEX  # the label of a token no loss is taken on

__all__ = ["IGNORE_INDEX", "LossTargets", "chunked_cross_entropy", "cross_entropy_sum", "loss_targets"]


class LossTargets(NamedTuple):
    """The supervised tokens of a batch, flattened: slot j is the token ``target[j]`` predicted by the
    hidden state at flat position ``index[j]`` (= row * length + column) of the [B, L] batch."""

    index: np.ndarray  # [N] int32 flat position of the hidden state that predicts the target
    target: np.ndarray  # [N] int32 target token id (0 in padding slots)
    weight: np.ndarray  # [N] float32 1 for a supervised token, 0 for a padding slot


def loss_targets(labels: np.ndarray, size: int | None = None, multiple: int = 1) -> LossTargets:
    """Host side: gather the supervised positions of ``labels`` [B, L] into N slots.

    N is ``size`` or the number of supervised tokens rounded up to ``multiple``. Position t predicts
    labels[t + 1], so the last column of a row never predicts anything. Flattening the whole batch (rather
    than padding every row to the longest row's count) leaves only the batch's total to pad.
    """
    labels = np.asarray(labels)
    b, length = labels.shape
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = np.flatnonzero(shifted.reshape(-1) != IGNORE_INDEX)
    need = int(flat.size)
    if size is None:
        size = max(multiple, -(-need // multiple) * multiple)
    if need > size:
        raise ValueError(f"{need} supervised tokens do not fit {size} loss slots")
    index = np.zeros((size,), np.int32)
    target = np.zeros((size,), np.int32)
    weight = np.zeros((size,), np.float32)
    index[:need] = flat
    target[:need] = shifted.reshape(-1)[flat]
    weight[:need] = 1.0
    return LossTargets(index, target, weight)


def _nll(logits: jax.Array, target: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def chunked_cross_entropy(hidden: jax.Array, targets: LossTargets, logits_fn: Callable[[jax.Array], jax.Array],
                          chunk: int, shards: int = 1) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLLs, number of supervised tokens), both float32 scalars.

    hidden [B, L, D] final hidden states; targets from `loss_targets` (device arrays, N slots); logits_fn
    maps [C, D] -> [C, vocab] (the model's lm_head). The N slots are processed ``chunk`` at a time (N is
    padded up to a multiple of chunk with zero-weight slots); each chunk's logits are recomputed in the
    backward pass instead of being stored.

    shards S > 1: the slots are laid out per batch shard (`train.batching.build_step_batch`: shard s's in
    block s of N / S, pointing into its own B / S rows) and each shard gathers and scores its own block, a
    chunk of chunk / S slots at a time: with the batch split over devices, each device computes the
    lm_head of its own rows' targets only. (A gather over the whole flattened batch made every device
    compute every chunk's logits once there was more than one chunk.)
    """
    index, target, weight = (jnp.asarray(a) for a in targets)
    b, length, dim = hidden.shape
    rows = b // shards * length  # flat positions per shard
    n = index.shape[0] // shards
    chunk = max(1, min(int(chunk) // shards, n))
    n_chunks = -(-n // chunk)
    pad = ((0, 0), (0, n_chunks * chunk - n))
    # shard-local positions (block s holds positions of rows s * B / S ...); padding slots point at 0
    local = index.reshape(shards, n) - jnp.arange(shards, dtype=index.dtype)[:, None] * rows
    local, target, weight = (jnp.pad(a.reshape(shards, n), pad) for a in (local, target, weight))
    gathered = jnp.take_along_axis(hidden.reshape(shards, rows, dim), local[..., None], axis=1, mode="clip")

    def chunks(x):  # [S, n_chunks * chunk, ...] -> [n_chunks, S, chunk, ...]: the scan keeps S (devices)
        return jnp.swapaxes(x.reshape(shards, n_chunks, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def body(total, x):
        h, tgt, w = x
        nll = _nll(logits_fn(h.reshape(-1, dim)), tgt.reshape(-1))
        return total + jnp.sum(nll * w.reshape(-1)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(gathered), chunks(target), chunks(weight)))
    return total, jnp.sum(weight).astype(jnp.float32)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unchunked reference on full logits [B, L, V] and HF labels [B, L]: (sum of NLLs, token count)."""
    labels = jnp.asarray(labels)
    shifted = labels[:, 1:]
    mask = (shifted != IGNORE_INDEX).astype(jnp.float32)
    nll = _nll(logits[:, :-1], jnp.where(shifted == IGNORE_INDEX, 0, shifted))
    return jnp.sum(nll * mask), jnp.sum(mask)
