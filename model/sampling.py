"""Logits warpers for sampling, with the semantics and order of HF `generate(do_sample=True)`.

HF builds its warpers in this order (transformers `GenerationMixin._get_logits_processor`):
`TemperatureLogitsWarper` (logits / T), `TopKLogitsWarper` (keep every token whose logit is >= the k-th
largest, so ties with the k-th are kept), `TopPLogitsWarper` (sort ascending, remove the tokens whose
cumulative probability is <= 1 - top_p, always keeping the most probable one). The functions here
reproduce each step on jnp arrays, with -inf at removed tokens, so that the same float32 logits give the
same kept set and values as HF. Sampling from the result (`sample_categorical`) draws from
softmax(filtered logits), as HF's `torch.multinomial(softmax(scores))` does.

"Off" values are HF's: temperature None or 1.0, top_k None or 0, top_p None or 1.0. Note that HF's
`GenerationConfig` defaults to top_k=50 when a caller passes nothing; here nothing given means no
top-k, so pass top_k=50 to match a HF call that relied on that default.

top_k and top_p must be Python values (static under jit: top-k needs a static k); temperature may be
a Python float or a traced scalar, so that a changing temperature does not recompile a decode loop.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

# HF's min_tokens_to_keep for plain sampling (it is larger only for beam sampling).
MIN_TOKENS_TO_KEEP = 1


def check_sampling_args(temperature, top_k, top_p) -> None:
    """Raise a ValueError naming the bad argument (the same ranges HF's warpers accept)."""
    if isinstance(temperature, numbers.Real) and not 0 <= temperature < math.inf:  # NaN too: it sampled token 0
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int (0 or None: off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0.0 <= float(top_p) <= 1.0):
        raise ValueError(f"top_p must be a float in [0, 1] (1.0 or None: off), got {top_p!r}")


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """logits / temperature (HF `TemperatureLogitsWarper`); None or 1.0 leaves the logits as they are."""
    if temperature is None or (isinstance(temperature, numbers.Real) and temperature == 1.0):
        return logits
    if isinstance(temperature, numbers.Real) and temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits (0 means greedy: use argmax), got {temperature}")
    # XLA rewrites x / broadcast(t) into x * (1 / t), up to 1 ulp off the division HF does; dividing by
    # an array the simplifier cannot see through keeps it a true division (bitwise HF, also on logits
    # that tie after the rewrite). Under vmap with an unbatched t the barrier is bypassed (1 ulp again).
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(temperature, logits.dtype), logits.shape))
    return logits / divisor


def apply_top_k(logits: jax.Array, top_k: int | None, min_tokens_to_keep: int = MIN_TOKENS_TO_KEEP) -> jax.Array:
    """HF `TopKLogitsWarper`: -inf below the k-th largest logit (ties with it are kept)."""
    if not top_k:
        return logits
    k = min(max(int(top_k), min_tokens_to_keep), logits.shape[-1])
    shape = logits.shape
    keys = _order_keys(logits.reshape(-1, shape[-1]))
    kept = (keys >= _kth_largest_key(keys, k)).reshape(shape)
    return jnp.where(kept, logits, -jnp.inf)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that order like the float32 values (-inf lowest; -0.0 and 0.0 one key, as they tie)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits & sign, ~bits, bits | sign)


TOP_K_BLOCK = 128


def _kth_largest_key(keys: jax.Array, k: int) -> jax.Array:
    """Per row of uint32 keys [B, V], the k-th largest (ties counted: the largest t with at least k keys
    >= t), as [B, 1].

    Why not `jax.lax.top_k(logits, k)`: on a CPU it sorts, and [32, 151936] took 1.1 s, i.e. per decode step
    of a GRPO rollout (HF uses torch.topk). Here: the k blocks of TOP_K_BLOCK tokens with the largest
    maxima hold the answer (a block left out has k blocks whose maxima are at least its own, so at least k
    keys >= anything in it are kept), then a bisection over the 2^32 key values on those k x TOP_K_BLOCK
    candidates only: 32 compare-and-count passes."""
    rows, vocab = keys.shape
    blocks = -(-vocab // TOP_K_BLOCK)
    if 1 < k * 2 <= blocks:
        padded = jnp.pad(keys, ((0, 0), (0, blocks * TOP_K_BLOCK - vocab)))  # key 0: below every value
        padded = padded.reshape(rows, blocks, TOP_K_BLOCK)
        signed = jax.lax.bitcast_convert_type(padded.max(-1) ^ jnp.uint32(0x80000000), jnp.int32)
        chosen = jax.lax.top_k(signed, k)[1]  # [B, k]: a short sort
        keys = jnp.take_along_axis(padded, chosen[:, :, None], axis=1).reshape(rows, k * TOP_K_BLOCK)
    lo = jnp.zeros((rows, 1), jnp.uint32)  # invariant: at least k keys >= lo
    hi = jnp.full_like(lo, 0xFFFFFFFF)

    def halve(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + (gap & 1)  # the upper middle: no overflow, and mid > lo while lo < hi
        enough = jnp.sum(keys >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def apply_top_p(logits: jax.Array, top_p: float | None, min_tokens_to_keep: int = MIN_TOKENS_TO_KEEP) -> jax.Array:
    """HF `TopPLogitsWarper`: in ascending order, remove the tokens whose cumulative probability is
    <= 1 - top_p, except the last `min_tokens_to_keep` (the most probable)."""
    if top_p is None or float(top_p) >= 1.0:
        return logits
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    # A stable ascending sort orders tied logits by index. torch.sort on CPU is not stable for rows longer
    # than 16, so where tied logits straddle the threshold HF may keep another of the tied tokens: the kept
    # mass is the same, the token ids can differ (without ties at the cut-off the sets are identical).
    order = jnp.argsort(flat, axis=-1, stable=True)
    ascending = jnp.take_along_axis(flat, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - float(top_p))
    remove_sorted = remove_sorted.at[:, -min_tokens_to_keep:].set(False)
    rows = jnp.arange(flat.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, flat).reshape(shape)


def suppress_tokens(logits: jax.Array, token_ids: jax.Array | None) -> jax.Array:
    """[..., vocab] logits with -inf at `token_ids` ([S] int32; -1 entries suppress nothing): HF's
    SuppressTokensLogitsProcessor, a logits processor applied before the warpers. TRL's GRPO passes
    suppress_tokens=[image_token_id] for a vision-language model, so a rollout never samples an image
    placeholder; the log-probs of the loss stay those of the unsuppressed logits, as in TRL."""
    if token_ids is None or token_ids.size == 0:
        return logits
    hit = jnp.any(jnp.arange(logits.shape[-1], dtype=jnp.int32)[:, None] == token_ids.astype(jnp.int32)[None, :],
                  axis=-1)
    return jnp.where(hit, -jnp.inf, logits)


def filter_logits(logits: jax.Array, temperature=None, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """[..., vocab] logits -> float32 logits of the sampling distribution: temperature, then top-k, then
    top-p, as HF applies them; -inf at removed tokens. temperature must be > 0 here (greedy is argmax
    of the raw logits, see `choose_tokens`)."""
    check_sampling_args(temperature, top_k, top_p)
    x = apply_temperature(logits.astype(jnp.float32), temperature)
    return apply_top_p(apply_top_k(x, top_k), top_p)


def choose_tokens(logits: jax.Array, key: jax.Array | None, *, greedy: bool, temperature=1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """One token per row of [B, vocab] logits, int32 [B]: argmax when greedy (HF do_sample=False, which
    top-k/top-p cannot change), else a draw from softmax(filter_logits(...)) with `key`."""
    if greedy:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return sample_categorical(key, filtered)


SAMPLE_BLOCK = 128


def sample_categorical(key: jax.Array, logits: jax.Array, block: int = SAMPLE_BLOCK) -> jax.Array:
    """One draw per row from softmax(logits [B, V]) (-inf: never drawn), int32 [B], by inverse CDF in two
    levels: a block of `block` tokens by the cumulative block masses, then a token inside it.

    Why not `jax.random.categorical`: its Gumbel trick draws V random numbers per row, and on a CPU
    threefry over Qwen's 151,936 tokens x 32 rows took 177 ms per decode step; this takes two uniforms per
    row and two short cumulative sums (8 ms). The distribution is the same (tests/test_sampling.py)."""
    rows, vocab = logits.shape
    blocks = -(-vocab // block)
    x = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, blocks * block - vocab)), constant_values=-jnp.inf)
    mass = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)).reshape(rows, blocks, block)
    key_block, key_token = jax.random.split(key)

    def pick(weights, k):  # index i with probability weights[i] / sum: the first cumulative sum above u
        cum = jnp.cumsum(weights, axis=-1)
        u = jax.random.uniform(k, (rows, 1)) * cum[:, -1:]
        return jnp.minimum(jnp.sum(cum <= u, axis=-1), weights.shape[-1] - 1)

    b = pick(mass.sum(-1), key_block)
    inner = jnp.take_along_axis(mass, b[:, None, None], axis=1)[:, 0]
    return (b * block + pick(inner, key_token)).astype(jnp.int32)
