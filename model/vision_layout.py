"""Host-side layout of a batch's image patches for the jitted vision encoder.

All images of a batch (any number, any grids) become one token sequence in *padded window order*:
every attention window of window_merged_side x window_merged_side merged units gets a fixed number of
slots (partial windows at the right/bottom edges are padded), and the number of windows is rounded up
to a bucket so that only a few shapes are ever compiled. Window attention is then a reshape to
[windows, slots]. Full attention runs per segment (one per image frame, as HF's cu_seqlens): the slots
of each segment are gathered into a [segments, segment_slots] block, so a batch of n images costs n
attentions over one image each, not one over all of them. HF's own window permutation and
un-permutation become one gather, `merged_index`. On a mesh, model.inputs.prepare_inputs(batch_shards=S) lays
out each batch shard's images this way on their own and stacks the S layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import VisionConfig

# Padded sizes: powers of two and 1.5x steps between them bound padding to 50 %.
_BUCKET_BASES = (1, 1.5)


def round_up_to_bucket(n: int) -> int:
    """Smallest value >= n in {1, 2, 3, 4, 6, 8, 12, 16, 24, ...}: the padded size of a count (windows,
    segments, loss slots), so that only a few shapes ever compile."""
    n = max(n, 1)
    p = 1
    while True:
        for base in _BUCKET_BASES:
            size = int(p * base)
            if size >= n:
                return size
        p *= 2


@dataclass(frozen=True)
class VisionLayout:
    """numpy arrays, P = windows * window_slots slots, M = merged image tokens (HF order)."""

    patch_source: np.ndarray  # [P] int32 row of pixel_values feeding each slot (0 for padding)
    valid: np.ndarray  # [P] bool
    segment_ids: np.ndarray  # [P] int32 image-frame id for full attention (-1 for padding)
    pos_hw: np.ndarray  # [P, 2] int32 (row, col) of the patch in its image
    merged_index: np.ndarray  # [M] int32 merged token (HF order) -> merged slot (P // merge_unit)
    window_slots: int
    segment_slots: np.ndarray  # [S, Ls] int32 slots of each segment (0 in padding)
    segment_valid: np.ndarray  # [S, Ls] bool
    slot_in_segment: np.ndarray  # [P] int32 position of each slot in the flattened [S * Ls] block (0 for padding)

    @property
    def num_slots(self) -> int:
        return int(self.valid.shape[0])


def vision_layout(image_grid_thw: np.ndarray, cfg: VisionConfig) -> VisionLayout:
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    side = cfg.window_merged_side
    unit = cfg.merge_unit
    window_slots = cfg.window_slots

    # Per window: which HF patch rows fill its slots.
    windows_src: list[np.ndarray] = []
    windows_pos: list[np.ndarray] = []
    windows_seg: list[int] = []
    merged_index: list[np.ndarray] = []
    row_offset = 0
    segment = 0
    for t, h, w in grids.tolist():
        if h % m or w % m:
            raise ValueError(f"image grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        gh, gw = h // m, w // m
        nwh, nww = -(-gh // side), -(-gw // side)
        bh, bw = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # merged unit coords
        mh, mw = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        for _ in range(t):
            # HF patch order: merged units row-major, then the m x m patches inside each unit.
            hf_merged = (bh * gw + bw)  # [gh, gw]
            window_of_unit = (bh // side) * nww + (bw // side)
            slot_of_unit = (bh % side) * side + (bw % side)
            first_window = len(windows_src)
            src = np.zeros((nwh * nww, side * side, unit), np.int64)
            pos = np.zeros((nwh * nww, side * side, unit, 2), np.int64)
            ok = np.zeros((nwh * nww, side * side, unit), bool)
            rows = row_offset + hf_merged[..., None] * unit + np.arange(unit)  # [gh, gw, unit]
            src[window_of_unit, slot_of_unit] = rows
            ok[window_of_unit, slot_of_unit] = True
            pos[window_of_unit, slot_of_unit, :, 0] = (bh * m)[..., None] + mh.ravel()
            pos[window_of_unit, slot_of_unit, :, 1] = (bw * m)[..., None] + mw.ravel()
            merged_index.append(((first_window + window_of_unit) * side * side + slot_of_unit).ravel())
            for wi in range(nwh * nww):
                windows_src.append(np.where(ok[wi], src[wi], -1).ravel())
                windows_pos.append(pos[wi].reshape(-1, 2))
                windows_seg.append(segment)
            row_offset += gh * gw * unit
            segment += 1

    n_windows = round_up_to_bucket(len(windows_src))
    src = np.full((n_windows, window_slots), -1, np.int64)
    pos = np.zeros((n_windows, window_slots, 2), np.int64)
    seg = np.full((n_windows, window_slots), -1, np.int64)
    for wi, (s, p, g) in enumerate(zip(windows_src, windows_pos, windows_seg)):
        src[wi], pos[wi] = s, p
        seg[wi] = np.where(s >= 0, g, -1)
    valid = src.ravel() >= 0
    segment_slots, segment_valid, slot_in_segment = _segment_blocks(seg.ravel(), window_slots)
    return VisionLayout(
        patch_source=np.where(valid, src.ravel(), 0).astype(np.int32),
        valid=valid,
        segment_ids=seg.ravel().astype(np.int32),
        pos_hw=pos.reshape(-1, 2).astype(np.int32),
        merged_index=(np.concatenate(merged_index) if merged_index else np.zeros((0,), np.int64)).astype(np.int32),
        window_slots=window_slots,
        segment_slots=segment_slots,
        segment_valid=segment_valid,
        slot_in_segment=slot_in_segment,
    )


def _segment_blocks(segment_of_slot: np.ndarray, window_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather indices for per-segment full attention; sizes bucketed like the window count."""
    ids = [g for g in np.unique(segment_of_slot) if g >= 0]
    members = [np.flatnonzero(segment_of_slot == g) for g in ids]
    longest_windows = max((len(m) + window_slots - 1) // window_slots for m in members) if members else 1
    length = round_up_to_bucket(longest_windows) * window_slots
    count = round_up_to_bucket(len(members))
    slots = np.zeros((count, length), np.int32)
    ok = np.zeros((count, length), bool)
    where = np.zeros(segment_of_slot.shape, np.int32)
    for i, m in enumerate(members):
        slots[i, :len(m)] = m
        ok[i, :len(m)] = True
        where[m] = i * length + np.arange(len(m))
    return slots, ok, where
