"""What a user watches during training: metrics.jsonl, TensorBoard event files, the progress bar."""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest

from fxjax.train.metrics import MetricsLogger, ProgressBar


def read_events(directory) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files under `directory`."""
    from tensorboardX.proto import event_pb2

    out = []
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.append((value.tag, int(event.step), float(value.simple_value)))
    return out


def test_jsonl_has_one_plain_record_per_call(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(5, "train", {"loss": 1.5, "tokens": 12.0, "finite": True, "bad": float("nan")})
    logger.log(10, "eval", {"format_rate": 0.75})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [(5, "train"), (10, "eval")]
    assert records[0]["loss"] == 1.5 and records[0]["tokens"] == 12.0 and records[0]["finite"] is True
    assert records[0]["bad"] == "nan"  # JSON has no NaN: kept visible as a string, not dropped
    assert records[1]["format_rate"] == 0.75 and not (tmp_path / "tensorboard").exists()


def test_text_is_logged_as_written_even_where_it_reads_as_a_number(tmp_path):
    import numpy as np

    from fxjax.train.metrics import CompletionLog, read_metrics

    texts = ["2024", " 7 \n", "Infinity", "NaN", "1_000", "1e3"]
    CompletionLog(tmp_path, resume_step=0).log(3, [{"completion": t, "stage": "1", "sample": np.int64(2)}
                                                   for t in texts])
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == texts and {r["stage"] for r in rows} == {"1"}
    assert {r["sample"] for r in rows} == {2} and all(type(r["sample"]) is int for r in rows)
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, "train", {"stage": "01", "loss": np.float32(1.5)})
    logger.close()
    (record,) = read_metrics(tmp_path)
    assert record["stage"] == "01" and record["loss"] == 1.5


def test_tensorboard_gets_every_finite_scalar(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, "train", {"loss": 2.5, "learning_rate": 1e-3, "skipped": 0, "finite": True})
    logger.log(2, "train", {"loss": float("inf"), "learning_rate": 2e-3})
    logger.log(2, "eval", {"verdict_accuracy": 0.5})
    logger.close()
    events = read_events(tmp_path / "tensorboard")
    assert sorted(events) == sorted([("train/loss", 1, 2.5), ("train/learning_rate", 1, pytest.approx(1e-3)),
                                     ("train/skipped", 1, 0.0), ("train/learning_rate", 2, pytest.approx(2e-3)),
                                     ("eval/verdict_accuracy", 2, 0.5)])
    assert all(math.isfinite(v) for _, _, v in events)


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log(1, "train", {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_progress_bar_shows_step_and_postfix(capsys):
    bar = ProgressBar(total=4, initial=1, enabled=True)
    bar.update(1, {"loss": 1.23456, "tok_s": 10})
    bar.close()
    err = capsys.readouterr().err
    assert "2/4" in err and "loss=1.235" in err and "tok_s=10" in err


def test_progress_without_a_terminal_is_a_line_every_tenth(capsys, monkeypatch):
    """CI logs and pipes get plain lines (tqdm's carriage returns would make one endless line): the run's
    first step at once, with its time (its compilation in it), then every tenth, the rate after the first."""
    ticks = [100.0, 160.0, *(160.0 + 2 * k for k in range(1, 30))]  # the first step 60 s, then 2 s each
    clock = iter(ticks)
    monkeypatch.setattr("fxjax.train.metrics.time.perf_counter", lambda: next(clock, ticks[-1]))
    bar = ProgressBar(total=30, initial=0, enabled=True, desc="grpo")
    for _ in range(30):
        bar.update(1, {"reward": 1.5})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" reward")[0] for line in lines] == [f"grpo: step {k}/30" for k in (1, *range(3, 31, 3))]
    assert lines[0].endswith("reward=1.5 (60.0 s, compiling included if any)")
    assert all(line.endswith("reward=1.5 (2.00 s/step on the clock)") for line in lines[1:]), lines
    ProgressBar(total=30, initial=0, enabled=False).update(30, {})
    assert capsys.readouterr().err == ""


# ---- resume: one record per step -----------------------------------------------------------------------

def write_lines(path, lines, torn: str | None = None):
    text = "".join(json.dumps(r) + "\n" for r in lines) + (torn or "")
    path.write_text(text)


def test_resume_drops_the_records_past_the_restored_step(tmp_path):
    """SIGKILL after step 5 (mid-write of step 6), resume from the checkpoint of step 3: steps 4-5 and the
    torn line go, and the resumed run's records follow; the file keeps the mode an ordinary write gives."""
    import os
    import stat

    from fxjax.file_modes import current_umask

    path = tmp_path / "metrics.jsonl"
    first = [{"step": s, "kind": "train", "loss": 10.0 - s} for s in range(1, 6)] + [{"step": 3, "kind": "eval",
                                                                                     "format_rate": 0.5}]
    write_lines(path, first, torn='{"step": 6, "kind": "tr')
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    for s in (4, 5):
        logger.log(s, "train", {"loss": 20.0 + s})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["kind"], r.get("loss")) for r in records] == [
        (1, "train", 9.0), (2, "train", 8.0), (3, "train", 7.0), (3, "eval", None), (4, "train", 24.0),
        (5, "train", 25.0)]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~current_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left over


def test_a_fresh_run_appends_and_resume_zero_starts_over(tmp_path):
    """resume_step 0 (a run from scratch) drops the records of an attempt killed before its first
    checkpoint, its evaluation at step 0 too, which the new run logs again (it was there twice)."""
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 0, "kind": "eval", "loss": 2.0}, {"step": 1, "kind": "train", "loss": 1.0}])
    MetricsLogger(tmp_path, tensorboard=False).close()  # resume_step None: nothing dropped
    assert len(path.read_text().splitlines()) == 2
    MetricsLogger(tmp_path, tensorboard=False, resume_step=0).close()
    assert path.read_text() == ""


def test_tensorboard_hides_the_events_past_the_restored_step(tmp_path):
    from tensorboardX.proto import event_pb2

    def purge_starts(run_dir):
        (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
        data, pos, starts = events.read_bytes(), 0, []
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                starts.append(int(event.step))
        return starts

    MetricsLogger(tmp_path / "resumed", tensorboard=True, resume_step=7).close()
    assert purge_starts(tmp_path / "resumed") == [8]  # TensorBoard purges the events at step >= 8 written before
    MetricsLogger(tmp_path / "fresh", tensorboard=True, resume_step=0).close()
    assert purge_starts(tmp_path / "fresh") == [0]  # a run from scratch: all of them, the eval at step 0 too


def test_read_metrics_gives_one_record_per_kind_and_step(tmp_path):
    from fxjax.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 1, "kind": "train", "loss": 3.0}, {"step": 2, "kind": "train", "loss": 2.0},
                       {"step": 2, "kind": "eval", "loss": 2.5}, {"step": 3, "kind": "train", "loss": 1.0},
                       {"step": 2, "kind": "train", "loss": 2.2}, {"step": 3, "kind": "train", "loss": 1.1}],
                torn='{"step": 4, "ki')
    records = read_metrics(tmp_path)  # a run directory or the file itself
    assert [(r["step"], r["kind"], r["loss"]) for r in records] == [
        (1, "train", 3.0), (2, "train", 2.2), (2, "eval", 2.5), (3, "train", 1.1)]
    assert read_metrics(path) == records
    # not JSON, a kind that is not a name, a step that is a boolean, a line that is not UTF-8: each names its line
    for bad in (b"not json", b'{"step": 1, "kind": ["train"]}', b'{"step": true, "kind": "train"}',
                b'{"step": 1, "kind": "train", "note": "\xff"}'):
        path.write_bytes(b'{"step": 1, "kind": "train"}\n' + bad + b'\n{"step": 2, "kind": "train"}\n')
        with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics record"):
            read_metrics(path)


def test_a_run_resumed_from_another_folder_is_warned_where_its_relative_paths_now_name_other_files(tmp_path,
                                                                                                    monkeypatch):
    """A run started in one project folder (model.path: d/base-model) and resumed from another holding its own
    d/base-model went on with that folder's weights (the loss back at a fresh model's), its config unchanged as
    text: said per path, where the folder it named then is still there (a project moved whole is not)."""
    from fxjax.train.resume import warn_paths_read_elsewhere
    from fxjax.train_config import SFTConfig

    started, here = tmp_path / "started", tmp_path / "here"
    for folder in (started, here):
        (folder / "d" / "base-model").mkdir(parents=True)
    config = SFTConfig().to_dict()
    config["model"]["path"], config["data"]["tokenizer"] = "d/base-model", str(started / "d" / "base-model")
    monkeypatch.chdir(here)
    lines: list[str] = []
    assert warn_paths_read_elsewhere(config, config, str(started), lines.append) == lines
    assert lines == [f"warning: model.path: d/base-model is read from {here} now, {here / 'd' / 'base-model'}; the "
                     f"run started in {started}, where it is {started / 'd' / 'base-model'}, still there: if they "
                     f"differ, the run goes on with other inputs (run it from {started}, or give the path absolute)"]
    assert warn_paths_read_elsewhere(config, config, str(here), print) == []  # (resumed where it started)
    shutil.rmtree(started / "d")  # (the project moved here whole: its paths mean what they meant)
    assert warn_paths_read_elsewhere(config, config, str(started), print) == []


def test_check_resume_config_warns_on_what_changed_the_run():
    from fxjax.train.resume_check import check_resume_config
    from fxjax.train_config import SFTConfig

    saved = SFTConfig().to_dict()
    saved["train"]["steps"] = 100
    current = json.loads(json.dumps(saved))
    assert check_resume_config(saved, current, print) == []
    current["train"].update(steps=200, output_dir="elsewhere", log_every=5)  # only the length is watched
    current["optim"]["learning_rate"] = 2e-4
    current["lora"]["rank"] = 16
    lines: list[str] = []
    warnings = check_resume_config(saved, current, lines.append)
    assert lines == warnings and len(warnings) == 3
    assert warnings[0].startswith("warning: resuming with a different lora config") and "lora.rank: 8 -> 16" in warnings[0]
    assert "optim.learning_rate: 0.0001 -> 0.0002" in warnings[1]
    assert warnings[2].endswith("(the step count, so the learning-rate schedule changed): train.steps: 100 -> 200")
    # the LoRA's scale: refused (the restored B A would be scaled otherwise: another model than the trained one)
    from fxjax.config_mapping import ConfigError
    from fxjax.train.resume_check import check_lora_scale

    check_lora_scale(saved, current, "step 10")  # (the rank: the restore's own error, arrays of other shapes)
    alpha = saved["lora"]["alpha"]
    for key, value, shown in (("alpha", 2 * alpha, f"lora.alpha: {alpha} -> {2 * alpha}"),
                              ("use_rslora", True, "lora.use_rslora: false -> true")):
        changed = json.loads(json.dumps(current))
        changed["lora"][key] = value
        with pytest.raises(ConfigError, match=shown + ": the checkpoint of step 10 was trained with the former"):
            check_lora_scale(saved, changed, "step 10")
        # a run started from an adapter takes the adapter's scale: its lora section changes nothing
        started = json.loads(json.dumps(changed))
        started["model"]["adapter"] = "sft-adapter"
        check_lora_scale({**saved, "model": started["model"]}, started, "step 10")
    current["train"].update(steps=None, epochs=3.0)
    (line,) = [w for w in check_resume_config(saved, current, print) if "different train config" in w]
    assert "train.steps: 100 -> null; train.epochs: null -> 3.0" in line
    # how the same model is computed and what the training stream does not read: no warning (one said "the
    # base model changed" for remat, "the data stream changed" for new held-out files)
    quiet = json.loads(json.dumps(saved))
    quiet["model"].update(remat="none", remat_vision="full", attention="xla", scan_layers=True)
    quiet["data"].update(eval_files=["test.jsonl"], check_decode=False, read_threads=8, prefetch_buffer_size=2)
    assert check_resume_config(saved, quiet, print) == []
    quiet["model"]["dtype"] = "float32"
    quiet["data"]["seed"] = 3
    assert [w.split(":")[-2:] for w in check_resume_config(saved, quiet, print)] == [
        [" model.dtype", " bfloat16 -> float32"], [" data.seed", " 0 -> 3"]]
    flags = json.loads(json.dumps(saved))  # values as --set writes them (it said True, ['q_proj'])
    flags["lora"].update(use_rslora=True, target_modules=["q_proj", "v_proj"])
    (line,) = check_resume_config(saved, flags, print)
    assert "lora.target_modules: all-linear -> [q_proj, v_proj]; lora.use_rslora: false -> true" in line, line
    # where the LoRA started is not the base model, and a resume goes on from its checkpoint's LoRA: said so
    # (it said "the base model changed" for model.from_run_step beta -> alpha, and kept beta's)
    started = json.loads(json.dumps(saved))
    started["model"].update(path=None, from_run="runs/sft", from_run_step="beta")
    moved = json.loads(json.dumps(started))
    moved["model"].update(from_run_step="alpha", dtype="float32")
    warnings = check_resume_config(started, moved, print)
    assert warnings[0] == ("warning: resuming with another start than the checkpoint's (model.from_run_step: beta -> "
                           "alpha): a resumed run goes on from its checkpoint's LoRA, so this changes nothing; "
                           "another train.output_dir starts a new run from it")
    assert warnings[1].endswith("(the base model changed): model.dtype: bfloat16 -> float32") and len(warnings) == 2


def test_a_grpo_checkpoint_written_before_stage_epochs_resumes_without_a_warning():
    """A checkpoint's stages recorded before a stage had `epochs` ({name, steps}) are the same stages as
    today's record of them ({name, steps, epochs: null}); a changed stage length still warns."""
    from fxjax.grpo_config import GRPOConfig
    from fxjax.train.grpo import GRPO_WATCHED
    from fxjax.train.resume_check import check_resume_config

    current = GRPOConfig().to_dict()
    saved = json.loads(json.dumps(current))
    saved["stages"] = [{"name": s["name"], "steps": s["steps"]} for s in saved["stages"]]
    assert "epochs" in current["stages"][0] and check_resume_config(saved, current, print, GRPO_WATCHED) == []
    current["stages"][1]["steps"] = 50
    (line,) = check_resume_config(saved, current, print, GRPO_WATCHED)
    assert "different stages config" in line and "'steps': 50" in line


def test_interval_means_average_the_steps_between_two_records():
    """What SFT logs every train.log_every steps: the mean of each value over those steps (as HF Trainer's
    logged loss), over the finite ones (a skipped non-finite step does not turn the mean into NaN), then a
    fresh interval."""
    from fxjax.train.metrics import IntervalMeans

    interval = IntervalMeans()
    for loss, norm in [(4.0, 1.0), (2.0, float("nan")), (3.0, 3.0)]:
        interval.add({"loss": loss, "grad_norm": norm})
    assert interval.take() == {"loss": 3.0, "grad_norm": 2.0}
    interval.add({"loss": float("inf")})
    means = interval.take()
    assert list(means) == ["loss"] and math.isnan(means["loss"])  # no finite value: NaN, not 0
    assert interval.take() == {}


def test_a_run_rerun_with_its_paths_written_absolute_is_not_said_to_have_changed(tmp_path, monkeypatch):
    """`run_sft(load_run("runs/sft").config)` re-runs a run with its paths given back absolute: the resume
    warned "the base model changed: model.path: tiny-qwen -> /work/tiny-qwen" (and data.train_files) for the
    same files. Compared where they resolve (relative ones from the folder the run started in); another
    file is still said."""
    from fxjax.train.resume import as_saved_where_same
    from fxjax.train.resume_check import check_resume_config
    from fxjax.train_config import SFTConfig

    (tmp_path / "tiny-qwen").mkdir()
    saved = SFTConfig().to_dict()
    saved["model"]["path"], saved["data"]["train_files"] = "tiny-qwen", ["data/train.jsonl"]
    now = json.loads(json.dumps(saved))
    now["model"]["path"], now["data"]["train_files"] = str(tmp_path / "tiny-qwen"), [str(tmp_path / "data/train.jsonl")]
    monkeypatch.chdir(tmp_path.parent)  # (re-run from elsewhere: relative paths resolve where the run started)
    assert len(check_resume_config(saved, now, print)) == 2  # (as text: the model and the data stream "changed")
    assert check_resume_config(saved, as_saved_where_same(saved, now, str(tmp_path)), print) == []
    now["model"]["path"] = str(tmp_path / "other-model")
    said = check_resume_config(saved, as_saved_where_same(saved, now, str(tmp_path)), print)
    assert len(said) == 1 and "model.path: tiny-qwen -> " in said[0]
