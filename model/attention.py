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
    """
    h, kvh, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if h != kvh:
        # Repeating KV to full heads (HF's repeat_kv) lets XLA fuse the softmax into the second matmul;
        # the grouped [kv, group] einsum layout costed an extra copy of the score tensor on CPU.
        k = jnp.repeat(k, h // kvh, axis=-2)
        v = jnp.repeat(v, h // kvh, axis=-2)
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[..., None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)
