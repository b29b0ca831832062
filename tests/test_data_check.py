"""`fxjax data check`: counts, balance and histograms of a good dataset; every bad record named with file:line."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
from fakexplain_data import IMAGES, write_fakexplain

from fxjax.cli import main

MAX_PIXELS = 112 * 112


def check(capsys, *argv) -> tuple[int, str]:
    rc = main(["data", "check", *map(str, argv)])
    return rc, capsys.readouterr().out


def bar_row(label: str, count: int) -> str:
    """A histogram row: the label, its count and a bar of '#'."""
    return rf"^\s+{re.escape(label)}\s+{count}(\s+[\d.]+%)?\s+#+$"


def test_good_dataset(capsys, tmp_path, tokenizer_dir):
    from fxjax.data.pipeline import DataConfig, DataPipeline

    path = write_fakexplain(tmp_path / "fx")
    rc, out = check(capsys, path, "--tokenizer", tokenizer_dir, "--max-pixels", MAX_PIXELS, "--max-length", 90,
                    "--long-images", "drop")
    assert rc == 0, out
    assert f"records: {len(IMAGES)}, valid {len(IMAGES)}, invalid 0" in out
    assert re.search(r"^\s+real\s+2\s+50\.0%\s+#{40}$", out, re.M)
    assert re.search(r"^\s+generated\s+2\s+50\.0%\s+#{40}$", out, re.M)
    assert "formats: swift 4" in out
    assert "regions per generated image: mean 1.50, min 1, median 1, max 2" in out
    assert re.search(bar_row("1", 1), out, re.M) and re.search(bar_row("2", 1), out, re.M)
    sides = sorted(max(size) for _, size, *_ in IMAGES)  # 80, 90, 100, 120
    assert f"longer side in pixels: min {sides[0]}, median {(sides[1] + sides[2]) // 2}, max {sides[-1]}" in out
    assert "smallest 80x60, largest 100x100" in out
    for side in sides:
        assert re.search(bar_row(str(side), 1), out, re.M)
    # Token lengths: the lengths of the examples the SFT pipeline builds from the same records.
    cfg = DataConfig(data_files=(str(path),), tokenizer=str(tokenizer_dir), max_pixels=MAX_PIXELS, shuffle=False,
                     num_epochs=1, batch_size=len(IMAGES), shard_index=0, shard_count=1)
    lengths = sorted(int(n) for n in next(iter(DataPipeline(cfg)))["attention_mask"].sum(1))
    assert f"max_pixels {MAX_PIXELS}): min {lengths[0]}, median " in out and f"max {lengths[-1]}" in out
    over = sum(n > 90 for n in lengths)
    assert 0 < over < len(lengths) and f"over max_length 90: {over} (generated {over}): training truncates" in out
    assert "alone reaches max_length" not in out  # every prompt fits: cutting the reasoning can help
    # a prompt that alone reaches max_length is dropped whatever is cut: said, with the settings to change
    rc, out = check(capsys, path, "--tokenizer", tokenizer_dir, "--max-pixels", MAX_PIXELS, "--max-length", 20,
                    "--long-images", "drop")
    assert (f"of them {len(IMAGES)} whose prompt with its image tokens alone reaches max_length, so training drops "
            f"them whatever it cuts (e.g. {path}:1): lower data.max_pixels (--max-pixels) or raise data.max_length"
            ) in out
    # every valid record dropped: nothing to train on, which "OK" and exit 0 hid
    assert rc == 1 and ("FAILED: 0 of 4 records invalid; training would drop every valid one (4) as too long for "
                        "max_length 20") in out

    # data.long_images "shrink" (the default): the images that leave an example over max_length are shrunk, so
    # fewer are over it, and the lengths are those of the examples the pipeline builds (long_samples "drop":
    # what still does not fit is left out, and said)
    rc, out = check(capsys, path, "--tokenizer", tokenizer_dir, "--max-pixels", MAX_PIXELS, "--max-length", 90)
    shrinking = dataclasses.replace(cfg, max_length=90, long_samples="drop", drop_remainder=False)
    it = iter(DataPipeline(shrinking))
    built = sorted(int(n) for batch in it for n in batch["attention_mask"].sum(1))
    # (every image shrunk, also one that does not fit even at the smallest size: the pipeline counts it as
    # dropped too long, not as shrunk; the estimate it was shrunk by once undershot min_pixels, so it stayed
    # at full size and the check counted one image fewer)
    truncating = iter(DataPipeline(dataclasses.replace(shrinking, long_samples="truncate")))
    list(truncating)
    shrunk = truncating.get_state()["shrunk"] + truncating.get_state()["dropped"].get("too_long", 0)
    assert 0 < shrunk and f"images shrunk below max_pixels to fit max_length 90 (data.long_images: shrink): " \
                          f"{shrunk} (generated {shrunk}; e.g. {path}:1)" in out, out
    assert f"over max_length 90: {len(IMAGES) - len(built)} (generated 1)" in out and len(built) > len(IMAGES) - over

    # Without a tokenizer the token histogram is skipped with a note; --bins groups values into ranges.
    rc, out = check(capsys, path, "--bins", 2)
    assert rc == 0 and "token length: skipped (give --tokenizer DIR" in out
    assert "alone reach max_length" not in out
    # ... but the images whose tokens alone reach max_length are still named (a phone photo's 15552 tokens at
    # Qwen's max_pixels against max_length 8192), with what training does with them
    from fxjax.image_processing import model_input_size

    tokens = sorted((h // 28) * (w // 28) for h, w in (model_input_size(height, width, 3136, MAX_PIXELS)
                                                       for _, (width, height), *_ in IMAGES))
    for option, fate in ((), "training shrinks them to fit (data.long_images: shrink)"), \
                        (("--long-images", "drop"), "training drops them (data.long_images: drop"):
        rc, no_tokenizer = check(capsys, path, "--max-pixels", MAX_PIXELS, "--max-length", tokens[1], *option)
        assert (f"images whose tokens at max_pixels {MAX_PIXELS} alone reach max_length {tokens[1]}: {sum(t >= tokens[1] for t in tokens)} "
                in no_tokenizer and fate in no_tokenizer and rc == 0), no_tokenizer
    # a tokenizer that is not there: said before any image is read
    assert main(["data", "check", str(path), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert f"tokenizer: {tmp_path / 'nope'} does not exist (--tokenizer)" in capsys.readouterr().err
    assert re.search(bar_row("80-99", 2), out, re.M) and re.search(bar_row("100-120", 2), out, re.M)


def test_bad_dataset_lists_every_invalid_record(capsys, tmp_path):
    folder = tmp_path / "fx"
    absolute = str((folder / IMAGES[0][0]).resolve())
    swift = {"messages": [{"role": "user", "content": "<image>Real?"},
                          {"role": "assistant", "content": "<think> The <ref-object><bbox> is odd.\n<tag>t</tag>"
                                                           "</think><verdict>generated</verdict>"}],
             "images": [IMAGES[0][0]], "objects": {"ref": ["hand"], "bbox": [[1, 2, 30, 40]]}}
    bad = {  # line number -> (kind, record)
        5: ("json", '{"messages": ['),
        6: ("image_missing", json.dumps({**swift, "images": ["images/real/gone.jpg"]})),
        7: ("box_outside", json.dumps({**swift, "objects": {"ref": ["hand"], "bbox": [[1, 2, 95, 40]]}})),
        8: ("placeholders", json.dumps({**swift, "objects": {"ref": ["a", "b"],
                                                             "bbox": [[1, 2, 3, 4], [5, 6, 7, 8]]}})),
        9: ("image_path", json.dumps({**swift, "images": [absolute]})),
        10: ("label", json.dumps({"image": IMAGES[1][0], "label": "fake"})),
    }
    path = write_fakexplain(folder, extra_lines=tuple(line for _, line in bad.values()))
    rc, out = check(capsys, path)
    assert rc == 1, out
    assert f"records: 10, valid 4, invalid {len(bad)}" in out
    assert "invalid by kind: box_outside 1, image_missing 1, image_path 1, json 1, label 1, placeholders 1" in out
    listed = out[out.index(f"invalid records ({len(bad)}):"):].splitlines()[1:1 + len(bad)]
    assert [line.split(": [")[0].strip() for line in listed] == [f"{path}:{n}" for n in bad]
    for line, (kind, _) in zip(listed, bad.values()):
        assert f": [{kind}] " in line
    assert "outside the 90x70 image" in out and "unknown label 'fake'" in out and "is absolute" in out
    assert f"FAILED: {len(bad)} of 10 records invalid" in out
    # The valid records are still described.
    assert re.search(r"^\s+real\s+2\s+50\.0%", out, re.M)
    # --allow-absolute-paths accepts line 9.
    rc, out = check(capsys, path, "--allow-absolute-paths")
    assert rc == 1 and f"records: 10, valid 5, invalid {len(bad) - 1}" in out and f"{path}:9: [" not in out
    assert (f"1 image(s) in more than one record of a file (trained on more often; where these are an image's boxes "
            f"one record each, merge them into one record's 'regions': each record's answer names only its own box, "
            f"and teaches the others as absent): {absolute} ({path}:1 generated, {path}:9 generated)") in out
    # (line 9 names line 1's image by its absolute path, with another box)


def test_ms_swift_answers_that_break_the_output_format_are_warned_about(capsys, tmp_path):
    """An ms-swift record's assistant text is the SFT target as written: one without a verdict, with two, or
    failing the format check trained silently on answers eval's format rate counts wrong."""
    path = write_fakexplain(tmp_path / "fx")
    image = json.loads(path.read_text().splitlines()[1])["images"][0]  # a real record's image

    def real(answer):
        return json.dumps({"messages": [{"role": "user", "content": "<image>Real?"},
                                        {"role": "assistant", "content": answer}], "images": [image], "label": "real"})

    generated = json.loads(path.read_text().splitlines()[0])
    regions = "<ref-object><bbox> " * len(generated["objects"]["ref"])
    lines = [real("<think>fine</think>"), real("<think>ok</think><verdict>real</verdict><verdict>generated</verdict>"),
             real("<think>ok</think><verdict>real</verdict>"),
             json.dumps({**generated, "messages": [*generated["messages"][:-1], {
                 "role": "assistant", "content": f"<think>{regions}odd\n<tag>t</tag></think>\n"
                                                 "<verdict>generated</verdict>"}]})]
    path.write_text("\n".join(lines) + "\n")
    rc, out = check(capsys, path)
    assert rc == 0 and "OK: 0 of 4 records invalid" in out, out  # (warned, not refused)
    assert (f"2 ms-swift record(s) whose answer breaks the output format (docs/format.md; `fxjax docs format`): SFT teaches it as "
            f"written, and eval's format rate counts such an answer wrong: {path}:1: no verdict; {path}:2: 2 verdicts"
            ) in out
    path.write_text(path.read_text() + json.dumps({**generated, "messages": [*generated["messages"][:-1], {
        "role": "assistant", "content": f"<think>Look at {regions}.\n<tag>t</tag></think>\n"
                                        "<verdict>generated</verdict>"}]}) + "\n")
    rc, out = check(capsys, path)
    assert f"{path}:5: its <think> is not followed at once by its first region" in out


def test_config_checks_a_runs_data_as_that_run_reads_it(capsys, tmp_path, tokenizer_dir):
    """--config: the run's files, tokenizer and prompt settings (here one user prompt instead of the
    records' own), so the token lengths are the ones its pipeline builds; a GRPO config: the prompts'."""
    import yaml

    from fxjax.data.pipeline import DataConfig, DataPipeline

    path = write_fakexplain(tmp_path / "fx")
    data = {"train_files": [str(path)], "tokenizer": str(tokenizer_dir), "max_pixels": MAX_PIXELS,
            "prompts": "templates", "user_prompt": "Box it.", "system_prompt": "Look.", "max_length": 90,
            "long_images": "drop"}  # (the lengths at max_pixels: the run's setting reaches the check)
    runs = {"sft": {"model": {"preset": "tiny"}, "data": data, "train": {"steps": 1}},
            "grpo": {"model": {"preset": "tiny"}, "data": data, "stages": [{"name": "alpha", "steps": 1}]}}
    seen = {}
    for kind, config in runs.items():
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(config))
        rc, out = check(capsys, "--config", tmp_path / f"{kind}.yaml", "--set", "data.max_length=80")
        assert rc == 0, out
        assert f"as `fxjax {kind} --config {tmp_path / f'{kind}.yaml'}` reads them" in out
        mode = "prompt" if kind == "grpo" else "sft"
        cfg = DataConfig(data_files=(str(path),), tokenizer=str(tokenizer_dir), max_pixels=MAX_PIXELS, shuffle=False,
                         prompts="templates", user_prompt="Box it.", system_prompt="Look.", max_length=1024,
                         mode=mode, num_epochs=1, batch_size=len(IMAGES), shard_index=0, shard_count=1)
        lengths = sorted(int(n) for n in next(iter(DataPipeline(cfg)))["attention_mask"].sum(1))
        seen[kind] = lengths
        what = "prompt + image tokens (GRPO prompts)" if kind == "grpo" else "prompt + image tokens + target"
        assert f"token length ({what}; min_pixels 3136, max_pixels {MAX_PIXELS}): min {lengths[0]}, " in out, out
        assert f"max {lengths[-1]}" in out and f"over max_length 80: {sum(n > 80 for n in lengths)}" in out
    # a GRPO config whose file has no grpo or stages section (the default stages) is one by its --set
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": data}))
    for key in ("grpo.beta=0", "stages[0].steps=1"):  # (a list key: its section is "stages", not "stages[0]")
        rc, out = check(capsys, "--config", tmp_path / "bare.yaml", "--set", key)
        assert rc == 0 and f"as `fxjax grpo --config {tmp_path / 'bare.yaml'}` reads them" in out, out
    # ... or by --kind; without either it is SFT's, with or without a run length (a data check trains nothing:
    # the shipped sft config, which leaves train.steps to the user, was read as GRPO's, prompt lengths only)
    rc, out = check(capsys, "--config", tmp_path / "bare.yaml")
    assert rc == 0 and f"as `fxjax sft --config {tmp_path / 'bare.yaml'}` reads them" in out, out
    rc, out = check(capsys, "--config", tmp_path / "bare.yaml", "--kind", "grpo")
    assert rc == 0 and f"as `fxjax grpo --config {tmp_path / 'bare.yaml'}` reads them" in out, out
    # an SFT config with its run length, read as GRPO reads it (GRPO's length comes from its stages); a GRPO
    # config as SFT: refused, naming why
    (tmp_path / "long.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": data,
                                                        "train": {"epochs": 1}}))
    rc, out = check(capsys, "--config", tmp_path / "long.yaml", "--kind", "grpo")
    assert rc == 0 and f"as `fxjax grpo --config {tmp_path / 'long.yaml'}` reads them" in out, out
    assert main(["data", "check", "--config", str(tmp_path / "bare.yaml"), "--set", "grpo.beta=0", "--kind", "sft"]) == 2
    assert "--kind sft: " in capsys.readouterr().err
    (tmp_path / "neither.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": data,
                                                           "train": {"steps": 1, "epochs": 1}}))
    assert main(["data", "check", "--config", str(tmp_path / "neither.yaml")]) == 2
    assert "set exactly one of train.steps and train.epochs" in capsys.readouterr().err  # (the SFT reading's)
    # without --config, the records' own (longer) prompts: other lengths
    rc, out = check(capsys, path, "--tokenizer", tokenizer_dir, "--max-pixels", MAX_PIXELS)
    own = re.search(r"\+ target; min_pixels \d+, max_pixels \d+\): min (\d+), ", out)
    assert rc == 0 and own and int(own.group(1)) > seen["sft"][0], out
    # the config's format and decoding settings hold unless an option overrides them
    from fxjax.cli import build_parser
    from fxjax.commands.data_check import _data_config

    (tmp_path / "swift.yaml").write_text(yaml.safe_dump(dict(runs["sft"], data=dict(data, format="swift",
                                                                                    check_decode=False))))
    args = build_parser().parse_args(["data", "check", "--config", str(tmp_path / "swift.yaml")])
    assert (_data_config(args).format, _data_config(args).check_decode) == ("swift", False)
    args = build_parser().parse_args(["data", "check", "--config", str(tmp_path / "swift.yaml"), "--format", "auto"])
    assert _data_config(args).format == "auto"
    assert main(["data", "check", "--set", "data.max_length=8", str(path)]) == 2
    assert "--set overrides values of --config" in capsys.readouterr().err


def test_valid_but_suspicious_records_are_warned_about(capsys, tmp_path):
    """Records that load but look wrong over the dataset: a misspelt key (training logs it; the check must
    print it too), one image labelled both ways, an image repeated, an image in both files (a leak)."""
    from PIL import Image

    for shade, name in enumerate(("a", "b", "c")):  # three images: distinct contents
        Image.new("RGB", (40, 30), (shade * 60,) * 3).save(tmp_path / f"{name}.png")
    box = [{"bbox": [1, 2, 20, 20], "caption": "odd"}]
    train = [{"image": "a.png", "label": "real"}, {"image": "a.png", "label": "generated", "regions": box},
             {"image": "b.png", "label": "real", "reason": "fine"}, {"image": "b.png", "label": "real"}]
    test = [{"image": "c.png", "label": "real"}, {"image": "b.png", "label": "real"}]
    for name, records in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, out = check(capsys, tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    assert rc == 0, out
    warned = out[out.index("warnings (4;"):].splitlines()[1:5]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    assert warned[0] == (f"  {train_file}: 1 record(s) (line 3) have a key 'reason' and no 'reasoning': a misspelling? "
                         "(fxjax reads 'reasoning'; other keys are kept for eval --group-by)")
    assert warned[1] == (f"  1 image(s) labelled both real and generated: {a} ({train_file}:1 real, "
                         f"{train_file}:2 generated)")
    assert warned[2] == (f"  1 image(s) in more than one record of a file (trained on more often): {b} "
                         f"({train_file}:3 real, {train_file}:4 real, {test_file}:2 real)")
    assert warned[3].startswith(f"  1 image(s) in more than one file (a leak if the files are train and test splits): "
                                f"{b} (")
    assert out.rstrip().endswith("OK: 0 of 6 records invalid; 4 warning(s) above")
    # an image once in each file is a leak, not a repeat
    rc, out = check(capsys, tmp_path / "test.jsonl", tmp_path / "train.jsonl")
    assert "more than one record of a file" in out  # b.png twice in train.jsonl
    (tmp_path / "train.jsonl").write_text(json.dumps(train[2]) + "\n")
    rc, out = check(capsys, tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    assert "more than one file" in out and "more than one record of a file" not in out


def test_an_image_in_many_records_lists_a_few_of_them_with_each_label(capsys, tmp_path):
    """An image in thousands of records listed every one of them on its warning's line (16k characters at
    40k records); now five at most, in file order, the first of each label among them (the contradiction
    stays visible), and how many more."""
    from PIL import Image

    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "a.png")
    labels = ["real"] * 11 + ["generated"] + ["real"] * 3
    box = [{"bbox": [1, 2, 20, 20], "caption": "odd"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": "a.png", "label": label} | (
        {"regions": box} if label == "generated" else {})) + "\n" for label in labels))
    rc, out = check(capsys, tmp_path / "train.jsonl")
    assert rc == 0, out
    f, a = tmp_path / "train.jsonl", tmp_path / "a.png"
    (line,) = [line for line in out.splitlines() if "labelled both real and generated" in line]
    assert line == (f"  1 image(s) labelled both real and generated: {a} ({f}:1 real, {f}:2 real, {f}:3 real, "
                    f"{f}:4 real, {f}:12 generated, and 10 more record(s))")


def test_an_image_is_its_content_and_an_id_names_one_image(capsys, tmp_path):
    """A copy of a training image under another name in the test file is a leak all the same (the check
    compared paths only); an id that two records of other images share in one file is said, while records
    without an id (their path is their id) and ids reused across files are not."""
    from PIL import Image

    for shade, name in enumerate(("a", "b")):
        Image.new("RGB", (40, 30), (shade * 60,) * 3).save(tmp_path / f"{name}.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")
    train = [{"image": "a.png", "label": "real", "id": "x1"}, {"image": "b.png", "label": "real", "id": "x1"}]
    test = [{"image": "a_copy.png", "label": "real", "id": "x1"}]
    for name, records in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    rc, out = check(capsys, train_file, test_file)
    assert rc == 0, out
    warned = out[out.index("warnings (2;"):].splitlines()[1:3]
    a, copy = tmp_path / "a.png", tmp_path / "a_copy.png"
    assert warned[0] == (f"  1 image(s) in more than one file (a leak if the files are train and test splits): "
                         f"{a} = {copy} ({train_file}:1 real {a}, {test_file}:1 real {copy})")
    assert warned[1] == (f"  1 id(s) given to records of other images in the same file (eval's predictions.jsonl "
                         f"names records by id): 'x1' ({train_file}:1, {train_file}:2)")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "b.png", "label": "real"}) + "\n"
                                          + json.dumps({"image": "b.png", "label": "real"}) + "\n")
    rc, out = check(capsys, train_file)
    assert "id(s) given" not in out and "more than one record of a file" in out
    # one id on a file and its copy: one image, so no id warning (it called them "other images")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "a.png", "label": "real", "id": "y"}) + "\n"
                                          + json.dumps({"image": "a_copy.png", "label": "real", "id": "y"}) + "\n")
    rc, out = check(capsys, train_file)
    assert "id(s) given" not in out and "more than one record of a file" in out


def test_errors_that_stop_the_check(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["data", "check", str(empty)]) == 2
    assert f"fxjax data check: error: {empty}: has no records: the file is empty" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "absent.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path)]) == 2
    assert f"dataset file {tmp_path} is a directory, not a JSONL file" in capsys.readouterr().err
    # (a --max-pixels below 1 is the flag's own error: tests/test_cli_help.py)


def test_help_explains_outputs_and_exit_status(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for words in ("label balance", "image-size histogram", "token-length histogram", "FILE:LINE",
                  "--allow-absolute-paths", "--tokenizer DIR", "1  at least one record is invalid"):
        assert words in text, words


def test_an_annotators_mistakes_are_named_where_they_would_train_silently(capsys, tmp_path):
    """Boxes of a file in COCO's [x, y, w, h] (refused only where inverted: the others pass as corners), a box
    drawn on the stored frame of an EXIF-rotated photo, fractions with float noise, a real image with a
    placeholder region, and a record copied from docs wrapped over lines."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 x 40, displayed 40 x 64
    Image.new("RGB", (64, 40), (90, 120, 30)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (300, 200), (30, 60, 90)).save(tmp_path / "wide.png")

    def generated(image, box):
        return {"image": image, "label": "generated", "regions": [{"bbox": box, "caption": "a seam"}]}

    rows = [generated("wide.png", [100, 50, 150, 120]),  # COCO [x, y, w, h] that passes as corners
            generated("wide.png", [120, 80, 60, 40]),  # COCO, inverted as corners: refused with the hint
            generated("turned.jpg", [10, 5, 60, 30]),  # drawn on the stored 64 x 40 frame: outside 40 x 64
            generated("turned.jpg", [5, 10, 30, 50]),  # inside the displayed frame
            generated("wide.png", [0.1, 0.2, 0.4, 1.0001]),  # fractions, converted with float noise
            {"image": "wide.png", "label": "real", "regions": [{"bbox": [0, 0, 0, 0], "caption": ""}]}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = check(capsys, path)
    assert rc == 1, out
    assert f"{path}:2: [box_inverted]" in out and "write corners [x, y, x + w, y + h] = [120, 80, 180, 120]" in out
    assert (f"1 record(s) refused for an inverted box that reads as COCO's [x, y, w, h] (e.g. {path}:2): if {path} "
            f"use that convention, the boxes of its 2 valid record(s) with regions are wrong too") in out, out
    assert (f"{path}:3: [box_outside] region 0 bbox [10, 5, 60, 30] lies outside the 40x64 image (width x height); "
            f"the file is stored as 64x40 with EXIF orientation 6") in out, out
    assert "1 image(s) with boxes are stored rotated (EXIF orientation 5-8" in out and f"{path}:4 (40x64" in out
    assert f"{path}:5: [box_normalised] every bbox coordinate is at most 1 on a 300x200 image" in out, out
    assert f"{path}:6: [schema] a real image must not have regions (has 1; a placeholder such as" in out, out
    # the docs' example record wrapped for reading, copied as it is: one message for the file, not per line
    wrapped = tmp_path / "wrapped.jsonl"
    wrapped.write_text('{"image": "wide.png", "label": "generated",\n'
                       ' "regions": [{"bbox": [1, 2, 30, 40], "caption": "a seam"}]}\n')
    assert main(["data", "check", str(wrapped)]) == 2
    err = capsys.readouterr().err
    assert f"{wrapped}: holds a record spread over lines (line 1 is not a whole JSON object" in err, err


def test_a_dataset_of_another_layout_is_named_for_what_it_is(capsys, tmp_path):
    """What a researcher's own dataset brings (a review in a user's shoes): boxes under COCO-like keys (a real
    record's passed silently, a generated one's said only "must have at least one region"), the record's own
    width/height of a resized copy (passed), a box a fraction of a pixel past the edge (no way out said), a
    flat box (got the COCO hint and a false warning about the whole file), a tag across lines (breaks the
    answer's one line of tags), the image under another key, a file name in the wrong case, one record per box of an image,
    a 10 x 10 image, a COCO annotation file and a CSV given as JSONL."""
    from PIL import Image

    Image.new("RGB", (200, 150), (30, 60, 90)).save(tmp_path / "plain.png")
    Image.new("RGB", (10, 10), (90, 60, 30)).save(tmp_path / "tiny.png")
    Image.new("RGB", (64, 64), (60, 90, 30)).save(tmp_path / "other.png")
    seam = {"bbox": [20, 30, 80, 90], "caption": "a seam"}
    rows = [{"image": "plain.png", "label": "generated", "bbox": [20, 30, 80, 90], "caption": "x"},  # 1
            {"image": "other.png", "label": "real", "bbox": [2, 3, 8, 9]},  # 2: passes, its box not read
            {"image": "plain.png", "label": "generated", "regions": [seam], "width": 400, "height": 300},  # 3
            {"image": "plain.png", "label": "generated", "regions": [{"bbox": [-0.5, 0, 50, 50], "caption": "c"}]},
            {"image": "plain.png", "label": "generated", "regions": [{"bbox": [50, 60, 50, 90], "caption": "c"}]},
            {"image": "plain.png", "label": "generated", "regions": [seam], "tags": ["texture,\nskin"]},  # 6
            {"image_path": "plain.png", "label": "real"},  # 7
            {"image": "Plain.PNG", "label": "real"},  # 8
            {"image": "plain.png", "label": "generated", "regions": [{"bbox": [1, 2, 30, 40], "caption": "a"}]},
            {"image": "tiny.png", "label": "real"},  # 10
            {"messages": [{"role": "user", "content": "<image>Real?"},  # 11: an ms-swift record's boxes are its objects
                          {"role": "assistant", "content": "<verdict>generated</verdict>"}],
             "images": ["plain.png"], "objects": {"ref": [], "bbox": []}}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = check(capsys, path, "--show", "all")
    assert rc == 1, out
    assert (f"{path}:1: [no_regions] a generated image must have at least one region (it has 'bbox': boxes are read "
            f"from 'regions' only") in out, out
    assert f"{path}: 2 record(s) (lines 1, 2) have a key 'bbox' and no 'regions': fxjax reads boxes from 'regions'" in out
    assert (f"1 record(s) give a width and height other than their image's ({path}:3: 400x300 given, the file "
            f"200x150 as displayed): boxes are read in the image file's pixels as displayed") in out, out
    assert ("lies outside the 200x150 image (width x height); it is 0.5 px past the edge: clamped to the image it "
            "is [0, 0, 50, 50]") in out, out
    assert f"{path}:5: [box_tiny] region 0 bbox [50, 60, 50, 90] is empty: zero width (x1 = x2)" in out, out
    assert "COCO" not in out  # (the flat box gave the COCO hint, and with it a warning about the file's valid boxes)
    assert f"{path}:6: [schema] tag 0 'texture,\\nskin' spans lines: the answer lists the tags on one line" in out, out
    assert (f"{path}:7: [schema] missing field 'image' (the record's keys: image_path, label; rename 'image_path' to "
            f"'image')") in out, out
    assert f"{path}:8: [image_missing]" in out and "('plain.png' exists: file names are case-sensitive here)" in out
    assert ("image(s) in more than one record of a file (trained on more often; where these are an image's boxes "
            "one record each, merge them into one record's 'regions'") in out, out
    assert "1 image(s) under 28 pixels on a side (one image token is 28 x 28 pixels): each such side is enlarged" \
        in out, out
    assert f"{path}:10 (10x10)" in out and "labelled both" not in out
    assert f"{path}:11: [no_regions] a generated image must have at least one region\n" in out, out
    # whole files of another layout: one message naming it, not one error per line
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"info": {}, "images": [{"id": 1, "file_name": "plain.png", "width": 200,
                                                         "height": 150}],
                                "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 1}],
                                "categories": [{"id": 1, "name": "seam"}]}, indent=1))
    table = tmp_path / "boxes.csv"
    table.write_text("image,label,x,y,w,h,caption\nplain.png,generated,1,2,3,4,seam\n")
    tabs = tmp_path / "boxes.tsv"
    tabs.write_text("image\tlabel\nplain.png\treal\n")
    for given, says in ((coco, "looks like a COCO annotation file"), (table, "looks like CSV, not JSON Lines"),
                        (tabs, "looks like CSV, not JSON Lines")):
        assert main(["data", "check", str(given)]) == 2
        assert f"{given}: {says}" in capsys.readouterr().err
    # JSON Lines whose records have keys or words of COCO's ("info", "images", "annotations") are records
    from fxjax.data.records import whole_file_problem

    swift = {"messages": [{"role": "user", "content": "<image>Real?"}, {"role": "assistant", "content": "x"}],
             "images": ["plain.png"], "info": "from the 2024 crawl", "objects": {"ref": ["info"], "bbox": []}}
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps(swift) + "\n" + json.dumps({"image": "plain.png", "label": "real",
                                                            "tags": ["annotations"]}) + "\n")
    assert whole_file_problem(lines) is None


def test_the_docs_coco_conversion_gives_records_the_check_accepts(capsys, tmp_path, monkeypatch):
    """docs/data.md's "From a COCO annotation file" block, run as it is: labels from having boxes, category
    names as captions, [x, y, w, h] as corners, a box that slips past the edge clamped."""
    from pathlib import Path

    from PIL import Image

    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = docs.split("### From a COCO annotation file", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    Image.new("RGB", (300, 200), (30, 60, 90)).save(tmp_path / "fake.png")
    Image.new("RGB", (120, 80), (90, 60, 30)).save(tmp_path / "photo.png")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "fake.png", "width": 300, "height": 200},
                   {"id": 8, "file_name": "photo.png", "width": 120, "height": 80}],
        "annotations": [{"id": 1, "image_id": 7, "bbox": [100, 50, 150, 120], "category_id": 3},
                        {"id": 2, "image_id": 7, "bbox": [250.5, 10, 50, 30], "category_id": 4}],
        "categories": [{"id": 3, "name": "melted hand"}, {"id": 4, "name": "seam"}]}))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/data.md", "exec"), {})
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert records == [{"image": "fake.png", "label": "generated",
                        "regions": [{"bbox": [100, 50, 250, 170], "caption": "melted hand"},
                                    {"bbox": [250.5, 10, 300, 40], "caption": "seam"}], "width": 300, "height": 200},
                       {"image": "photo.png", "label": "real", "regions": [], "width": 120, "height": 80}]
    rc, out = check(capsys, tmp_path / "train.jsonl")
    assert rc == 0 and "OK: 0 of 2 records invalid" in out, out


def test_the_docs_csv_conversion_gives_records_the_check_accepts(capsys, tmp_path, monkeypatch):
    """docs/data.md's "From a CSV or COCO's boxes" block, run as it is on a CSV of COCO boxes."""
    from pathlib import Path

    from PIL import Image

    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = docs.split("### From a CSV or COCO's boxes", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    Image.new("RGB", (300, 200), (30, 60, 90)).save(tmp_path / "fake.png")
    Image.new("RGB", (120, 80), (90, 60, 30)).save(tmp_path / "photo.png")
    (tmp_path / "boxes.csv").write_text("image,label,x,y,w,h,caption\n"
                                        "fake.png,Generated,100,50,150,120,a melted hand\n"
                                        "fake.png,generated,10,10,20,30,a seam\n"
                                        "photo.png,real,,,,,\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/data.md", "exec"), {})
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert records == [{"regions": [{"bbox": [100.0, 50.0, 250.0, 170.0], "caption": "a melted hand"},
                                    {"bbox": [10.0, 10.0, 30.0, 40.0], "caption": "a seam"}],
                        "image": "fake.png", "label": "generated"},
                       {"regions": [], "image": "photo.png", "label": "real"}]
    rc, out = check(capsys, tmp_path / "train.jsonl")
    assert rc == 0 and "OK: 0 of 2 records invalid" in out, out


def test_a_relative_data_file_found_beside_the_config_says_where_paths_resolve(capsys, tmp_path, monkeypatch,
                                                                              tokenizer_dir):
    """Relative data files resolve against the working folder (README); run from elsewhere, the error named
    only `tinybox.jsonl`. Now it says the file lies beside the config, in data check and in a training run's
    start-up check."""
    import yaml

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"image": "a.png", "label": "real"}\n')
    (folder / "run.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "train": {"steps": 1},
                                                     "data": {"train_files": ["train.jsonl"],
                                                              "tokenizer": str(tokenizer_dir)}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hint = (f"train.jsonl does not exist (relative paths resolve against the working folder, {elsewhere}, not the "
            f"config's; {folder / 'train.jsonl'} exists: run from {folder} or write the path from here)")
    assert main(["data", "check", "--config", str(folder / "run.yaml")]) == 2
    assert f"fxjax data check: error: dataset file {hint}" in capsys.readouterr().err
    assert main(["sft", "--config", str(folder / "run.yaml")]) == 2
    assert f"fxjax sft: error: data.train_files: {hint}" in capsys.readouterr().err


def test_invalid_records_are_listed_up_to_a_count_per_kind_and_a_wrong_root_is_named(capsys, tmp_path):
    """A wrong --root made every record invalid and printed one line each (10,000 records: 1.2 MB) with no word
    of the root. Now the first --show (20) of each kind are listed, then how many more of each kind; every
    image missing says where the paths were looked for."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"image": f"img/{i}.png", "label": "real"}) + "\n" for i in range(25))
                    + json.dumps({"image": "img/0.png", "label": "fake"}) + "\n")
    rc, out = check(capsys, path)
    listed = out[out.index("invalid records (26):"):].splitlines()[1:]
    assert rc == 1 and [line for line in listed if "[image_missing]" in line][-1].startswith(f"  {path}:20: ")
    assert f"  {path}:26: [label] " in out  # (each kind its own count)
    assert "  ... and 5 more (image_missing 5): --show all lists every one" in out
    assert "no record's image" not in out  # (line 26's image was not looked for)
    path.write_text("".join(json.dumps({"image": f"img/{i}.png", "label": "real"}) + "\n" for i in range(3)))
    (tmp_path / "elsewhere").mkdir()
    rc, out = check(capsys, path, "--root", tmp_path / "elsewhere")
    assert (f"no record's image was found: their paths are read relative to --root {tmp_path / 'elsewhere'}; is "
            "that where the images are?") in out
    rc, out = check(capsys, path, "--show", "all")
    assert "the folder of each file (no --root)" in out and "more (" not in out
    with pytest.raises(SystemExit):
        check(capsys, path, "--show", "0")
    assert "expected a count of at least 1 or `all`, got '0'" in capsys.readouterr().err


def test_data_check_lists_as_many_invalid_records_per_kind_as_a_run_logs():
    """`data check --show`'s default is the count a training run or eval names per kind (its own constant:
    data check's --help does not import the records module)."""
    from fxjax.commands.data_check import SHOWN_PER_KIND
    from fxjax.data.records import LOGGED_PER_KIND

    assert SHOWN_PER_KIND == LOGGED_PER_KIND
