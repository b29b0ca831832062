"""Qwen2.5-VL vision encoder: patch embedding, window/full-attention blocks, patch merger."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import dot_product_attention, key_padding_mask, segment_mask
from .batch_axis import shard_batch, shard_batch_and_features
from .config import VisionConfig
from .layers import GatedMLP, Linear, RMSNorm, activation
from .rope import apply_rotary, vision_rotary
from .scan import RematPolicy, scan_stack, stack_modules


class VisionInputs(NamedTuple):
    """Device-side vision batch, in padded window order (see model.vision_layout).

    Two layouts: the images of the whole batch packed into one sequence (the shapes below), or one packed
    sequence per batch shard, stacked on a leading shard axis (every field [S, ...], see
    model.inputs.prepare_inputs's `batch_shards`): each shard's block holds only its own rows' images, and
    every index in it is shard-local, so a mesh that splits that axis encodes each image on one device.
    """

    patches: jax.Array  # [P, patch_dim] pixel rows (zeros in padding slots)
    valid: jax.Array  # [P] bool
    segment_ids: jax.Array  # [P] int32
    pos_hw: jax.Array  # [P, 2] int32
    # Per-segment gather for full attention (model.vision_layout); without them full attention falls
    # back to one masked attention over all P slots, which gives the same result at more cost.
    segment_slots: jax.Array | None = None  # [G, Ls] int32
    segment_valid: jax.Array | None = None  # [G, Ls] bool
    slot_in_segment: jax.Array | None = None  # [P] int32

    @property
    def shard_axes(self) -> int:
        """0 for one packed sequence, 1 for the per-shard layout (a leading [S] axis)."""
        return self.valid.ndim - 1


def take_rows(x: jax.Array, index: jax.Array, lead: int) -> jax.Array:
    """x[index] along the axis after `lead` leading (shard) axes, per shard: x [*S, N, ...], index [*S, ...]."""
    take = lambda a, i: a[i]  # noqa: E731
    for _ in range(lead):
        take = jax.vmap(take)
    return take(x, index)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        *lead, dim = x.shape
        qkv = self.qkv(x).reshape(*lead, 3, self.num_heads, dim // self.num_heads)
        q = apply_rotary(qkv[..., 0, :, :], cos, sin, upcast=True)
        k = apply_rotary(qkv[..., 1, :, :], cos, sin, upcast=True)
        out = dot_product_attention(q, k, qkv[..., 2, :, :], mask)
        return self.proj(out.reshape(*lead, dim))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True,
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then 2x2 neighbouring patches concatenated -> Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        merged = cfg.hidden_size * cfg.merge_unit
        self.merge_unit = cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        self.fc1 = Linear(merged, merged, use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = Linear(merged, cfg.out_hidden_size, use_bias=True, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] // self.merge_unit, -1)
        hidden = self.fc1(x)
        if hidden.ndim == 3:  # per shard [S, tokens, features]: fc1 column-parallel (see shard_batch_and_features)
            hidden = shard_batch_and_features(hidden)
        return self.fc2(activation("gelu")(hidden))  # (HF: nn.GELU, exact, in float32)


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

        def block(rngs: nnx.Rngs) -> VisionBlock:
            return VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        # cfg.scan_layers: one VisionBlock with stacked parameters [depth, ...], run under scan (model.scan)
        self.blocks = stack_modules(block, cfg.depth, rngs) if cfg.scan_layers else nnx.List(
            [block(rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Rematerialisation of one scanned block (model.scan.scan_stack's `remat`), set on a trace-local copy
        # by train.remat.with_remat; looped blocks are wrapped one by one instead.
        self.block_remat: RematPolicy = None

    def encode(self, inputs: VisionInputs) -> jax.Array:
        """Patch tokens after the last block, [P, hidden] (before the merger); [S, P, hidden] per shard."""
        cfg = self.cfg
        slots = cfg.window_slots
        lead = inputs.valid.shape[:-1]  # () or (S,): the per-shard layout keeps its shard axis throughout
        # Per shard: pin the shard axis to the mesh's batch axes (FSDP then gathers weights, not patches).
        pin = shard_batch if lead else (lambda x: x)
        n = inputs.valid.shape[-1]
        x = pin(self.patch_embed(inputs.patches))
        cos, sin = vision_rotary(inputs.pos_hw, cfg.head_dim, cfg.rope_theta)

        window_mask = key_padding_mask(inputs.valid.reshape(*lead, -1, slots), cfg.attention)
        win_cos = cos.reshape(*lead, -1, slots, cos.shape[-1])
        win_sin = sin.reshape(*lead, -1, slots, sin.shape[-1])
        full_block = self._full_attention_block(inputs, cos, sin, cfg.attention)

        fullatt = set(cfg.fullatt_block_indexes)

        def window_block(block, x):
            out = block(x.reshape(*lead, -1, slots, x.shape[-1]), win_cos, win_sin, window_mask)
            return pin(out.reshape(*lead, n, -1))

        def full_attention_block(block, x):
            return pin(full_block(block, x))

        if cfg.scan_layers:
            def step(block, x, is_full):  # one program for both kinds: the flag (scanned) picks the branch
                return nnx.cond(is_full, full_attention_block, window_block, block, x), None

            is_full = jnp.asarray([i in fullatt for i in range(cfg.depth)])
            return scan_stack(self.blocks, step, x, is_full, remat=self.block_remat)[0]
        for i, block in enumerate(self.blocks):
            x = full_attention_block(block, x) if i in fullatt else window_block(block, x)
        return x

    @staticmethod
    def _full_attention_block(inputs: VisionInputs, cos, sin, backend: str):
        """How a full-attention block runs: per segment when the layout gives the gather, else masked."""
        lead = inputs.shard_axes
        if inputs.segment_slots is None:
            mask = segment_mask(inputs.segment_ids, inputs.valid, backend)
            return lambda block, x: block(x, cos, sin, mask)
        gather = inputs.segment_slots
        mask = key_padding_mask(inputs.segment_valid, backend)
        seg_cos, seg_sin = take_rows(cos, gather, lead), take_rows(sin, gather, lead)

        def run(block, x):
            out = block(take_rows(x, gather, lead), seg_cos, seg_sin, mask)
            out = out.reshape(*out.shape[:lead], -1, out.shape[-1])  # [*S, G * Ls, hidden]
            return take_rows(out, inputs.slot_in_segment, lead)

        return run

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Merged image tokens in padded window order, [P // merge_unit, out_hidden] ([S, ...] per shard)."""
        return self.merger(self.encode(inputs))
