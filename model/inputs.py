"""Host-side preparation of HF-shaped inputs into what the jitted forward consumes."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import Qwen25VLConfig
from .rope import rope_index
from .vision import VisionInputs
from .vision_layout import vision_layout


class ModelInputs(NamedTuple):
    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] int32
    position_ids: np.ndarray  # [3, B, L] int32
    rope_deltas: np.ndarray  # [B] int32, for decoding
    image_feature_index: np.ndarray  # [B, L] int32 merged-slot index feeding each image token (0 elsewhere)
    vision: VisionInputs | None


def prepare_inputs(cfg: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None) -> ModelInputs:
    """HF-style (input_ids, attention_mask, pixel_values, image_grid_thw) -> ModelInputs (numpy)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    input_ids = input_ids.astype(np.int32)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
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
        layout = vision_layout(grid, cfg.vision)
        is_image = input_ids == cfg.image_token_id
        n_tokens, n_features = int(is_image.sum()), int(layout.merged_index.shape[0])
        if n_tokens != n_features:
            raise ValueError(f"Image features and image tokens do not match: tokens {n_tokens}, features {n_features}")
        feature_index[is_image] = layout.merged_index  # row-major order, as HF's masked_scatter
        patches = pixel_values[layout.patch_source] * layout.valid[:, None]
        vision = VisionInputs(patches, layout.valid, layout.segment_ids, layout.pos_hw, layout.segment_slots,
                              layout.segment_valid, layout.slot_in_segment)
    return ModelInputs(input_ids, mask, positions, deltas, feature_index, vision)
