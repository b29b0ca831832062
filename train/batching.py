"""Host batches from the data pipeline -> the fixed-structure arrays the jitted step consumes.

One optimiser step takes ``grad_accum`` micro-batches. They are padded to common shapes and stacked on
a leading axis, so the step scans them:

* text: input_ids / attention_mask re-padded to the longest micro-batch's length bucket, then
  `model.prepare` (M-RoPE positions, image-feature index, vision layout);
* vision: the packed patch sequence padded with invalid windows to the largest window count (a count
  from `model.vision_layout.round_up_to_bucket`, so few shapes compile);
* loss: the supervised positions of each micro-batch gathered into N slots (`train.losses.loss_targets`),
  N from a small set of sizes (multiples of 64 in the same bucket progression).

Each process builds only its rows of the global batch (the data pipeline's `batch_rows`: the rows of the
batch shards on its own devices, `fxjax.device_mesh.process_batch_shards`), and `place_local_batch` assembles
the global arrays from every process's part (`jax.make_array_from_process_local_data`): the batch axis
sharded over ("data", "fsdp"); the vision arrays, built per batch shard (`build_step_batch(...,
batch_shards=S)`), shard their shard axis the same way, so each device encodes only the images of its own
rows (with S = 1 they are one replicated sequence). With S > 1 the loss slots are laid out per batch shard
too (each shard's supervised tokens in its own block of slots), so a process fills its block alone. The
padded sizes must agree over the processes (`agree_floor`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from fxjax.host_exchange import BARRIER_TIMEOUT_S, allgather_json
from fxjax.model.inputs import ModelInputs, pad_vision, prepare_inputs, stack_vision
from fxjax.model.vision import VisionInputs
from fxjax.model.vision_layout import round_up_to_bucket
from fxjax.device_mesh import along_batch, inputs_shardings, process_batch_shards, put
from fxjax.device_mesh import batch_shards as mesh_batch_shards
from fxjax.train.losses import IGNORE_INDEX, LossTargets, loss_targets

__all__ = ["ProcessRows", "StepBatch", "agree_floor", "agree_sizes", "batch_shardings", "build_step_batch",
           "check_same_records",
           "grow_floor", "inputs_with_patch_dtype", "pad_rows", "pad_vision_inputs", "place_batch", "vision_floor",
           "place_local_batch", "process_rows", "shape_of", "with_patch_dtype"]

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


def vision_floor(visions: Sequence[VisionInputs], model_cfg, floor: dict[str, int], *, prefix: str = "",
                 bucket: bool = True) -> tuple[int, tuple[int, int] | None, dict[str, int]]:
    """The common vision sizes of packed `visions` at least `floor`'s (its keys `prefix` + windows, segments,
    segment_length): (windows, (segments, segment length) or None without segments, the grown floor). The
    windows are rounded up to a bucket unless `bucket` is False."""
    window_slots = model_cfg.vision.window_slots
    windows = max([int(floor.get(prefix + "windows", 0))] + [v.valid.shape[-1] // window_slots for v in visions])
    windows = round_up_to_bucket(windows) if bucket else windows
    segments = None
    if getattr(visions[0], "segment_slots", None) is not None:
        segments = (max([int(floor.get(prefix + "segments", 0))] + [v.segment_slots.shape[-2] for v in visions]),
                    max([int(floor.get(prefix + "segment_length", 0))] + [v.segment_slots.shape[-1] for v in visions]))
    grown = dict(floor, **{prefix + "windows": windows})
    if segments is not None:
        grown.update({prefix + "segments": segments[0], prefix + "segment_length": segments[1]})
    return windows, segments, grown


def pad_vision_inputs(inputs: ModelInputs, model_cfg, floor: dict[str, int]) -> tuple[ModelInputs, dict[str, int]]:
    """Pad one (unstacked) ModelInputs' vision up to `floor` (windows, segments); returns it and the grown
    floor. For generation, where the text length is the prompt's bucket."""
    if inputs.vision is None:
        return inputs, floor
    windows, segments, grown = vision_floor([inputs.vision], model_cfg, floor, bucket=False)
    return inputs._replace(vision=pad_vision(inputs.vision, windows * model_cfg.vision.window_slots, segments)), grown


def shape_of(batch: StepBatch, model_cfg, batch_shards: int = 1) -> dict[str, int]:
    """The padded sizes of a StepBatch: length, vision windows, vision segments, loss slots (per batch shard:
    `batch_shards` is the number of shards the batch was built with)."""
    vcfg = model_cfg.vision
    window_slots = vcfg.window_slots
    v = batch.inputs.vision
    seg = getattr(v, "segment_slots", None) if v is not None else None
    return dict(length=int(batch.inputs.input_ids.shape[-1]),
                windows=0 if v is None else int(v.valid.shape[-1]) // window_slots,
                segments=0 if seg is None else int(seg.shape[-2]),
                segment_length=0 if seg is None else int(seg.shape[-1]),
                targets=int(batch.targets.index.shape[-1]) // batch_shards)


def grow_floor(floor: dict[str, int], batch: StepBatch, model_cfg, batch_shards: int = 1) -> dict[str, int]:
    """Element-wise max of a shape floor and a batch's shape (see build_step_batch's `floor`)."""
    shape = shape_of(batch, model_cfg, batch_shards)
    return {k: max(int(floor.get(k, 0)), v) for k, v in shape.items()}


def build_step_batch(micro_batches: Sequence[dict], model_cfg, pad_id: int, *,
                     floor: dict[str, int] | None = None, batch_shards: int = 1,
                     shard_ids: Sequence[int] | None = None) -> StepBatch:
    """Pipeline batches (dicts of numpy arrays, one per micro-batch) -> one StepBatch.

    `batch_shards` S > 1 (the mesh's data x fsdp, `fxjax.device_mesh.batch_shards`, when the batch axis is
    sharded): each micro-batch's rows split into S contiguous groups, each group's images packed on their
    own (vision fields [A, S, P_s, ...], image indices shard-local; `model.inputs.prepare_inputs`), so each
    device encodes only its rows' images. S = 1 (and no `shard_ids`): every image of a micro-batch in one
    sequence [A, P, ...].
    The vision sizes and the loss slots in `floor` are then per shard, and the loss slots are laid out per
    shard: shard s's supervised tokens in slots [s * n, (s + 1) * n).

    `shard_ids`: the global batch-shard indices of the S shards given (default 0 .. S - 1, the whole batch),
    when a process builds only its own shards' rows: the loss slots' flat positions are those of the global
    batch (row = shard_id * rows per shard + row in shard).

    `floor` ({length, windows, segments, segment_length, targets}) pads every size up to at least that
    value. The training loop passes the running maximum of the shapes seen (`grow_floor`), so shapes only
    grow: a handful of compiles early on, then one program for the rest of the run. (The floor is part of
    the checkpoint: padding changes the order of float reductions, and a resumed run must pad alike.)
    """
    floor = floor or {}
    min_length, min_targets = (int(floor.get(k, 0)) for k in ("length", "targets"))
    if not micro_batches:
        raise ValueError("no micro-batches")
    rows = {mb["input_ids"].shape[0] for mb in micro_batches}
    if len(rows) != 1:
        raise ValueError(f"micro-batches differ in size: {sorted(rows)}")
    length = max(min_length, max(mb["input_ids"].shape[1] for mb in micro_batches))
    per_shard = batch_shards > 1 or shard_ids is not None  # a process's single shard of several too
    prepared, labels = [], []
    for mb in micro_batches:
        ids, mask, lab = _repad(mb, length, pad_id)
        prepared.append(prepare_inputs(model_cfg, ids, mask, mb.get("pixel_values"), mb.get("image_grid_thw"),
                                       batch_shards=batch_shards if per_shard else None))
        labels.append(lab)
    with_vision = [p.vision is not None for p in prepared]
    vision = None
    if any(with_vision):
        if not all(with_vision):
            raise ValueError("some micro-batches of a step have images and some do not")
        windows, segments, _ = vision_floor([p.vision for p in prepared], model_cfg, floor)
        vision = stack_vision([p.vision for p in prepared], windows * model_cfg.vision.window_slots, segments)
    targets = _shard_targets(labels, batch_shards, shard_ids, min_targets)
    inputs = ModelInputs(
        input_ids=np.stack([p.input_ids for p in prepared]),
        attention_mask=np.stack([p.attention_mask for p in prepared]),
        position_ids=np.stack([p.position_ids for p in prepared]),
        rope_deltas=np.stack([p.rope_deltas for p in prepared]),
        image_feature_index=np.stack([p.image_feature_index for p in prepared]),
        vision=vision)
    return StepBatch(inputs, LossTargets(*(np.stack(parts) for parts in zip(*targets))))


def _shard_targets(labels: Sequence[np.ndarray], shards: int, shard_ids: Sequence[int] | None,
                   min_slots: int) -> list[LossTargets]:
    """Each micro-batch's loss slots: one block of n slots per batch shard (n from the bucket progression,
    at least `min_slots`), flat positions in the global batch's [B, L]."""
    shard_ids = list(range(shards)) if shard_ids is None else [int(i) for i in shard_ids]
    if len(shard_ids) != shards:
        raise ValueError(f"{len(shard_ids)} shard ids for {shards} batch shards")
    rows = labels[0].shape[0] // shards
    parts = [[np.asarray(lab)[s * rows:(s + 1) * rows] for s in range(shards)] for lab in labels]
    need = max(int((part[:, 1:] != IGNORE_INDEX).sum()) for micro in parts for part in micro)
    size = round_up_to_bucket(max(1, -(-max(need, min_slots) // TARGET_QUANTUM))) * TARGET_QUANTUM
    out = []
    for micro in parts:
        blocks = []
        for shard_id, part in zip(shard_ids, micro):
            t = loss_targets(part, size=size)
            offset = shard_id * rows * part.shape[1]  # the shard's first row in the global batch
            blocks.append(t._replace(index=(t.index + offset).astype(np.int32)))
        out.append(LossTargets(*(np.concatenate(parts_) for parts_ in zip(*blocks))))
    return out


def batch_shardings(batch: StepBatch, mesh: Mesh, batch_axis: bool = True, *,
                    built_shards: int | None = None) -> StepBatch:
    """NamedShardings for a StepBatch: [A, B, ...] arrays shard B, position_ids [A, 3, B, L] too, the loss
    slots [A, N] shard N; per-shard vision arrays [A, S, ...] shard S (S must be the mesh's data x fsdp), one
    packed vision sequence [A, P, ...] is replicated. `batch_axis` False replicates everything (batches
    smaller than the data-parallel degree; their vision must be one packed sequence). `built_shards`: the
    number of batch shards `batch` holds when it is one process's part (`place_local_batch`); default all."""
    i = batch.inputs
    if i.vision is not None and np.ndim(i.vision.valid) == 3:  # [A, S, P]: per batch shard
        shards = int(np.shape(i.vision.valid)[1])
        want = mesh_batch_shards(mesh) if batch_axis else 1
        if built_shards is not None and batch_axis:
            want = built_shards
        if shards != want:
            raise ValueError(f"the batch's vision is packed for {shards} batch shards but the mesh {dict(mesh.shape)} "
                             f"{'splits the batch ' + str(want) + ' ways' if batch_axis else 'replicates the batch'}: "
                             f"build it with build_step_batch(..., batch_shards={want})")
    inputs = inputs_shardings(i, mesh, batch_dim=1, split=batch_axis)
    # [A, N]: N over the batch axes
    return StepBatch(inputs, LossTargets(*(along_batch(mesh, t, 1, batch_axis) for t in batch.targets)))


def place_batch(batch: StepBatch, shardings: StepBatch):
    """Host StepBatch (the whole global batch, the same on every process) -> global jax arrays (each process
    fills its addressable shards)."""
    return jax.tree.map(lambda x, sh: put(np.asarray(x), sh), batch, shardings)


def place_local_batch(batch: StepBatch, shardings: StepBatch, built_shards: int):
    """This process's part of a StepBatch (the rows of its `built_shards` batch shards, built with
    `build_step_batch(..., batch_shards=built_shards, shard_ids=process_batch_shards(mesh))`) -> global jax
    arrays, from every process's part (`jax.make_array_from_process_local_data`). Replicated arrays (a
    batch that does not split) are the whole value on every process."""

    def one(x, sh: NamedSharding):
        x = np.asarray(x)
        total = mesh_batch_shards(sh.mesh)
        spec = tuple(sh.spec) + (None,) * (x.ndim - len(sh.spec))
        shape = tuple(n * total // built_shards if part is not None else n for n, part in zip(x.shape, spec))
        return jax.make_array_from_process_local_data(sh, x, shape)

    return jax.tree.map(one, batch, shardings)


def with_patch_dtype(batch, dtype):
    """The batch (a StepBatch, GRPO's GroupBatch: anything with `inputs`) with its pixel patches in `dtype`
    (the model's compute dtype): the patch embedding casts them to it first thing, so sending bfloat16
    halves the transfer and changes nothing computed (a LoRA on the patch embedding would see the rounded
    pixels)."""
    inputs = inputs_with_patch_dtype(batch.inputs, dtype)
    return batch if inputs is batch.inputs else batch._replace(inputs=inputs)


def inputs_with_patch_dtype(inputs: ModelInputs, dtype) -> ModelInputs:
    """`with_patch_dtype` of one ModelInputs (e.g. prompts for sampling)."""
    vision = inputs.vision
    if vision is None or vision.patches.dtype == np.dtype(dtype):
        return inputs
    return inputs._replace(vision=vision._replace(patches=np.asarray(vision.patches).astype(dtype)))


def agree_floor(floor: dict[str, int], batch: StepBatch, model_cfg, batch_shards: int = 1, *,
                cancelled=None, **extra: int) -> tuple[dict[str, int], dict[str, int]]:
    """(the shape floor every process's part of this step must be padded to, the sums of `extra` over the
    processes): the element-wise max of every process's `grow_floor` (a global array has one shape, and
    each process padded only its own rows). Host-only exchange (`fxjax.host_exchange.allgather_json`); the
    same on every process. With one process: `grow_floor` and `extra` as given. `cancelled`: see
    `allgather_json`."""
    return agree_sizes("step-batch-shape", grow_floor(floor, batch, model_cfg, batch_shards), cancelled=cancelled,
                       **extra)


def agree_sizes(name: str, sizes: dict[str, int], *, cancelled=None, **extra: float
                ) -> tuple[dict[str, int], dict[str, float]]:
    """(the element-wise max of every process's `sizes`, the sums of `extra` over the processes): one
    host-only exchange (`allgather_json` under `name`), the same result on every process: the keys too (a
    size only some processes' parts report counts as 0 where it is missing), so every process pads to, and
    saves with its checkpoint, the same floor."""
    parts = allgather_json(name, {"floor": sizes, "extra": extra}, cancelled=cancelled)
    keys = sorted({k for p in parts for k in p["floor"]})
    agreed = {k: max(int(p["floor"].get(k, 0)) for p in parts) for k in keys}
    return agreed, {k: sum(p["extra"][k] for p in parts) for k in extra}


class ProcessRows(NamedTuple):
    """Which rows of each global batch this process builds (`process_rows`)."""

    shards: tuple[int, ...]  # the global batch shards it builds, increasing ((0,) when the batch is replicated)
    shard_ids: tuple[int, ...] | None  # `shards` when the batch splits in several, else None (one packed vision)
    rows: tuple[int, ...]  # its rows of a global batch, increasing: each shard's block of rows in turn
    batch_size: int  # rows of the global batch
    # the share of its shards this process is the first (lowest-index) holder of: a run-wide sum of what the
    # processes built (tokens a second) takes each process's own figure times this, so a shard that several
    # processes build (tensor across processes, a replicated batch) counts once
    counted_share: float = 1.0

    @property
    def built_shards(self) -> int:
        return len(self.shards)

    @property
    def batch_rows(self) -> tuple[int, ...] | None:
        """The data pipeline's `DataConfig.batch_rows`: None when it builds every row."""
        return None if len(self.rows) == self.batch_size else self.rows


def process_rows(mesh: Mesh, batch_size: int, shard_rows: bool) -> ProcessRows:
    """The rows of a global batch of `batch_size` that live on this process's devices: those of its batch
    shards (`fxjax.device_mesh.process_batch_shards`) when the batch splits over the mesh (`shard_rows`), else
    every row (a replicated batch)."""
    def held(process: int) -> tuple[int, ...]:
        return process_batch_shards(mesh, process) if shard_rows else (0,)

    me, shards = jax.process_index(), held(jax.process_index())
    per_shard = batch_size // (mesh_batch_shards(mesh) if shard_rows else 1)
    rows = tuple(r for s in shards for r in range(s * per_shard, (s + 1) * per_shard))
    shard_ids = shards if shard_rows and mesh_batch_shards(mesh) > 1 else None
    earlier = {s for p in range(me) for s in held(p)}  # the shards a lower-index process builds too
    counted = sum(1 for s in shards if s not in earlier) / len(shards)
    return ProcessRows(shards, shard_ids, rows, batch_size, counted)


def process_image_share():
    """How the processes of a run split the opening of the images at the records' check (each opens its share,
    decoding it whole with data.check_decode, and they exchange what they found: fxjax.data.records.ImageShare);
    None with one process."""
    if jax.process_count() == 1:
        return None
    from fxjax.data.records import ImageShare

    # (a share of a large dataset on a network disk may take longer than the 10 minutes a gather waits)
    return ImageShare(jax.process_index(), jax.process_count(),
                       lambda found: allgather_json("fxjax.data.images", found, timeout_s=BARRIER_TIMEOUT_S))


def check_same_records(pipeline) -> None:
    """Every process loaded the same records (`fxjax.data.pipeline.records_fingerprint`): each process reads
    the data files itself, and the global stream's order, its length (the run's steps) and which rows a
    process takes all assume one list. A file changed while the processes started, or a record skipped on
    one process only (an image one host could not read, under data.on_error=skip), is an error naming the
    files and the processes that differ, not a run whose processes disagree on every batch (or hang)."""
    from fxjax.data.pipeline import records_fingerprint

    # (each host opens its share of the images, and with data.check_decode decodes it, before it gets here: one on a colder
    # network disk may take far longer than the 10 minutes a gather waits by default; a peer that failed
    # ends the wait at once, a dead one through JAX's heartbeat)
    every = allgather_json("fxjax.data.records", records_fingerprint(pipeline.records), timeout_s=BARRIER_TIMEOUT_S)
    differ = [i for i, f in enumerate(every) if f != every[0]]
    if differ:
        counts = ", ".join(f"process {i}: {every[i]['count']} ({every[i]['sha256']})" for i in [0, *differ])
        raise ValueError(f"{', '.join(pipeline.cfg.data_files)}: the processes loaded different records ({counts}); "
                         "each process reads the files itself: were they changed while the run started, or did "
                         "data.on_error=skip skip a record on one process only (its log names it)?")
