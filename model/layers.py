"""Basic NNX layers with HF Qwen2.5-VL numerics: Linear, RMSNorm, Embedding, activations."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .batch_axis import shard_batch_and_features, vocab_parallel


def _in_float32(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """`fn` computed in float32 and rounded once to the input's dtype, as torch's silu / gelu kernels do
    for bfloat16 (a chain of bfloat16 operations rounds at each: 60% of silu's outputs differed from HF's)."""
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": _in_float32(jax.nn.silu),
    "swish": _in_float32(jax.nn.silu),
    "gelu": _in_float32(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_pytorch_tanh": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # (HF's QuickGELU is this chain in the input dtype)
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dropout_active(module: nnx.Module) -> bool:
    """Whether a call of `module` advances a random stream: an active dropout inside it (train mode,
    rate > 0). Such a call cannot run inside a jitted loop whose trace the stream was not made in."""
    return any(isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0 for _, m in nnx.iter_modules(module))


def next_key(stream: nnx.RngStream) -> jax.Array:
    """The key `stream()` returns, advancing the stream the same way, without flax's in-place update.

    Under a trace (nnx.eval_shape, jit) flax's `count[...] += 1` compares the new count's `.sharding` with
    the old one's; a tracer has none, and jax builds a detailed AttributeError message for each ask (~18 ms,
    two per draw): 15 of the 20 s `fxjax info 3b` spent building the abstract model, and ~36 ms per LoRA
    dropout each time a training step is traced. Replacing the count skips that comparison."""
    count = stream.count[...]
    key = jax.random.fold_in(stream.key[...], count)
    stream.count.set_value(count + 1)
    return key


def params_key(rngs: nnx.Rngs) -> jax.Array:
    """`rngs.params()` by `next_key`."""
    return next_key(rngs.params)


def _init_normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, scale: float) -> jax.Array:
    return (scale * jax.random.normal(params_key(rngs), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (HF stores [out, in]; import transposes).

    Parameters live in `param_dtype`; the matmul runs in `dtype` (the compute dtype).
    `lora` is None or a `model.lora.LoRAAdapter` (attached by `model.lora.apply_lora`); an enabled
    adapter adds its low-rank update after the bias, as PEFT does.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        scale = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(_init_normal(rngs, (in_features, out_features), param_dtype, scale))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x_c, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if self.bias is None:
            y = jnp.dot(x_c, kernel)
        else:  # x @ W + b rounded once, as torch's addmm (rounding the product first, then the sum, is twice)
            y = (jnp.dot(x_c, kernel, preferred_element_type=jnp.float32)
                 + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        if self.lora is not None and self.lora.enabled:
            y = (y + self.lora(x)).astype(y.dtype)  # as PEFT: a float32 update, the sum rounded once
        return y


class RMSNorm(nnx.Module):
    """HF Qwen2RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(in_dtype)
        return self.weight[...].astype(in_dtype) * normed


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = nnx.Param(_init_normal(rngs, (num_embeddings, features), param_dtype, 0.02))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(vocab_parallel(self.embedding[...]), ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied lm_head: logits = x @ embedding.T."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class GatedMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); the vision MLP has biases, the decoder's has none."""

    def __init__(self, hidden: int, intermediate: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, batch_first: bool = False):
        kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(hidden, intermediate, **kw)
        self.up_proj = Linear(hidden, intermediate, **kw)
        self.down_proj = Linear(intermediate, hidden, **kw)
        self.act = activation(act)
        # inputs [batch, ..., hidden] (the decoder's): the column-parallel outputs are pinned to the layout
        # down_proj takes (shard_batch_and_features); the vision tower's dim 0 may be patches
        self.batch_first = batch_first

    def __call__(self, x: jax.Array) -> jax.Array:
        pin = shard_batch_and_features if self.batch_first else (lambda h: h)
        return self.down_proj(pin(self.act(pin(self.gate_proj(x))) * pin(self.up_proj(x))))
