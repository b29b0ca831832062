"""Dataset formats and validation: every error names file:line; skip mode counts; prompts are deterministic."""

from __future__ import annotations

import gzip
import json
import re
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxjax.data.prompts import (QWEN_DEFAULT_SYSTEM, SYSTEM_PROMPT, USER_TEMPLATES, pick_template, prompt_parts,
                                record_prompt, render_prompt, render_target)
from fxjax.data.records import DataError, ImageShare, load_records, resolve_image_path
from fxjax.rewards.output_format import render_completion

W, H = 64, 48


@pytest.fixture()
def root(tmp_path) -> Path:
    """A dataset root with good and bad image files."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "img/ok.png")
    Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(tmp_path / "img/gray.png")
    data = (tmp_path / "img/ok.png").read_bytes()
    (tmp_path / "img/truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "img/text.png").write_text("this is not an image\n")
    Image.new("RGB", (300, 300)).save(tmp_path / "img/big.png")
    Image.new("RGB", (201, 1)).save(tmp_path / "img/thin.png")
    # EXIF orientation 6 (rotate 90 degrees): stored 64x48, displayed 48x64.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "img/rotated.jpg", exif=exif)
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    Image.new("RGB", (W, H)).save(outside)
    (tmp_path / "img/link.png").symlink_to(outside)
    ramp = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 21).astype(np.uint16)  # 0..64491: 16-bit values
    Image.fromarray(ramp).save(tmp_path / "img/deep.png")
    return tmp_path


def native(image="img/ok.png", label="generated", regions=None, **extra) -> dict:
    if regions is None:
        regions = [{"bbox": [4, 5, 30, 40], "caption": "smeared texture"}] if label == "generated" else []
    return {"image": image, "label": label, "regions": regions, "tags": ["texture quality"],
            "reasoning": "Looks synthetic.", "generator": "sdxl", **extra}


def swift(assistant=None, refs=("odd hand",), boxes=([2, 3, 20, 30],), user="<image>Is this image real?", **extra):
    if assistant is None:
        assistant = ("<think> The <ref-object><bbox> is malformed.\n<tag>attribute correctness</tag>\n</think>\n"
                     "<verdict>generated</verdict>")
    record = {"messages": [{"role": "system", "content": "Be a forensic expert."},
                           {"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
              "images": ["img/ok.png"], "objects": {"ref": list(refs), "bbox": [list(b) for b in boxes]}}
    record.update(extra)
    return record


def write(root: Path, *records, name="data.jsonl") -> Path:
    path = root / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_native_record_loads(root):
    path = write(root, native(), native(label="real"), native(image="img/gray.png", label="REAL ", id="x7"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte-order mark, as Windows editors write
    assert load_records(write(root, native(bbox_type="real"), name="real.jsonl"))[1].loaded == 1  # pixels: fine
    records, report = load_records(path)
    assert report.loaded == report.lines == 3 and not report.skipped
    r = records[0]
    assert (r.index, r.source, r.record_id, r.width, r.height) == (0, f"{path}:1", "img/ok.png", W, H)
    assert r.image == str((root / "img/ok.png").resolve())
    assert r.label == "generated" and r.regions[0].bbox == (4.0, 5.0, 30.0, 40.0)
    assert r.regions[0].caption == "smeared texture" and r.tags == ("texture quality",)
    assert (r.reasoning, r.generator, r.format) == ("Looks synthetic.", "sdxl", "native")
    assert records[2].label == "real" and records[2].record_id == "x7" and records[2].index == 2
    numbered, _ = load_records(write(root, native(id=12), native(id=None), name="ids.jsonl"))
    assert [r.record_id for r in numbered] == ["12", "img/ok.png"]  # a null id is no id (it read "None")


def test_a_line_that_is_not_utf8_is_that_lines_error(root):
    """A bad byte on line 60 of 61 is reported on line 60 (a text-mode read reported it where its read-ahead
    chunk began, line 1) and under on_error=skip is skipped like any bad record; lines end at \n, \r\n or \r,
    as an editor counts them."""
    lines = [json.dumps(native(id=f"r{i}")).encode() for i in range(61)]
    lines[59] = lines[59].replace(b"Looks synthetic.", b"Looks synthetic.\xff")
    path = root / "bad.jsonl"
    path.write_bytes(b"\n".join(lines[:30]) + b"\r\n" + b"\r\n".join(lines[30:50]) + b"\r" + b"\n".join(lines[50:]))
    with pytest.raises(DataError, match=re.escape(f"{path}:60: not valid UTF-8")):
        load_records(path)
    records, report = load_records(path, on_error="skip")
    assert [r.record_id for r in records] == [f"r{i}" for i in range(61) if i != 59]
    assert report.lines == 61 and [s.where for s in report.skipped] == [f"{path}:60"]


def test_a_misspelt_field_is_warned_about_once_per_file(root, caplog):
    """A key close to a field the record lacks ("reason" for "reasoning") loads (other keys are kept for eval
    --group-by) but is warned about, with the count; a key like "camera" is not."""
    typo = {k: v for k, v in native().items() if k != "reasoning"}
    path = write(root, dict(typo, reason="Looks synthetic."), dict(typo, reason="Odd."), native(camera="dslr"))
    with caplog.at_level("WARNING", logger="fxjax.data.records"):
        records, _ = load_records(path)
    assert len(records) == 3 and records[0].reasoning == ""
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [f"{path}: 2 record(s) (lines 1, 2) have a key 'reason' and no 'reasoning': a misspelling? "
                     "(fxjax reads 'reasoning'; other keys are kept for eval --group-by)"]  # (lines: they named none)
    assert load_records(path)[1].hints == notes  # for `fxjax data check`, which prints them in its report


def test_swift_record_loads(root):
    real = swift(assistant="<think> fine\n</think>\n<verdict>real</verdict>", refs=(), boxes=(), user="Real or not?")
    # A system prompt may describe the output format with its markers.
    real["messages"][0]["content"] = "Answer as <think> ... </think><verdict>real|generated</verdict>."
    path = write(root, swift(), real)
    records, report = load_records(path)
    assert report.loaded == 2
    r = records[0]
    assert (r.format, r.label, r.system, r.user) == ("swift", "generated", "Be a forensic expert.",
                                                      "<image>Is this image real?")
    assert r.regions[0].caption == "odd hand" and r.regions[0].bbox == (2.0, 3.0, 20.0, 30.0)
    assert records[1].label == "real" and records[1].regions == ()


def test_box_forms_load_as_pixels_of_the_image(root):
    """ms-swift objects.bbox_type "norm1" (fractions of the width and height, on a non-square image) and the
    [[x1, y1], [x2, y2]] form of native and ms-swift records load as pixel boxes [x1, y1, x2, y2]."""
    norm = swift(boxes=([0.1, 0.2, 0.5, 0.9],))
    norm["objects"]["bbox_type"] = "norm1"
    nested = native(regions=[{"bbox": [[4, 5], [30, 40]], "caption": "c"}])
    records, _ = load_records(write(root, norm, nested, swift(boxes=([[2, 3], [20, 30]],))))
    assert W != H and records[0].regions[0].bbox == pytest.approx((0.1 * W, 0.2 * H, 0.5 * W, 0.9 * H))
    assert records[1].regions[0].bbox == (4.0, 5.0, 30.0, 40.0) and records[2].regions[0].bbox == (2.0, 3.0, 20.0, 30.0)
    norm["objects"]["bbox"] = [[0.1, 0.2, 0.5, 1.2]]  # past the bottom edge
    with pytest.raises(DataError, match=r"object 0 bbox .* lies outside the 64x48 image"):
        load_records(write(root, norm, name="outside.jsonl"))


def test_exif_orientation_is_applied_to_the_size(root):
    # Displayed 48 wide x 64 high: a box 50 px tall fits, one 50 px wide does not.
    path = write(root, native(image="img/rotated.jpg", regions=[{"bbox": [0, 0, 40, 60], "caption": "c"}]),
                 native(image="img/rotated.jpg", regions=[{"bbox": [0, 0, 50, 40], "caption": "c"}]))
    for decode in (True, False):
        records, report = load_records(path, on_error="skip", check_decode=decode)
        assert (records[0].width, records[0].height) == (H, W)
        assert [e.kind for e in report.skipped] == ["box_outside"]


# (record, expected kind, words the message must contain); each is written as line 3 after a good
# record and a blank line, so the message must say data.jsonl:3.
BAD = {
    "missing image": (native(image="img/nope.png"), "image_missing", "does not exist"),
    "windows path": (native(image="img\\ok.png"), "image_missing", "'img/ok.png' exists: write paths"),
    "undecodable image": (native(image="img/truncated.png"), "image_undecodable", "cannot be decoded"),
    "not an image": (native(image="img/text.png"), "not_an_image", "not an image"),
    "decompression bomb": (native(image="img/big.png", label="real"), "image_too_large", "decompression-bomb"),
    "aspect ratio": (native(image="img/thin.png", label="real"), "image_aspect", "aspect ratio"),
    "absolute path": (native(image="/etc/passwd"), "image_path", "absolute"),
    "dotdot escape": (native(image="img/../../secret.png"), "image_path", "escapes the dataset root"),
    "symlink escape": (native(image="img/link.png"), "image_path", "outside the dataset root"),
    "16-bit image": (native(image="img/deep.png"), "image_mode", "has 16-bit pixels (PIL mode I;16"),
    "bbox_type on a native record": (native(bbox_type="norm1"), "schema", "read from ms-swift records only"),
    "normalised boxes": (native(regions=[{"bbox": [0.1, 0.2, 0.5, 1.0], "caption": "c"}]), "box_normalised",
                         "every bbox coordinate is at most 1 on a 64x48 image: fractions"),
    # one fraction among pixel boxes, and a box under a pixel: both trained on an empty box, unsaid
    "one normalised box": (native(regions=[{"bbox": [0.5, 0.2, 0.7, 0.5], "caption": "a"},
                                           {"bbox": [6, 7, 37, 40], "caption": "b"}]), "box_normalised",
                           "region 0 bbox [0.5, 0.2, 0.7, 0.5] has every coordinate at most 1 on a 64x48 image, "
                           "where the other boxes are in pixels"),
    "sub-pixel box": (native(regions=[{"bbox": [50.2, 20.3, 50.6, 20.6], "caption": "a"}]), "box_tiny",
                      "region 0 bbox [50.2, 20.3, 50.6, 20.6] is under one pixel wide or high on the 64x48 image"),
    "regions an object": (native(regions={}), "schema", "'regions' must be a list, got dict"),
    "tags an empty string": (native(tags=""), "schema", "'tags' must be a list of strings, got str"),
    "reasoning false": (native(reasoning=False), "schema", "reasoning must be a string, got bool"),
    "missing caption": (native(regions=[{"bbox": [4, 5, 30, 40], "label": "x"}]), "schema",
                        "region 0 has no 'caption' (keys: bbox, label)"),
    "unknown label": (native(label="fake"), "label", "unknown label 'fake'"),
    "missing label": ({"image": "img/ok.png"}, "label", "missing field 'label'"),
    "box outside": (native(regions=[{"bbox": [10, 10, 65, 20], "caption": "c"}]), "box_outside", "outside the 64x48"),
    "box negative": (native(regions=[{"bbox": [-1, 10, 20, 20], "caption": "c"}]), "box_outside", "outside"),
    "box inverted": (native(regions=[{"bbox": [30, 10, 20, 20], "caption": "c"}]), "box_inverted",
                     "inverted (needs x1 < x2 and y1 < y2); if it is COCO's [x, y, w, h], write corners "
                     "[x, y, x + w, y + h] = [30, 10, 50, 30]"),
    "box empty": (native(regions=[{"bbox": [10, 10, 10, 20], "caption": "c"}]), "box_tiny",
                  "region 0 bbox [10, 10, 10, 20] is empty: zero width (x1 = x2)$"),  # (no COCO hint: not a COCO box)
    "box nan": ('{"image": "img/ok.png", "label": "generated", "regions": [{"bbox": [1, NaN, 5, 9], '
                '"caption": "c"}]}', "box_nonfinite", "non-finite"),
    "box inf": ('{"image": "img/ok.png", "label": "generated", "regions": [{"bbox": [1, 2, 1e999, 9], '
                '"caption": "c"}]}', "box_nonfinite", "non-finite"),
    "box arity": (native(regions=[{"bbox": [1, 2, 3], "caption": "c"}]), "box_arity", "4 numbers"),
    "box not numbers": (native(regions=[{"bbox": [1, 2, "3", 4], "caption": "c"}]), "box_arity", "non-numeric"),
    "generated without regions": (native(regions=[]), "no_regions", "at least one region"),
    "real with regions": (native(label="real", regions=[{"bbox": [1, 2, 3, 4], "caption": "c"}]), "schema",
                          "must not have regions"),
    "reserved marker in text": (native(reasoning="x </think> y"), "schema", "reserved marker"),
    "caption across lines": (native(regions=[{"bbox": [4, 5, 30, 40], "caption": "six\nfingers"}]), "schema",
                             "region 0 caption 'six\\nfingers' spans lines"),
    "swift ref across lines": (swift(refs=("a\r\nb",)), "schema", "object 0 ref 'a\\r\\nb' spans lines"),
    "invalid json": ('{"image": "img/ok.png", "label": ', "json", "invalid JSON"),
    "not an object": ("[1, 2]", "schema", "JSON object"),
    "swift too few placeholders": (swift(refs=("a", "b"), boxes=([1, 2, 3, 4], [5, 6, 7, 8])), "placeholders",
                                   "placeholder count does not match"),
    "swift bbox without ref": (swift(assistant="<think> <bbox> <bbox>\n<tag>t</tag></think><verdict>generated"
                                               "</verdict>"), "placeholders", "placeholder count does not match"),
    "swift unknown verdict": (swift(assistant="<think> <ref-object><bbox>\n<tag>t</tag></think>"
                                              "<verdict>maybe</verdict>"), "label", "unknown label 'maybe'"),
    "swift no verdict": (swift(assistant="<ref-object><bbox>"), "label", "no <verdict>"),
    "swift box outside": (swift(boxes=([2, 3, 20, 49],)), "box_outside",
                          "object 0 bbox [2, 3, 20, 49] lies outside the 64x48 image (width x height); it is 1 px "
                          "past the edge: clamped to the image it is [2, 3, 20, 48] (x to [0, 64], y to [0, 48]; "
                          "docs/data.md's conversion recipe clamps)$"),
    "swift generated without objects": (swift(assistant="<think> x\n</think><verdict>generated</verdict>", refs=(),
                                              boxes=()), "no_regions", "at least one region"),
    "swift two images": (swift(images=["img/ok.png", "img/gray.png"]), "schema", "exactly one image"),
    # norm1 boxes in pixels: named as given (it showed the numbers scaled by the image size)
    "swift norm1 in pixels": (swift(objects={"ref": ["odd hand"], "bbox": [[2, 3, 20, 30]], "bbox_type": "norm1"}),
                              "box_outside", "object 0 bbox [2, 3, 20, 30] (bbox_type norm1: fractions of the image, "
                                             "[128, 144, 1280, 1440] in pixels) lies outside the 64x48 image"),
    # Qwen2-VL's 0-1000 boxes: shown in pixels of this image
    "thousandths": (native(regions=[{"bbox": [100, 200, 800, 900], "caption": "c"}]), "box_outside",
                    "region 0 bbox [100, 200, 800, 900] lies outside the 64x48 image (width x height); if it is on "
                    "Qwen2-VL's 0-1000 scale of the image, in pixels it is [6.4, 9.6, 51.2, 43.2]"),
    # a key given twice: JSON keeps the last, silently
    "repeated key": ('{"image": "img/ok.png", "label": "real", "label": "generated"}', "json",
                     "the key 'label' is given twice in one object"),
    "region box key": (native(regions=[{"box": [4, 5, 30, 40], "caption": "c"}]), "schema",
                       "region 0 must be an object with 'bbox' and 'caption' (keys: box, caption)"),
    # the key of a native record in an ms-swift one, a URL, a path with a trailing space: each named
    "swift image key": ({k: v for k, v in swift(image="img/ok.png").items() if k != "images"}, "schema",
                        "'images' must list exactly one image, got None (the record has 'image': ms-swift records "
                        "name it 'images')"),
    "url": (native(image="https://example.com/a.png"), "image_path",
            "image path 'https://example.com/a.png' is a URL: download the image and give its path"),
    "trailing space": (native(image="img/ok.png "), "image_missing",
                       "(the path 'img/ok.png ' starts or ends with white space; 'img/ok.png' exists)"),
    "swift missing image": (swift(images=["img/gone.png"]), "image_missing", "does not exist"),
    "swift chat token": (swift(user="<image><|im_end|>hi"), "schema", "reserved token '<|im_end|>'"),
    "swift two image tags": (swift(user="<image><image>?"), "placeholders", "2 <image> tags"),
    "swift generator": (swift(generator=7), "schema", "'generator' must be a string or null, got int"),
    "id a list": (native(id=["a"]), "schema", "'id' must be a string or an integer, got list"),
    "swift id a bool": (swift(id=True), "schema", "'id' must be a string or an integer, got bool"),
}


def test_a_name_whose_accents_are_composed_otherwise_is_named(root):
    """"névé.png" written decomposed (NFD, as macOS writes names) in a record, composed (NFC) on disk: the
    missing-image error printed the two alike; now it says which file exists."""
    import unicodedata

    composed = unicodedata.normalize("NFC", "névé.png")
    (root / "img" / composed).write_bytes((root / "img/ok.png").read_bytes())
    decomposed = unicodedata.normalize("NFD", "névé.png")
    if (root / "img" / decomposed).exists():
        pytest.skip("this file system finds a name in either composition (macOS): nothing is missing")
    path = root / "data.jsonl"
    path.write_text(json.dumps(native(image=f"img/{decomposed}")) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"accents composed otherwise \(NFC\) exists: ") as info:
        load_records(path)
    assert info.value.kind == "image_missing" and f"{ascii(composed)}, not {ascii(decomposed)}" in str(info.value)
    path.write_text(json.dumps(native(image=f"img/{composed}")) + "\n", encoding="utf-8")
    assert len(load_records(path)[0]) == 1


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_validation_error_names_the_record(root, case):
    record, kind, words = BAD[case]
    good = native()
    path = root / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + (record if isinstance(record, str) else json.dumps(record)) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path, max_image_pixels=50_000)
    err = info.value
    assert str(err).startswith(f"{path}:3: "), str(err)
    assert err.where == f"{path}:3" and err.kind == kind, (err.kind, str(err))
    assert (str(err).endswith(words[:-1]) if words.endswith("$") else words in str(err)), str(err)  # $: the end


def test_skip_mode_counts_and_reports_every_skip(root, caplog):
    bad = [BAD[c][0] for c in sorted(BAD)]
    path = write(root, native(), *bad, native(label="real"))
    with caplog.at_level(logging.WARNING, logger="fxjax.data.records"):
        records, report = load_records(path, on_error="skip", max_image_pixels=50_000)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:{len(bad) + 2}"]
    assert [r.index for r in records] == [0, 1]
    assert report.lines == len(bad) + 2 and report.loaded == 2 and len(report.skipped) == len(bad)
    expected = {}
    for case in BAD:
        expected[BAD[case][1]] = expected.get(BAD[case][1], 0) + 1
    assert dict(report.counts()) == expected
    assert [e.where for e in report.skipped] == [f"{path}:{i}" for i in range(2, len(bad) + 2)]  # file order
    summary = report.summary()
    assert f"loaded 2 of {len(bad) + 2}" in summary and f"skipped {len(bad)}" in summary
    assert all(f"{k} {n}" in summary for k, n in expected.items())
    logged = caplog.text
    assert all(e.where in logged for e in report.skipped) and "skipped" in logged


def test_raise_mode_reports_the_first_problem_in_file_order(root):
    # An image problem on line 2 comes before a schema problem on line 3, though images are checked later.
    path = write(root, native(), native(image="img/nope.png"), native(label="fake"))
    with pytest.raises(DataError, match=f"{path}:2: missing image"):
        load_records(path)


def test_header_only_check_defers_decoding(root):
    path = write(root, native(image="img/truncated.png"))
    records, _ = load_records(path, check_decode=False)
    assert len(records) == 1  # the pipeline reports the decode error later (tests/test_pipeline.py)


def _as_two_processes(path, monkeypatch, **kwargs):
    """load_records(path) by two "processes" (threads) sharing the images (`ImageShare`, the exchange an
    allgather over a barrier): (their results, the images each opened as (decoded?, name), the values each
    posted)."""
    import threading

    from fxjax.data import records as records_module

    opened: dict[str, list[tuple[bool, str]]] = {}
    real = records_module.image_size
    monkeypatch.setattr(records_module, "image_size", lambda p, limit, decode: (
        opened.setdefault(threading.current_thread().name, []).append((decode, Path(p).name)),
        real(p, limit, decode))[1])
    resolve = Path.resolve

    def counted_resolve(self, *args, **kwargs):  # (images' paths: a round trip per file on a network disk)
        if self.suffix in (".png", ".jpg"):
            opened.setdefault(threading.current_thread().name, []).append(("resolved", self.name))
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", counted_resolve)
    barrier, posted = threading.Barrier(2), [None, None]

    def exchange(index):
        def allgather(value):
            posted[index] = value
            barrier.wait()
            return list(posted)
        return allgather

    got = {}

    def process(index):
        got[index] = load_records(path, num_threads=1, image_share=ImageShare(index, 2, exchange(index)), **kwargs)

    threads = [threading.Thread(target=process, args=(i,), name=f"process-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [got[0], got[1]], opened, posted


@pytest.mark.parametrize("check_decode", [True, False])
def test_processes_split_the_images_and_keep_the_same_records(root, monkeypatch, caplog, check_decode):
    """On a pod each process opens its share of the images (every second one, in the order the records name
    them: the header, decoded whole with data.check_decode) and the others' findings are exchanged, so every
    process keeps the records (and skips, with the same reasons) one process opening all would. Each host
    opened every image's header before (64 reads of each image on a 64-host pod)."""
    (root / "img/inside.png").symlink_to(root / "img/gray.png")  # (a link within the root: read as gray.png)
    names = ["ok.png", "truncated.png", "gray.png", "truncated.png", "rotated.jpg", "ok.png", "nope.png", "thin.png",
             "link.png", "inside.png"]  # (link.png: a symbolic link out of the root)
    path = write(root, *[native(image=f"img/{n}", label="real") for n in names])
    whole, whole_report = load_records(path, on_error="skip", check_decode=check_decode)
    assert {e.kind for e in whole_report.skipped} == (
        {"image_missing", "image_aspect", "image_path"} | ({"image_undecodable"} if check_decode else set()))
    caplog.clear()
    got, opened, _ = _as_two_processes(path, monkeypatch, on_error="skip", check_decode=check_decode)
    # what the load finds is said once, by the first process (a pod's hosts each printed every skipped record)
    said = {(r.threadName, r.levelno) for r in caplog.records if r.getMessage().startswith("skipping record")}
    assert {name for name, level in said if level == logging.WARNING} == {"process-0"}
    # each process resolves and opens its share of the images, in the order the records name them (ok,
    # truncated, gray, rotated, nope, thin, link, inside): resolved, then opened where the path leads
    resolved = lambda *names: [step for n in names for step in [("resolved", n), (check_decode, n)]]  # noqa: E731
    assert opened == {"process-0": resolved("ok.png", "gray.png") + [("resolved", "nope.png")]  # (strictly, then not)
                      + resolved("nope.png") + [("resolved", "link.png")],  # (link.png's target not opened)
                      "process-1": resolved("truncated.png", "rotated.jpg", "thin.png")
                      + [("resolved", "inside.png"), (check_decode, "gray.png")]}
    for records, report in got:
        assert [(r.source, r.image, r.width, r.height) for r in records] == \
            [(r.source, r.image, r.width, r.height) for r in whole]
        assert sorted((e.where, e.kind, str(e)) for e in report.skipped) == \
            sorted((e.where, e.kind, str(e)) for e in whole_report.skipped)
    with pytest.raises(ValueError, match="not with a limit"):
        load_records(path, limit=2, image_share=ImageShare(0, 2, lambda value: [value]))


def test_a_wrong_root_exchanges_one_message(root, monkeypatch):
    """What the processes exchange through the coordination service is one small entry per image: a wrong
    root (every image missing, the commonest mistake) sends each problem's message once with the path left
    out, not a message naming its path for each of two million images; each process's error is the one a
    single process gives."""
    path = write(root, *[native(image=f"img/missing_{i:03d}.png") for i in range(40)])
    with pytest.raises(DataError) as alone:
        load_records(path)
    got, _, posted = _as_two_processes(path, monkeypatch, on_error="skip")
    for records, report in got:
        assert not records and len(report.skipped) == 40
        assert str(report.skipped[0]) == str(alone.value)
    for value in posted:
        assert len(value["opened"]) == 20 and len(value["templates"]) == 1
        assert len(json.dumps(value)) < 200


def test_missing_file_and_bad_options(root):
    with pytest.raises(FileNotFoundError):
        load_records(root / "absent.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_records(write(root, native()), on_error="ignore")


def test_resolve_image_path(root):
    assert resolve_image_path(root, "img/ok.png") == (root / "img/ok.png").resolve()
    for bad, says in [("", "non-empty string"), ("/abs.png", "is absolute"), ("C:\\x.png", "is absolute"),
                      ("a/../../b.png", "escapes the dataset root"), ("..\\b.png", "escapes the dataset root"),
                      (3, "non-empty string, got 3")]:
        with pytest.raises(ValueError, match=says):
            resolve_image_path(root, bad)


def test_data_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(DataError("f.jsonl:3", "bad box", "box_outside")))
    assert (str(err), err.kind, err.where) == ("f.jsonl:3: bad box", "box_outside", "f.jsonl:3")


# ---- prompts -----------------------------------------------------------------------------------

def test_nine_distinct_templates_picked_deterministically():
    assert len(USER_TEMPLATES) == 9 == len(set(USER_TEMPLATES))
    picks = [[pick_template(0, i, e) for e in range(4)] for i in range(300)]
    assert picks == [[pick_template(0, i, e) for e in range(4)] for i in range(300)]
    assert {p for row in picks for p in row} == set(range(9))  # all templates are used
    assert sum(len(set(row)) > 1 for row in picks) > 250  # the choice changes between epochs
    assert [pick_template(1, i, 0) for i in range(50)] != [row[0] for row in picks[:50]]  # and with the seed
    with pytest.raises(ValueError, match=r"must be >= 0, got \(0, -1, 0\)"):
        pick_template(0, -1, 0)


def test_render_prompt_places_the_image_tokens():
    text = render_prompt("SYS", "Look.", image_tokens=3)
    assert text == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    "<|image_pad|><|image_pad|><|image_pad|><|vision_end|>Look.<|im_end|>\n<|im_start|>assistant\n")
    before, after = prompt_parts("S", "Here: <image> what is it?")
    assert before.endswith("user\nHere: <|vision_start|>") and after.startswith("<|vision_end|> what is it?")
    assert SYSTEM_PROMPT != QWEN_DEFAULT_SYSTEM


def test_targets_for_both_formats(root):
    records, _ = load_records(write(root, native(), swift()))
    native_rec, swift_rec = records[0], records[1]
    assert render_target(native_rec, [[8, 10, 60, 80]]) == render_completion(
        "generated", [("smeared texture", [8, 10, 60, 80])], ("texture quality",), "Looks synthetic.")
    assert render_target(swift_rec, [[4.4, 6, 40, 60.5]]) == (
        "<think> The <|object_ref_start|>odd hand<|object_ref_end|><|box_start|>[4, 6, 40, 60]<|box_end|> is "
        "malformed.\n<tag>attribute correctness</tag>\n</think>\n<verdict>generated</verdict>")
    assert record_prompt(swift_rec, 0) == ("Be a forensic expert.", "<image>Is this image real?")
    assert record_prompt(swift_rec, 2, prompts="templates") == (SYSTEM_PROMPT, USER_TEMPLATES[2])
    assert record_prompt(native_rec, 5, system_prompt="S") == ("S", USER_TEMPLATES[5])
    assert record_prompt(native_rec, 5, user_prompt="U") == (SYSTEM_PROMPT, "U")
    assert record_prompt(swift_rec, 0, user_prompt="U") == ("Be a forensic expert.", "<image>Is this image real?")
    with pytest.raises(ValueError):
        render_target(native_rec, [])


# ---- empty files and absolute paths ------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "\n\n  \n"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_file_without_records_is_named(root, content, on_error):
    empty = root / "empty.jsonl"
    empty.write_text(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: has no records: the file is empty or holds "
                                        "only blank lines$") as info:
        load_records([write(root, native()), empty], on_error=on_error)
    assert info.value.kind == "empty_file"


def _image_bytes(format: str) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format=format)
    return out.getvalue()


@pytest.mark.parametrize("name, content, problem", [
    ("array.jsonl", lambda r: ("[\n" + json.dumps(r) + "\n]\n").encode(), "holds one JSON array, not JSON Lines"),
    ("array1.jsonl", lambda r: ("[" + json.dumps(r) + "]\n").encode(), "holds a JSON array on a line, not JSON Lines"),
    ("pretty.json", lambda r: json.dumps(r, indent=2).encode(), "holds JSON spread over lines (pretty-printed)"),
    ("data.jsonl.gz", lambda r: gzip.compress(json.dumps(r).encode()), "is gzip-compressed: decompress it first"),
    ("utf16.jsonl", lambda r: json.dumps(r).encode("utf-16"), "is UTF-16 text: save it as UTF-8"),
    # an image given where its dataset's JSONL belongs: each "line" of it was an invalid record
    ("photo.jpg", lambda r: _image_bytes("JPEG"), "is a JPEG image, not a JSON Lines file of records: give the "
                                                  ".jsonl that names the images"),
    ("photo.png", lambda r: _image_bytes("PNG"), "is a PNG image, not a JSON Lines file"),
    ("photo.webp", lambda r: _image_bytes("WEBP"), "is a WebP image, not a JSON Lines file"),
    ("photo.bmp", lambda r: _image_bytes("BMP"), "is a BMP image, not a JSON Lines file"),
])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_file_that_is_not_json_lines_is_named_once(root, name, content, problem, on_error):
    """A JSON array, pretty-printed JSON, gzip or UTF-16 gave an error per line ("invalid JSON", "not valid
    UTF-8": 74 of them for one array) and nothing said what the file was."""
    path = root / name
    path.write_bytes(content(native()))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {re.escape(problem)}"):
        load_records(path, on_error=on_error)


def test_a_comment_line_is_named_as_one(root):
    path = root / "commented.jsonl"
    path.write_text("# my dataset\n" + json.dumps(native()) + "\n")
    with pytest.raises(DataError, match=r"commented\.jsonl:1: invalid JSON: .* \(JSON Lines has no comments: delete "
                                        r"the line\)"):
        load_records(path)


@pytest.mark.parametrize("line, hint", [
    ('{"image": "img/ok.png", "label": "real",}', "(a comma before '}': JSON allows no trailing comma)"),
    ('{"image": "img/ok.png", "label": "real", "boxes": [[1, 2, 3, 4],]}',
     "(a comma before ']': JSON allows no trailing comma)"),
    ("{'image': 'img/ok.png', 'label': 'real'}", "(JSON strings take double quotes; a Python dict written with "
                                                "str() or print: write json.dumps(record))"),
    ('{"image": "img/ok.png", "label": "real", "flag": True}', "(JSON writes True as true; a Python dict written "
                                                              "with str(): write json.dumps(record))"),
    ('{"image": "img/ok.png", "label": real}', "(a text value takes double quotes)"),
    ('{"image": "img/ok.png", "label": "real"},', "Extra data at character 41 of the line (a comma "
                                                 "after the record: JSON Lines separates records by line breaks only)"),
    ('{"image": "img/ok.png", "label": "real"} {"image": "img/ok.png", "label": "real"}',
     "(a second record on the same line: one record per line)"),
])
def test_hand_written_json_mistakes_are_named(root, line, hint):
    """json's own words ("Expecting property name enclosed in double quotes") for a trailing comma, single
    quotes, Python's True / None or a bare word: now said what the mistake is."""
    path = root / "hand.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=r"hand\.jsonl:1: invalid JSON: .*" + re.escape(hint)):
        load_records(path)


def test_absolute_image_paths_only_when_allowed(root):
    absolute = str((root / "img/ok.png").resolve())
    path = write(root, native(image=absolute), {**swift(), "images": [absolute]})
    with pytest.raises(DataError, match="is absolute.*allow_absolute_paths"):
        load_records(path)
    records, report = load_records(path, allow_absolute_paths=True)
    assert report.loaded == 2 and [r.image for r in records] == [absolute, absolute]
    # Relative paths stay confined to the root even then.
    with pytest.raises(DataError, match="escapes the dataset root"):
        load_records(write(root, native(image="img/../../secret.png")), allow_absolute_paths=True)
    assert resolve_image_path(root, absolute, allow_absolute=True) == Path(absolute)
    # A symbolic link out of the root is followed only then (without, BAD's "symlink escape" says how).
    (linked,), _ = load_records(write(root, native(image="img/link.png")), allow_absolute_paths=True)
    assert linked.image == str((root / "img/link.png").resolve()) and linked.image != str(root / "img/link.png")
    with pytest.raises(DataError, match="a symbolic link.*--allow-absolute-paths"):
        load_records(write(root, native(image="img/link.png")))
    with pytest.raises(ValueError, match="another operating system"):
        resolve_image_path(root, "C:\\x.png", allow_absolute=True)


def test_the_record_examples_of_docs_data_md_load(tmp_path):
    """docs/data.md's JSON examples are records the loader accepts, as written."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    assert len(blocks) == 2
    records = [json.loads(line) for line in _json_lines("".join(blocks))]
    (tmp_path / "images").mkdir()
    for record in records:
        image = record.get("image") or record["images"][0]
        Image.new("RGB", (256, 256)).save(tmp_path / image)
    path = write(tmp_path, *records)
    loaded, report = load_records(path)
    assert report.loaded == 3 and [r.label for r in loaded] == ["generated", "real", "generated"]
    assert loaded[0].regions[0].bbox == (112, 40, 188, 131) and loaded[2].regions[0].caption == "left hand"


def _json_lines(text: str):
    """The JSON objects of the concatenated examples (an object may span lines)."""
    decoder, at = json.JSONDecoder(), 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return
        obj, at = decoder.raw_decode(text, at)
        yield json.dumps(obj)


def test_a_record_giving_a_rotated_images_stored_frame_is_said_to_and_a_point_box_is_empty_both_ways(root):
    """img/rotated.jpg is stored 64x48 with EXIF orientation 6 (displayed 48x64): a record that gives 64 x 48
    gives the stored frame, not a resized copy; a box of one point has zero width and height."""
    path = write(root, native(image="img/rotated.jpg", label="real", width=W, height=H),
                 native(image="img/ok.png", label="real", width=2 * W, height=2 * H))
    _, report = load_records(path)
    hint = report.hints[-1]
    assert hint.startswith("2 record(s) give a width and height other than their image's (")
    assert f"{path}:1: 64x48 given, the file 48x64 as displayed (its stored frame: EXIF-rotated)" in hint
    assert f"{path}:2: 128x96 given, the file 64x48 as displayed)" in hint
    with pytest.raises(DataError, match=re.escape("bbox [5, 5, 5, 5] is empty: zero width (x1 = x2) and height "
                                                  "(y1 = y2)")):
        load_records(write(root, native(regions=[{"bbox": [5, 5, 5, 5], "caption": "a dot"}])))


def test_a_record_nested_past_pythons_recursion_limit_is_an_invalid_record(root):
    """100k nested '[' ended the load (and data check) in a RecursionError traceback, --on-error skip or not."""
    path = write(root, native(), "[" * 100_000 + "]" * 100_000, native(label="real"))
    with pytest.raises(DataError, match=r":2: invalid JSON: nested too deeply to be a record"):
        load_records(path)
    records, report = load_records(path, on_error="skip")
    assert len(records) == 2 and [e.kind for e in report.skipped] == ["json"]


def test_chat_records_of_other_tools_say_how_they_differ_from_ms_swifts(root):
    """A ShareGPT conversation, OpenAI-style content parts and a 0-1000 box scale said only that the role,
    the content's type or the bbox_type was wrong, not what the record was or how to convert it."""
    record = swift()
    cases = (({**record, "messages": [{"from": "human", "value": "<image>Real?"}, {"from": "gpt", "value": "x"}]},
              "message 0 must have role system, user or assistant (a ShareGPT message"),
             ({**record, "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                                      record["messages"][2]]},
              "message 0 (user) content is a list of parts: ms-swift's is one string, with <image> where"),
             ({**record, "objects": {**record["objects"], "bbox_type": "norm1000"}},
              "(boxes on a 0-1000 scale, as Qwen2-VL's grounding data: divide by 1000 and set norm1)"))
    for bad, says in cases:
        with pytest.raises(DataError, match=re.escape(says)):
            load_records(write(root, bad))


def test_a_record_read_in_the_other_format_says_it_looks_like_the_other_one(root):
    """--format native on an ms-swift record said "missing field 'image'", --format swift on a native one
    "'messages' must be a non-empty list", and neither that the record is of the other format."""
    for record, format, words in ((swift(), "native", "missing field 'image' (it looks like an ms-swift record "
                                                      "('messages'), read as native by the format setting"),
                                  (native(), "swift", "'messages' must be a non-empty list (it looks like a native "
                                                      "record (no 'messages'), read as swift by the format setting")):
        path = write(root, record)
        with pytest.raises(DataError, match=re.escape(words)):
            load_records(path, format=format)
        assert load_records(path, format="auto")[0]  # (auto reads it)


def test_opening_images_in_threads_leaves_the_processs_warning_filters_as_they_were(tmp_path):
    """Each open_image silenced PIL's DecompressionBombWarning with warnings.catch_warnings, which saves and
    restores the process's filter list: two threads' blocks that overlapped (the image threads of the data
    check or the pipeline) left the `ignore` in place for good, so a notebook's own PIL code lost the warning.
    (A short switch interval interleaves the threads at once: the old code left it in every run.)"""
    import sys
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from fxjax.data.images import open_image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    before = list(warnings.filters)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(4) as pool:
            sizes = set(pool.map(lambda i: open_image(tmp_path / "a.png", decode=True).size, range(400)))
    finally:
        sys.setswitchinterval(interval)
    assert sizes == {(32, 32)} and warnings.filters == before


def test_each_image_is_opened_once_and_a_png_header_read_decodes_nothing(root, monkeypatch):
    """Pass 2 opened an image once per record (40k records of 400 images: 20 s instead of 0.3); and reading a
    PNG's header for its EXIF orientation (data.check_decode false, data check --no-decode) decoded the whole
    image: PIL's PNG getexif() loads the pixels to look for an eXIf chunk after them."""
    from PIL import PngImagePlugin

    import fxjax.data.records as records_module

    opened = []
    image_size = records_module.image_size
    monkeypatch.setattr(records_module, "image_size", lambda path, *args: opened.append(path) or image_size(path, *args))
    path = write(root, *[native(label="real", id=i) for i in range(6)],
                 *[native(image="img/gray.png", label="real", id=f"g{i}") for i in range(3)], native(image="img/no.png"))
    records, report = load_records(path, on_error="skip", check_decode=False)
    assert len(records) == 9 and [e.kind for e in report.skipped] == ["image_missing"]
    assert sorted(Path(p).name for p in opened) == ["gray.png", "no.png", "ok.png"]

    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self) or load(self))
    assert load_records(path, on_error="skip", check_decode=False)[1].loaded == 9 and decoded == []
    assert load_records(path, on_error="skip", check_decode=True)[1].loaded == 9 and decoded  # (a decode: it loads)


def test_skipped_records_are_named_in_the_log_up_to_a_count_per_kind(root, caplog):
    """data.on_error skip named every skipped record at each run's start (3,000 bad records: 3,000 lines on
    every start and resume); now the first 20 of each kind, then how many more, and the summary counts all."""
    import logging

    path = write(root, *[native(image=f"img/no{i}.png") for i in range(23)], native(label="fake"))
    with caplog.at_level(logging.WARNING, logger="fxjax.data.records"):
        records, report = load_records(path, on_error="skip")
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping record: ")]
    assert len(report.skipped) == 24 and len(named) == 21 and sum("'fake'" in m for m in named) == 1, named
    assert ("skipping 3 more (image_missing 3), not named here: `fxjax data check --show all` lists them"
            in caplog.text)
    assert "skipped 24 (image_missing 23, label 1)" in caplog.text


def test_an_image_path_written_from_the_working_folder_is_said_so(root, monkeypatch):
    """A newcomer's records in data/train.jsonl named their images as seen from the working folder
    (img/ok.png, not ../img/ok.png): each image "missing", and the run's hint was to skip the records. The
    error says where paths are read from and the setting that reads them from the working folder."""
    (root / "data").mkdir()
    path = write(root / "data", native(image="img/ok.png"), name="train.jsonl")
    monkeypatch.chdir(root)
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing image: .* \(image paths are read relative to the "
                                        r"folder of the records' file, not the working folder, where img/ok.png is: set "
                                        r"data.root, or --root for fxjax data check and eval, to "):
        load_records(path)
    records, _ = load_records(path, root=str(root))  # (what the hint says works)
    assert len(records) == 1
    with pytest.raises(DataError, match=r"\(image paths are read relative to data.root \(--root\), not the working "
                                        r"folder, where img/ok.png is"):
        load_records(path, root=str(root / "data"))  # (a root given, and still not the working folder)
    monkeypatch.chdir(root / "data")  # (from elsewhere, no such file here: no hint)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert "working folder" not in str(err.value)


def test_a_symbolic_link_loop_is_a_record_error(root):
    """Resolving an image path whose links loop raised RuntimeError out of load_records (a traceback)."""
    (root / "img/loop.png").symlink_to(root / "img/loop.png")
    records, report = load_records(write(root, native(image="img/loop.png"), native()), on_error="skip")
    assert len(records) == 1 and [e.kind for e in report.skipped] == ["image_path"]
    assert "img/loop.png cannot be resolved" in str(report.skipped[0])


def test_a_limit_keeps_the_records_fingerprint_of_linked_images(root):
    """`--limit`'s records past the limit count in the records' fingerprint by the name of the file their path
    leads to, as the loaded records do: with the paths resolved in pass 2, a linked image counted by the
    link's name there and by its target's name among the loaded ones (another fingerprint than without a
    limit, so an eval with --limit and one without no longer counted as one)."""
    from fxjax.data.pipeline import records_fingerprint

    (root / "img/inside.png").symlink_to(root / "img/gray.png")
    path = write(root, native(image="img/ok.png"), native(image="img/inside.png"), native(image="img/ok.png"))
    whole, _ = load_records(path)
    limited, report = load_records(path, limit=1)
    assert [name for _, _, name in report.unchecked] == ["gray.png", "ok.png"]
    assert records_fingerprint(limited, report.unchecked) == records_fingerprint(whole)


def test_a_symbolic_link_loop_is_a_record_error_whatever_the_python(root, monkeypatch):
    """Python 3.13's non-strict Path.resolve returns a loop's path as it is (3.11 and 3.12 raise): the loop
    is found by the strict resolve, so it is an image_path error there too, not a file that cannot be read."""
    (root / "img/loop.png").symlink_to(root / "img/loop.png")
    resolve = Path.resolve

    def as_python_3_13(self, strict=False):
        try:
            return resolve(self, strict=strict)
        except RuntimeError:
            if strict:
                raise OSError(40, "Too many levels of symbolic links", str(self)) from None
            return self

    monkeypatch.setattr(Path, "resolve", as_python_3_13)
    records, report = load_records(write(root, native(image="img/loop.png"), native()), on_error="skip")
    assert len(records) == 1 and [e.kind for e in report.skipped] == ["image_path"]
