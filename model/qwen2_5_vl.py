"""Qwen2.5-VL for conditional generation as one Flax NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .batch_axis import shard_batch
from .config import Qwen25VLConfig
from .decoder import TextDecoder
from .inputs import ModelInputs, prepare_inputs
from .kv_cache import KVCache
from .layers import Embedding, Linear
from .vision import VisionEncoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def place_features(features: jax.Array, index: jax.Array) -> jax.Array:
    """The merged image feature of every token: features [M, D] (one packed sequence) or [S, M_s, D] (per
    batch shard), index [B, L] -> [B, L, D]. Per shard, the B rows split into S contiguous groups (the split
    the batch axis gets on the mesh) and group s indexes shard s's features only, so the gather stays on
    the device that holds both: no features cross devices."""
    if features.ndim == 2:
        return jnp.take(features, index, axis=0)
    shards, (b, length) = features.shape[0], index.shape
    if b % shards:
        raise ValueError(f"batch of {b} rows does not split into the vision's {shards} shards")
    per_shard = index.reshape(shards, b // shards, length)
    placed = jax.vmap(lambda f, i: jnp.take(f, i, axis=0))(shard_batch(features), shard_batch(per_shard))
    return placed.reshape(b, length, features.shape[-1])


def as_dtype(dtype) -> jnp.dtype:
    """A compute or storage dtype: one of DTYPES, by name or as a dtype (np.int8 gave a model of all-zero int8
    logits, None float64)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    try:
        resolved = jnp.dtype(dtype) if dtype is not None else None
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} (a name or a jnp dtype)")
    return resolved


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
        """Token embeddings with the merged image features placed at the image-pad positions (those with an
        image_feature_index >= 0: an image-pad token a model sampled, index -1, stays a token, as the
        decode steps embed it)."""
        x = self.embed_tokens(inputs.input_ids)
        if inputs.vision is not None:
            features = self.visual(inputs.vision).astype(x.dtype)
            index = inputs.image_feature_index
            placed = place_features(features, jnp.maximum(index, 0))
            is_image = ((inputs.input_ids == self.config.image_token_id) & (index >= 0))[..., None]
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

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                batch_shards: int | None = None) -> ModelInputs:
        """HF-shaped host inputs -> ModelInputs (numpy), what `forward` consumes. Not traceable: the
        image layout and positions depend on the values of image_grid_thw and the token ids.
        `batch_shards`: pack the images per group of rows (see model.inputs.prepare_inputs)."""
        return prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                              batch_shards=batch_shards)

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
