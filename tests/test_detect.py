"""`fxjax detect`: boxes mapped from the model's resized input back to the original pixels, overlays, answers
that do not parse, and one real run of the command on a tiny model.

The synthetic completions go through the command's own path (`fxjax.commands.detect.detect`: image records
-> prompt pipeline -> decoder -> parse -> scale -> overlay) with a decoder whose model step returns them."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxjax.commands.detect import detect, format_result, image_records
from fxjax.data.config import DataConfig
from fxjax.image_processing import model_input_size
from fxjax.overlay import BOX_COLOURS
from fxjax.train.inference import GreedyDecoder

MIN_PIXELS, MAX_PIXELS = 3136, 40000


class ScriptedDecoder(GreedyDecoder):
    """GreedyDecoder whose model step returns a completion per image (the pipeline stays real)."""

    def __init__(self, script, batch_size=2):
        self.script, self.batch_size, self.asked = script, batch_size, []

    def decoding_model(self):  # (no model: no weights to gather)
        return None

    def complete(self, batch, model=None):
        self.asked += [m["record_id"] for m in batch["meta"]]
        return [self.script(m) for m in batch["meta"]]


def odd_images(directory):
    """Images of odd sizes and modes: RGB, palette, grey with alpha, grey."""
    rng = np.random.default_rng(0)
    specs = {"rgb.png": ((77, 131, 3), "RGB"), "palette.png": ((203, 57, 3), "P"),
             "alpha.png": ((45, 90, 2), "LA"), "grey.png": ((61, 150), "L")}
    paths = []
    for name, (shape, mode) in specs.items():
        if mode == "L":
            image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        else:
            image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), "LA" if mode == "LA" else "RGB")
            if mode == "P":
                image = image.convert("P")
        image.save(directory / name)
        paths.append(str(directory / name))
    return paths


def prompt_config(tokenizer_dir):
    return DataConfig(data_files=("(images)",), tokenizer=str(tokenizer_dir), min_pixels=MIN_PIXELS,
                      max_pixels=MAX_PIXELS, max_length=1024, mode="prompt", prompts="auto", batch_size=2,
                      drop_remainder=False, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)


def box_in_model_pixels(meta):
    """A box well inside the model's input: the right lower quarter, in whole model pixels."""
    mh, mw = meta["model_size"]
    return [mw // 2, mh // 2, mw - 3, mh - 3]


def generated_answer(meta):
    box = box_in_model_pixels(meta)
    return ("<think><|object_ref_start|>warped texture<|object_ref_end|><|box_start|>"
            f"[{', '.join(map(str, box))}]<|box_end|>\n<tag>texture quality, lighting</tag>\n</think>\n"
            "<verdict>generated</verdict>")


def test_boxes_map_back_to_the_original_pixels_of_odd_sized_images(tokenizer_dir, tmp_path):
    paths = odd_images(tmp_path)
    records, failed, shrunk = image_records(paths, system="sys", user="Real or generated?", min_pixels=MIN_PIXELS,
                                    max_pixels=MAX_PIXELS)
    assert failed == [] and shrunk == [] and len(records) == 4
    # a 16-bit image is reported, not analysed: the processor's RGB conversion would clip it to white
    Image.fromarray(np.full((61, 150), 40000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    _, (refused,), _ = image_records([str(tmp_path / "grey16.png")], system="sys", user="?", min_pixels=MIN_PIXELS,
                                  max_pixels=MAX_PIXELS)
    assert refused[0] == str(tmp_path / "grey16.png") and "has 16-bit pixels (PIL mode I;16)" in refused[1]
    assert "the model would see an image nearly all white" in refused[1]
    # a float one in [0, 1] comes out black (the message said "blown-out" for both), an empty file is named so
    Image.fromarray(np.full((61, 150), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    (tmp_path / "empty.png").write_bytes(b"")
    _, refused, _ = image_records([str(tmp_path / "float.tif"), str(tmp_path / "empty.png")], system="sys", user="?",
                                  min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert "has 32-bit float pixels (PIL mode F)" in refused[0][1] and "nearly all black" in refused[0][1]
    assert refused[1][1] == f"{tmp_path / 'empty.png'} is an empty file (0 bytes), not an image"
    decoder = ScriptedDecoder(generated_answer)
    emitted = []
    results = detect(records, decoder, prompt_config(tokenizer_dir), out=tmp_path / "out", emit=emitted.append)
    assert emitted == results and decoder.asked == paths
    for path, result in zip(paths, results):
        with Image.open(path) as image:
            width, height = image.size
        mh, mw = model_input_size(height, width, MIN_PIXELS, MAX_PIXELS)
        assert result["size"] == [width, height] and result["model_size"] == [mw, mh]
        assert (mw, mh) != (width, height)  # the model saw a resized image
        x1, y1, x2, y2 = box_in_model_pixels({"model_size": (mh, mw)})
        # original = model * (original / model), per axis, computed exactly
        want = [Fraction(x1 * width, mw), Fraction(y1 * height, mh), Fraction(x2 * width, mw),
                Fraction(y2 * height, mh)]
        (region,) = result["regions"]
        assert region["box_model"] == [x1, y1, x2, y2] and region["caption"] == "warped texture"
        assert region["box"] == pytest.approx([float(v) for v in want], rel=1e-12, abs=0)
        assert result["verdict"] == "generated" and result["parsed"] and result["note"] is None
        assert result["tags"] == ["texture quality", "lighting"]

        overlay = Image.open(result["overlay"])
        # drawn enlarged by a whole factor to a side of at least 256 (a 56-pixel overlay cut its verdict off)
        k = -(-256 // max(width, height))
        assert k > 1 and overlay.size == (width * k, height * k) and overlay.mode == "RGB"
        # the box's left edge is drawn in the first box colour at the original x1 (times k), halfway down the box
        bx1, by1, _, by2 = (v * k for v in region["box"])
        assert overlay.getpixel((int(np.ceil(bx1)), int((by1 + by2) / 2))) == BOX_COLOURS[0], path
        # ... over the image itself, each of its pixels a k x k block
        from fxjax.image_processing import pil_to_rgb

        with Image.open(path) as original:  # (as the model saw it: transparency on white)
            assert overlay.getpixel((overlay.width - 1, overlay.height // 4)) == \
                pil_to_rgb(original).getpixel(((overlay.width - 1) // k, overlay.height // 4 // k)), path
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "alpha.detect.png", "grey.detect.png", "palette.detect.png", "rgb.detect.png"]


def test_an_answer_that_does_not_parse_is_shown_raw_with_a_note(tokenizer_dir, tmp_path):
    path = odd_images(tmp_path)[0]
    records, _, _ = image_records([path, path], system="sys", user="?", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    answers = iter(["<think> hmm </think> <verdict>maybe</verdict>",
                    "<think><|object_ref_start|>x<|object_ref_end|><|box_start|>[1, 2]<|box_end|></think>"])
    results = detect(records, ScriptedDecoder(lambda meta: next(answers)), prompt_config(tokenizer_dir),
                     out=tmp_path / "out", emit=lambda r: None)
    first, second = results
    assert first["verdict"] is None and not first["parsed"] and "its verdict is 'maybe'" in first["note"]
    text = format_result(first)
    assert "NO VERDICT" in text and "raw answer:" in text and "| <think> hmm </think> <verdict>maybe</verdict>" in text
    assert second["regions"] == [] and "1 region(s) with a box that is not [x1, y1, x2, y2]" in second["note"]
    # the same image twice: two overlays, neither overwritten
    assert [r["overlay"] for r in results] == [str(tmp_path / "out" / "rgb.detect.png"),
                                              str(tmp_path / "out" / "rgb-2.detect.png")]
    # a second run into the same folder replaces them: collected, for detect's note (it was silent)
    replaced = []
    again = iter(["<think> hmm </think> <verdict>real</verdict>"] * 2)
    detect(records, ScriptedDecoder(lambda meta: next(again)), prompt_config(tokenizer_dir), out=tmp_path / "out",
           emit=lambda r: None, replaced=replaced)
    assert replaced == [tmp_path / "out" / "rgb.detect.png", tmp_path / "out" / "rgb-2.detect.png"]
    # names that differ only in case get their own overlays (one file on a case-insensitive file system)
    from fxjax.commands.detect import overlay_path

    taken = set()
    assert [overlay_path(tmp_path, p, taken).name for p in ("A.jpg", "a.jpg", "x/a.png")] == [
        "A.detect.png", "a-2.detect.png", "a-3.detect.png"]
    # --no-overlay: the key is there, null (JSON readers need not test for it)
    unwritten = detect(records, ScriptedDecoder(generated_answer), prompt_config(tokenizer_dir), out=None,
                       emit=lambda r: None)
    assert [r["overlay"] for r in unwritten] == [None, None]


def test_detect_command_on_a_tiny_model(tiny_vl_dir, tmp_path, capsys):
    from fxjax.cli import main

    from fxjax.data.examples import tokens_for
    from fxjax.data.prompts import serving_prompt

    paths = odd_images(tmp_path)[:2]
    with Image.open(paths[0]) as first:  # an animation: analysed on its first frame, said (it was silent)
        frames = [first.convert("RGB"), first.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    paths.append(str(tmp_path / "moving.gif"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    missing = tmp_path / "nope.png"
    # max_length leaves room for 4 image tokens beside the prompt: at max_pixels 40000 both images would be
    # about 15 tokens, so detect shrinks them to 4 (3136 pixels) rather than letting the pipeline drop them
    prompt = serving_prompt(None, None)
    before, after = tokens_for(str(tiny_vl_dir)).prompt(prompt["system"], prompt["user"])
    max_length = len(before) + len(after) + 4
    args = ["detect", *paths, str(broken), str(missing), "--model", str(tiny_vl_dir), "--out",
            str(tmp_path / "overlays"), "--json", "--batch-size", "4", "--max-new-tokens", "3", "--max-pixels",
            "40000", "--max-length", str(max_length)]
    assert main(args) == 1  # two images could not be read (not an image; no such file); the others were analysed
    out = capsys.readouterr()
    assert f"{broken}: cannot be analysed" in out.err and f"{missing}: cannot be analysed: no such file" in out.err
    for path in paths:
        assert f"{path}: at max_pixels 40000 it would be" in out.err and "analysed at" in out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    errors = {r["image"]: r["error"] for r in lines if "error" in r}
    assert set(errors) == {str(broken), str(missing)} and errors[str(missing)] == "no such file"
    # the unreadable ones come first: each object's index is its image's place among those given
    given = [*paths, str(broken), str(missing)]
    assert sorted(r["index"] for r in lines) == list(range(len(given)))
    assert all(given[r["index"]] == r["image"] for r in lines)
    results = [r for r in lines if "error" not in r]
    assert [r["image"] for r in results] == paths
    for r in results:  # a random model's 3 tokens: shown raw, with a note, never a crash
        assert r["model_size"] == list(model_input_size(r["size"][1], r["size"][0], 3136, 3136))[::-1]
        assert not r["parsed"] and isinstance(r["completion"], str)
        mw, mh = r["model_size"]
        assert r["note"].startswith("at max_pixels 40000 it would be")
        assert r["truncated"] and "the answer stopped at --max-new-tokens (3 tokens) before its end" in r["note"]
        assert f"analysed at {mw}x{mh} ({mw * mh // 784} image tokens; --max-pixels, --max-length)" in r["note"]
        assert ("2 frames (an animation or a multi-page file): analysed on the first" in r["note"]) == \
            r["image"].endswith(".gif")
        k = -(-256 // max(r["size"]))  # (enlarged to a side of at least 256)
        assert Image.open(r["overlay"]).size == (r["size"][0] * k, r["size"][1] * k)


def test_the_python_detector_answers_as_the_command_for_paths_and_pil_images(tiny_vl_dir, tmp_path, capsys):
    """fxjax.detector.ImageDetector: `fxjax detect` from a notebook (it needed six internal modules). Its
    results are the command's --json objects for the same images (the command is the oracle), a PIL image's
    as the PNG it saves; bad options are a ValueError naming the flag, not the parser's SystemExit."""
    from fxjax.cli import main
    from fxjax.detector import ImageDetector

    paths = odd_images(tmp_path)[:2]
    missing = str(tmp_path / "nope.png")
    options = ["--max-new-tokens", "3", "--max-pixels", "3136", "--batch-size", "2"]
    assert main(["detect", *paths, missing, "--model", str(tiny_vl_dir), "--json", "--no-overlay", *options]) == 1
    want = sorted((json.loads(line) for line in capsys.readouterr().out.splitlines()), key=lambda r: r["index"])
    detector = ImageDetector(tiny_vl_dir, max_new_tokens=3, max_pixels=3136, batch_size=2)
    with Image.open(paths[1]) as second:
        got = detector([paths[0], second.copy(), missing], overlays=tmp_path / "overlays")
    assert [r["image"] for r in got] == [paths[0], "<PIL image 1>", missing]
    assert got[2] == want[2] and got[2]["error"] == "no such file"
    for mine, theirs in zip(got[:2], want[:2]):
        assert Path(mine.pop("overlay")).is_file() and theirs.pop("overlay") is None
        mine.pop("image"), theirs.pop("image")
        assert mine == theirs and isinstance(mine["completion"], str)
    # a CMYK image (PNG stores none: the call failed) as the same image read from a file; a phone photo
    # opened with PIL turned upright by its EXIF orientation, as its file is (its PNG copy lost the tag)
    cmyk = Image.open(paths[0]).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tiff")
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # (rotate 90 degrees to show it)
    Image.open(paths[0]).convert("RGB").save(rotated, exif=exif)
    with Image.open(rotated) as photo:
        got = detector([cmyk, str(tmp_path / "cmyk.tiff"), photo, str(rotated)])
    assert [r.get("error") for r in got] == [None] * 4
    for mine, theirs in ((got[0], got[1]), (got[2], got[3])):
        assert {k: v for k, v in mine.items() if k not in ("image", "index")} == \
            {k: v for k, v in theirs.items() if k not in ("image", "index")}
    assert got[3]["size"] == list(Image.open(paths[0]).size)[::-1]  # (upright: height and width swapped)
    assert ImageDetector(tiny_vl_dir, user_prompt="-real or generated?")._detector.data["user_prompt"] == \
        "-real or generated?"  # (a value that starts with "-" is a value)
    with pytest.raises(ValueError, match=r"ImageDetector: .*argument max_pixels: .*-5"):  # (in keywords' words)
        ImageDetector(tiny_vl_dir, max_pixels=-5)
    with pytest.raises(ValueError, match=r"^give model=PATH \(an HF directory, optionally with adapter=DIR\) or "
                                         r"run=RUN_DIR"):  # (the command said "give --model PATH ...")
        ImageDetector(step="alpha")
    with pytest.raises(TypeError, match=r"unknown option 'max_pixel'"):
        ImageDetector(tiny_vl_dir, max_pixel=5)
    with pytest.raises(TypeError, match=r"ImageDetector: user_prompt takes one value, not \['Real', 'or fake\?'\]"):
        ImageDetector(tiny_vl_dir, user_prompt=["Real", "or fake?"])  # (it became the text "['Real', 'or fake?']")


def test_out_that_is_a_file_is_refused_before_any_model_loads(tmp_path, capsys):
    from fxjax.cli import main

    taken = tmp_path / "taken"
    taken.write_text("mine")
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"  # (a model folder, as far as a check before loading sees)
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main(["detect", "x.png", "--model", str(model), "--out", str(taken)]) == 2
    assert f"--out: {taken} is a file; give a directory for the overlays" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--model", str(model), "--out", str(taken)]) == 2
    assert f"--out: {taken} is a file; give a directory for the predictions" in capsys.readouterr().err
    assert taken.read_text() == "mine"


def test_a_phone_photo_is_shrunk_to_fit_max_length_and_small_images_are_not(tmp_path):
    from fxjax.commands.detect import fitting_max_pixels

    # Qwen's max_pixels and fxjax's max_length: a 4032 x 3024 photo is 15552 image tokens, over 8192
    height, width = model_input_size(3024, 4032, 3136, 12845056)
    assert height * width // 784 == 15552
    fit = fitting_max_pixels(12845056, 8192, prompt_tokens=200)
    assert fit == (8192 - 200) * 784
    height, width = model_input_size(3024, 4032, 3136, fit)
    assert 7000 < height * width // 784 <= 8192 - 200  # the largest size that fits, near the budget
    assert fitting_max_pixels(40000, 8192, 200) == 40000  # a smaller max_pixels already fits: kept
    # an image is said to be shrunk only where it is: a 4000 x 30 strip is 2576 x 28 at max_pixels 50176 (over
    # it, as HF's smart_resize makes it), 92 tokens, which max_length 2048 fits (it was said shrunk to itself)
    from PIL import Image

    Image.new("RGB", (4000, 30)).save(tmp_path / "strip.png")
    Image.new("RGB", (600, 400)).save(tmp_path / "photo.png")
    paths = [str(tmp_path / "strip.png"), str(tmp_path / "photo.png")]
    records, failed, shrunk = image_records(paths, system="s", user="u", min_pixels=3136, max_pixels=50176,
                                            fit_pixels=fitting_max_pixels(50176, 2048, 100), max_length=2048)
    assert len(records) == 2 and failed == [] and shrunk == []
    _, _, shrunk = image_records(paths, system="s", user="u", min_pixels=3136, max_pixels=50176,
                                 fit_pixels=fitting_max_pixels(50176, 140, 100), max_length=140)
    assert [path for path, _ in shrunk] == paths and "more than max_length 140 allows" in shrunk[1][1]  # (40 tokens)
    with pytest.raises(ValueError, match="max_length 100 leaves no room for an image beside the prompt's 98"):
        fitting_max_pixels(40000, 100, 98)


def test_an_empty_prompt_or_a_zero_length_is_refused_naming_the_flag(tiny_vl_dir, tmp_path, capsys):
    from fxjax.cli import main

    for flags, message in ((["--user-prompt", " "], "--user-prompt: give a non-empty text"),
                           (["--system-prompt", ""], "--system-prompt: give a non-empty text"),
                           (["--user-prompt", "Is <|image_pad|> real?"],
                            "--user-prompt contains the reserved token '<|image_pad|>'"),
                           (["--system-prompt", "S<image>"], "--system-prompt: <image> belongs in the user prompt"),
                           (["--min-pixels", "100000", "--max-pixels", "40000"],
                            "min_pixels 100000 is above max_pixels 40000")):
        assert main(["detect", "x.png", "--model", str(tiny_vl_dir), "--no-overlay", *flags]) == 2
        assert message in capsys.readouterr().err
    # a file as --model (a photo given first by mistake) is a bad model (2), not a tokenizer's traceback
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not really a png")
    assert main(["detect", "x.png", "--model", str(photo), "--no-overlay"]) == 2
    assert f"--model: {photo} is a file; give an HF model directory" in capsys.readouterr().err


def test_an_out_folder_nothing_can_be_written_into_is_refused_before_any_model_loads(unwritable_dir, capsys):
    """(The same check as eval's and export's, `require_writable`: a write is tried, as root passes every mode.)"""
    from fxjax.cli import main

    assert main(["detect", "x.png", "--model", "no-model", "--out", str(unwritable_dir)]) == 2
    assert f"--out (or pass --no-overlay): {unwritable_dir} cannot be written" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """(It was made after the weights had loaded, and a permission error came out as a traceback.) A run
    that then fails leaves no empty folder behind (it left the one made for it), and one that existed stays."""
    from fxjax.cli import main
    from fxjax.commands import model_args

    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" / "overlays"  # under a file: cannot be made
    assert main(["detect", "x.png", "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert f"--out: cannot create the overlay folder {out}" in capsys.readouterr().err
    check, existed = model_args.check_model_arguments, []
    monkeypatch.setattr(model_args, "check_model_arguments", lambda args: (existed.append(Path(args.out).is_dir()),
                                                                          check(args)))
    new = tmp_path / "new" / "overlays"
    (tmp_path / "kept").mkdir()
    for folder in (new, tmp_path / "kept"):
        assert main(["detect", "x.png", "--model", str(tmp_path / "no-model"), "--out", str(folder)]) == 2
        assert "--model" in capsys.readouterr().err  # the model refused after the folder was made
    assert existed == [True, True] and not (tmp_path / "new").exists() and (tmp_path / "kept").is_dir()


def test_the_image_pixel_limit_is_a_flag_and_odd_files_are_named(tiny_vl_dir, tmp_path, capsys):
    """--max-image-pixels reaches the check (the error named a flag detect did not have); a pipe or device
    is said to be one, not "no such file"."""
    import os

    from fxjax.cli import main
    from fxjax.commands.detect import image_records

    path = odd_images(tmp_path)[0]
    assert main(["detect", path, "--model", str(tiny_vl_dir), "--no-overlay", "--max-image-pixels", "100"]) == 1
    assert "over the decompression-bomb limit of 100 (data.max_image_pixels, --max-image-pixels)" in \
        capsys.readouterr().err
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _, failed, _ = image_records([str(fifo)], system="s", user="u", min_pixels=3136, max_pixels=12544)
    assert failed == [(str(fifo), "not a regular file (a pipe, socket or device): save the image to a file first")]


def test_a_run_trained_on_ms_swift_records_own_prompts_is_noted(tmp_path):
    """Such a model never saw the prompts detect sends by default: a note says to pass them (once both are
    given, or with data.prompts 'templates', or native records, nothing)."""
    from fxjax.commands.detect import own_prompts_note

    swift = tmp_path / "swift.jsonl"
    swift.write_text("\n" + json.dumps({"messages": [{"role": "user", "content": "<image>Real?"},
                                                     {"role": "assistant", "content": "x"}], "images": ["a.png"]})
                     + "\n")
    native = tmp_path / "native.jsonl"
    native.write_text(json.dumps({"image": "a.png", "label": "real"}) + "\n")
    data = {"prompts": "auto", "train_files": (str(native), str(swift), str(tmp_path / "gone.jsonl"))}
    note = own_prompts_note(data, system_given=False, user_given=True)
    assert note == (f"the run trained on ms-swift records with their own prompts ({swift}; data.prompts 'auto'), "
                    "which detect does not know: pass --system-prompt and --user-prompt with the texts those "
                    "records carry")
    assert own_prompts_note(data, system_given=True, user_given=True) is None
    assert own_prompts_note(dict(data, prompts="templates"), False, False) is None
    assert own_prompts_note(dict(data, train_files=(str(native),)), False, False) is None
    assert own_prompts_note({"prompts": "auto"}, False, False) is None  # an export: no train files known


def test_an_export_of_such_a_run_names_its_ms_swift_files_for_detect_with_model(tmp_path, tiny_vl_dir):
    """The export records which train files were ms-swift records with their own prompts, so that `fxjax
    detect --model EXPORT` notes it on a machine without those files (before, it could not tell)."""
    from fxjax.cli import build_parser
    from fxjax.commands.detect import own_prompts_note
    from fxjax.commands.model_args import resolve_detector
    from fxjax.config_sections import DataSection
    from fxjax.train.export import PROMPT_SETTINGS_FILE, write_prompt_settings

    swift = tmp_path / "swift.jsonl"
    swift.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>Real?"},
                                              {"role": "assistant", "content": "x"}], "images": ["a.png"]}) + "\n")
    native = tmp_path / "native.jsonl"
    native.write_text(json.dumps({"image": "a.png", "label": "real"}) + "\n")
    export = tmp_path / "export"
    shutil.copytree(tiny_vl_dir, export)
    write_prompt_settings(export, DataSection(train_files=(str(native), str(swift))))
    written = json.loads((export / PROMPT_SETTINGS_FILE).read_text())
    assert written["own_prompt_files"] == [str(swift)] and str(swift) in written["serve"]["note"]
    swift.unlink()  # the serving machine has no train files
    data = resolve_detector(build_parser().parse_args(["detect", "x.png", "--model", str(export)])).data
    assert own_prompts_note(data, system_given=False, user_given=False) == (
        f"the run trained on ms-swift records with their own prompts ({swift}; data.prompts 'auto'), which detect "
        "does not know: pass --system-prompt and --user-prompt with the texts those records carry")
    # native records only, or 'templates' (the records' prompts replaced): nothing to note, and no note to serve
    for section in (DataSection(train_files=(str(native),)), DataSection(train_files=(str(native), str(swift)),
                                                                          prompts="templates")):
        swift.write_text(json.dumps({"messages": []}) + "\n")
        write_prompt_settings(export, section)
        written = json.loads((export / PROMPT_SETTINGS_FILE).read_text())
        assert written["own_prompt_files"] == [] and "note" not in written["serve"]
        data = resolve_detector(build_parser().parse_args(["detect", "x.png", "--model", str(export)])).data
        assert own_prompts_note(data, False, False) is None
    # train files gone at export: the hedged note names them
    write_prompt_settings(export, DataSection(train_files=(str(tmp_path / "gone.jsonl"),)))
    assert f"the train files {tmp_path / 'gone.jsonl'} were not there" in json.loads(
        (export / PROMPT_SETTINGS_FILE).read_text())["serve"]["note"]
    (export / PROMPT_SETTINGS_FILE).write_text(json.dumps({"own_prompt_files": "swift.jsonl"}))
    with pytest.raises(ValueError, match="own_prompt_files must be a list of file names"):
        resolve_detector(build_parser().parse_args(["detect", "x.png", "--model", str(export)]))


def test_a_directory_among_the_images_is_named_as_one(tmp_path):
    from fxjax.commands.detect import image_records

    _, failed, _ = image_records([str(tmp_path)], system="s", user="u", min_pixels=3136, max_pixels=12544)
    assert failed == [(str(tmp_path), f"a directory, not an image file (its images: {tmp_path / '*'})")]  # it said "no such file"


def test_an_overlay_shows_a_transparent_image_as_the_model_saw_it():
    """Transparency is composited on white for the model (HF's rule): the overlay does the same (it
    dropped the alpha band, showing a transparent image black)."""
    from PIL import Image

    from fxjax.image_processing import pil_to_rgb
    from fxjax.overlay import draw_detection

    for image in (Image.new("RGBA", (64, 48), (0, 0, 0, 0)), Image.new("LA", (64, 48), (0, 0))):
        out = draw_detection(image, [], "real")
        assert out.mode == "RGB" and out.getpixel((60, 44)) == (255, 255, 255)
        assert out.getpixel((60, 44)) == pil_to_rgb(image).getpixel((60, 44))


def test_an_overlay_draws_boxes_with_swapped_corners_and_boxes_at_the_border():
    """A box written [x2, y2, x1, y1] (the parser takes it) is drawn as the same box (Pillow refuses the
    corners unsorted: detect and the demo's sheet would crash); a box reaching the image's edge keeps its
    whole line width inside."""
    from fxjax.overlay import draw_detection

    swapped = draw_detection(Image.new("RGB", (100, 80)), [("a", (60, 40, 20, 70))], "generated")
    assert swapped.getpixel((20, 60)) == BOX_COLOURS[0] == swapped.getpixel((60, 60))
    edge = draw_detection(Image.new("RGB", (100, 80)), [("", (50, 40, 100, 80))], "generated")
    assert edge.getpixel((99, 60)) == BOX_COLOURS[0] == edge.getpixel((98, 60))  # line 2: the last two columns
    assert edge.getpixel((75, 79)) == BOX_COLOURS[0] == edge.getpixel((75, 78))


def test_an_overlay_draws_accented_greek_and_symbol_captions_and_a_bitmap_font_does_not_crash(monkeypatch):
    """Pillow's own font drew "é", "Δ" and "✓" as the box it draws for a missing glyph (the same as for a
    CJK character no font here has); the overlay's font draws them. Without FreeType, Pillow's bitmap font
    raised UnicodeEncodeError on them: they become "?"."""
    from PIL import ImageFont

    from fxjax import overlay

    from PIL import ImageDraw

    def glyph(char: str, font) -> bytes:
        image = Image.new("L", (40, 40))
        ImageDraw.Draw(image).text((5, 5), char, font=font, fill=255)
        return image.tobytes()

    font = overlay._font(24)
    for char in ("é", "Δ", "✓"):
        assert glyph(char, font) != glyph("\u4e00", font), char
    drawn = overlay.draw_detection(Image.new("RGB", (200, 120)), [("généré Δ ✓", (10, 60, 90, 110))], "generated")
    assert drawn.size == (200, 120)
    monkeypatch.setattr(overlay, "_font", lambda size: ImageFont.load_default_imagefont())
    plain = overlay.draw_detection(Image.new("RGB", (200, 120)), [("généré Δ ✓ 一", (10, 60, 90, 110))], None,
                                   note="réponse Δ")
    assert plain.size == drawn.size


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_raised_image_pixel_limit_reaches_the_decoding_and_the_overlay_in_detect_and_eval(tiny_vl_dir, tmp_path,
                                                                                          capsys):
    """--max-image-pixels above the default (89478485 pixels) let an image through the first check, then
    the pipeline and the overlay opened it at the default limit: detect failed it, eval stopped after the
    model had loaded, each saying to raise the flag that had been raised."""
    from fxjax.cli import main

    big = tmp_path / "big.png"
    Image.new("L", (9500, 9500), 128).save(big)  # 90.25M pixels, a few kB of PNG
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": "big.png", "label": "real"}) + "\n")
    raised = ["--max-image-pixels", "100000000", "--max-new-tokens", "2", "--max-pixels", "3136"]
    assert main(["detect", str(big), "--model", str(tiny_vl_dir), "--out", str(tmp_path / "overlays"), "--json",
                 *raised]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    with Image.open(result["overlay"]) as overlay:  # (PIL warns of a possible bomb: the test's own read)
        assert result["size"] == [9500, 9500] and overlay.size == (9500, 9500)
    assert main(["eval", "--model", str(tiny_vl_dir), "--data", str(tmp_path / "test.jsonl"), "--out",
                 str(tmp_path / "eval"), *raised]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["examples"] == 1
