"""The grain pipeline: example contents, label mask, buckets, long samples, restore, sharding, workers."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxjax.data.demo_data import make_demo_data
from fxjax.data.pipeline import (IGNORE_INDEX, DataConfig, DataPipeline, Dropped, ExampleBuilder, records_fingerprint,
                                 records_in_view, tokens_for)
from fxjax.data.prompts import SYSTEM_PROMPT, USER_TEMPLATES, pick_template, render_prompt
from fxjax.data.records import DataError, load_records
from fxjax.image_processing import model_input_size, process_image
from fxjax.rewards.output_format import BOX_END, BOX_START, REF_END, REF_START

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # at most 16 image tokens
_R, _RE, _B, _BE = (re.escape(m) for m in (REF_START, REF_END, BOX_START, BOX_END))
FORMAT_CHECK = {  # the authors' format checks (ground truth generated / real), searched with DOTALL
    "generated": f"<think>({_R}.*?{_RE}\\s*{_B}.*?{_BE}.*?)+.*?<tag>.*?</tag>.*?</think>\\s*<verdict>.*?</verdict>",
    "real": r"<think>.*?</think>\s*<verdict>.*?</verdict>",
}
IM_START, IM_END, PAD = 151644, 151645, 151643


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    """15 images: 12 in train.jsonl, 3 in test.jsonl."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), n=15, seed=0, test_fraction=0.2, min_side=64,
                          max_side=160)


@pytest.fixture(scope="session")
def records(demo):
    return load_records([demo["train"], demo["test"]])[0]


def make_cfg(demo, tokenizer_dir, **kw) -> DataConfig:
    base = dict(data_files=(str(demo["train"]), str(demo["test"])), tokenizer=str(tokenizer_dir),
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_length=512, length_buckets=(128, 256, 384, 512),
                batch_size=2, shard_index=0, shard_count=1, seed=3)
    base.update(kw)
    return DataConfig(**base)


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
    for x, y in zip(a, b, strict=True):
        for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
            if x[k].shape != y[k].shape or not np.array_equal(x[k], y[k]):
                return False
        if [(m["index"], m["epoch"], m["template"]) for m in x["meta"]] != \
                [(m["index"], m["epoch"], m["template"]) for m in y["meta"]]:
            return False
    return True


def assistant_start(ids) -> int:
    """Position right after the last `<|im_start|>assistant\\n`."""
    starts = np.flatnonzero(np.asarray(ids) == IM_START)
    return int(starts[-1]) + 3  # <|im_start|> "assistant" "\n"


def test_examples_are_hf_shaped_with_the_assistant_span_labelled(demo, tokenizer_dir, records):
    from fxjax.presets import load_preset
    from fxjax.model.inputs import prepare_inputs

    cfg = make_cfg(demo, tokenizer_dir, shuffle=False, num_epochs=1, batch_size=3)
    tok = tokens_for(cfg.tokenizer).tok
    batches = list(DataPipeline(cfg, records))
    assert [len(b["meta"]) for b in batches] == [3] * 5  # 15 records
    model_cfg = load_preset("tiny")
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == np.int32 and ids.shape[1] in cfg.buckets
        assert batch["pixel_values"].dtype == np.float32 and batch["image_grid_thw"].shape == (3, 3)
        row_start = 0
        for i, meta in enumerate(batch["meta"]):
            record = records[meta["index"]]
            n = int(mask[i].sum())
            assert mask[i, :n].all() and not mask[i, n:].any() and (ids[i, n:] == PAD).all()
            grid = batch["image_grid_thw"][i]
            assert (ids[i] == 151655).sum() == grid.prod() // 4 == meta["num_image_tokens"]
            start = assistant_start(ids[i, :n])
            assert start == meta["prompt_length"]
            assert (labels[i, :start] == IGNORE_INDEX).all() and (labels[i, n:] == IGNORE_INDEX).all()
            assert np.array_equal(labels[i, start:n], ids[i, start:n]) and ids[i, n - 1] == IM_END
            assert tok.decode(ids[i, start:n].tolist(), skip_special_tokens=False) == meta["target"] + "<|im_end|>"
            assert tok.decode(ids[i, :start].tolist(), skip_special_tokens=False) == render_prompt(
                SYSTEM_PROMPT, USER_TEMPLATES[meta["template"]], meta["num_image_tokens"])
            # pixels: exactly fxjax.process_image of the file
            image = Image.open(record.image)
            expected, expected_grid = process_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            rows = int(grid.prod())
            assert np.array_equal(batch["pixel_values"][row_start:row_start + rows], expected)
            assert np.array_equal(expected_grid[0], grid)
            row_start += rows
            # metadata: sizes and boxes in model-input pixels
            h, w = model_input_size(record.height, record.width, MIN_PIXELS, MAX_PIXELS)
            assert meta["original_size"] == (record.height, record.width) and meta["model_size"] == (h, w)
            scale = np.array([w / record.width, h / record.height] * 2)
            expected_boxes = np.array([r.bbox for r in record.regions]).reshape(-1, 4) * scale
            np.testing.assert_allclose(meta["boxes"], expected_boxes, rtol=1e-6)
            assert meta["label"] == record.label and meta["record_id"] == record.record_id
            assert meta["source"] == record.source and meta["truncated"] == 0
            assert re.search(FORMAT_CHECK[meta["label"]], meta["target"], re.DOTALL)
        assert row_start == batch["pixel_values"].shape[0]
        # The model's host-side preparation accepts the batch as is.
        prepared = prepare_inputs(model_cfg, ids, mask, batch["pixel_values"], batch["image_grid_thw"])
        assert prepared.position_ids.shape == (3, *ids.shape)


def test_batches_are_deterministic_and_use_few_shapes(demo, tokenizer_dir, records):
    cfg = make_cfg(demo, tokenizer_dir, batch_size=2, length_buckets=(256, 512))
    first, second = take(iter(DataPipeline(cfg, records)), 10), take(iter(DataPipeline(cfg, records)), 10)
    assert same_batches(first, second)
    assert {b["input_ids"].shape for b in first} <= {(2, 256), (2, 512)}
    # The default buckets: powers of two from 64, capped by max_length.
    assert dataclasses.replace(cfg, length_buckets=(), max_length=300).buckets == (64, 128, 256, 300)


@pytest.mark.parametrize("drop_remainder, sizes", [(False, [4, 4, 4, 3]), (True, [4, 4, 4])])
def test_one_pass_ends_with_the_partial_batch_unless_dropped(demo, tokenizer_dir, records, drop_remainder, sizes):
    """15 records in batches of 4 over one epoch: the last 3 make a batch of their own (what `fxjax eval`
    needs: every held-out example), or are left out with drop_remainder."""
    cfg = make_cfg(demo, tokenizer_dir, batch_size=4, num_epochs=1, drop_remainder=drop_remainder,
                   length_buckets=())
    batches = list(iter(DataPipeline(cfg, records)))
    assert [len(b["meta"]) for b in batches] == sizes
    seen = [m["index"] for b in batches for m in b["meta"]]
    assert len(set(seen)) == len(seen) == sum(sizes)


def test_restore_from_saved_state_yields_the_same_next_batches(demo, tokenizer_dir, records):
    cfg = make_cfg(demo, tokenizer_dir, batch_size=4, max_length=384, length_buckets=())
    it = iter(DataPipeline(cfg, records))
    take(it, 5)  # past the first epoch boundary (15 records)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 6)
    restored = iter(DataPipeline(cfg, records))
    restored.set_state(state)
    assert same_batches(take(restored, 6), expected)
    assert restored.get_state() == it.get_state()
    assert {m["epoch"] for b in expected for m in b["meta"]} >= {1, 2}  # restore across epochs too


def test_a_saved_position_is_refused_over_other_records(demo, tokenizer_dir, records):
    """A data position means the same batches only over the same records: one record gone (an image that no
    longer reads, under on_error=skip) or two swapped is an error naming the files, not a shifted stream;
    the records moved to another folder still resume, and so does a state saved before fingerprints."""
    cfg = make_cfg(demo, tokenizer_dir, batch_size=4, max_length=384, length_buckets=())
    it = iter(DataPipeline(cfg, records))
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    assert state["records"]["count"] == 15
    swapped = [records[1], records[0], *records[2:]]
    for other in (records[:7] + records[8:], swapped):
        with pytest.raises(ValueError, match=r"train.jsonl, .*test.jsonl: the records differ from those the saved "
                                             r"data position was taken over \(15 records"):
            iter(DataPipeline(cfg, other)).set_state(state)
    moved = [dataclasses.replace(r, image="/elsewhere/" + Path(r.image).name) for r in records]
    assert records_fingerprint(moved) == state["records"] != records_fingerprint(swapped)
    expected = take(it, 2)
    for saved in (state, {k: v for k, v in state.items() if k != "records"}):
        restored = iter(DataPipeline(cfg, records))
        restored.set_state(saved)
        assert [m["index"] for b in take(restored, 2) for m in b["meta"]] == [m["index"] for b in expected
                                                                             for m in b["meta"]]


def test_two_shards_cover_every_record_exactly_once_per_epoch(demo, tokenizer_dir, records):
    assert len(records) == 15  # odd: the shards differ in size by one
    seen = {}
    for shard in (0, 1):
        cfg = make_cfg(demo, tokenizer_dir, shard_index=shard, shard_count=2, num_epochs=2, batch_size=1,
                       drop_remainder=False)
        pipeline = DataPipeline(cfg, records)
        assert len(pipeline) == (8, 7)[shard]
        metas = [m for b in pipeline for m in b["meta"]]
        seen[shard] = [(m["epoch"], m["index"]) for m in metas]
        # the template depends on (seed, record, epoch) only, not on the shard layout
        assert all(m["template"] == pick_template(cfg.seed, m["index"], m["epoch"]) for m in metas)
    for epoch in (0, 1):
        per_shard = [[i for e, i in seen[s] if e == epoch] for s in (0, 1)]
        assert sorted(per_shard[0] + per_shard[1]) == list(range(15))
        assert not set(per_shard[0]) & set(per_shard[1])
    order = [[i for e, i in seen[0] if e == epoch] for epoch in (0, 1)]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])  # reshuffled each epoch
    # drop_remainder: equal shards
    cfg = make_cfg(demo, tokenizer_dir, shard_index=1, shard_count=2, shard_drop_remainder=True)
    assert len(DataPipeline(cfg, records)) == 7


def test_batch_rows_build_only_their_rows_of_the_global_batches(demo, tokenizer_dir, records, monkeypatch):
    """Two processes' pipelines (rows {0, 2} and {1, 3} of each batch of 4) decode only their own examples,
    disjoint and together the whole global batch, which their rows put back in place equal; and each
    restores its own position."""
    built = []
    original = ExampleBuilder.build

    def counting(self, record, epoch=0):
        built.append((epoch, record.index))
        return original(self, record, epoch=epoch)

    monkeypatch.setattr(ExampleBuilder, "build", counting)
    cfg = make_cfg(demo, tokenizer_dir, batch_size=4, max_length=384, length_buckets=(384,), read_threads=0,
                   prefetch_buffer_size=0)
    whole = take(iter(DataPipeline(cfg, records)), 5)  # past the first epoch boundary (15 records)
    decoded, parts, states = {}, {}, {}
    for rows in ((0, 2), (1, 3)):
        built.clear()
        it = iter(DataPipeline(dataclasses.replace(cfg, batch_rows=rows), records))
        parts[rows] = take(it, 3)
        states[rows] = json.loads(json.dumps(it.get_state()))
        parts[rows] += take(it, 2)
        decoded[rows] = list(built)
    every = [(m["epoch"], m["index"]) for b in whole for m in b["meta"]]
    assert len(decoded[(0, 2)]) == len(decoded[(1, 3)]) == 10  # no read-ahead: exactly their own rows
    assert not set(decoded[(0, 2)]) & set(decoded[(1, 3)])
    assert sorted(decoded[(0, 2)] + decoded[(1, 3)]) == sorted(every)
    for g, batch in enumerate(whole):
        a, b = parts[(0, 2)][g], parts[(1, 3)][g]
        assert a["input_ids"].shape[0] == b["input_ids"].shape[0] == 2
        rows = [a, b, a, b]  # global row r lives in part r % 2, at position r // 2
        for r in range(4):
            part, i = rows[r], r // 2
            assert np.array_equal(part["input_ids"][i], batch["input_ids"][r])
            assert np.array_equal(part["labels"][i], batch["labels"][r])
            assert part["meta"][i]["index"] == batch["meta"][r]["index"]
        assert np.array_equal(np.sort(np.concatenate([a["pixel_values"], b["pixel_values"]]), axis=0),
                              np.sort(batch["pixel_values"], axis=0))  # the same pixel rows, in another order
    for rows in ((0, 2), (1, 3)):  # each part resumes from its own state
        restored = iter(DataPipeline(dataclasses.replace(cfg, batch_rows=rows), records))
        restored.set_state(states[rows])
        assert same_batches(take(restored, 2), parts[rows][3:])
    with pytest.raises(ValueError, match="batch_rows"):
        dataclasses.replace(cfg, batch_rows=(1, 4))


def _free_text(tokens, ids) -> str:
    return tokens.tok.decode([t for t, f in zip(ids, tokens.free_mask(ids)) if f], skip_special_tokens=False)


def test_long_samples_truncate_the_reasoning_never_the_verdict(demo, tokenizer_dir, records, caplog):
    generated = [r for r in records if r.label == "generated"]
    full_cfg = make_cfg(demo, tokenizer_dir)
    full = {r.index: ExampleBuilder(full_cfg, len(records)).build(r) for r in generated}
    lengths = sorted(len(e["input_ids"]) for e in full.values())
    max_length = lengths[len(lengths) // 2] - 20  # over half of them are too long
    # (long_images "drop": the images stay at max_pixels, so only the reasoning can make room)
    cfg = make_cfg(demo, tokenizer_dir, max_length=max_length, length_buckets=(), long_images="drop")
    builder, tokens = ExampleBuilder(cfg, len(records)), tokens_for(cfg.tokenizer)
    truncated = dropped = 0
    for r in generated:
        ex, ref = builder.build(r), full[r.index]
        if isinstance(ex, Dropped):
            assert ex.kind == "too_long" and r.source in ex.message
            dropped += 1
            continue
        assert len(ex["input_ids"]) <= max_length
        start = ex["meta"]["prompt_length"]
        if len(ref["input_ids"]) <= max_length:
            assert np.array_equal(ex["input_ids"], ref["input_ids"])
            continue
        truncated += 1
        assert ex["meta"]["truncated"] == len(ref["input_ids"]) - len(ex["input_ids"]) > 0
        assert np.array_equal(ex["input_ids"][:start], ref["input_ids"][:start])  # prompt untouched
        cut, whole = ex["input_ids"][start:].tolist(), ref["input_ids"][start:].tolist()
        text = tokens.tok.decode(cut, skip_special_tokens=False)
        # Every structural token is kept, in order: <think>, regions (captions and boxes), tags, </think>,
        # the verdict and <|im_end|>; only free text (the reasoning) got shorter.
        structure = lambda ids: [t for t, f in zip(ids, tokens.free_mask(ids)) if not f]  # noqa: E731
        assert structure(cut) == structure(whole) and cut[-1] == IM_END
        assert re.search(FORMAT_CHECK["generated"], text, re.DOTALL) and text.endswith(
            "<verdict>generated</verdict><|im_end|>")
        for caption, box in zip(ex["meta"]["captions"], ex["meta"]["boxes"]):
            assert f"{REF_START}{caption}{REF_END}{BOX_START}[" in text
        # ... and the reasoning that is left is a prefix of the original one, still on its own line(s).
        kept, original = _free_text(tokens, cut), _free_text(tokens, whole)
        assert original.startswith(kept.rstrip()) and len(kept) < len(original)
        assert kept.rstrip() == kept.rstrip("\n").rstrip() and kept.endswith("\n")
    assert truncated >= 2
    # long_samples="drop": every over-long example is dropped, and counted by the iterator.
    cfg_drop = dataclasses.replace(cfg, long_samples="drop", num_epochs=1, batch_size=1, drop_remainder=False)
    it = dropping = iter(DataPipeline(cfg_drop, records))
    kept = [m["index"] for b in it for m in b["meta"]]
    too_long = {r.index for r in generated if len(full[r.index]["input_ids"]) > max_length}
    assert not too_long & set(kept) and it.get_state()["dropped"] == {"too_long": len(too_long)}
    assert len(kept) + len(too_long) == len(records) and f"too_long {len(too_long)}" in it.report()
    # truncate mode counts truncations and the rare drops in the state as well, and names each truncation
    it = iter(DataPipeline(dataclasses.replace(cfg, num_epochs=1, batch_size=1, drop_remainder=False), records))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fxjax.data.batching"):
        list(it)
    assert it.get_state()["truncated"] == truncated
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("truncated example: ")]
    assert len(notes) == truncated and all(f"to fit max_length {max_length}" in n for n in notes)
    assert {n.split(": ")[1] for n in notes} <= {r.source for r in generated}
    assert it.get_state()["dropped"] == ({"too_long": dropped} if dropped else {})
    # the counts survive a resume (a restored iterator reported 0 truncated examples)
    for config, done in ((cfg_drop, dropping), (dataclasses.replace(cfg, num_epochs=1, batch_size=1,
                                                                     drop_remainder=False), it)):
        again = iter(DataPipeline(config, records))
        again.set_state(json.loads(json.dumps(done.get_state())))
        assert again.get_state() == done.get_state() and again.report() == done.report()
    assert it.get_state()["truncated"] > 0 and dropping.get_state()["dropped"]


def test_long_images_shrink_to_fit_and_keep_their_boxes(demo, tokenizer_dir, records, caplog):
    """data.long_images "shrink" (the default): an example whose image tokens leave it over max_length is built
    from its image resized to fit (not below min_pixels), with the boxes scaled to that size; one that fits is
    untouched; "drop" leaves it at max_pixels, to be dropped. GRPO's prompts as well."""
    for mode in ("sft", "prompt"):
        full_cfg = make_cfg(demo, tokenizer_dir, long_images="drop", mode=mode, length_buckets=(),
                            user_prompt="Real or generated?")  # (one prompt: the same lengths every epoch)
        full = {r.index: ExampleBuilder(full_cfg, len(records)).build(r) for r in records}
        max_length = max(len(e["input_ids"]) for e in full.values()) - 6  # at most 16 image tokens each
        cfg = dataclasses.replace(full_cfg, max_length=max_length, long_samples="drop", long_images="shrink")
        builder, shrunk = ExampleBuilder(cfg, len(records)), set()
        for r in records:
            ex, ref = builder.build(r), full[r.index]
            if len(ref["input_ids"]) <= max_length:
                assert np.array_equal(ex["input_ids"], ref["input_ids"]) and ex["meta"]["shrunk_from"] is None
                continue
            assert not isinstance(ex, Dropped) and len(ex["input_ids"]) <= max_length, mode
            (h, w), (h0, w0) = ex["meta"]["model_size"], ref["meta"]["model_size"]
            assert ex["meta"]["shrunk_from"] == (h0, w0) and MIN_PIXELS <= h * w < h0 * w0
            grid = ex["image_grid_thw"][0]
            assert (grid[1] * 14, grid[2] * 14) == (h, w) and len(ex["pixel_values"]) == grid.prod()
            assert (ex["input_ids"] == tokens_for(cfg.tokenizer).image_pad).sum() == grid.prod() // 4
            scale = np.array([w / r.width, h / r.height] * 2)
            boxes = np.array([g.bbox for g in r.regions], np.float64).reshape(-1, 4) * scale
            np.testing.assert_allclose(ex["meta"]["boxes"], boxes, rtol=1e-6)
            shrunk.add(r.source)
        assert shrunk, mode
        # the pipeline counts them (in its state, which a resume restores) and names each image once
        it = iter(DataPipeline(dataclasses.replace(cfg, num_epochs=2, batch_size=1, drop_remainder=False), records))
        caplog.clear()
        with caplog.at_level("WARNING", logger="fxjax.data.batching"):
            kept = sum(len(b["meta"]) for b in it)
        notes = [m.getMessage() for m in caplog.records if m.getMessage().startswith("shrunk image: ")]
        assert kept == 2 * len(records) and it.get_state()["shrunk"] == 2 * len(shrunk)
        assert sorted(n.split(": ")[1] for n in notes) == sorted(shrunk)
        assert all(f"fits max_length {max_length} (data.long_images: shrink)" in n for n in notes)
        # "drop": the same examples are left out
        it = iter(DataPipeline(dataclasses.replace(cfg, long_images="drop", num_epochs=1, batch_size=1,
                                                   drop_remainder=False), records))
        assert sum(len(b["meta"]) for b in it) == len(records) - len(shrunk)
        assert it.get_state()["dropped"] == {"too_long": len(shrunk)} and it.get_state()["shrunk"] == 0


@pytest.mark.parametrize("mode", ["sft", "prompt"])
def test_a_long_image_shrinks_to_the_largest_size_that_fits(tmp_path, tokenizer_dir, mode):
    """For every max_length between the smallest and the full example's length, the size "shrink" picks is
    the largest at which the example fits (or, when none does, the largest at which it fits with its
    reasoning cut, else the smallest min_pixels admits), against every size smart_resize gives between. The size was estimated from the token overflow: smart_resize's rounding
    took it below min_pixels, and a 301 x 157 image stayed at full size (271 tokens) for max_length 210,
    dropped, where 56 x 140 fits in 209. GRPO's prompts (mode "prompt") too: a prompt of max_length fits."""
    Image.new("RGB", (301, 157), (90, 120, 30)).save(tmp_path / "a.png")
    regions = [{"bbox": [20, 15, 140, 90], "caption": "a melted fence"},
               {"bbox": [180, 60, 290, 150], "caption": "a sign with broken letters"}]
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "a.png", "label": "generated", "regions": regions,
                                                  "reasoning": "The fence and the sign look wrong."}) + "\n")
    (record,), _ = load_records(tmp_path / "a.jsonl")
    cfg = DataConfig(data_files=(str(tmp_path / "a.jsonl"),), tokenizer=str(tokenizer_dir), min_pixels=3136,
                     max_pixels=12845056, max_length=100000, user_prompt="Real or generated?", long_images="drop",
                     mode=mode)

    def at(pixels: int):
        text = ExampleBuilder(dataclasses.replace(cfg, max_pixels=pixels), 1).text(record)
        completion = ExampleBuilder(cfg, 1).completion_ids(text.target) if mode == "sft" else []
        return text.model_size, len(text.prompt_ids) + len(completion)

    full_size, full_length = at(cfg.max_pixels)
    sizes, pixels_of = {}, {}  # every size smart_resize gives from min_pixels to the full one: its example's length
    for pixels in range(cfg.min_pixels, full_size[0] * full_size[1] + 1, 98):
        size, length = at(pixels)
        if size[0] * size[1] >= cfg.min_pixels:  # (what min_pixels admits)
            sizes[size], pixels_of[size] = length, pixels
    assert len(sizes) > 5 and sizes[full_size] == full_length
    smallest = min(sizes, key=lambda s: s[0] * s[1])

    def built_cut(size, max_length) -> bool:  # the example at this size builds, its reasoning cut (not dropped)
        fixed = dataclasses.replace(cfg, max_pixels=pixels_of[size], max_length=max_length)
        return not isinstance(ExampleBuilder(fixed, 1).build(record), Dropped)

    cut_at = set()
    for max_length in range(min(sizes.values()) - 40, full_length + 1):
        fitting = [s for s, n in sizes.items() if n <= max_length]
        if not fitting and mode == "sft":  # (none fits whole: the largest at which the cut example fits)
            fitting = [s for s in sizes if built_cut(s, max_length)]
            cut_at.add(max_length) if fitting else None
        want = max(fitting, key=lambda s: s[0] * s[1]) if fitting else smallest
        text = ExampleBuilder(dataclasses.replace(cfg, max_length=max_length, long_images="shrink"), 1).text(record)
        assert text.model_size == want, (max_length, text.model_size, want, sizes[want])
        assert text.shrunk_from == (None if want == full_size else full_size)
    assert mode == "prompt" or cut_at  # (max_lengths where the cut example fits at a size, none whole)


def test_a_long_reasoning_beside_a_small_image_is_cut_and_the_image_kept_at_full_size(tmp_path, tokenizer_dir):
    """A FakeXplain-like record: a 300 x 200 image (54 tokens at its full size) and a reasoning far over
    max_length. No size fits the whole example, so the reasoning is cut at any size: the image stays at its
    full size, the size GRPO, eval and detect read it at (it was shrunk to min_pixels, 6 tokens, and cut
    all the same)."""
    Image.new("RGB", (300, 200), (90, 120, 30)).save(tmp_path / "a.png")
    reasoning = " ".join(f"Detail {i} of the scene looks plausible." for i in range(300))
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "a.png", "label": "generated", "reasoning": reasoning,
                                                  "regions": [{"bbox": [20, 15, 140, 90], "caption": "a fence"}]})
                                      + "\n")
    (record,), _ = load_records(tmp_path / "a.jsonl")
    cfg = DataConfig(data_files=(str(tmp_path / "a.jsonl"),), tokenizer=str(tokenizer_dir), min_pixels=3136,
                     max_pixels=50176, max_length=1024, user_prompt="Real or generated?")
    full = ExampleBuilder(dataclasses.replace(cfg, long_images="drop"), 1).build(record)
    example = ExampleBuilder(cfg, 1).build(record)
    assert example["meta"]["model_size"] == full["meta"]["model_size"] == (168, 252)  # (54 image tokens)
    assert example["meta"]["shrunk_from"] is None and example["meta"]["truncated"] > 1000
    assert len(example["input_ids"]) <= 1024 and np.array_equal(example["input_ids"], full["input_ids"])
    # where the cut example does not fit at full size, the largest size at which it does: 10 tokens under the
    # shortest max_length at which it builds at full size (a smaller image has up to 48 tokens fewer)
    builds = lambda n: not isinstance(  # noqa: E731
        ExampleBuilder(dataclasses.replace(cfg, max_length=n, long_images="drop"), 1).build(record), Dropped)
    shortest = next(n for n in range(full["meta"]["prompt_length"] + 1, 1024) if builds(n))
    tight = dataclasses.replace(cfg, max_length=shortest - 10)
    text = ExampleBuilder(tight, 1).text(record)
    assert text.shrunk_from == (168, 252) and text.model_size[0] * text.model_size[1] < 168 * 252
    assert not isinstance(ExampleBuilder(tight, 1).build(record), Dropped)

def test_a_stream_that_drops_every_example_is_an_error_not_a_hang(demo, tokenizer_dir, records):
    """Training streams repeat forever: with every prompt longer than max_length no batch ever comes, so the
    iterator says so once every record has been dropped with none kept in between, instead of waiting."""
    cfg = make_cfg(demo, tokenizer_dir, max_length=32, length_buckets=(), num_epochs=None, long_samples="drop",
                   long_images="drop")
    it = iter(DataPipeline(cfg, records))
    with pytest.raises(ValueError, match=r"every record was dropped \(all 15 of this process's, with no example "
                                         r"kept in between; dropped so far: too_long 15\).*raise data.max_length"):
        next(it)
    # a finite stream (eval's one epoch) just ends, with every drop counted
    it = iter(DataPipeline(dataclasses.replace(cfg, num_epochs=1, drop_remainder=False), records))
    assert list(it) == [] and it.dropped == {"too_long": 15}
    # the shortest example alone fits: it keeps the stream going though every other record is dropped
    cfg = dataclasses.replace(cfg, user_prompt="Real or generated?", batch_size=2)  # one prompt: fixed lengths
    builder = ExampleBuilder(dataclasses.replace(cfg, max_length=512), len(records))
    lengths = {r.source: len(builder.build(r)["input_ids"]) for r in records}
    it = iter(DataPipeline(dataclasses.replace(cfg, max_length=min(lengths.values())), records))
    kept = {m["source"] for _ in range(4) for m in next(it)["meta"]}
    assert kept == {s for s, n in lengths.items() if n == min(lengths.values())}
    assert set(it.dropped_sources) == set(lengths) - kept and set(it.dropped_sources.values()) == {"too_long"}


def test_all_dropped_waits_only_for_the_records_a_process_rows_ever_hold(demo, tokenizer_dir, records):
    """An unshuffled global stream read for row 0 of batches of 4 (one process of four, batch_rows) holds
    only every fourth of 12 records, whatever the epoch: the error comes once those 3 are dropped (waiting
    for all 12 never ended)."""
    twelve = records[:12]
    cfg = make_cfg(demo, tokenizer_dir, max_length=32, length_buckets=(), num_epochs=None, long_samples="drop",
                   long_images="drop", shuffle=False, batch_size=4, batch_rows=(0,))
    it = iter(DataPipeline(cfg, twelve))
    with pytest.raises(ValueError, match=r"every record was dropped \(all 3 of this process's"):
        next(it)
    assert set(it.dropped_sources) == {twelve[i].source for i in (0, 4, 8)}
    assert records_in_view(12, 4, (0, 2), shuffle=False) == 6 and records_in_view(12, 4, (1,), shuffle=False) == 3
    assert records_in_view(15, 4, (0,), shuffle=False) == 15  # gcd 1: the epochs shift the rows over every record
    assert records_in_view(12, 4, (0,), shuffle=True) == 12  # a new order each epoch


def test_processes_that_loaded_other_records_are_an_error(demo, tokenizer_dir, records, monkeypatch):
    """Each process loads the files itself; one whose list differs (a record skipped there only) is named
    before training (the exchange is stubbed here with what the other processes would send; the real one
    runs in the two-process runs of tests/test_sft.py and tests/test_grpo.py, where the lists agree)."""
    from fxjax.train import batching

    pipeline = DataPipeline(make_cfg(demo, tokenizer_dir), records)
    short = records_fingerprint(records[:14])
    monkeypatch.setattr(batching, "allgather_json",
                        lambda name, value, timeout_s: [value, json.loads(json.dumps(value)), short])
    with pytest.raises(ValueError, match=r"test.jsonl: the processes loaded different records \(process 0: 15 "
                                         r"\(\w+\), process 2: 14 \(\w+\)\)"):
        batching.check_same_records(pipeline)
    waits = []
    monkeypatch.setattr(batching, "allgather_json", lambda name, value, timeout_s: waits.append(timeout_s) or
                        [value, json.loads(json.dumps(value))])
    batching.check_same_records(pipeline)
    # every host decodes every image first: a host on a cold network disk may come hours later, not the 10
    # minutes a gather waits by default (the run failed there)
    from fxjax.host_exchange import BARRIER_TIMEOUT_S

    assert waits == [BARRIER_TIMEOUT_S]


def test_a_drop_another_epochs_template_avoids_is_not_for_good(demo, tokenizer_dir, records):
    """The user templates differ in length and each epoch picks one per record: a record too long with this
    epoch's template but not with the shortest is dropped for now (`lasting` False), so a stream of only such
    a record keeps going until an epoch's template fits, instead of calling every record dropped."""
    record = records[0]
    builder = ExampleBuilder(make_cfg(demo, tokenizer_dir), 1)
    target = len(builder.completion_ids(builder.text(record).target))
    lengths = [len(builder.text(record, template=t).prompt_ids) + target for t in range(len(USER_TEMPLATES))]
    max_length = min(lengths)
    seed = next(s for s in range(100) if lengths[pick_template(s, record.index, 0)] > max_length)
    cfg = make_cfg(demo, tokenizer_dir, max_length=max_length, length_buckets=(), num_epochs=None,
                   long_samples="drop", long_images="drop", shuffle=False, batch_size=1, seed=seed)
    dropped = ExampleBuilder(cfg, 1).build(record, epoch=0)
    assert isinstance(dropped, Dropped) and dropped.kind == "too_long" and not dropped.lasting
    it = iter(DataPipeline(cfg, [record]))
    batch = next(it)
    assert it.dropped["too_long"] >= 1 and len(batch["input_ids"][0]) == max_length
    assert lengths[batch["meta"][0]["template"]] == max_length
    one_short = ExampleBuilder(dataclasses.replace(cfg, max_length=max_length - 1), 1).build(record, epoch=0)
    assert isinstance(one_short, Dropped) and one_short.lasting  # no template fits: for good


def test_decode_errors_skip_with_a_count_or_raise_naming_the_record(demo, tokenizer_dir, tmp_path):
    rows = [json.loads(line) for line in Path(demo["train"]).read_text().splitlines()[:4]]
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    for row in rows:
        (root / row["image"]).write_bytes((Path(demo["train"]).parent / row["image"]).read_bytes())
    data = (root / rows[2]["image"]).read_bytes()
    (root / rows[2]["image"]).write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(demo, tokenizer_dir, data_files=(str(path),), root=str(root), check_decode=False,
                   num_epochs=1, batch_size=1, drop_remainder=False, shuffle=False, on_error="skip")
    it = iter(DataPipeline(cfg))
    assert [m["index"] for b in it for m in b["meta"]] == [0, 1, 3]
    assert it.get_state()["dropped"] == {"decode": 1} and "decode 1" in it.report()
    with pytest.raises(DataError, match=f"{re.escape(str(path))}:3: cannot decode image"):
        list(DataPipeline(dataclasses.replace(cfg, on_error="raise")))


def test_swift_records_keep_their_prompts_and_fill_placeholders(demo, tokenizer_dir, records, tmp_path, caplog):
    real = next(r for r in records if r.label == "real")
    gen = next(r for r in records if r.label == "generated")
    root = Path(demo["train"]).parent
    rel = lambda r: str(Path(r.image).relative_to(root.resolve()))  # noqa: E731
    swift = [
        {"messages": [{"role": "user", "content": "Is <image> fake?"},
                      {"role": "assistant", "content": "<think> Look at <ref-object><bbox>.\n<tag>texture</tag>\n"
                                                       "</think>\n<verdict>generated</verdict>"}],
         "images": [rel(gen)], "objects": {"ref": [gen.regions[0].caption], "bbox": [list(gen.regions[0].bbox)]}},
        {"messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "<image>Real?"},
                      {"role": "assistant", "content": "<think> fine\n</think>\n<verdict>real</verdict>"}],
         "images": [rel(real)]},
    ]
    path = tmp_path / "swift.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in swift))
    cfg = make_cfg(demo, tokenizer_dir, data_files=(str(path),), root=str(root), shuffle=False, num_epochs=1)
    batch = next(iter(DataPipeline(cfg)))
    tok = tokens_for(cfg.tokenizer).tok
    m0, m1 = batch["meta"]
    box = m0["boxes"][0]
    assert m0["target"] == (f"<think> Look at {REF_START}{gen.regions[0].caption}{REF_END}{BOX_START}"
                            f"[{', '.join(str(int(round(float(v)))) for v in box)}]{BOX_END}.\n<tag>texture</tag>\n"
                            "</think>\n<verdict>generated</verdict>")
    prompt0 = tok.decode(batch["input_ids"][0, :m0["prompt_length"]].tolist(), skip_special_tokens=False)
    assert prompt0 == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nIs "
                       "<|vision_start|>" + "<|image_pad|>" * m0["num_image_tokens"] + "<|vision_end|> fake?"
                       "<|im_end|>\n<|im_start|>assistant\n")
    prompt1 = tok.decode(batch["input_ids"][1, :m1["prompt_length"]].tolist(), skip_special_tokens=False)
    assert prompt1.startswith("<|im_start|>system\nSYS<|im_end|>") and m0["template"] == m1["template"] == -1
    # prompts="templates" replaces the record's prompts with the project's
    batch = next(iter(DataPipeline(dataclasses.replace(cfg, prompts="templates"))))
    assert batch["meta"][0]["template"] >= 0
    batch = next(iter(DataPipeline(dataclasses.replace(cfg, prompts="templates", user_prompt="Box it."))))
    assert batch["meta"][0]["template"] == -1  # the user prompt given replaces the templates here too
    prompt = tok.decode(batch["input_ids"][0, :batch["meta"][0]["prompt_length"]].tolist(), skip_special_tokens=False)
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}")
    # with prompts="auto" a user prompt given is not used for these records: said, not silently ignored
    with caplog.at_level("WARNING", logger="fxjax.data.pipeline"):
        DataPipeline(dataclasses.replace(cfg, user_prompt="Box it."))
    assert any("do not apply to the 2 ms-swift record(s)" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)
    # on the second process of a run it is said at debug level only (the first says it for all: the held-out
    # evaluator's pipelines of given records said it on every host)
    from fxjax.data.records import ImageShare

    loaded = DataPipeline(cfg).records
    caplog.clear()
    with caplog.at_level("WARNING", logger="fxjax.data.pipeline"):
        DataPipeline(dataclasses.replace(cfg, user_prompt="Box it."), records=loaded,
                     image_share=ImageShare(1, 2, lambda value: [value, value]))
    assert not caplog.records


def test_prompt_mode_is_left_padded_without_targets(demo, tokenizer_dir, records):
    cfg = make_cfg(demo, tokenizer_dir, mode="prompt", batch_size=3, shuffle=False)
    batch = next(iter(DataPipeline(cfg, records)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (batch["labels"] == IGNORE_INDEX).all()
    assert mask[:, -1].all() and (ids[:, -3:] == ids[0, -3:]).all() and ids[0, -3] == IM_START
    for i, meta in enumerate(batch["meta"]):
        n = int(mask[i].sum())
        assert n == meta["prompt_length"] and not mask[i, :-n].any() and (ids[i, :-n] == PAD).all()
        assert meta["target"].endswith(f"<verdict>{meta['label']}</verdict>")


def test_a_data_file_listed_twice_is_refused(demo, tokenizer_dir):
    """Its records would come twice under the same file:line, the key eval and the drop count go by."""
    again = str(Path(demo["train"]).parent / "." / Path(demo["train"]).name)
    with pytest.raises(ValueError, match=f"{re.escape(again)} is listed twice"):
        make_cfg(demo, tokenizer_dir, data_files=(str(demo["train"]), str(demo["test"]), again))


def test_configured_prompts_with_chat_tokens_are_refused_naming_the_key(demo, tokenizer_dir):
    """A chat or vision token in data.system_prompt / data.user_prompt would add image tokens the image does
    not fill or end the turn early (records are checked for the same): refused, naming the key."""
    for key, text, message in (("user_prompt", "Is this <|image_pad|> real?", "reserved token '<|image_pad|>'"),
                               ("system_prompt", "Judge.<|im_end|>\n<|im_start|>assistant\nReal", "reserved token"),
                               ("user_prompt", "<image> then <image>", "<image> may appear once"),
                               ("system_prompt", "Look at <image>", "<image> belongs in the user prompt")):
        with pytest.raises(ValueError, match=f"data.{key}.*{re.escape(message)}"):
            make_cfg(demo, tokenizer_dir, **{key: text})
    assert make_cfg(demo, tokenizer_dir, user_prompt="Where? <image>").user_prompt == "Where? <image>"


def test_one_user_prompt_replaces_the_templates_for_native_records(demo, tokenizer_dir, records):
    """data.user_prompt: every native record gets that prompt (template -1 in its meta) in both modes; the
    system prompt stays whatever system_prompt says."""
    tok = tokens_for(str(tokenizer_dir)).tok
    for mode in ("sft", "prompt"):
        cfg = make_cfg(demo, tokenizer_dir, mode=mode, batch_size=3, shuffle=False, system_prompt="S",
                       user_prompt="Box it.")
        batch = next(iter(DataPipeline(cfg, records)))
        for i, meta in enumerate(batch["meta"]):
            ids = batch["input_ids"][i][batch["attention_mask"][i].astype(bool)]
            prompt = tok.decode(ids[:meta["prompt_length"]].tolist(), skip_special_tokens=False)
            assert prompt == render_prompt("S", "Box it.", meta["num_image_tokens"]) and meta["template"] == -1


def test_worker_processes_give_the_same_batches_and_restore(demo, tokenizer_dir, records):
    cfg = make_cfg(demo, tokenizer_dir, batch_size=3)
    expected = take(iter(DataPipeline(cfg, records)), 4)
    mp_cfg = dataclasses.replace(cfg, worker_count=1)
    it = iter(DataPipeline(mp_cfg, records))
    try:
        assert same_batches(take(it, 2), expected[:2])
        state = json.loads(json.dumps(it.get_state()))
        assert same_batches(take(it, 2), expected[2:])
    finally:
        it.close()
    restored = iter(DataPipeline(mp_cfg, records))
    try:
        restored.set_state(state)
        assert same_batches(take(restored, 2), expected[2:])
    finally:
        restored.close()


def test_config_validation():
    ok = dict(data_files=("a.jsonl",), tokenizer="tok")
    DataConfig(**ok)
    for bad, says in [(dict(on_error="ignore"), "on_error must be one of"), (dict(format="csv"), "format must be"),
                      (dict(long_samples="cut"), "long_samples must be"), (dict(batch_size=0), "batch_size must be"),
                      (dict(shard_index=0), "set both shard_index and shard_count"),
                      (dict(shard_index=2, shard_count=2), r"shard_index 2 not in \[0, 2\)"),
                      (dict(length_buckets=(256, 128)), "strictly increasing"),
                      (dict(length_buckets=(128,), max_length=256), "below max_length 256"),
                      (dict(num_epochs=0), "num_epochs must be"), (dict(data_files=()), "data_files must be"),
                      (dict(user_prompt=" "), "user_prompt must be")]:
        with pytest.raises(ValueError, match=says):
            DataConfig(**{**ok, **bad})
    cfg = DataConfig.from_dict({"data_files": "a.jsonl", "tokenizer": "tok", "length_buckets": [64, 8192]})
    assert cfg.data_files == ("a.jsonl",) and cfg.length_buckets == (64, 8192)
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({**ok, "bogus": 1})


# ---- the FakeXplain release as it ships --------------------------------------------------------------

def test_fakexplain_as_released_in_sft_and_prompt_modes(tokenizer_dir, tmp_path):
    from fakexplain_data import IMAGES, SYSTEM, USER, fakexplain_records, write_fakexplain

    path = write_fakexplain(tmp_path / "FakeXplain")  # images relative to the JSONL, no root given
    rows = fakexplain_records()
    base = dict(data_files=(str(path),), tokenizer=str(tokenizer_dir), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                max_length=512, length_buckets=(256, 512), batch_size=len(rows), shard_index=0, shard_count=1,
                shuffle=False, num_epochs=1)
    tok = tokens_for(str(tokenizer_dir)).tok
    sft = next(iter(DataPipeline(DataConfig(**base))))
    prompt = next(iter(DataPipeline(DataConfig(**base, mode="prompt"))))
    for i, (rel, (w, h), _, label, regions) in enumerate(IMAGES):
        meta = sft["meta"][i]
        assert meta["source"] == f"{path}:{i + 1}" and meta["label"] == label and meta["template"] == -1
        assert meta["original_size"] == (h, w) and meta["captions"] == tuple(c for c, _ in regions)
        mh, mw = meta["model_size"]
        expected_boxes = np.array([b for _, b in regions], np.float64).reshape(-1, 4) * np.array([mw / w, mh / h] * 2)
        np.testing.assert_allclose(meta["boxes"], expected_boxes, rtol=1e-6)
        # The target is the record's assistant text with the i-th placeholder pair -> i-th caption and box.
        expected = rows[i]["messages"][-1]["content"]
        for (caption, _), box in zip(regions, meta["boxes"]):
            box_text = ", ".join(str(int(round(float(v)))) for v in box)
            expected = expected.replace("<ref-object><bbox>", f"{REF_START}{caption}{REF_END}{BOX_START}[{box_text}]"
                                                              f"{BOX_END}", 1)
        assert meta["target"] == expected and "<ref-object>" not in expected
        n = int(sft["attention_mask"][i].sum())
        start = meta["prompt_length"]
        assert tok.decode(sft["input_ids"][i, start:n].tolist(), skip_special_tokens=False) == expected + "<|im_end|>"
        assert np.array_equal(sft["labels"][i, start:n], sft["input_ids"][i, start:n])
        # The record's own system and user prompts, with the image where the <image> tag was.
        expected_prompt = render_prompt(SYSTEM, USER.replace("<image>", ""), meta["num_image_tokens"])
        assert tok.decode(sft["input_ids"][i, :start].tolist(), skip_special_tokens=False) == expected_prompt
        # Prompt mode (GRPO): the same prompt, left-padded, nothing to learn, the same targets for the rewards.
        pmeta = prompt["meta"][i]
        assert pmeta["target"] == meta["target"] and np.array_equal(pmeta["boxes"], meta["boxes"])
        row = prompt["input_ids"][i, prompt["input_ids"].shape[1] - start:]
        assert np.array_equal(row, sft["input_ids"][i, :start]) and prompt["attention_mask"][i, -start:].all()
    assert (prompt["labels"] == IGNORE_INDEX).all()
    # Absolute image paths: refused unless the config allows them.
    absolute = dict(rows[0], images=[str((path.parent / IMAGES[0][0]).resolve())])
    path.write_text(json.dumps(absolute) + "\n")
    with pytest.raises(DataError, match=f"{re.escape(str(path))}:1: image path .* is absolute"):
        DataPipeline(DataConfig(**base))
    batch = next(iter(DataPipeline(DataConfig(**{**base, "batch_size": 1}, allow_absolute_paths=True))))
    assert batch["meta"][0]["target"] == sft["meta"][0]["target"]


def test_empty_and_all_invalid_files_are_named(tokenizer_dir, tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n \n")
    cfg = DataConfig(data_files=(str(empty),), tokenizer=str(tokenizer_dir), shard_index=0, shard_count=1)
    with pytest.raises(DataError, match=f"{re.escape(str(empty))}: has no records"):
        DataPipeline(cfg)
    empty.write_text('{"image": "missing.png", "label": "real"}\n')
    with pytest.raises(ValueError, match=f"no valid records in {re.escape(str(empty))}: loaded 0 of 1 records .* "
                                         "skipped 1 \\(image_missing 1\\)"):
        DataPipeline(dataclasses.replace(cfg, on_error="skip"))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_box_the_resized_image_writes_empty_is_named_or_skipped(tmp_path, tokenizer_dir, on_error, capsys, caplog):
    """A 2-pixel box on an image shrunk to a quarter is [3.5, 3.5, 4, 4] at the model's input: written in whole
    pixels, [4, 4, 4, 4], an empty target box (the record's own check passes it). The pipeline finds it when
    it starts (it stopped the run at the step that first built the record, hours in), and data check fails
    on it (it said OK and exited 0)."""
    Image.new("RGB", (224, 224)).save(tmp_path / "big.png")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "big.png", "label": "real"}) + "\n"
                    + json.dumps({"image": "big.png", "label": "generated",
                                  "regions": [{"bbox": [14, 14, 16, 16], "caption": "speck"}]}) + "\n")
    cfg = DataConfig(data_files=(str(data),), tokenizer=str(tokenizer_dir), min_pixels=3136, max_pixels=3136,
                     shuffle=False, num_epochs=1, batch_size=1, shard_index=0, shard_count=1, on_error=on_error)
    records, _ = load_records(data)
    said = r"d\.jsonl:2: region 0 box \[3\.5, 3\.5, 4\.0, 4\.0\] is under one pixel wide or high at the model's input \(56x56\)"
    if on_error == "raise":
        with pytest.raises(DataError, match=said) as info:
            ExampleBuilder(cfg, 2).build(records[1])
        assert info.value.kind == "box_tiny"
        with pytest.raises(DataError, match=said):
            DataPipeline(cfg)
    else:
        built = ExampleBuilder(cfg, 2).build(records[1])
        assert isinstance(built, Dropped) and built.kind == "box_tiny"
        # skip: named when the pipeline starts, kept in place (the records' order and templates, and a
        # checkpoint's stream, as before) and dropped where built
        with caplog.at_level("WARNING", logger="fxjax.data.pipeline"):
            pipeline = DataPipeline(cfg)
        assert [r.source for r in pipeline.records] == [f"{data}:1", f"{data}:2"]
        assert any(f"1 record(s) have a box under a pixel at the model's input, which training leaves out "
                   f"(data.on_error: skip) [box_tiny]: {data}:2" in m.getMessage() for m in caplog.records)
        it = iter(pipeline)
        assert [m["source"] for b in it for m in b["meta"]] == [f"{data}:1"]
        assert it.get_state()["dropped"] == {"box_tiny": 1}
        from fxjax.cli import main

        assert main(["data", "check", str(data), "--tokenizer", str(tokenizer_dir), "--min-pixels", "3136",
                     "--max-pixels", "3136"]) == 1
        out = capsys.readouterr().out
        assert (f"boxes under a pixel at the model's input: 1 record(s), which training refuses (data.on_error: skip "
                f"leaves them out; e.g. {data}:2; all listed below)") in out
        assert f"[box_tiny]:\n  {data}:2\n" in out and "FAILED: 0 of 2 records invalid; training refuses 1 more" in out
        # without a tokenizer too (the box needs only the image's size and the pixel limits)
        assert main(["data", "check", str(data), "--min-pixels", "3136", "--max-pixels", "3136"]) == 1
        assert f"[box_tiny]:\n  {data}:2\n" in capsys.readouterr().out
