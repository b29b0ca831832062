"""Rotary embeddings: the vision encoder's 2D rotary and the decoder's M-RoPE.

`rope_index` is the host-side (numpy) equivalent of HF `Qwen2_5_VLModel.get_rope_index` for still
images; it runs once per batch outside jit, like the data pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, *, upcast: bool) -> jax.Array:
    """x: [..., L, H, D]; cos/sin: [..., L, D] (broadcast over heads).

    HF rotates vision q/k in float32 (upcast=True) but decoder q/k in the compute dtype with cos/sin
    already cast to it (upcast=False); matching both keeps bf16 runs close to HF's.
    """
    work = jnp.float32 if upcast else x.dtype
    xw = x.astype(work)
    cos = cos[..., None, :].astype(work)
    sin = sin[..., None, :].astype(work)
    return (xw * cos + rotate_half(xw) * sin).astype(x.dtype)


def vision_rotary(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """pos_hw: [..., N, 2] (row, col) patch positions -> cos, sin [..., N, head_dim].

    Frequencies cover half the head dim: the first quarter rotates with h, the second with w, and the
    whole is repeated (HF's recomposition), so the rotation spans the full head.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, spatial/2]
    freqs = jnp.concatenate([freqs[..., 0, :], freqs[..., 1, :]], axis=-1)  # [N, spatial]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope(position_ids: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...],
          dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """position_ids: [3, B, L] (t, h, w) -> cos, sin [B, L, head_dim] in `dtype`.

    Frequency j takes its angle from axis a(j), where mrope_section splits the head_dim/2 frequencies
    into t, h and w runs.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, D/2]
    axis_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    freqs = _select_axes(freqs, axis_of_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _select_axes(freqs: jax.Array, axis_of_freq: np.ndarray) -> jax.Array:
    """freqs [3, B, L, F] -> [B, L, F] taking frequency j from axis axis_of_freq[j]."""
    onehot = jnp.asarray(np.eye(3, dtype=np.float32)[axis_of_freq].T)  # [3, F]
    # A gather expressed as a select-sum keeps exact values (one non-zero term per output).
    return jnp.sum(jnp.where(onehot[:, None, None, :] > 0, freqs, 0.0), axis=0)


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_grid_thw: np.ndarray | None,
               *, image_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """3D positions [3, B, L] and rope deltas [B] for text with still images (HF get_rope_index).

    Text runs advance t, h, w together; an image of merged grid (1, H, W) takes t = start,
    h = start + row, w = start + col and the following text starts at start + max(H, W).
    Padding (attention_mask == 0) gets position 0 on all axes, as in HF.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3).tolist())
    positions = np.zeros((3, b, length), dtype=np.int32)
    deltas = np.zeros((b,), dtype=np.int32)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_image = ids == image_token_id
        pieces: list[np.ndarray] = []
        cur = 0
        i = 0
        n = len(ids)
        while i < n:
            j = i
            while j < n and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                # A run of image tokens may hold several adjacent images: consume grids until it is covered.
                k = i
                while k < j:
                    try:
                        t, h, w = next(grids)
                    except StopIteration:
                        raise ValueError(
                            f"sequence {row} has more image tokens than image_grid_thw describes"
                        ) from None
                    gh, gw = h // spatial_merge_size, w // spatial_merge_size
                    count = t * gh * gw
                    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                    pieces.append(np.stack([tt.ravel() + cur, hh.ravel() + cur, ww.ravel() + cur]))
                    cur += max(gh, gw)
                    k += count
                if k != j:
                    raise ValueError(
                        f"sequence {row}: a run of {j - i} image tokens does not match the image grids "
                        f"(they cover {k - i})"
                    )
            i = j
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int32)
        positions[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 - n) if n else 0
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw describes more images than the input_ids contain")
    return positions, deltas
