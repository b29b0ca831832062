"""Host-side preparation of HF-shaped inputs into what the jitted forward consumes."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .config import Qwen25VLConfig
from .rope import rope_index
from .vision import VisionInputs
from .vision_layout import VisionLayout, vision_layout


class ModelInputs(NamedTuple):
    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] int32
    position_ids: np.ndarray  # [3, B, L] int32
    rope_deltas: np.ndarray  # [B] int32, for decoding
    # [B, L] int32 merged-slot index feeding each image token (0 elsewhere; -1: an image-pad token that takes
    # no feature, one a model sampled); with per-shard vision an index into the features of the row's own shard
    image_feature_index: np.ndarray
    vision: VisionInputs | None


def prepare_inputs(cfg: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, *, batch_shards: int | None = None) -> ModelInputs:
    """HF-style (input_ids, attention_mask, pixel_values, image_grid_thw) -> ModelInputs (numpy).

    `batch_shards` None: every image of the batch in one packed sequence. An integer S: the B rows split
    into S contiguous groups (how a mesh's ("data", "fsdp") axes split the batch), each group's images
    packed on their own, padded to a common size and stacked [S, ...] (VisionInputs' per-shard layout);
    `image_feature_index` then points into the features of the row's own group.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be [batch, length] with both at least 1, got shape {input_ids.shape}")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    vocab = cfg.text.vocab_size
    if input_ids.min() < 0 or input_ids.max() >= vocab:  # the embedding lookup would clamp them silently
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got ids from {input_ids.min()} "
                         f"to {input_ids.max()}")
    input_ids = input_ids.astype(np.int32)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    if batch_shards is not None and (batch_shards < 1 or input_ids.shape[0] % batch_shards):
        raise ValueError(f"batch of {input_ids.shape[0]} rows does not split into batch_shards={batch_shards}")
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    merge = cfg.vision.spatial_merge_size
    if grid is not None and np.any(grid[:, 1:] % merge):
        raise ValueError(f"image_grid_thw {grid.tolist()}: each image's height and width in patches must be "
                         f"multiples of the spatial merge size {merge} (fxjax.process_image gives such grids)")
    positions, deltas = rope_index(input_ids, mask, grid, image_token_id=cfg.image_token_id,
                                   spatial_merge_size=cfg.vision.spatial_merge_size)
    feature_index = np.zeros_like(input_ids)
    vision = None
    if grid is not None:
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        expected_rows = int(np.prod(grid, axis=1).sum())
        if pixel_values.shape != (expected_rows, cfg.vision.patch_dim):
            raise ValueError(
                f"pixel_values shape {pixel_values.shape} does not match image_grid_thw "
                f"(expected ({expected_rows}, {cfg.vision.patch_dim}))"
            )
        if batch_shards is None:
            layout = vision_layout(grid, cfg.vision)
            _fill_feature_index(feature_index, input_ids, layout, cfg.image_token_id)
            vision = _vision_inputs(layout, pixel_values)
        else:
            rows = input_ids.shape[0] // batch_shards
            groups = [(s * rows, (s + 1) * rows) for s in range(batch_shards)]
            vision, indices = pack_vision_per_shard(cfg, input_ids, pixel_values, grid, groups)
            for (start, stop), index in zip(groups, indices):
                feature_index[start:stop] = index
    return ModelInputs(input_ids, mask, positions, deltas, feature_index, vision)


def _fill_feature_index(feature_index: np.ndarray, input_ids: np.ndarray, layout: VisionLayout,
                        image_token_id: int) -> None:
    """Write the layout's merged slots into `feature_index` at the image tokens (row-major order, as HF's
    masked_scatter)."""
    is_image = input_ids == image_token_id
    n_tokens, n_features = int(is_image.sum()), int(layout.merged_index.shape[0])
    if n_tokens != n_features:
        raise ValueError(f"Image features and image tokens do not match: tokens {n_tokens}, features {n_features}")
    feature_index[is_image] = layout.merged_index


def _vision_inputs(layout: VisionLayout, pixel_values: np.ndarray) -> VisionInputs:
    if pixel_values.shape[0] == 0:  # a shard without images: padding slots only
        patches = np.zeros((layout.num_slots, pixel_values.shape[1]), pixel_values.dtype)
    else:
        patches = pixel_values[layout.patch_source] * layout.valid[:, None]
    return VisionInputs(patches, layout.valid, layout.segment_ids, layout.pos_hw, layout.segment_slots,
                        layout.segment_valid, layout.slot_in_segment)


def image_offsets(input_ids: np.ndarray, grid: np.ndarray, cfg: Qwen25VLConfig) -> np.ndarray:
    """[B + 1]: the images of row b are grid[offsets[b]:offsets[b + 1]] (images follow their tokens' row-major
    order). Every image's tokens must lie in one row."""
    tokens_per_image = np.prod(grid, axis=1) // cfg.vision.merge_unit
    per_row = (input_ids == cfg.image_token_id).sum(axis=1)
    if int(per_row.sum()) != int(tokens_per_image.sum()):
        raise ValueError(f"Image features and image tokens do not match: tokens {int(per_row.sum())}, "
                         f"features {int(tokens_per_image.sum())}")
    image_ends = np.concatenate([[0], np.cumsum(tokens_per_image)])  # strictly increasing
    row_ends = np.concatenate([[0], np.cumsum(per_row)])
    offsets = np.searchsorted(image_ends, row_ends)
    bad = np.flatnonzero(image_ends[offsets] != row_ends)
    if bad.size:
        raise ValueError(f"the image tokens of row {int(bad[0]) - 1} end inside an image: image_grid_thw lists "
                         f"images whose tokens do not split at row boundaries")
    return offsets.astype(np.int64)


def pack_vision_per_shard(cfg: Qwen25VLConfig, input_ids: np.ndarray, pixel_values: np.ndarray, grid: np.ndarray,
                          row_groups: Sequence[tuple[int, int]]) -> tuple[VisionInputs, list[np.ndarray]]:
    """The images of each group of rows [start, stop) packed on their own (model.vision_layout), padded to
    common sizes and stacked [S, ...]; with, per group, the feature index of its rows ([stop - start, L],
    into that group's own merged features). Groups may overlap (a row's images are then packed in each)."""
    offsets = image_offsets(input_ids, grid, cfg)
    pixel_start = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
    visions, indices = [], []
    for start, stop in row_groups:
        first, last = offsets[start], offsets[stop]
        layout = vision_layout(grid[first:last], cfg.vision)
        index = np.zeros((stop - start, input_ids.shape[1]), input_ids.dtype)
        _fill_feature_index(index, input_ids[start:stop], layout, cfg.image_token_id)
        visions.append(_vision_inputs(layout, pixel_values[pixel_start[first]:pixel_start[last]]))
        indices.append(index)
    return stack_vision(visions), indices


def stack_vision(visions: Sequence[VisionInputs], slots: int = 0, segments: tuple[int, int] = (0, 0)) -> VisionInputs:
    """Pad packed sequences (of one layout) to common sizes, at least `slots` and `segments` (count,
    length), and stack them on a new leading axis."""
    slots = max([slots] + [v.valid.shape[-1] for v in visions])
    segs = None
    if visions[0].segment_slots is not None:
        segs = (max([segments[0]] + [v.segment_slots.shape[-2] for v in visions]),
                max([segments[1]] + [v.segment_slots.shape[-1] for v in visions]))
    padded = [pad_vision(v, slots, segs) for v in visions]
    return VisionInputs(*(None if parts[0] is None else np.stack(parts) for parts in zip(*padded)))


def pad_vision(vision: VisionInputs, slots: int, segments: tuple[int, int] | None) -> VisionInputs:
    """Pad the packed patch axis to `slots` (invalid slots) and the per-segment gather (when the layout has
    one) to [segments, segment_length]; indices into the flattened segment block are remapped. Works on
    either layout (the per-shard one pads every shard alike)."""
    fields = set(VisionInputs._fields)
    known = {"patches", "valid", "segment_ids", "pos_hw", "segment_slots", "segment_valid", "slot_in_segment"}
    if fields - known:  # a new field in model.vision.VisionInputs: teach this function to pad it
        raise NotImplementedError(f"pad_vision cannot pad VisionInputs fields {sorted(fields - known)}")
    v = {k: (None if getattr(vision, k) is None else np.asarray(getattr(vision, k))) for k in VisionInputs._fields}
    axis = v["valid"].ndim - 1  # the slot axis, after any shard axis
    extra = slots - v["valid"].shape[axis]

    def pad(x, value):
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[axis] = extra
        return np.concatenate([x, np.full(shape, value, x.dtype)], axis=axis)

    out = dict(patches=pad(v["patches"], 0), valid=pad(v["valid"], False), segment_ids=pad(v["segment_ids"], -1),
               pos_hw=pad(v["pos_hw"], 0))
    if v.get("segment_slots") is not None:
        n_seg, seg_len = segments
        *lead, old_n, old_len = v["segment_slots"].shape
        seg_slots = np.zeros((*lead, n_seg, seg_len), v["segment_slots"].dtype)
        seg_valid = np.zeros((*lead, n_seg, seg_len), bool)
        seg_slots[..., :old_n, :old_len] = v["segment_slots"]
        seg_valid[..., :old_n, :old_len] = v["segment_valid"]
        where = v["slot_in_segment"]
        where = (where // old_len) * seg_len + where % old_len
        out.update(segment_slots=seg_slots, segment_valid=seg_valid, slot_in_segment=pad(where.astype(np.int32), 0))
    return VisionInputs(**out)


__all__ = ["ModelInputs", "image_offsets", "pack_vision_per_shard", "pad_vision", "prepare_inputs", "stack_vision"]
