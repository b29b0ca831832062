"""`fxjax make-demo-data`: deterministic, valid native data whose artefacts sit exactly in their boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxjax.cli import main
from fxjax.data.demo_data import (ARTEFACTS, MIN_CHANGE, PHOTOS, _load_photos, add_fingerprint, add_row_code,
                                  make_demo_data, make_demo_example)
from fxjax.data.records import load_records


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    assert main(["make-demo-data", str(out), "--n", "12", "--seed", "0", "--min-side", "64",
                 "--max-side", "128"]) == 0
    return out


def test_cli_writes_a_valid_native_dataset(demo_dir, capsys):
    train, test = demo_dir / "train.jsonl", demo_dir / "test.jsonl"
    records, report = load_records([train, test])  # raises on any invalid record
    assert report.loaded == 12 and not report.skipped
    assert len(train.read_text().splitlines()) == 11 and len(test.read_text().splitlines()) == 1
    assert sorted(r.label for r in records) == ["generated"] * 6 + ["real"] * 6
    captions = {a.caption for a in ARTEFACTS}
    for r in records:
        assert 64 <= max(r.width, r.height) <= 128 and r.reasoning
        if r.label == "generated":
            assert 1 <= len(r.regions) <= 3 and r.tags and r.generator.startswith("procedural:")
            assert all(region.caption in captions for region in r.regions)
            boxes = [region.bbox for region in r.regions]  # they do not overlap
            for i, p in enumerate(boxes):
                for q in boxes[i + 1:]:
                    assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
        else:
            assert not r.regions and not r.tags and r.generator is None
    # refuses to overwrite, as a CLI error
    assert main(["make-demo-data", str(demo_dir), "--n", "2"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    (demo_dir.parent / "mine" / "images").mkdir(parents=True)  # someone's images, no dataset files: kept
    (demo_dir.parent / "mine" / "images" / "000000.png").write_bytes(b"mine")
    assert main(["make-demo-data", str(demo_dir.parent / "mine"), "--n", "2"]) == 2
    assert "images already holds files the demo images would overwrite" in capsys.readouterr().err
    assert (demo_dir.parent / "mine" / "images" / "000000.png").read_bytes() == b"mine"


def test_same_seed_same_bytes_other_seed_other_data(demo_dir, tmp_path):
    again = make_demo_data(tmp_path / "again", n=12, seed=0, min_side=64, max_side=128)
    assert _files(again["train"].parent) == _files(demo_dir)
    other = make_demo_data(tmp_path / "other", n=12, seed=1, min_side=64, max_side=128)
    assert other["train"].read_text() != (demo_dir / "train.jsonl").read_text()


def test_artefacts_change_exactly_their_boxes(demo_dir):
    photos = _load_photos()
    assert set(photos) <= set(PHOTOS) and len(photos) >= 10
    rows = [json.loads(line) for f in ("train.jsonl", "test.jsonl") for line in (demo_dir / f).read_text().splitlines()]
    kinds_seen = set()
    for i, row in enumerate(rows):
        image = np.asarray(Image.open(demo_dir / row["image"])).astype(np.int16)
        if row["label"] == "real":
            continue
        # The same (seed, index) without artefacts is the clean view the generated image was made from.
        clean, _ = make_demo_example(i, 0, False, photos, 64, 128)
        outside = np.ones(image.shape[:2], bool)
        for region in row["regions"]:
            x1, y1, x2, y2 = region["bbox"]
            outside[y1:y2, x1:x2] = False
            assert np.abs(image[y1:y2, x1:x2] - clean[y1:y2, x1:x2]).mean() >= MIN_CHANGE
        assert np.array_equal(image[outside], clean[outside])
        kinds_seen |= set(row["generator"].removeprefix("procedural:").split("+"))
    assert len(kinds_seen) >= 3


def test_every_artefact_generator_changes_a_region():
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(next(iter(_load_photos().values()))).resize((96, 96)))
    for artefact in ARTEFACTS:
        img = photo.copy()
        artefact.apply(img, (10, 20, 50, 60), rng)
        assert np.array_equal(img[:20], photo[:20]) and np.array_equal(img[:, 50:], photo[:, 50:])
        assert not np.array_equal(img[20:60, 10:50], photo[20:60, 10:50]), artefact.name


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="must be positive, got 0"):
        make_demo_data(tmp_path / "a", n=0)
    with pytest.raises(ValueError, match="min_side <= max_side"):
        make_demo_data(tmp_path / "b", n=2, min_side=100, max_side=50)
    with pytest.raises(ValueError, match="no multiple of 28"):
        make_demo_data(tmp_path / "c", n=2, min_side=60, max_side=80, multiple=28)
    with pytest.raises(ValueError, match="fingerprint"):
        make_demo_data(tmp_path / "d", n=2, fingerprint=-1)
    with pytest.raises(ValueError, match="max_regions"):
        make_demo_data(tmp_path / "e", n=2, max_regions=0)
    with pytest.raises(ValueError, match=r"seed: a seed must be in \[0, 2\*\*32\), got -1"):
        make_demo_data(tmp_path / "f", n=2, seed=-1)  # (numpy's own error did not name the seed)
    # a split left empty was written without a word (n=4 at 0.1: test.jsonl with 0 records)
    with pytest.raises(ValueError, match=r"n=4 with test_fraction=0.1 gives 4 train and 0 test images"):
        make_demo_data(tmp_path / "g", n=4, test_fraction=0.1)
    with pytest.raises(ValueError, match=r"gives 0 train and 1 test images"):
        make_demo_data(tmp_path / "h", n=1, test_fraction=0.6)
    assert not any((tmp_path / d).exists() for d in "fgh")
    # an empty --artefacts is an error, not "every kind"
    assert main(["make-demo-data", str(tmp_path / "i"), "--n", "10", "--artefacts", ""]) == 2
    assert "artefacts (--artefacts) must be a non-empty subset" in capsys.readouterr().err
    # the flags named, not only the function's parameters ("n must be positive", "no multiple of 0 lies in")
    # (a count below 1 is the flag's own error: tests/test_cli_help.py)
    for flags, message in ((["--max-side", "40"], "need 32 <= min_side <= max_side (--min-side, --max-side)"),
                           (["--test-fraction", "1"], "test_fraction (--test-fraction) must be in [0, 1), got 1.0")):
        assert main(["make-demo-data", str(tmp_path / "j"), *flags]) == 2
        assert f"fxjax make-demo-data: error: {message}" in capsys.readouterr().err


def test_overwrite_with_fewer_images_leaves_none_of_the_old_ones(tmp_path):
    out = tmp_path / "d"
    make_demo_data(out, n=12, seed=0, min_side=48, max_side=64)
    (out / "images" / "notes.png").write_bytes(b"mine")  # not named as the demo's images: kept
    make_demo_data(out, n=4, seed=0, test_fraction=0.25, min_side=48, max_side=64, overwrite=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)] + ["notes.png"]


def test_demo_options_sides_fingerprint_and_region_count():
    """What `fxjax demo` asks for: sides in multiples of 28 (so the image processor keeps the pixels), the
    up-sampling fingerprint over generated images only, and at most max_regions regions."""
    from fxjax.image_processing import model_input_size

    photos = _load_photos()
    counts = set()
    for i in range(40):
        generated = i % 2 == 1
        img, record = make_demo_example(i, 0, generated, photos, 56, 112, multiple=28, fingerprint=16.0, max_regions=2)
        plain, plain_record = make_demo_example(i, 0, generated, photos, 56, 112, multiple=28, max_regions=2)
        h, w = img.shape[:2]
        assert h % 28 == 0 and w % 28 == 0 and 56 <= max(h, w) <= 112
        assert model_input_size(h, w, min_pixels=3136, max_pixels=12544) == (h, w)
        if generated:
            counts.add(len(record["regions"]))
            assert np.array_equal(img, add_fingerprint(plain, 16.0))  # same image, plus the fingerprint
            assert record["regions"] == plain_record["regions"] and "up-sampling" in record["reasoning"]
        else:
            assert np.array_equal(img, plain) and record == plain_record
    assert counts == {1, 2}
    # the fingerprint is the period-2 checkerboard: a matched filter sees +-16 levels where nothing clips
    flat = np.full((4, 4, 3), 100, np.uint8)
    assert add_fingerprint(flat, 16.0)[:, :, 0].tolist() == [[116, 84, 116, 84], [84, 116, 84, 116]] * 2


def test_fingerprint_inside_the_regions_only_and_boxes_on_a_grid():
    """fingerprint_scope "regions": the same image as without a fingerprint outside the regions, plus the
    frame-phase checkerboard inside each region; box_multiple puts every corner on that grid."""
    photos = _load_photos()
    seen = 0
    for i in range(1, 30, 2):
        img, record = make_demo_example(i, 0, True, photos, 112, 112, multiple=28, fingerprint=24.0, max_regions=2,
                                        fingerprint_scope="regions", box_multiple=28)
        plain, plain_record = make_demo_example(i, 0, True, photos, 112, 112, multiple=28, max_regions=2,
                                                box_multiple=28)
        boxes = [r["bbox"] for r in record["regions"]]
        assert boxes == [r["bbox"] for r in plain_record["regions"]] and "up-sampling" in record["reasoning"]
        assert all(v % 28 == 0 for box in boxes for v in box)
        assert all(box[2] > box[0] and box[3] > box[1] for box in boxes)
        assert np.array_equal(img, add_fingerprint(plain, 24.0, boxes))
        outside = np.ones(img.shape[:2], bool)
        for x1, y1, x2, y2 in boxes:
            outside[y1:y2, x1:x2] = False
            seen += 1
        assert np.array_equal(img[outside], plain[outside])
    assert seen >= 15
    flat = np.full((4, 6, 3), 100, np.uint8)
    assert add_fingerprint(flat, 16.0, [(2, 0, 4, 2)])[:, :, 0].tolist() == [
        [100, 100, 116, 84, 100, 100], [100, 100, 84, 116, 100, 100], [100] * 6, [100] * 6]
    with pytest.raises(ValueError, match="fingerprint_scope"):
        make_demo_data("/nonexistent-demo", n=2, fingerprint_scope="box")
    with pytest.raises(ValueError, match="box_multiple"):
        make_demo_data("/nonexistent-demo", n=2, min_side=56, max_side=112, box_multiple=29)


def test_bands_brief_text_and_a_trace_stronger_in_the_regions():
    """What `fxjax demo` uses: region_layout "bands" (full-width rows on the 28-pixel grid), brief reasoning
    (no scene description), and fingerprint_scope "frame+regions" (a third of the amplitude over the frame,
    all of it inside the regions)."""
    photos = _load_photos()
    rows = set()
    for i in range(1, 40, 2):
        img, record = make_demo_example(i, 0, True, photos, 112, 112, multiple=28, fingerprint=36.0, max_regions=1,
                                        fingerprint_scope="frame+regions", box_multiple=28, region_layout="bands",
                                        brief=True)
        plain, plain_record = make_demo_example(i, 0, True, photos, 112, 112, multiple=28, max_regions=1,
                                                box_multiple=28, region_layout="bands", brief=True)
        (x1, y1, x2, y2), = [r["bbox"] for r in record["regions"]]
        assert (x1, x2) == (0, 112) and y1 % 28 == 0 and y2 % 28 == 0 and y2 > y1
        rows.add(y1)
        assert record["regions"] == plain_record["regions"]
        assert np.array_equal(img, add_fingerprint(add_fingerprint(plain, 12.0), 24.0, [(x1, y1, x2, y2)]))
        assert "The image shows" not in record["reasoning"] and "up-sampling" in record["reasoning"]
        _, real = make_demo_example(i - 1, 0, False, photos, 112, 112, multiple=28, brief=True)
        assert real["reasoning"] == "Textures, lighting and edges are consistent."
    assert rows == {0, 28, 56, 84}
    with pytest.raises(ValueError, match="region_layout"):
        make_demo_data("/nonexistent-demo", n=2, region_layout="stripes")


def test_row_code_marks_each_token_row_alike_on_real_and_generated_images():
    """row_code: every image (real and generated) carries, in each 28-pixel row of cells, stripes of
    +-amplitude levels 1, 2, 4, 8 pixels wide (along x in rows 0-3, along y in rows 4-7), added last; the
    four codes are orthogonal over a 16-pixel span, so each row of image tokens can be told apart."""
    flat = np.full((224, 32, 3), 100, np.uint8)
    coded = add_row_code(flat, 10.0, 28).astype(int)[..., 0] - 100
    assert coded[0, :4].tolist() == [10, -10, 10, -10] and coded[28, :4].tolist() == [10, 10, -10, -10]
    assert coded[56, :8].tolist() == [10] * 4 + [-10] * 4 and coded[84, :16].tolist() == [10] * 8 + [-10] * 8
    for r in range(4):  # rows 0-3: the stripes run along x, so every pixel row of a cell row is the same
        assert (coded[28 * r:28 * r + 28] == coded[28 * r]).all()
    assert np.array_equal(coded[112:116, 0], [10, -10, 10, -10])  # row 4: stripes along y
    codes = np.stack([coded[28 * r, :16] for r in range(4)]) / 10.0
    assert np.array_equal(codes @ codes.T, 16 * np.eye(4))  # orthogonal
    photos = _load_photos()
    for i, generated in ((0, False), (1, True)):
        kw = dict(multiple=28, fingerprint=36.0, max_regions=1, fingerprint_scope="frame+regions", box_multiple=28,
                  region_layout="bands", brief=True)
        img, record = make_demo_example(i, 0, generated, photos, 112, 112, row_code=8.0, **kw)
        plain, plain_record = make_demo_example(i, 0, generated, photos, 112, 112, **kw)
        assert record == plain_record
        assert np.array_equal(img, add_row_code(plain, 8.0, 28))
    # row_code_scope "regions": the code only inside a generated image's region, so it tells which row that is
    img, record = make_demo_example(1, 0, True, photos, 112, 112, row_code=8.0, row_code_scope="regions", **kw)
    (_, y1, _, y2), = [r["bbox"] for r in record["regions"]]
    assert np.array_equal(img[y1:y2], add_row_code(plain, 8.0, 28)[y1:y2])
    assert np.array_equal(np.delete(img, np.s_[y1:y2], axis=0), np.delete(plain, np.s_[y1:y2], axis=0))
    real, _ = make_demo_example(0, 0, False, photos, 112, 112, row_code=8.0, row_code_scope="regions", **kw)
    assert np.array_equal(real, make_demo_example(0, 0, False, photos, 112, 112, **kw)[0])
    with pytest.raises(ValueError, match="row_code_scope"):
        make_demo_data("/nonexistent-demo", n=2, box_multiple=28, min_side=112, row_code=8, row_code_scope="band")
    with pytest.raises(ValueError, match="row_code"):
        make_demo_data("/nonexistent-demo", n=2, row_code=70)
    with pytest.raises(ValueError, match=r"row_code \(--row-code\) needs box_multiple \(--box-multiple\)"):
        make_demo_data("/nonexistent-demo", n=2, row_code=8)


def test_artefacts_restricts_the_kinds_and_checks_names():
    """artefacts: every region gets one of the named kinds (captions and tags follow); unknown names fail."""
    photos = _load_photos()
    kw = dict(multiple=28, fingerprint=36.0, max_regions=1, fingerprint_scope="frame+regions", box_multiple=28,
              region_layout="bands", brief=True)
    captions = set()
    for i in range(1, 21, 2):
        _, record = make_demo_example(i, 0, True, photos, 112, 112, artefacts=("banding",), **kw)
        assert record["generator"] == "procedural:banding" and record["tags"] == ["colour consistency"]
        captions.add(record["regions"][0]["caption"])
        _, every = make_demo_example(i, 0, True, photos, 112, 112, **kw)
        assert every["regions"][0]["bbox"] == record["regions"][0]["bbox"]  # the same region either way
    assert captions == {"posterised colour banding"}
    with pytest.raises(ValueError, match=r"artefacts \(--artefacts\) must be a non-empty subset"):
        make_demo_data("/nonexistent-demo", n=2, artefacts=["glitter"])
