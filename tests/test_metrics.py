"""What a user watches during training: metrics.jsonl, TensorBoard event files, the progress bar."""

from __future__ import annotations

import json
import math
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


def test_tensorboard_gets_every_finite_scalar(tmp_path):
    pytest.importorskip("tensorboardX")
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
