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
