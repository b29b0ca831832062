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
    *batch, lq, h, d = q.shape
    kvh = k.shape[-2]
    groups = h // kvh
    qg = q.reshape(*batch, lq, kvh, groups, d)
    scores = jnp.einsum("...qkgd,...skd->...kgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    if mask is not None:
        m = mask[..., None, None, :, :]  # broadcast over (kvh, groups)
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("...kgqs,...skd->...qkgd", probs, v)
    return out.reshape(*batch, lq, h, d)
