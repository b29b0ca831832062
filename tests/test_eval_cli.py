"""`fxjax eval`: the paper's metrics against a hand-computed case, resume from predictions.jsonl, and one real
run of the command on a tiny model.

The hand-computed cases go through the command's own path (`fxjax.commands.eval_folder.evaluate`: records -> prompt
pipeline -> decoder -> scoring -> predictions.jsonl -> metrics.json) with a decoder whose model step returns
known completions instead of decoding (`ScriptedDecoder` replaces GreedyDecoder.complete only)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxjax.commands.eval_folder import PREDICTIONS, evaluate, prompt_data_config
from fxjax.data.records import load_records
from fxjax.train.inference import GreedyDecoder

REF, REF_END, BOX, BOX_END = "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"


def region(caption, box):
    return f"{REF}{caption}{REF_END}{BOX}[{', '.join(str(v) for v in box)}]{BOX_END}"


# Completions in the model's resized-image pixels.
SCRIPT = {
    # g1 (100x60 original -> 112x56 model input): true boxes [0,0,28,28] and [56,28,84,56] in model pixels.
    # Prediction 1 (centre (14,7)) takes true box 1: IoU 392/784 = 0.5; prediction 2 equals true box 2: 1.
    # Matched IoU (0.5 + 1) / 2 = 0.75; format ok; verdict right.
    "g1": "<think>" + region("smeared eye", [0, 0, 28, 14]) + "\n" + region("melted ear", [56, 28, 84, 56])
          + "\n<tag>texture quality</tag>\n</think>\n<verdict>generated</verdict>",
    # g2: says real without regions: the format check for a generated truth fails, verdict wrong, IoU 0.
    "g2": "<think> a clean photograph </think>\n<verdict>real</verdict>",
    # g3: no verdict at all: predicted "none", format fails, IoU 0.
    "g3": "I am not sure.",
    # r1: right; the real format check passes.
    "r1": "<think> natural noise </think>\n<verdict>real</verdict>",
    # r2: a false positive; the real format check (think ... verdict) still passes.
    "r2": "<think>" + region("odd shadow", [0, 0, 10, 10]) + "\n<tag>lighting</tag>\n</think>\n"
          "<verdict>generated</verdict>",
}


class ScriptedDecoder(GreedyDecoder):
    """GreedyDecoder whose model step is replaced by the scripted completions (the pipeline stays real)."""

    def __init__(self, script, batch_size=2):
        self.script, self.batch_size, self.asked = script, batch_size, []

    def plan_decoding(self):  # (no model: no weights to gather)
        return None

    def decoding_model(self):
        return None

    def complete(self, batch, model=None):
        ids = [m["record_id"] for m in batch["meta"]]
        self.asked += ids
        return [self.script[i] for i in ids]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    sizes = {"g1": (100, 60), "g2": (112, 84), "g3": (112, 84), "r1": (84, 112), "r2": (112, 84)}  # (w, h)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    records = [
        # g1's true boxes in original pixels: x * 112/100, y * 56/60 gives [0,0,28,28] and [56,28,84,56].
        {"id": "g1", "image": "g1.png", "label": "generated", "generator": "A",
         "regions": [{"bbox": [0, 0, 25, 30], "caption": "eye"}, {"bbox": [50, 30, 75, 60], "caption": "ear"}]},
        {"id": "g2", "image": "g2.png", "label": "generated", "generator": "B",
         "regions": [{"bbox": [28, 28, 56, 56], "caption": "hand"}]},
        {"id": "g3", "image": "g3.png", "label": "generated", "generator": "A",
         "regions": [{"bbox": [0, 0, 56, 56], "caption": "text"}]},
        {"id": "r1", "image": "r1.png", "label": "real", "camera": "phone"},  # a key fxjax does not model
        {"id": "r2", "image": "r2.png", "label": "real", "camera": "dslr"},
    ]
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def eval_args(dataset, tokenizer_dir, batch_size=2):
    import argparse

    return argparse.Namespace(data=[str(dataset)], root=None, allow_absolute_paths=False, format="auto",
                              on_error="raise", batch_size=batch_size, max_image_pixels=None)


def run_scripted(dataset, tokenizer_dir, out, decoder, settings=None, group_by=("generator",), long_images="shrink",
                 limit=None, say=lambda text: None, **kwargs):
    records, _ = load_records([dataset])
    records = records[:limit]  # (as --limit)
    data = dict(min_pixels=3136, max_pixels=12845056, max_length=1024, prompts="auto", system_prompt=None,
                user_prompt=None, seed=0, long_images=long_images)
    config = prompt_data_config(eval_args(dataset, tokenizer_dir), data, str(tokenizer_dir))
    return evaluate(records, lambda: decoder, config, out, settings=settings or {"model": "scripted"},
                    group_by=group_by, progress=False, say=say, **kwargs)


def test_metrics_of_known_completions_equal_the_hand_computed_ones(dataset, tokenizer_dir, tmp_path):
    summary = run_scripted(dataset, tokenizer_dir, tmp_path, ScriptedDecoder(SCRIPT))
    assert summary["examples"] == 5
    assert summary["accuracy"] == pytest.approx(2 / 5)  # g1, r1
    assert summary["precision"] == pytest.approx(1 / 2)  # TP g1, FP r2
    assert summary["recall"] == pytest.approx(1 / 3)  # FN g2 (said real), g3 (no verdict)
    assert summary["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # = 0.4
    assert summary["format_rate"] == pytest.approx(3 / 5)  # g1, r1, r2
    assert summary["mean_iou"] == pytest.approx((0.75 + 0 + 0) / 3) and summary["iou_images"] == 3
    assert summary["confusion"] == {"real": {"real": 1, "generated": 1, "none": 0},
                                    "generated": {"real": 1, "generated": 1, "none": 1}}
    # 95% intervals: Wilson's for the rates (scipy's as the oracle), mean +/- 1.96 SE for the IoU
    from scipy.stats import binomtest

    for key, k in (("accuracy", 2), ("format_rate", 3)):
        want = binomtest(k, 5).proportion_ci(method="wilson")
        assert summary["ci95"][key] == pytest.approx([want.low, want.high], abs=1e-12), key
    from fxjax.detection_metrics import wilson_interval

    for n in (1, 3, 5, 6, 60, 61):  # none or all: the bound is exactly 0 or 1 (it was 2.8e-17 off at n = 6)
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0, n
        assert wilson_interval(0, n)[1] == pytest.approx(binomtest(0, n).proportion_ci(method="wilson").high), n
    ious = [0.75, 0.0, 0.0]
    half = 1.959963984540054 * np.std(ious, ddof=1) / np.sqrt(3)
    assert summary["ci95"]["mean_iou"] == pytest.approx([max(0.0, 0.25 - half), 0.25 + half])
    by = summary["by"]["generator"]
    assert list(by) == ["A", "B", "(none)"]
    assert by["A"]["accuracy"] == pytest.approx(1 / 2) and by["A"]["mean_iou"] == pytest.approx(0.375)
    # one true class per group: no precision / F1 (A's would be a trivial 1.0), accuracy is its recall
    assert by["A"]["precision"] is None and by["A"]["f1"] is None and by["A"]["recall"] == pytest.approx(1 / 2)
    # a detector that never says "generated": F1 0 (as scikit-learn), not "n/a"; a set of one true class
    # has no precision or F1 overall either (it had precision 1.0 and an F1 over generated images only)
    from fxjax.detection_metrics import summarize

    rows = [dict(label=label, predicted=pred, correct=label == pred, format_ok=True)
            for label, pred in (("generated", "real"), ("generated", "none"), ("real", "real"))]
    never = summarize(rows)
    assert never["precision"] is None and never["recall"] == 0.0 and never["f1"] == 0.0
    one_class = summarize([dict(rows[0], predicted="generated", correct=True), rows[1]])
    assert one_class["precision"] is None and one_class["f1"] is None and one_class["recall"] == 0.5
    assert summarize([rows[2]])["f1"] is None  # no generated image, none called generated: 0 / 0
    # a generated image without true boxes has no IoU: the mean is over the images with boxes only
    from fxjax.detection_metrics import score_completions
    from fxjax.rewards.output_format import BOX_END, BOX_START, REF_END, REF_START

    text = (f"<think>{REF_START}x{REF_END}{BOX_START}[0, 0, 10, 10]{BOX_END}\n<tag>t</tag>\n</think>\n"
            "<verdict>generated</verdict>")
    scored = score_completions([text, text], [{"label": "generated", "boxes": [[0, 0, 10, 10]]},
                                              {"label": "generated", "boxes": []}])
    boxless = summarize(scored)
    assert scored[1]["iou"] is None and boxless["iou_images"] == 1 and boxless["mean_iou"] == 1.0
    # a label as rewards.score reads it ("Generated ": it scored the verdict right, then had no IoU, and the
    # confusion matrix raised KeyError 'Generated ')
    cased = score_completions([text], [{"label": "Generated ", "boxes": [[0, 0, 10, 10]]}])
    assert cased[0]["label"] == "generated" and cased[0]["iou"] == 1.0 and summarize(cased)["accuracy"] == 1.0
    assert by["(none)"]["precision"] is None  # the real images
    assert by["B"]["accuracy"] == 0 and by["B"]["mean_iou"] == 0 and by["B"]["precision"] is None
    assert by["(none)"]["accuracy"] == pytest.approx(1 / 2) and by["(none)"]["mean_iou"] is None

    rows = {r["id"]: r for r in map(json.loads, (tmp_path / PREDICTIONS).read_text().splitlines())}
    assert list(rows) == ["g1", "g2", "g3", "r1", "r2"]
    g1 = rows["g1"]
    assert g1["iou"] == pytest.approx(0.75) and g1["correct"] and g1["format_ok"] and g1["verdict"] == "generated"
    assert g1["model_size"] == [56, 112] and g1["original_size"] == [60, 100]
    assert g1["true_boxes"] == [[0, 0, 28, 28], [56, 28, 84, 56]]
    assert [r["box"] for r in g1["regions"]] == [[0, 0, 28, 14], [56, 28, 84, 56]]
    assert [r["box_original"] for r in g1["regions"]] == [pytest.approx([0, 0, 25, 15]),
                                                          pytest.approx([50, 30, 75, 60])]
    assert g1["tags"] == ["texture quality"] and g1["completion"] == SCRIPT["g1"]
    assert rows["g3"]["predicted"] == "none" and rows["g3"]["verdict"] is None
    assert rows["r1"]["iou"] is None and rows["g2"]["iou"] == 0.0
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == pytest.approx(0.4)

    # any top-level key of the records groups too; the finished eval is summarised again, not decoded
    again = ScriptedDecoder(SCRIPT)
    by = run_scripted(dataset, tokenizer_dir, tmp_path, again, group_by=("camera",))["by"]["camera"]
    assert again.asked == [] and list(by) == ["dslr", "phone", "(none)"]
    assert by["dslr"]["accuracy"] == 0 and by["phone"]["accuracy"] == 1 and by["(none)"]["examples"] == 3
    # the rows hold no groups: written with the first run's --group-by (generator), they went stale at a
    # regrouping, and rows decoded after it would have held the new ones beside them
    assert not any("groups" in json.loads(line) for line in (tmp_path / PREDICTIONS).read_text().splitlines())
    # the record's own fields group too; regions by their number (their boxes crashed the grouping: a Region
    # is no JSON value), tags as their JSON list
    counts = {r.source: len(r.regions) for r in load_records([dataset])[0]}
    by = run_scripted(dataset, tokenizer_dir, tmp_path, again, group_by=("regions", "tags"))["by"]
    assert {str(k): v["examples"] for k, v in by["regions"].items()} == {
        str(n): sum(1 for c in counts.values() if c == n) for n in set(counts.values())}
    assert again.asked == [] and all(k == "(none)" or isinstance(json.loads(k), list) for k in by["tags"])
    with pytest.raises(ValueError, match=r"--group-by camra: no record of the data has a field 'camra' \(fields: .*camera"):
        run_scripted(dataset, tokenizer_dir, tmp_path, again, group_by=("camra",))
    # a file saved with a UTF-8 byte order mark (as records.load_records accepts) groups by its own keys too
    bom = dataset.with_name("test_bom.jsonl")
    bom.write_bytes(b"\xef\xbb\xbf" + dataset.read_bytes())
    by = run_scripted(bom, tokenizer_dir, tmp_path / "bom", ScriptedDecoder(SCRIPT), group_by=("camera",))["by"]
    assert list(by["camera"]) == ["dslr", "phone", "(none)"]
    # a line that is not UTF-8, skipped by --on-error skip, is not read again for the grouping keys
    from fxjax.data.records import record_objects

    broken = dataset.with_name("test_broken.jsonl")
    broken.write_bytes(dataset.read_bytes() + b'{"id": "bad \xff"}\n')
    records, _ = load_records([broken], on_error="skip")
    assert [obj.get("camera") for obj in record_objects(records).values()] == [None, None, None, "phone", "dslr"]
    # line ends as load_records counts them: "\r\r\n" (a CRLF file converted once more: records on lines 1, 3,
    # 5, ...) took other records' values; lone "\r" ends (old Mac files) did not parse
    for name, end in (("crcrlf", b"\r\r\n"), ("cr", b"\r")):
        other = dataset.with_name(f"test_{name}.jsonl")
        other.write_bytes(dataset.read_bytes().replace(b"\n", end))
        records, _ = load_records([other])
        assert [obj.get("camera") for obj in record_objects(records).values()] == [None, None, None, "phone", "dslr"]


def without_decoding(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "decoding"}


def test_an_interrupted_eval_decodes_only_what_predictions_jsonl_lacks(dataset, tokenizer_dir, tmp_path):
    full = run_scripted(dataset, tokenizer_dir, tmp_path / "full", ScriptedDecoder(SCRIPT))
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(tmp_path / "full" / "settings.json", out / "settings.json")
    lines = (tmp_path / "full" / PREDICTIONS).read_text().splitlines(keepends=True)
    # two whole rows, then half of the third (a kill while writing it)
    (out / PREDICTIONS).write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    decoder = ScriptedDecoder(SCRIPT)
    resumed = run_scripted(dataset, tokenizer_dir, out, decoder)
    assert decoder.asked == ["g3", "r1", "r2"]
    assert without_decoding(resumed) == without_decoding(full)
    assert (out / PREDICTIONS).read_text() == "".join(lines)
    # metrics.json's `decoding`: a run per entry, with what it decoded and on what (a batch of 2, one CPU)
    (run,) = full["decoding"]
    assert (run["images"], run["batch_size"], run["mesh"], run["devices"], run["platform"]) == (5, 2, None, 1, "cpu")
    assert run["seconds"] > 0 and run["images_per_s"] == pytest.approx(5 / run["seconds"], rel=0.01)
    assert [r["images"] for r in resumed["decoding"]] == [3]  # (the rows found in predictions.jsonl: no run)

    again = ScriptedDecoder(SCRIPT)  # finished: nothing to decode, and the runs that decoded are kept
    assert run_scripted(dataset, tokenizer_dir, out, again) == resumed and again.asked == []
    # a smaller --limit: its metrics count its images, and say how many rows of predictions.jsonl they leave
    said = []
    fewer = run_scripted(dataset, tokenizer_dir, out, again, limit=2, say=said.append)
    assert again.asked == [] and fewer["examples"] == 2 and fewer["predictions_outside"] == 3
    assert any("also holds 3 image(s) this evaluation leaves out" in line for line in said), said
    assert resumed["predictions_outside"] == 0

    with pytest.raises(ValueError, match="other settings .*model: 'scripted' then, 'other' now.*--fresh"):
        run_scripted(dataset, tokenizer_dir, out, ScriptedDecoder(SCRIPT), settings={"model": "other"})
    fresh = ScriptedDecoder(SCRIPT)
    run_scripted(dataset, tokenizer_dir, out, fresh, settings={"model": "other"}, fresh=True)
    assert fresh.asked == ["g1", "g2", "g3", "r1", "r2"]


def test_progress_without_a_terminal_is_plain_lines_after_the_loading(dataset, tokenizer_dir, tmp_path, capsys):
    """A log or a pipe gets a line per tenth of the images (tqdm's carriage returns ran the bar and the
    loading message together), the first batch's with its time, compiling included; the bar starts after
    the model loads."""
    def make_decoder():
        print("fxjax eval: loading the model", file=sys.stderr)
        return ScriptedDecoder(SCRIPT)

    records, _ = load_records([dataset])
    data = dict(min_pixels=3136, max_pixels=12845056, max_length=1024, prompts="auto", system_prompt=None,
                user_prompt=None, seed=0, long_images="shrink")
    config = prompt_data_config(eval_args(dataset, tokenizer_dir), data, str(tokenizer_dir))
    evaluate(records, make_decoder, config, tmp_path, settings={"model": "scripted"}, progress=True,
             say=lambda text: None)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "fxjax eval: loading the model" and "\r" not in "".join(lines)
    assert [line.split(" (")[0] for line in lines[1:]] == ["eval: image 2/5", "eval: image 4/5", "eval: image 5/5"]
    assert lines[1].endswith("s, compiling included if any)") and lines[2].endswith(" s/image on the clock)"), lines


def test_a_cut_last_row_is_dropped_at_its_byte_offset_after_rows_of_non_ascii_text(tmp_path):
    """The rows kept before a cut last line are counted in bytes: a completion in other scripts (a caption
    "région généré" or "生成") is more bytes than characters, and truncating at the character count cut the
    last whole row too."""
    from fxjax.commands.eval_folder import read_predictions

    rows = [{"source": f"{tmp_path / 'd.jsonl'}:{n}", "completion": text}
            for n, text in ((1, "région généré ✓"), (2, "<ref>生成的手</ref>"))]
    whole = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path = tmp_path / PREDICTIONS
    path.write_text(whole + '{"source": "cut', encoding="utf-8")
    said = []
    assert [row["completion"] for row in read_predictions(path, said.append).values()] == [r["completion"] for r in rows]
    assert path.read_text(encoding="utf-8") == whole and "dropped an incomplete last line" in said[0]


def test_a_resume_finds_its_rows_from_another_folder_and_after_a_kill_before_a_newline(
        dataset, tokenizer_dir, tmp_path, monkeypatch):
    """Rows are matched by the data file's absolute path: the same relative --data from another folder
    decoded every image again (and doubled predictions.jsonl). A whole last row without its newline (a kill
    between the two) is kept and given its newline: the next row was written onto the same line."""
    out = tmp_path / "out"
    monkeypatch.chdir(dataset.parent)
    full = run_scripted(Path(dataset.name), tokenizer_dir, out, ScriptedDecoder(SCRIPT))
    monkeypatch.chdir(dataset.parent.parent)
    again = ScriptedDecoder(SCRIPT)
    assert run_scripted(Path(dataset.parent.name) / dataset.name, tokenizer_dir, out, again) == full
    assert again.asked == [] and len((out / PREDICTIONS).read_text().splitlines()) == 5

    lines = (out / PREDICTIONS).read_text().splitlines(keepends=True)
    (out / PREDICTIONS).write_text("".join(lines[:3])[:-1])  # the third row whole, its newline not written
    resumed = ScriptedDecoder(SCRIPT)
    got = run_scripted(dataset, tokenizer_dir, out, resumed)
    assert without_decoding(got) == without_decoding(full) and resumed.asked == ["r1", "r2"]
    assert [r["images"] for r in got["decoding"]] == [5, 2]  # (a run per entry, this one added)
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["g1", "g2", "g3", "r1", "r2"]


def test_a_record_the_pipeline_drops_is_reported_and_not_retried_on_resume(dataset, tokenizer_dir, tmp_path):
    with_large = dataset.with_name("with_large.jsonl")
    # 1232 x 1232: 1936 image tokens, over run_scripted's max_length of 1024
    Image.new("RGB", (1232, 1232), (128, 128, 128)).save(dataset.parent / "large.png")
    extra = {"id": "g4", "image": "large.png", "label": "real"}
    with_large.write_text(dataset.read_text() + json.dumps(extra) + "\n")
    # as training does (data.long_images: shrink, the default), eval analyses it at the largest size that fits
    shrunk = run_scripted(with_large, tokenizer_dir, tmp_path / "shrink", ScriptedDecoder({**SCRIPT, "g4": SCRIPT["r1"]}))
    assert shrunk["examples"] == 6 and not shrunk.get("not_evaluated")
    row = json.loads((tmp_path / "shrink" / PREDICTIONS).read_text().splitlines()[-1])
    assert row["id"] == "g4" and row["original_size"] == [1232, 1232] and 700 < (row["model_size"][0] // 28) ** 2 < 1024
    # with "drop" (a run that trained so) it is left out, and said
    summary = run_scripted(with_large, tokenizer_dir, tmp_path, ScriptedDecoder(SCRIPT), long_images="drop")
    assert summary["examples"] == 5 and summary["not_evaluated"] == [f"{with_large}:6"]
    assert summary["not_evaluated_why"] == {f"{with_large}:6": "too_long"}
    # finished: the dropped record is not decoded again, so no model is made
    records, _ = load_records([with_large])
    config = prompt_data_config(eval_args(with_large, tokenizer_dir), dict(
        min_pixels=3136, max_pixels=12845056, max_length=1024, prompts="auto", system_prompt=None,
        user_prompt=None, seed=0, long_images="drop"), str(tokenizer_dir))
    said = []
    again = evaluate(records, lambda: pytest.fail("a model was made"), config, tmp_path, settings={"model": "scripted"},
                     group_by=("generator",), progress=False, say=said.append)
    assert again == summary and "too long for max_length" in said[0] and "(too_long 1;" in said[1]
    fresh = ScriptedDecoder(SCRIPT)  # --fresh tries it again
    run_scripted(with_large, tokenizer_dir, tmp_path, fresh, fresh=True, long_images="drop")
    assert fresh.asked == ["g1", "g2", "g3", "r1", "r2"]


def test_eval_command_on_a_tiny_model(dataset, tiny_vl_dir, tmp_path, capsys):
    from fxjax.cli import main

    args = ["eval", "--model", str(tiny_vl_dir), "--data", str(dataset), "--out", str(tmp_path),
            "--batch-size", "8", "--max-new-tokens", "3", "--max-pixels", "3136", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "accuracy" in out.out and "generator=A" in out.out and "confusion" in out.out
    rows = [json.loads(line) for line in (tmp_path / PREDICTIONS).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["g1", "g2", "g3", "r1", "r2"]
    from fxjax.image_processing import model_input_size

    assert all(r["model_size"] == list(model_input_size(*r["original_size"], 3136, 3136)) for r in rows)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["examples"] == 5 and metrics["settings"]["max_new_tokens"] == 3
    # metrics.json and settings.json are written whole (a hidden sibling renamed over them): none is left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "json" in p.name) == []
    # `fxjax info` of the folder says what it evaluated and its metrics (it read "holds no checkpoints"); of a
    # folder whose eval did not finish, how far it got; of a folder of step folders, each
    assert main(["info", str(tmp_path)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"fxjax eval folder {tmp_path}: model {tiny_vl_dir.resolve()}, on {dataset.resolve()}"
    assert said[1].startswith(f"  5 image(s): accuracy {metrics['accuracy']:.3f}, F1 (generated) ")
    steps = tmp_path / "steps"
    for name in ("1", "2"):
        (steps / name).mkdir(parents=True)
        for file in (PREDICTIONS, "settings.json"):
            shutil.copy(tmp_path / file, steps / name / file)
    assert main(["info", str(steps)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in said if not line.startswith(" ")] == [
        f"fxjax eval folder {steps / '1'}", f"fxjax eval folder {steps / '2'}"]
    assert said[1] == (f"  unfinished: 5 image(s) in {PREDICTIONS}, no metrics.json yet; the same eval command goes "
                       f"on from them")
    shutil.rmtree(steps)
    # a random model says nothing parsable in 3 tokens: every verdict is "none"
    assert metrics["confusion"]["generated"]["none"] + metrics["confusion"]["real"]["none"] == 5
    # each row says how long its completion was and whether it hit the limit; the rate is their share
    assert all(1 <= r["completion_tokens"] <= 3 for r in rows)
    assert all(r["completion_tokens"] == 3 for r in rows if r["truncated"])  # cut: all 3 tokens, no stop
    assert not any(r["truncated"] for r in rows if r["completion_tokens"] < 3)  # shorter: it stopped
    assert metrics["truncated_rate"] == pytest.approx(sum(r["truncated"] for r in rows) / 5)
    assert metrics["truncated_rate"] > 0 and "truncated: " in out.out  # 3 tokens: some completion is cut
    assert main(args) == 0  # run again: all five are resumed, none decoded
    assert "resuming: 5 of 5 images already in" in capsys.readouterr().err
    assert main([a if a != "3" else "4" for a in args]) == 2
    assert "other settings (max_new_tokens: 3 then, 4 now)" in capsys.readouterr().err
    # predictions are keyed by file:line: images read from another --root are other images
    shutil.copytree(dataset.parent, tmp_path / "elsewhere")
    assert main(args + ["--root", str(tmp_path / "elsewhere")]) == 2
    # (each differing value by its dotted key, not the two whole records)
    assert f"other settings (images.root: None then, '{tmp_path / 'elsewhere'}' now)" in capsys.readouterr().err
    weights = next(tiny_vl_dir.glob("*.safetensors"))  # the model overwritten since (same path): not resumed
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"other settings (model.model_files.{weights.name}: " in err and err.count(" then, ") == 1, err
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # --on-error skip: the records it could not read are in the metrics.json it writes, in one write
    with_gone = tmp_path / "with_gone.jsonl"
    with_gone.write_text(dataset.read_text() + json.dumps({"image": "gone.png", "label": "real"}) + "\n")
    skipping = [a if a != str(dataset) else str(with_gone) for a in args]
    skipping[skipping.index("--out") + 1] = str(tmp_path / "skipping")
    assert main(skipping + ["--root", str(dataset.parent), "--on-error", "skip"]) == 0
    written = json.loads((tmp_path / "skipping" / "metrics.json").read_text())
    assert written["examples"] == 5 and len(written["invalid_records"]) == 1
    assert "gone.png" in written["invalid_records"][0]
    # fxjax.evaluate.evaluate: the command from Python (a notebook), its keywords read by the command's parser;
    # what it returns is the command's metrics.json, the same as the shell's for the same options
    from fxjax.evaluate import evaluate

    got = evaluate(dataset, out=tmp_path / "python", model=tiny_vl_dir, batch_size=8, max_new_tokens=3,
                   max_pixels=3136, progress=False)
    assert got == json.loads((tmp_path / "python" / "metrics.json").read_text())
    assert {k: v for k, v in got.items() if k != "decoding"} == {k: v for k, v in metrics.items() if k != "decoding"}
    assert "accuracy" in capsys.readouterr().out  # (the command's table, as from a shell)
    with pytest.raises(ValueError, match=r"evaluate: .*argument batch_size: .*0"):  # (the keyword, not --batch-size)
        evaluate(dataset, out=tmp_path / "python", model=tiny_vl_dir, batch_size=0)
    (tmp_path / "python" / "predictions.jsonl").write_text("not a row\n")
    with pytest.raises(ValueError, match=r"pass fresh=True to start over"):  # (the command said --fresh)
        evaluate(dataset, out=tmp_path / "python", model=tiny_vl_dir, batch_size=8)
    with pytest.raises(TypeError, match=r"evaluate: unknown option 'batch'; the options are .*batch_size"):
        evaluate(dataset, out=tmp_path / "python", model=tiny_vl_dir, batch=8)
    with pytest.raises(TypeError, match=r"evaluate: fresh is 'yes'; give True or False"):
        evaluate(dataset, out=tmp_path / "python", model=tiny_vl_dir, fresh="yes")


def test_eval_errors_are_clear(dataset, tmp_path, capsys):
    from fxjax.cli import main

    assert main(["eval", "--data", str(dataset)]) == 2
    assert "give --model PATH" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(dataset)]) == 2
    assert "--model: " in capsys.readouterr().err
    model = tmp_path / "model"  # (a model folder, as far as a check before loading sees)
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main(["eval", "--model", str(model), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "--data: " in capsys.readouterr().err
    # the image limit the error names is a flag of eval's (it was only data check's), checked before any model
    assert main(["eval", "--model", str(model), "--data", str(dataset), "--max-image-pixels", "10"]) == 2
    assert "over the decompression-bomb limit of 10 (data.max_image_pixels, --max-image-pixels)" in \
        capsys.readouterr().err


def test_a_folder_of_another_kind_is_named_as_such_for_model_and_run(dataset, tiny_vl_dir, tmp_path, capsys):
    """A newcomer's --model runs/sft was asked for a tokenizer ("no tokenizer.json in runs/sft; pass
    --tokenizer DIR"), and --run given an HF model, an adapter or a folder of runs said only that it holds
    no checkpoints: each is now said as what it is, with the flag to give it by."""
    import shutil

    from fxjax.cli import main

    (tmp_path / "runs" / "sft" / "checkpoints" / "3").mkdir(parents=True)
    shutil.copytree(tiny_vl_dir, tmp_path / "model")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    common = ["--data", str(dataset), "--out", str(tmp_path / "eval")]
    for flags, said in (
            (["--model", str(tmp_path / "runs" / "sft")], f"--model: {tmp_path / 'runs' / 'sft'} is an fxjax training "
                                                         f"run, not an HF model: pass --run {tmp_path / 'runs' / 'sft'}"),
            (["--model", str(tmp_path / "runs")], f"--model: {tmp_path / 'runs'} holds no config.json: not an HF "
                                                  f"model folder (the one with config.json and *.safetensors); the "
                                                  f"runs in it: {tmp_path / 'runs' / 'sft'}"),
            (["--run", str(tmp_path / "model")], f"{tmp_path / 'model'} is an HF model: give --model {tmp_path / 'model'}"),
            (["--run", str(tmp_path / "adapter")], f"{tmp_path / 'adapter'} is a PEFT adapter: give --model BASE_MODEL "
                                                   f"--adapter {tmp_path / 'adapter'}"),
            (["--run", str(tmp_path / "runs")], f"holds no checkpoints: expected {tmp_path / 'runs' / 'checkpoints'}"
                                                f"/<step>/ (a fxjax sft/grpo train.output_dir) or <step>/ folders (a "
                                                f"checkpoint.dir); the runs in it: {tmp_path / 'runs' / 'sft'}")):
        assert main(["eval", *flags, *common]) == 2, flags
        assert said in capsys.readouterr().err, flags
    import fxjax.commands.eval as eval_command  # (the --model check needs no records: said before they are read)

    def not_reached(*args):
        raise AssertionError("the records were read before --model was checked")

    eval_command.eval_records, kept = not_reached, eval_command.eval_records
    try:
        assert main(["eval", "--model", str(tmp_path / "runs" / "sft"), *common]) == 2
    finally:
        eval_command.eval_records = kept
    assert "is an fxjax training run" in capsys.readouterr().err


def test_report_compares_eval_folders_with_their_intervals(dataset, tokenizer_dir, tmp_path, capsys):
    """`fxjax report EVAL_DIR EVAL_DIR --labels`: one bar per folder and metric, at the value `fxjax eval`
    wrote, its whisker the 95% interval; F1 without one; what is not defined is said, not drawn as 0."""
    from fxjax.cli import main
    from fxjax.commands.eval_report import build_eval_report, read_eval_metrics

    better = dict(SCRIPT, g2=SCRIPT["g1"], g3=SCRIPT["g1"], r2=SCRIPT["r1"])
    run_scripted(dataset, tokenizer_dir, tmp_path / "eval" / "first", ScriptedDecoder(SCRIPT))
    run_scripted(dataset, tokenizer_dir, tmp_path / "eval" / "second", ScriptedDecoder(better))
    folders = [str(tmp_path / "eval" / name) for name in ("first", "second")]
    assert main(["report", *folders, "--labels", "before,after"]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {tmp_path / 'eval' / 'eval_report.png'}"
    assert main(["report", *folders]) == 0  # (a second comparison there replaces the first: said)
    assert "(it replaced the one there; --out FILE.png writes another)" in capsys.readouterr().err
    assert (tmp_path / "eval" / "eval_report.png").stat().st_size > 20_000

    summaries = [read_eval_metrics(f) for f in folders]
    fig = build_eval_report(summaries, ["before", "after"])
    expected = [("format_rate", "format rate", "format_rate"), ("accuracy", "verdict accuracy", "accuracy"),
                ("f1", 'F1 for "generated"', None), ("mean_iou", "mean IoU on generated images", "mean_iou")]
    assert len(fig.axes) == len(expected)
    for ax, (key, title, ci_key) in zip(fig.axes, expected):
        assert ax.get_title().startswith(title)
        assert [b.get_height() for b in ax.patches] == pytest.approx([s[key] for s in summaries])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["before", "after"]
        whiskers = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert len(whiskers) == (0 if ci_key is None else 2), key
        for summary, whisker in zip(summaries, whiskers):
            low, high = summary["ci95"][ci_key]
            (segment,) = whisker.lines[2][0].get_segments()
            assert segment[:, 1] == pytest.approx([low, high]), key
    texts = [t.get_text() for t in fig.axes[2].texts]
    assert texts == [f"{summaries[0]['f1']:.3f}", f"{summaries[1]['f1']:.3f}"]
    # the IoU bars say how many images they rest on (2 of 8 looked as sure as 8 of 8)
    assert [t.get_text() for t in fig.axes[3].texts] == [f"{s['mean_iou']:.3f}\n{s['iou_images']} img" for s in summaries]
    # completions cut at --max-new-tokens (no verdict: the bars then measure the limit) are said, per evaluation
    cut = build_eval_report([dict(summaries[0], truncated_rate=1.0), dict(summaries[1], truncated_rate=0.0)],
                            ["before", "after"])
    assert "cut at --max-new-tokens (raise it): before 100%" in cut._suptitle.get_text()
    assert "cut at" not in fig._suptitle.get_text()
    no_iou = dict(summaries[0], mean_iou=None, ci95=dict(summaries[0]["ci95"], mean_iou=None))
    one = build_eval_report([no_iou], ["x"])
    assert "n/a" in [t.get_text() for t in one.axes[3].texts]
    # the title fits the figure (one line of it was wider than one to four evaluations' figure) and says
    # what n/a means: F1 is not defined on images of one true class
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(one).draw()
    extent = one._suptitle.get_window_extent(one.canvas.get_renderer()).transformed(one.transFigure.inverted())
    assert 0 <= extent.x0 and extent.x1 <= 1, extent  # (in figure widths)
    assert "F1: images of one true class only" in one._suptitle.get_text()

    other = dict(summaries[1], settings=dict(summaries[1]["settings"], data={"elsewhere.jsonl": "0" * 64}))
    assert "NOTE: the evaluations read different data files" in build_eval_report([summaries[0], other],
                                                                                  ["a", "b"])._suptitle.get_text()
    assert "NOTE" not in fig._suptitle.get_text() and "n/a" not in fig._suptitle.get_text()  # (no bar says n/a)

    # errors name what is wrong
    (tmp_path / "run").mkdir()
    assert main(["report", folders[0], str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run'}: not an `fxjax eval` folder" in capsys.readouterr().err
    assert main(["report", *folders, "--labels", "one"]) == 2
    assert "--labels: 1 names for 2 eval folders" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps({"examples": 5, "accuracy": 1.0}))
    assert main(["report", str(broken)]) == 2
    assert f"{broken / 'metrics.json'}: lacks format_rate, f1, mean_iou" in capsys.readouterr().err
    whole = {"examples": 5, "format_rate": 1.0, "accuracy": 1.0, "f1": 1.0, "mean_iou": None}
    for wrong, message in (({"format_rate": "0.5"}, "format_rate is '0.5', not a number or null"),
                           ({"ci95": {"accuracy": [0.5]}}, "ci95.accuracy is [0.5], not a [low, high] pair"),
                           ({"ci95": [0.1, 0.2]}, "ci95 is [0.1, 0.2], not an object")):
        (broken / "metrics.json").write_text(json.dumps(whole | wrong))
        assert main(["report", str(broken)]) == 2
        assert f"{broken / 'metrics.json'}: {message}" in capsys.readouterr().err
    (broken / "metrics.json").write_bytes(b'{"examples": 5, "\xff": 1}')
    assert main(["report", str(broken)]) == 2
    assert f"{broken / 'metrics.json'}: not valid JSON" in capsys.readouterr().err
    (broken / "metrics.json").write_text(json.dumps({"examples": 5, "accuracy": 1.0}))
    # a run folder that also holds an eval's metrics.json (`fxjax eval --out RUN`) is plotted as the run
    (broken / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "loss": 2.0}) + "\n")
    assert main(["report", str(broken)]) == 0 and (broken / "report.png").is_file()


def test_report_of_a_folder_of_eval_folders_compares_them_in_step_order(dataset, tokenizer_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """`fxjax report OUT` of `fxjax eval --step A B --out OUT`: its eval folders, ordered by the step each
    recorded (gamma's end before a later step named by number), named as `fxjax eval` names them (it named
    them by folder: "alpha" there was "alpha (step 2)" in eval's own chart), into OUT/eval_report.png."""
    from fxjax.cli import main
    from fxjax.commands.report import eval_subfolders

    out = tmp_path / "eval"
    for name, step in (("step-9", 9), ("gamma", 6), ("alpha", 2)):
        run_scripted(dataset, tokenizer_dir, out / name, ScriptedDecoder(SCRIPT), settings={"model": {"step": step}})
    (out / "notes").mkdir()  # not an eval folder: left out
    assert eval_subfolders(out) == [(out / "alpha", 2), (out / "gamma", 6), (out / "step-9", 9)]
    assert eval_subfolders(out / "alpha") == []  # an eval folder is itself, not a folder of them
    from fxjax.commands import report

    drawn = []
    write = report.write_eval_report
    monkeypatch.setattr(report, "write_eval_report", lambda dirs, out, labels, title: drawn.append(labels) or
                        write(dirs, out, labels, title))
    assert main(["report", str(out)]) == 0
    assert f"wrote {out / 'eval_report.png'}" in capsys.readouterr().err
    assert (out / "eval_report.png").stat().st_size > 20_000
    assert drawn == [["alpha (step 2)", "gamma (step 6)", "step 9"]]  # the names `fxjax eval --step` gives them
    (out / "extra").mkdir()  # without a recorded step: by name
    run_scripted(dataset, tokenizer_dir, out / "extra", ScriptedDecoder(SCRIPT), settings={"model": "scripted"})
    assert [d for d, _ in eval_subfolders(out)] == [out / name for name in ("alpha", "extra", "gamma", "step-9")]


def test_held_out_loss_and_greedy_decoding_trace_the_model_under_the_mesh(dataset, tiny_vl_dir, monkeypatch):
    """Attention `auto` is Splash on a TPU, a kernel XLA cannot partition: a multi-chip program holds it only
    per shard, which model.attention.on_local_shards does under the ambient mesh (the model also pins its
    activations' batch to it). The in-training evaluation's loss and the greedy decoding of eval / detect,
    given a mesh, trace the model with it set (a one-device mesh here: what is checked is the ambient mesh
    while tracing, seen by the model's batch pinning)."""
    import jax
    from flax import nnx

    import fxjax.model.qwen2_5_vl as qwen
    from fxjax.data.config import DataConfig
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.hf_checkpoint import from_pretrained
    from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS
    from fxjax.train.evaluation import Evaluator

    ambient = []
    pin = qwen.shard_batch

    def spy(x):
        ambient.append(not jax.sharding.get_abstract_mesh().empty)
        return pin(x)

    monkeypatch.setattr(qwen, "shard_batch", spy)
    mesh = make_mesh(MeshConfig())
    model = from_pretrained(str(tiny_vl_dir), dtype="float32", mesh=mesh)
    data = DataConfig(data_files=(str(dataset),), tokenizer=str(tiny_vl_dir), max_pixels=3136, max_length=512)
    evaluator = Evaluator(data, [str(dataset)], batch_size=2, max_examples=2, max_new_tokens=2, loss_chunk=64,
                          mesh=mesh)
    _, params, base, rest = nnx.split(model, LORA_PARAMS, BASE_PARAMS, ...)
    assert evaluator.loss(model, params, base, rest) > 0
    traced = len(ambient)
    assert traced and all(ambient)
    texts, _ = evaluator.completions(model)
    assert len(texts) == 2 and len(ambient) > traced and all(ambient)


def test_in_run_eval_with_every_example_too_long_reports_no_loss(dataset, tiny_vl_dir):
    """Every held-out example longer than max_length: the in-run evaluation has nothing to take a loss over,
    so it reports none (not 0.0, which reads as a perfect model), 0 examples and the drops by kind; the model
    is never called."""
    from fxjax.data.config import DataConfig
    from fxjax.train.evaluation import Evaluator

    data = DataConfig(data_files=(str(dataset),), tokenizer=str(tiny_vl_dir), max_pixels=3136, max_length=16)
    evaluator = Evaluator(data, [str(dataset)], batch_size=2, max_examples=3, max_new_tokens=2, loss_chunk=64)
    result = evaluator.evaluate(None, None, None, None, generate=False)
    assert result.loss is None and result.examples == 0
    assert result.metrics() == {"examples": 0, "seconds": result.seconds, "dropped_too_long": 3}


def test_predictions_without_their_settings_or_of_a_rewritten_step_are_not_reused(dataset, tokenizer_dir, tmp_path):
    """predictions.jsonl with no settings.json (what made them is unknown) is refused, not adopted; with
    --run, a step's checkpoint written again (a run started over from scratch) is other weights."""
    import time

    from fxjax.commands.eval import _weights_identity

    out = tmp_path / "out"
    run_scripted(dataset, tokenizer_dir, out, ScriptedDecoder(SCRIPT))
    (out / "settings.json").unlink()
    with pytest.raises(ValueError, match=r"holds predictions\.jsonl without settings\.json: .* --fresh"):
        run_scripted(dataset, tokenizer_dir, out, ScriptedDecoder(SCRIPT))
    for damaged, why in (("{bad", r"not JSON: Expecting property name"), ("[1, 2]", "not a JSON object")):
        (out / "settings.json").write_text(damaged)  # (was the JSON error naming no file; a list a TypeError)
        with pytest.raises(ValueError, match=rf"{out}/settings\.json is damaged \({why}.*\): what made the "
                                             r"predictions beside it is unknown; pass --fresh"):
            run_scripted(dataset, tokenizer_dir, out, ScriptedDecoder(SCRIPT))

    step = tmp_path / "run" / "checkpoints" / "4"
    step.mkdir(parents=True)
    source = {"run": str(step.parent), "step": 4}
    before = _weights_identity(source)
    assert before["checkpoint_mtime_ns"] == step.stat().st_mtime_ns
    step.rmdir()
    time.sleep(0.05)  # (past the file system's timestamp granularity)
    step.mkdir()
    assert _weights_identity(source) != before
    # a stage whose end moved (a run resumed with a longer stage): another step, said without the timestamps
    # that differ with it, and the folder to remove named
    fresh = tmp_path / "stage"
    then = {"model": {"run": "r", "step": 3, "checkpoint_mtime_ns": 1}}
    run_scripted(dataset, tokenizer_dir, fresh, ScriptedDecoder(SCRIPT), settings=then)
    now = {"model": {"run": "r", "step": 4, "checkpoint_mtime_ns": 2}}
    with pytest.raises(ValueError, match=rf"other settings \(model\.step: 3 then, 4 now\); pass --fresh to start "
                                         rf"over \(with several --step values: every step's folder\), remove "
                                         rf"{re.escape(str(fresh))}, "):
        run_scripted(dataset, tokenizer_dir, fresh, ScriptedDecoder(SCRIPT), settings=now)
    with pytest.raises(ValueError, match=r"model\.checkpoint_mtime_ns: 1 then, 2 now"):  # (the same step rewritten)
        run_scripted(dataset, tokenizer_dir, fresh, ScriptedDecoder(SCRIPT), settings=dict(then, model=dict(
            then["model"], checkpoint_mtime_ns=2)))


def test_mesh_flag_gives_data_the_devices_the_other_axes_leave():
    """--mesh as a run config's mesh: data takes the rest of the devices unless given or another axis is -1
    (`--mesh fsdp=4` on 8 devices was an error, "4 devices, but 8 are available"); an axis given twice, or
    two at -1, is refused naming the flag."""
    from fxjax.commands.model_args import parse_mesh
    from fxjax.device_mesh import MeshConfig

    assert parse_mesh("fsdp=4") == MeshConfig(data=-1, fsdp=4, tensor=1)
    assert parse_mesh("fsdp=4").resolve(8).shape == (2, 4, 1)
    assert parse_mesh("tensor=-1") == MeshConfig(data=1, fsdp=1, tensor=-1)
    assert parse_mesh("data=2, tensor=2") == MeshConfig(data=2, fsdp=1, tensor=2)
    assert parse_mesh(None) is None
    with pytest.raises(ValueError, match=r"--mesh: data is given twice \(data=2, data=4\); give it once"):
        parse_mesh("data=2,data=4")
    with pytest.raises(ValueError, match=r"--mesh: at most one axis may be -1 \(the rest of the devices\), got "
                                         r"data=-1,fsdp=-1"):
        parse_mesh("data=-1,fsdp=-1")


def test_parse_eval_args_reads_as_the_cli_does():
    """The demo and bench/demo_policy.py build `fxjax eval`'s arguments with parse_eval_args: the same
    namespace as the CLI's parser gives (every default, --step as a list, --group-by alone as no breakdown)."""
    from fxjax.cli import build_parser
    from fxjax.commands.eval import parse_eval_args

    argv = ["--run", "r", "--step", "alpha", "beta", "--data", "t.jsonl", "--limit", "60", "--group-by", "--fresh"]
    ours, cli = vars(parse_eval_args(argv)), vars(build_parser().parse_args(["eval", *argv]))
    assert ours.keys() == cli.keys() and ours == cli
    assert ours["step"] == ["alpha", "beta"] and ours["group_by"] == [] and ours["command"] == "eval"
    with pytest.raises(SystemExit):
        parse_eval_args(["--run", "r"])  # --data is required, as on the command line


def test_a_resume_with_the_records_in_another_order_or_others_skipped_is_refused(dataset, tmp_path):
    """A record's prompt template is drawn by its place among the loaded records: the --data files in another
    order, or other records skipped (--on-error skip with another --max-image-pixels), prompt the same image
    otherwise (15 of 20 completions differed), yet a resume took the rows of the first order and decoded
    the rest under the second, into one metrics.json. The loaded records are now part of the settings."""
    from fxjax.commands.eval import eval_records, parse_eval_args, settings_of
    from fxjax.commands.eval_folder import PREDICTIONS, check_settings, require_same_settings
    from fxjax.train.export import PROMPT_SETTING_KEYS

    lines = dataset.read_text().splitlines(keepends=True)
    a, b = dataset.with_name("half_a.jsonl"), dataset.with_name("half_b.jsonl")
    a.write_text("".join(lines[:2]))
    b.write_text("".join(lines[2:]))

    def settings(*argv):
        args = parse_eval_args(["--model", "m", *argv])
        records, _, records_key = eval_records(args, lambda text: None)
        return records, settings_of(args, {"model": "m"}, dict.fromkeys(PROMPT_SETTING_KEYS), str(tmp_path),
                                    records_key)

    records, first = settings("--data", str(a), str(b))
    out = tmp_path / "out"
    check_settings(out, first, fresh=False)
    (out / PREDICTIONS).write_text("")
    require_same_settings(out, settings("--data", str(a), str(b), "--limit", "2")[1])  # (--limit may change)
    with pytest.raises(ValueError, match=r"other settings \(records\.sha256: "):
        require_same_settings(out, settings("--data", str(b), str(a))[1])
    small = min(r.width * r.height for r in records)  # an image limit that skips the largest images
    with pytest.raises(ValueError, match=r"other settings \(records\.count: 5 then, [1-4] now; records\.sha256"):
        require_same_settings(out, settings("--data", str(a), str(b), "--on-error", "skip",
                                            "--max-image-pixels", str(small))[1])
    # a folder written before the records were recorded resumes (as it did), and records them from then on
    (out / "settings.json").write_text(json.dumps({k: v for k, v in first.items() if k != "records"}))
    require_same_settings(out, settings("--data", str(b), str(a))[1])
    check_settings(out, first, fresh=False)
    assert json.loads((out / "settings.json").read_text())["records"] == first["records"]


def test_skipped_records_are_said_up_to_a_count_per_kind_and_kept_in_full_for_the_metrics(tmp_path):
    """--on-error skip said every skipped record in one line (a wrong --root: thousands); now the first 20 of each
    kind, then how many more and where all of them are (metrics.json's invalid_records, from the full report)."""
    import argparse

    from PIL import Image

    from fxjax.commands.eval import eval_records

    Image.new("RGB", (56, 56)).save(tmp_path / "ok.png")
    lines = [{"image": "ok.png", "label": "real"}] + [{"image": f"no{i}.png", "label": "real"} for i in range(22)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = argparse.Namespace(data=[str(tmp_path / "data.jsonl")], root=None, format="auto", on_error="skip",
                              allow_absolute_paths=False, max_image_pixels=None, limit=None)
    said = []
    records, report, _ = eval_records(args, said.append)
    assert len(records) == 1 and len(report.skipped) == 22 and len(said) == 1
    assert said[0].count("missing image") == 20 and "no19.png" in said[0] and "no20.png" not in said[0]
    assert said[0].endswith("; and 2 more (image_missing 2), named in metrics.json's invalid_records")


def test_a_limit_opens_the_images_of_the_records_it_evaluates_only(tmp_path):
    """`--limit 100` on a 40k-record test set opened and decoded every image before the first of its 100 (a
    1024x768 JPEG: 4.7 ms on 2 cores, minutes for the set), and stopped on a bad image it would never
    evaluate. Now images are opened until --limit records are valid; those after count in the records'
    fingerprint as they read, so another --limit (or none) resumes the same folder when every image is good."""
    from PIL import Image

    from fxjax.commands.eval import eval_records, parse_eval_args

    for i in range(4):
        Image.new("RGB", (56, 56), (i, 0, 0)).save(tmp_path / f"{i}.png")
    lines = [{"image": "0.png", "label": "real"}, {"image": "gone.png", "label": "real"}] + [
        {"image": f"{i}.png", "label": "real"} for i in (1, 2, 3)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def load(*flags):
        return eval_records(parse_eval_args(["--model", "m", "--data", str(data), *flags]), lambda text: None)

    with pytest.raises(ValueError, match=r"data\.jsonl:2: missing image"):  # (within the first 2 valid ones)
        load("--limit", "2")
    records, report, key = load("--limit", "1")
    assert [r.source for r in records] == [f"{data}:1"] and report.unchecked[0] == ("gone.png", "real", "gone.png")
    assert "the images of the 4 after them not checked (a limit of 1)" in report.summary()
    records, report, key = load("--limit", "2", "--on-error", "skip")
    assert [r.image for r in records] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    assert [kind for kind in report.counts()] == ["image_missing"] and len(report.unchecked) == 2
    assert key == load("--on-error", "skip")[2] == load("--limit", "3", "--on-error", "skip")[2]
    assert key["count"] == 4


def test_a_second_eval_into_the_same_out_is_refused_naming_the_first(dataset, tmp_path, capsys):
    """Two evals with one --out (of one step or two) appended to one predictions.jsonl, each saying it wrote its
    8 images (16 rows, a resume then scored the mix): the folder is locked while an eval writes there."""
    from fxjax.cli import main
    from fxjax.train.run_lock import EVAL_LOCK_FILE, locked_eval_folders

    model, out = tmp_path / "model", tmp_path / "eval"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with locked_eval_folders([out], print):  # (a flock: a second open of the file is refused, here too)
        assert main(["eval", "--model", str(model), "--data", str(dataset), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"fxjax eval: error: --out: another fxjax eval is writing in {out.resolve()} (pid {os.getpid()} on " in err
    assert "two there would append to one predictions.jsonl, a mix of both" in err
    # several steps into OUT write OUT/<step>/, which a one-step eval may be given as its --out: locked too
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with locked_eval_folders([out / "alpha"], print):
        assert main(["eval", "--run", str(run), "--step", "alpha", "beta", "--data", str(dataset), "--out",
                     str(out)]) == 2
    assert f"--out: another fxjax eval is writing in {(out / 'alpha').resolve()}" in capsys.readouterr().err
    assert not (out / "beta").exists()  # (the folders it made for it: gone again)
    # an eval that fails leaves no lock file (nor the folder it made for it); the held one stayed
    assert (out / EVAL_LOCK_FILE).is_file()
    fresh = tmp_path / "fresh"
    assert main(["eval", "--model", str(model), "--data", str(dataset), "--out", str(fresh)]) == 2
    assert not fresh.exists()


def test_evaluate_returns_steps_by_name_for_a_list_of_one_and_takes_a_mesh_as_its_types(monkeypatch, tmp_path):
    """`evaluate(step=[...])` returns {step: metrics} for a list of one step as for several (code looping over
    a list of stages broke on a list of one); `mesh=` takes the library's own types as --mesh does its text."""
    import jax

    from fxjax.commands import eval as eval_command
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.evaluate import evaluate
    from fxjax.keyword_options import command_arguments

    def fake_run(args):  # (the command: its metrics.json in --out for one step)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps({"accuracy": 1.0}))
        return 0

    monkeypatch.setattr(eval_command, "run", fake_run)
    data = tmp_path / "d.jsonl"
    assert evaluate(data, out=tmp_path / "a", run="runs/x", step=["alpha"]) == {"alpha": {"accuracy": 1.0}}
    assert evaluate(data, out=tmp_path / "b", run="runs/x", step="alpha") == {"accuracy": 1.0}
    for mesh, text in ((MeshConfig(data=1, fsdp=2), "data=1,fsdp=2,tensor=1"), ({"fsdp": 2}, "fsdp=2"),
                       (make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), "data=1,fsdp=1,tensor=1"),
                       ("fsdp=2", "fsdp=2")):
        assert command_arguments("eval", [], {"data": [str(data)], "mesh": mesh}, "evaluate").mesh == text


def test_a_merged_folder_saved_from_python_decodes_to_its_generation_config_length(tiny_vl_dir, tmp_path):
    """save_merged(..., max_new_tokens=8) from Python writes generation_config.json but no export record:
    detect and eval decoded 1024 tokens where HF's generate stops at 8."""
    import shutil

    from fxjax.commands.model_args import resolve_detector
    from fxjax.keyword_options import command_arguments

    folder = tmp_path / "merged"
    shutil.copytree(tiny_vl_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text()) \
        if (folder / "generation_config.json").exists() else {}
    (folder / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 8}))
    args = command_arguments("eval", [], {"data": [str(tmp_path / "d.jsonl")], "model": str(folder)}, "t")
    assert resolve_detector(args).max_new_tokens == 8
    args = command_arguments("eval", [], {"data": [str(tmp_path / "d.jsonl")], "model": str(folder),
                                          "max_new_tokens": 5}, "t")
    assert resolve_detector(args).max_new_tokens == 5
