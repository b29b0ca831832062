"""The one attention function every block calls, so a fused kernel can replace it in one place."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention with grouped KV heads.

    q: [..., Lq, H, D]; k, v: [..., Lk, KVH, D] with H a multiple of KVH; mask: bool, broadcastable to
    [..., Lq, Lk] (True = may attend). Scores and softmax run in float32, as HF's eager/sdpa do for
    fp32 and as a bf16 run needs for stability. A fully masked row yields a uniform average instead of
    NaN (HF's min-value masking does the same); callers ignore such rows.

    Layout: the query groups of each KV head are folded into the query axis, so both matmuls are plain
    batched [kvh] matmuls with the score tensor as [..., kvh, groups * Lq, Lk]: XLA then fuses the
    softmax into the second matmul and never copies the score tensor (the grouped 5-D einsum did), and
    K/V are read once per KV head (no repeat to full heads, which would multiply decode traffic).
    """
    *batch, lq, h, d = q.shape
    kvh = k.shape[-2]
    groups = h // kvh
    n = len(batch)
    qf = jnp.moveaxis(q.reshape(*batch, lq, kvh, groups, d), n, n + 2)  # [..., kvh, groups, Lq, D]
    qf = qf.reshape(*batch, kvh, groups * lq, d)
    kt = jnp.moveaxis(k, n, n + 1)  # [..., kvh, Lk, D]
    vt = jnp.moveaxis(v, n, n + 1)
    scores = jnp.einsum("...kqd,...ksd->...kqs", qf, kt, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    if mask is not None:
        scores = scores.reshape(*batch, kvh, groups, lq, -1)
        scores = jnp.where(mask[..., None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        scores = scores.reshape(*batch, kvh, groups * lq, -1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("...kqs,...ksd->...kqd", probs, vt).reshape(*batch, kvh, groups, lq, d)
    return jnp.moveaxis(out, (n, n + 1), (n + 1, n + 2)).reshape(*batch, lq, h, d)
