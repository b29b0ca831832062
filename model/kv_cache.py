"""Fixed-size KV cache for prefill + one-token decode steps under jit."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Keys and values per layer: a tuple of [B, S, KVH, D] arrays for looped layers, or (stacked, for
    layers under scan, TextConfig.scan_layers) one [layers, B, S, KVH, D] array each."""

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    key_mask: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    length: jax.Array  # int32 scalar: slots written so far

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, *,
             stacked: bool = False) -> "KVCache":
        shape = (batch, max_len, kv_heads, head_dim)
        if stacked:
            keys = values = jnp.zeros((num_layers, *shape), dtype)
        else:
            keys = values = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(keys=keys, values=values, key_mask=jnp.zeros((batch, max_len), bool),
                   length=jnp.zeros((), jnp.int32))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.keys, tuple)

    @property
    def max_len(self) -> int:
        return int(self.key_mask.shape[1])


def write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, L, ...] into buffer [B, S, ...] at slot `start`."""
    index = (jnp.zeros((), jnp.int32), start.astype(jnp.int32)) + (jnp.zeros((), jnp.int32),) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), index)


def repeat_rows(cache: KVCache, repeats: int) -> KVCache:
    """Each row `repeats` times in a row: row i becomes rows i*repeats .. i*repeats + repeats - 1 (the
    layout of jnp.repeat and of HF's num_return_sequences). Lets G samples share one prompt prefill."""
    if repeats == 1:
        return cache
    rep = lambda x, axis=0: jnp.repeat(x, repeats, axis=axis)  # noqa: E731
    if cache.stacked:  # [layers, B, ...]: the rows are axis 1
        return KVCache(rep(cache.keys, 1), rep(cache.values, 1), rep(cache.key_mask), cache.length)
    return KVCache(tuple(map(rep, cache.keys)), tuple(map(rep, cache.values)), rep(cache.key_mask), cache.length)
