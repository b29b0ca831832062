"""Qwen2 decoder with M-RoPE: GQA attention with q/k/v bias, SwiGLU MLP, RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import cache_mask, causal_padding_mask, dot_product_attention
from .config import TextConfig
from .kv_cache import KVCache, write
from .layers import GatedMLP, Linear, RMSNorm
from .rope import apply_rotary, mrope
from .scan import RematPolicy, scan_stack, stack_modules


class DecoderAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * self.head_dim, use_bias=True, **kw)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, use_bias=True, **kw)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, use_bias=True, **kw)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask, kv: tuple[jax.Array, jax.Array] | None, start):
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin, upcast=False)
        k = apply_rotary(k, cos, sin, upcast=False)
        if kv is not None:
            k = write(kv[0], k, start)
            v = write(kv[1], v, start)
            kv = (k, v)
        # (the rows: pinned to the batch axes with the embeddings, model.qwen2_5_vl)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, rows_pinned=True)
        return self.o_proj(out.reshape(b, length, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = DecoderAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=False,
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype, batch_first=True)

    def __call__(self, x, cos, sin, mask, kv=None, start=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _layer_step(layer: DecoderLayer, x, kv, cos, sin, mask, start):
    """One scanned layer: x is the carry, the layer's (keys, values) slice of the cache its xs and ys."""
    return layer(x, cos, sin, mask, kv, start)


class TextDecoder(nnx.Module):
    """The decoder stack after the embedding: layers and final norm.

    `layers` is an nnx.List of DecoderLayers, or with cfg.scan_layers one DecoderLayer whose parameters
    are stacked [num_hidden_layers, ...] and run under scan (model.scan); the KV cache follows (per-layer
    tuples, or arrays with a leading layer axis).
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype

        def layer(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        if cfg.scan_layers:
            self.layers = stack_modules(layer, cfg.num_hidden_layers, rngs)
        else:
            self.layers = nnx.List([layer(rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        # Rematerialisation of one scanned layer (model.scan.scan_stack's `remat`), set on a trace-local
        # copy by train.remat.with_remat; looped layers are wrapped one by one instead.
        self.layer_remat: RematPolicy = None

    def __call__(self, x: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """x [B, L, D] embeddings, position_ids [3, B, L], attention_mask [B, L] (1 = real token).

        With a cache, the L new tokens go to slots [length, length + L) and attend to every real
        token written so far; without one, plain causal attention over the L tokens.
        """
        cfg = self.cfg
        b, length, _ = x.shape
        cos, sin = mrope(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dtype=x.dtype)
        real = attention_mask.astype(bool)
        if cache is None:
            mask = causal_padding_mask(real, cfg.attention)
            start = None
        else:
            start = cache.length
            key_mask = write(cache.key_mask, real, start)
            mask = cache_mask(key_mask, start, length, cfg.attention)
        if cfg.scan_layers:
            kv = None if cache is None else (cache.keys, cache.values)
            x, kv = scan_stack(self.layers, _layer_step, x, kv, (cos, sin, mask, start), remat=self.layer_remat)
            if cache is not None:
                cache = KVCache(kv[0], kv[1], key_mask, start + length)
            return self.norm(x), cache
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, cos, sin, mask, kv, start)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        if cache is not None:
            cache = KVCache(tuple(new_keys), tuple(new_values), key_mask, start + length)
        return self.norm(x), cache
