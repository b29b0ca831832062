"""Qwen2.5-VL for conditional generation as one Flax NNX module."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Qwen25VLConfig
from .decoder import TextDecoder
from .inputs import ModelInputs, prepare_inputs
from .kv_cache import KVCache
from .layers import Embedding, Linear
from .vision import VisionEncoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def shard_batch(x: jax.Array) -> jax.Array:
    """Shard dim 0 (the batch) over the ambient mesh's ("data", "fsdp") axes (jax.sharding.set_mesh);
    a no-op without such a mesh. Pins activations so that sharded weights are gathered (FSDP) rather
    than activations."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def as_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


class Qwen25VL(nnx.Module):
    """Vision encoder + merger + decoder + lm_head.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights. Two ways to call it:

    * HF-style convenience: `model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)`
      -> logits. It prepares the inputs on the host (numpy) and runs its own jit, so it cannot be traced.
    * Traceable: `inputs = model.prepare(...)` on the host (M-RoPE positions, the image-patch layout), then
      `model.forward(inputs)` (or `fxjax.model.forward(model, inputs)`): pure jax, no jit of its own,
      usable inside the caller's `jax.jit` / `nnx.jit` and `jax.grad` / `nnx.grad`. Training code uses
      its parts, `hidden_states` and `logits`, the same way.
    """

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.config = cfg
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.visual = VisionEncoder(cfg.vision, **kw)
        self.embed_tokens = Embedding(cfg.text.vocab_size, cfg.text.hidden_size, **kw)
        self.decoder = TextDecoder(cfg.text, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, **kw)

    def use_attention(self, text: str, vision: str | None = None) -> "Qwen25VL":
        """Run attention on another kernel (model.config.ATTENTION_BACKENDS: auto, xla, cudnn, splash): the
        decoder's `text`, the vision encoder's `vision` (default: the same). Weights are untouched; the
        choice is resolved against the platform when the forward pass is traced. Returns self."""
        self.config = self.config.with_attention(text, vision)
        self.decoder.cfg, self.visual.cfg = self.config.text, self.config.vision
        return self

    def embed(self, inputs: ModelInputs) -> jax.Array:
        """Token embeddings with the merged image features placed at the image-pad positions."""
        x = self.embed_tokens(inputs.input_ids)
        if inputs.vision is not None:
            features = self.visual(inputs.vision).astype(x.dtype)
            placed = jnp.take(features, inputs.image_feature_index, axis=0)
            is_image = (inputs.input_ids == self.config.image_token_id)[..., None]
            x = jnp.where(is_image, placed, x)
        return x

    def hidden_states(self, inputs: ModelInputs, cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.decoder(shard_batch(self.embed(inputs)), inputs.position_ids, inputs.attention_mask,
                                     cache)
        return shard_batch(hidden), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return shard_batch(self.embed_tokens.attend(hidden))
        return shard_batch(self.lm_head(hidden))

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> ModelInputs:
        """HF-shaped host inputs -> ModelInputs (numpy), what `forward` consumes. Not traceable: the
        image layout and positions depend on the values of image_grid_thw and the token ids."""
        return prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw)

    def forward(self, inputs: ModelInputs) -> jax.Array:
        """Prepared inputs -> logits [B, L, vocab]: pure jax, traceable inside the caller's jit and grad."""
        return forward(self, inputs)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """HF-shaped inputs -> logits [B, L, vocab] (float32 when computing in float32)."""
        return _forward_logits(self, self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw))


def forward(model: Qwen25VL, inputs: ModelInputs) -> jax.Array:
    """`model.forward(inputs)` as a function: ModelInputs (numpy or jax arrays, tracers included) -> logits."""
    hidden, _ = model.hidden_states(inputs)
    return model.logits(hidden)


_forward_logits = nnx.jit(forward)
