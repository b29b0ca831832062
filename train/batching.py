"""Host batches from the data pipeline -> the fixed-structure arrays the jitted step consumes.

One optimiser step takes ``grad_accum`` micro-batches. They are padded to common shapes and stacked on
a leading axis, so the step scans them:

* text: input_ids / attention_mask re-padded to the longest micro-batch's length bucket, then
  `model.prepare` (M-RoPE positions, image-feature index, vision layout);
* vision: the packed patch sequence padded with invalid windows to the largest window count (a count
  from `model.vision_layout.round_up_to_bucket`, so few shapes compile);
* loss: the supervised positions of each micro-batch gathered into N slots (`train.losses.loss_targets`),
  N from a small set of sizes (multiples of 64 in the same bucket progression).

Every process builds the same global batch (the data pipeline runs with one shard), and
`place_batch` puts it on the mesh: the batch axis sharded over ("data", "fsdp"), the packed vision axis
replicated, as in `fxjax.sharding.shard_inputs`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from fxjax.model.inputs import ModelInputs, prepare_inputs
from fxjax.model.vision import VisionInputs
from fxjax.model.vision_layout import round_up_to_bucket
from fxjax.sharding import REPLICATED, batch_spec, put
from fxjax.train.losses import IGNORE_INDEX, LossTargets, loss_targets

__all__ = ["StepBatch", "batch_shardings", "build_step_batch", "grow_floor", "pad_rows", "pad_vision_inputs", "place_batch", "shape_of"]

TARGET_QUANTUM = 64


class StepBatch(NamedTuple):
    inputs: ModelInputs  # every field with a leading [A] micro-batch axis
    targets: LossTargets  # [A, N]: the supervised tokens of each micro-batch, flattened


def _repad(batch: dict, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b, n = ids.shape
    if n == length:
        return ids, mask, labels
    out_ids = np.full((b, length), pad_id, ids.dtype)
    out_mask = np.zeros((b, length), mask.dtype)
    out_labels = np.full((b, length), IGNORE_INDEX, labels.dtype)
    out_ids[:, :n], out_mask[:, :n], out_labels[:, :n] = ids, mask, labels
    return out_ids, out_mask, out_labels


def pad_rows(batch: dict, rows: int) -> dict:
    """Append copies of the last example with no supervised tokens until the batch has `rows` rows
    (an incomplete last eval batch keeps the compiled shape and adds nothing to the loss)."""
    b = batch["input_ids"].shape[0]
    if b >= rows:
        return batch
    extra = rows - b
    out = dict(batch)
    for key in ("input_ids", "attention_mask"):
        out[key] = np.concatenate([batch[key], np.repeat(batch[key][-1:], extra, axis=0)])
    out["labels"] = np.concatenate([batch["labels"], np.full((extra, batch["labels"].shape[1]), IGNORE_INDEX,
                                                            batch["labels"].dtype)])
    if batch.get("pixel_values") is not None:
        grid = np.asarray(batch["image_grid_thw"])
        last_rows = int(np.prod(grid[-1]))
        out["pixel_values"] = np.concatenate([batch["pixel_values"]] + [batch["pixel_values"][-last_rows:]] * extra)
        out["image_grid_thw"] = np.concatenate([grid] + [grid[-1:]] * extra)
    out["meta"] = list(batch.get("meta", [])) + [None] * extra
    return out


def pad_vision(vision: VisionInputs, slots: int, segments: tuple[int, int] | None) -> VisionInputs:
    """Pad the packed patch axis to `slots` (invalid slots) and the per-segment gather (when the layout has
    one) to [segments, segment_length]; indices into the flattened segment block are remapped."""
    fields = set(VisionInputs._fields)
    known = {"patches", "valid", "segment_ids", "pos_hw", "segment_slots", "segment_valid", "slot_in_segment"}
    if fields - known:  # a new field in model.vision.VisionInputs: teach this function to pad it
        raise NotImplementedError(f"train.batching cannot pad VisionInputs fields {sorted(fields - known)}")
    v = {k: (None if getattr(vision, k) is None else np.asarray(getattr(vision, k))) for k in VisionInputs._fields}
    extra = slots - v["valid"].shape[0]

    def pad(x, value):
        if extra == 0:
            return x
        return np.concatenate([x, np.full((extra, *x.shape[1:]), value, x.dtype)])

    out = dict(patches=pad(v["patches"], 0), valid=pad(v["valid"], False), segment_ids=pad(v["segment_ids"], -1),
               pos_hw=pad(v["pos_hw"], 0))
    if "segment_slots" in v and v.get("segment_slots") is not None:
        n_seg, seg_len = segments
        old_n, old_len = v["segment_slots"].shape
        seg_slots = np.zeros((n_seg, seg_len), v["segment_slots"].dtype)
        seg_valid = np.zeros((n_seg, seg_len), bool)
        seg_slots[:old_n, :old_len] = v["segment_slots"]
        seg_valid[:old_n, :old_len] = v["segment_valid"]
        where = v["slot_in_segment"]
        where = (where // old_len) * seg_len + where % old_len
        out.update(segment_slots=seg_slots, segment_valid=seg_valid, slot_in_segment=pad(where.astype(np.int32), 0))
    return VisionInputs(**out)


def pad_vision_inputs(inputs: ModelInputs, model_cfg, floor: dict[str, int]) -> tuple[ModelInputs, dict[str, int]]:
    """Pad one (unstacked) ModelInputs' vision up to `floor` (windows, segments); returns it and the grown
    floor. For generation, where the text length is the prompt's bucket."""
    v = inputs.vision
    if v is None:
        return inputs, floor
    vcfg = model_cfg.vision
    window_slots = vcfg.window_slots
    windows = max(int(floor.get("windows", 0)), v.valid.shape[0] // window_slots)
    seg = getattr(v, "segment_slots", None)
    segments = None if seg is None else (max(int(floor.get("segments", 0)), seg.shape[0]),
                                         max(int(floor.get("segment_length", 0)), seg.shape[1]))
    padded = pad_vision(v, windows * window_slots, segments)
    grown = dict(floor, windows=windows)
    if segments is not None:
        grown.update(segments=segments[0], segment_length=segments[1])
    return inputs._replace(vision=padded), grown


def shape_of(batch: StepBatch, model_cfg) -> dict[str, int]:
    """The padded sizes of a StepBatch: length, vision windows, vision segments, loss slots."""
    vcfg = model_cfg.vision
    window_slots = vcfg.window_slots
    v = batch.inputs.vision
    seg = getattr(v, "segment_slots", None) if v is not None else None
    return dict(length=int(batch.inputs.input_ids.shape[-1]),
                windows=0 if v is None else int(v.valid.shape[-1]) // window_slots,
                segments=0 if seg is None else int(seg.shape[-2]),
                segment_length=0 if seg is None else int(seg.shape[-1]),
                targets=int(batch.targets.index.shape[-1]))


def grow_floor(floor: dict[str, int], batch: StepBatch, model_cfg) -> dict[str, int]:
    """Element-wise max of a shape floor and a batch's shape (see build_step_batch's `floor`)."""
    shape = shape_of(batch, model_cfg)
    return {k: max(int(floor.get(k, 0)), v) for k, v in shape.items()}


def build_step_batch(micro_batches: Sequence[dict], model_cfg, pad_id: int, *,
                     floor: dict[str, int] | None = None) -> StepBatch:
    """Pipeline batches (dicts of numpy arrays, one per micro-batch) -> one StepBatch.

    `floor` ({length, windows, segments, segment_length, targets}) pads every size up to at least that
    value. The training loop passes the running maximum of the shapes seen (`grow_floor`), so shapes only
    grow: a handful of compiles early on, then one program for the rest of the run. (The floor is part of
    the checkpoint: padding changes the order of float reductions, and a resumed run must pad alike.)
    """
    floor = floor or {}
    min_length, min_windows, min_targets = (int(floor.get(k, 0)) for k in ("length", "windows", "targets"))
    if not micro_batches:
        raise ValueError("no micro-batches")
    rows = {mb["input_ids"].shape[0] for mb in micro_batches}
    if len(rows) != 1:
        raise ValueError(f"micro-batches differ in size: {sorted(rows)}")
    length = max(min_length, max(mb["input_ids"].shape[1] for mb in micro_batches))
    prepared, labels = [], []
    for mb in micro_batches:
        ids, mask, lab = _repad(mb, length, pad_id)
        prepared.append(prepare_inputs(model_cfg, ids, mask, mb.get("pixel_values"), mb.get("image_grid_thw")))
        labels.append(lab)
    vcfg = model_cfg.vision
    window_slots = vcfg.window_slots
    with_vision = [p.vision is not None for p in prepared]
    vision = None
    if any(with_vision):
        if not all(with_vision):
            raise ValueError("some micro-batches of a step have images and some do not")
        windows = max(p.vision.valid.shape[0] // window_slots for p in prepared)
        slots = round_up_to_bucket(max(windows, min_windows)) * window_slots
        segments = None
        if getattr(prepared[0].vision, "segment_slots", None) is not None:
            segments = (max([int(floor.get("segments", 0))] + [p.vision.segment_slots.shape[0] for p in prepared]),
                        max([int(floor.get("segment_length", 0))]
                            + [p.vision.segment_slots.shape[1] for p in prepared]))
        padded = [pad_vision(p.vision, slots, segments) for p in prepared]
        vision = VisionInputs(*(None if parts[0] is None else np.stack(parts) for parts in zip(*padded)))
    need = max(int((np.asarray(lab)[:, 1:] != IGNORE_INDEX).sum()) for lab in labels)
    size = round_up_to_bucket(max(1, -(-max(need, min_targets) // TARGET_QUANTUM))) * TARGET_QUANTUM
    targets = [loss_targets(lab, size=size) for lab in labels]
    inputs = ModelInputs(
        input_ids=np.stack([p.input_ids for p in prepared]),
        attention_mask=np.stack([p.attention_mask for p in prepared]),
        position_ids=np.stack([p.position_ids for p in prepared]),
        rope_deltas=np.stack([p.rope_deltas for p in prepared]),
        image_feature_index=np.stack([p.image_feature_index for p in prepared]),
        vision=vision)
    return StepBatch(inputs, LossTargets(*(np.stack(parts) for parts in zip(*targets))))


def batch_shardings(batch: StepBatch, mesh: Mesh, batch_axis: bool = True) -> StepBatch:
    """NamedShardings for a StepBatch: [A, B, ...] arrays shard B, position_ids [A, 3, B, L] too, the loss
    slots [A, N] shard N, the packed vision arrays are replicated. `batch_axis` False replicates everything (batches smaller
    than the data-parallel degree)."""
    def s(x, dim):
        return NamedSharding(mesh, batch_spec(np.ndim(x), dim) if batch_axis and dim is not None else REPLICATED)

    i = batch.inputs
    vision = None if i.vision is None else VisionInputs(*(None if v is None else s(v, None) for v in i.vision))
    inputs = ModelInputs(s(i.input_ids, 1), s(i.attention_mask, 1), s(i.position_ids, 2), s(i.rope_deltas, 1),
                         s(i.image_feature_index, 1), vision)
    return StepBatch(inputs, LossTargets(*(s(t, 1) for t in batch.targets)))  # [A, N]: N over the batch axes


def place_batch(batch: StepBatch, shardings: StepBatch):
    """Host StepBatch -> global jax arrays (each process fills its addressable shards)."""
    return jax.tree.map(lambda x, sh: put(np.asarray(x), sh), batch, shardings)
