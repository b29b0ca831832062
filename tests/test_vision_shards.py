"""Vision packed per batch shard (`prepare_inputs(..., batch_shards=S)`): each group of rows' images in its
own sequence, stacked [S, ...], image indices shard-local. On one device it must give the logits of one
packed sequence; on a mesh each device encodes only its rows' images (bench/vision_flops.py measures the
per-device FLOPs; its smallest case runs here). The real SFT step on meshes with this layout is
tests/test_sharding.py's (tests/sharding_worker.py builds its batches per shard)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TOKENS, image_prompt, rel_err
from flax import nnx

import fxjax
from fxjax.model import forward
from fxjax.model.inputs import image_offsets

REPO = Path(__file__).resolve().parents[1]


def rows_with_images() -> dict:
    """4 rows: two images of different sizes, none, one, one; right-padded to one length."""
    rng = np.random.RandomState(3)
    rows = [image_prompt(g, rng) if g else (np.arange(5, 12), None, None)
            for g in ([(1, 4, 6), (1, 2, 4)], [], [(1, 6, 4)], [(1, 4, 4)])]
    length = max(len(ids) for ids, _, _ in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for r, (row, _, _) in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    pixels = np.concatenate([pv for _, pv, _ in rows if pv is not None])
    grid = np.concatenate([g for _, _, g in rows if g is not None])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return fxjax.from_pretrained(tiny_checkpoint, dtype="float32")


def test_per_shard_vision_gives_the_packed_logits(model):
    data = rows_with_images()
    run = nnx.jit(forward)
    packed = model.prepare(**data)
    reference = np.asarray(run(model, packed))
    unit = model.config.vision.merge_unit
    for shards in (4,):  # one shard with two images, one without any
        inputs = model.prepare(**data, batch_shards=shards)
        v = inputs.vision
        assert v.valid.shape[0] == shards and v.patches.shape[:2] == v.valid.shape
        # each shard holds exactly its rows' image patches, and every image token points at a valid slot
        # of its own shard's features
        rows = data["input_ids"].shape[0] // shards
        is_image = inputs.input_ids == TINY_TOKENS["image_token_id"]
        grid = data["image_grid_thw"]
        per_row = [sum(int(np.prod(g)) for g in grid_of) for grid_of in ([grid[0], grid[1]], [], [grid[2]], [grid[3]])]
        for s in range(shards):
            assert int(v.valid[s].sum()) == sum(per_row[s * rows:(s + 1) * rows])
            index = inputs.image_feature_index[s * rows:(s + 1) * rows][is_image[s * rows:(s + 1) * rows]]
            assert index.size == 0 or (v.valid[s][index * unit].all() and len(set(index.tolist())) == index.size)
        out = np.asarray(run(model, inputs))
        assert rel_err(out, reference) <= 1e-6, shards


def test_per_shard_vision_errors_name_the_problem(model):
    data = rows_with_images()
    with pytest.raises(ValueError, match="does not split into batch_shards=3"):
        model.prepare(**data, batch_shards=3)
    # same pixel rows, images listed so that 6 + 6 tokens straddle row 0's 8: rope_index refuses it, and so
    # does the per-shard split on its own
    bad = data["image_grid_thw"][[0, 2, 1, 3]]
    with pytest.raises(ValueError, match="sequence 0"):
        model.prepare(**dict(data, image_grid_thw=bad), batch_shards=2)
    with pytest.raises(ValueError, match="row 0 end inside an image"):
        image_offsets(data["input_ids"], bad, model.config)
    assert image_offsets(data["input_ids"], data["image_grid_thw"], model.config).tolist() == [0, 2, 2, 3, 4]


def test_bench_vision_flops_per_device_fall_to_one_eighth(tmp_path):
    """bench/vision_flops.py's smallest case: 8 rows with one image each; per device, the vision part of
    the forward compiled for (1,8,1) with the images packed per batch shard costs ~1/8 of one device."""
    out = tmp_path / "flops.json"
    cmd = [sys.executable, str(REPO / "bench" / "vision_flops.py"), "--preset", "tiny", "--vision-depth", "0",
           "--grid", "1,8,8", "--meshes", "1,1,1", "1,8,1", "--layouts", "sharded", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {(r["mesh"], r["layout"]): r for r in json.loads(out.read_text())["rows"]}
    one, fsdp8 = rows[("1,1,1", "packed")], rows[("1,8,1", "sharded")]
    assert fsdp8["vision_slots"] == [8, 64] and one["vision_slots"] == [512]
    assert 0.12 <= fsdp8["forward_vs_one_device"] <= 0.135, fsdp8
    assert "cpu:" in proc.stdout and "jax" in proc.stdout


def test_a_process_part_is_its_shards_of_the_step_batch(model):
    """`build_step_batch(..., shard_ids=...)` on some shards' rows (what one process builds) gives exactly
    those shards of the whole step batch: text rows, per-shard vision, and the per-shard blocks of loss
    slots pointing at the same global positions; with the patches in bfloat16 on request."""
    from fxjax.train.batching import build_step_batch, grow_floor, with_patch_dtype

    data = rows_with_images()
    labels = np.where(data["attention_mask"] > 0, data["input_ids"], -100)
    labels[:, :3] = -100
    micro = [dict(data, labels=labels), dict(data, labels=np.where(np.arange(labels.shape[1]) % 2, labels, -100))]
    cfg = model.config
    whole = build_step_batch(micro, cfg, 0, batch_shards=4)
    floor = grow_floor({}, whole, cfg, 4)
    assert floor["targets"] * 4 == whole.targets.index.shape[-1]
    # per-shard blocks: every supervised token once, at its global flat position
    w = whole.targets
    for a, mb in enumerate(micro):
        shifted = np.full_like(mb["labels"], -100)
        shifted[:, :-1] = mb["labels"][:, 1:]
        want = np.flatnonzero(shifted.reshape(-1) != -100)
        assert sorted(w.index[a][w.weight[a] > 0].tolist()) == want.tolist()
        assert np.array_equal(w.target[a][w.weight[a] > 0], shifted.reshape(-1)[w.index[a][w.weight[a] > 0]])
    for shards in ((1, 3), (2,)):  # one row per shard: a non-contiguous pair, as a process may hold; a single shard
        rows = list(shards)
        part_micro = [{k: v[rows] for k, v in mb.items() if k in ("input_ids", "attention_mask", "labels")}
                      for mb in micro]
        for pm, mb in zip(part_micro, micro):
            grid = mb["image_grid_thw"]
            starts = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
            per_row = [0, 2, 2, 3, 4]  # images of rows 0..3: two, none, one, one
            keep = [i for r in rows for i in range(per_row[r], per_row[r + 1])]
            pm["image_grid_thw"] = grid[keep]
            pm["pixel_values"] = np.concatenate([mb["pixel_values"][starts[i]:starts[i + 1]] for i in keep])
        part = build_step_batch(part_micro, cfg, 0, floor=floor, batch_shards=len(shards), shard_ids=shards)
        assert grow_floor(floor, part, cfg, len(shards)) == floor
        for got, full in zip(part.inputs[:5], whole.inputs[:5]):
            axis = 2 if full.ndim == 4 else 1  # position_ids [A, 3, B, L]
            assert np.array_equal(got, np.take(full, rows, axis=axis))
        for got, full in zip(part.inputs.vision, whole.inputs.vision):
            if full is not None:  # per shard even for one shard: [A, 1, ...]
                assert np.array_equal(got, full[:, list(shards)])
        for got, full in zip(part.targets, whole.targets):
            blocks = full.reshape(full.shape[0], 4, -1)[:, list(shards)]
            assert np.array_equal(got, blocks.reshape(full.shape[0], -1))
    bf16 = with_patch_dtype(part, "bfloat16")
    assert bf16.inputs.vision.patches.dtype.name == "bfloat16" and bf16.inputs.input_ids is part.inputs.input_ids
    assert with_patch_dtype(part, "float32") is part


def test_processes_agree_on_sizes_only_some_of_them_have(monkeypatch):
    """agree_sizes: a size only one process's part reports is agreed all the same (0 where missing), so
    every process ends with the same floor, keys included; the extras are summed."""
    from fxjax.train import batching

    parts = [{"floor": {"length": 40, "windows": 3}, "extra": {"tokens": 5}},
             {"floor": {"length": 48}, "extra": {"tokens": 7}}]
    monkeypatch.setattr(batching, "allgather_json", lambda name, value, cancelled=None: parts)
    results = [batching.agree_sizes("test", part["floor"], tokens=part["extra"]["tokens"]) for part in parts]
    assert results[0] == results[1] == ({"length": 48, "windows": 3}, {"tokens": 12})
