"""An `fxjax eval` output folder and the evaluation that fills it: predictions.jsonl (one row per image,
appended per batch, so an interrupted eval resumes), settings.json (what made them: a resume with other
settings is refused), metrics.json (the summary of the records evaluated now).

    records -> (not yet in predictions.jsonl) -> prompt batches -> greedy decoding with the KV cache
      -> rewards parser and scoring (fxjax.detection_metrics) -> predictions.jsonl -> metrics.json

Module-level imports are light (`fxjax eval --help` and `fxjax report` import it without jax).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from fxjax.data.records import record_objects
from fxjax.file_modes import write_json_whole

__all__ = ["METRICS", "PREDICTIONS", "SETTINGS", "evaluate", "evaluate_detector", "prompt_data_config",
           "read_predictions", "require_same_settings"]

PREDICTIONS, METRICS, SETTINGS = "predictions.jsonl", "metrics.json", "settings.json"


def source_key(source: str) -> str:
    """A record's source (its data file as given, ':' line) with the file's absolute path: the same record
    whatever folder the eval runs from (a resume from another folder decoded every image again)."""
    file, _, line = source.rpartition(":")
    return f"{os.path.realpath(file)}:{line}"


def read_predictions(path: Path, say: Callable[[str], None]) -> dict[str, dict]:
    """source_key -> prediction row (rows written before `resolved_source` existed: their source resolved
    from this folder). A last line cut short (a kill mid-write) is dropped from the file; a whole one that
    lacks its newline gets it, so the next row starts a line of its own."""
    if not path.is_file():
        return {}
    rows: dict[str, dict] = {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    good = 0
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "source" not in row:
                raise ValueError("not a prediction row")
        except ValueError:
            if n == len(lines) and not line.endswith("\n"):
                say(f"{path}:{n}: dropped an incomplete last line (the eval was killed while writing it)")
                with open(path, "r+", encoding="utf-8") as f:
                    f.truncate(good)
                break
            raise ValueError(f"{path}:{n}: not a prediction row; pass --fresh to start over") from None
        rows[row.get("resolved_source") or source_key(row["source"])] = row
        good += len(line.encode("utf-8"))
        if n == len(lines) and not line.endswith("\n"):  # killed between the row and its newline
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return rows


def _differences(then: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value then, value now) of every leaf that differs, nested dicts followed (a changed
    step shows as `model.step: 3 then, 2 now`, not as two whole model records to compare by eye)."""
    out = []
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_settings(out: Path, settings: dict, fresh: bool) -> None:
    """Check that the predictions already in `out` (if any; none after `fresh`, which removes them) were made
    with these settings, then write settings.json."""
    path = out / SETTINGS
    if fresh:
        for name in (PREDICTIONS, METRICS, SETTINGS):
            (out / name).unlink(missing_ok=True)
    require_same_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    write_json_whole(path, settings)


def require_same_settings(out: Path, settings: dict) -> None:
    """A ValueError unless the predictions already in `out` (if any) were made with these settings; reads
    only (`fxjax eval --step A B` checks every step's folder before the first loads anything)."""
    path = out / SETTINGS
    if (out / PREDICTIONS).is_file() and not path.is_file():  # (written before the first prediction)
        raise ValueError(f"{out} holds {PREDICTIONS} without {SETTINGS}: what made those predictions is unknown; "
                         "pass --fresh to start over, or another --out")
    if (out / PREDICTIONS).is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            why = None if isinstance(saved, dict) else "not a JSON object"
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            why = f"not JSON: {err}"
        if why:
            raise ValueError(f"{path} is damaged ({why}): what made the predictions beside it is unknown; pass "
                             "--fresh to start over, or another --out")
        changed = _differences(saved, as_recorded_then(saved, settings))
        if any(key == "model.step" for key, _, _ in changed):  # (another checkpoint: its time differs too)
            changed = [c for c in changed if c[0] != "model.checkpoint_mtime_ns"]
        if changed:
            shown = "; ".join(f"{k}: {then!r} then, {now!r} now" for k, then, now in changed)
            raise ValueError(f"{out} holds predictions made with other settings ({shown}); pass --fresh to start "
                             f"over (with several --step values: every step's folder), remove {out}, or give "
                             f"another --out")


def earlier_metrics(out: Path, settings: dict) -> dict:
    """metrics.json of an earlier run of this eval with the same settings ({} when there is none)."""
    try:
        metrics = json.loads((out / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(metrics, dict) or not isinstance(metrics.get("settings"), dict):
        return {}
    if metrics["settings"] != json.loads(json.dumps(as_recorded_then(metrics["settings"], settings))):
        return {}
    return metrics


# Settings keys added since eval folders were first written: a folder written before one was recorded
# resumes (the setting unknown then, as it was before), and records it from now on.
ADDED_SETTINGS = ("records",)


def as_recorded_then(saved: dict, settings: dict) -> dict:
    """`settings` without the keys `saved` (an older folder's settings) has not recorded (ADDED_SETTINGS)."""
    return {k: v for k, v in settings.items() if k in saved or k not in ADDED_SETTINGS}


def too_long_before(earlier: dict) -> set[str]:
    """Records an earlier run of this eval with the same settings (`earlier_metrics`) left out as too long
    for max_length (metrics.json's not_evaluated_why): the same prompt is as long again, so a finished eval
    loads no model for them. An image that failed to decode is tried again."""
    why = earlier.get("not_evaluated_why")
    return {s for s, kind in why.items() if kind == "too_long"} if isinstance(why, dict) else set()


def decoding_run(decoder, images: int, seconds: float) -> dict:
    """How one run of the eval decoded its images (metrics.json's `decoding`, a run per entry: a resumed
    eval adds one): the batch, the mesh and the devices, and the time, so that a figure can be compared with
    another machine's (not a setting: greedy answers do not depend on them, and a resume may change them)."""
    import jax

    mesh, device = getattr(decoder, "mesh", None), jax.devices()[0]
    return {"images": images, "seconds": round(seconds, 6),
            "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
            "batch_size": decoder.batch_size, "mesh": dict(mesh.shape) if mesh is not None else None,
            "devices": jax.device_count(), "platform": device.platform, "device_kind": device.device_kind,
            "processes": jax.process_count()}


# ---- truths and groups -----------------------------------------------------------------------------

def groups_of(record, raw: dict | None, fields: Sequence[str]) -> dict[str, Any]:
    """The record's group in each --group-by field: its value (a list or object as its JSON text); for
    `regions`, how many regions it has (their boxes would make a group of every image)."""
    groups = {}
    for name in fields:
        value = getattr(record, name, None) if name in {f.name for f in dataclasses.fields(record)} else None
        if value is None and raw is not None:
            value = raw.get(name)
        if name == "regions" and isinstance(value, (tuple, list)):
            value = len(value)
        groups[name] = (value if value is None or isinstance(value, (str, int, float, bool))
                        else json.dumps(value, default=_plain))
    return groups


def _plain(value):
    """json.dumps's fallback for a record's own values (dataclasses such as a Region)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def truth_of(meta: dict) -> dict:
    """The scoring truth of one pipeline example (boxes already in the model's resized-image pixels). No
    --group-by groups: a row of predictions.jsonl serves every later grouping of a resume, which takes each
    record's groups afresh."""
    return {"id": meta["record_id"], "source": meta["source"], "label": meta["label"], "boxes": meta["boxes"],
            "model_size": list(meta["model_size"]), "original_size": list(meta["original_size"]),
            **{k: meta[k] for k in ("completion_tokens", "truncated") if k in meta}}


# ---- the evaluation --------------------------------------------------------------------------------

def evaluate(records, make_decoder: Callable[[], Any], prompt_config, out: Path, *, settings: dict,
             group_by: Sequence[str] = (), fresh: bool = False, progress: bool = True,
             say: Callable[[str], None] = print, invalid_records: Sequence[str] = ()) -> dict:
    """Decode what predictions.jsonl in `out` lacks (less what an earlier run found too long,
    `too_long_before`), score it, and summarise every record; returns the
    metrics (also written to metrics.json, with `invalid_records`: those the records' check refused). `make_decoder()` gives a GreedyDecoder (its `batch_size` and
    `batches`); it is called only when something is left to decode, so a finished eval loads no model."""
    from fxjax import detection_metrics
    from fxjax.data.pipeline import DataPipeline

    check_settings(out, settings, fresh)
    pred_path = out / PREDICTIONS
    done = read_predictions(pred_path, say)
    earlier = earlier_metrics(out, settings)  # (its too-long records, and the runs that decoded before)
    too_long = too_long_before(earlier)
    todo = [r for r in records if source_key(r.source) not in done and r.source not in too_long]
    known = {f.name for f in dataclasses.fields(records[0])}
    raw = record_objects(records) if set(group_by) - known else {}
    for name in set(group_by) - known:  # a typo would make one group of every image, "(none)"
        if not any(isinstance(obj, dict) and name in obj for obj in raw.values()):
            fields = sorted(known | {k for obj in raw.values() if isinstance(obj, dict) for k in obj})
            raise ValueError(f"--group-by {name}: no record of the data has a field {name!r} (fields: "
                             f"{', '.join(fields)})")
    if len(todo) < len(records):
        say(f"resuming: {len(records) - len(todo)} of {len(records)} images already in {pred_path}"
            + (" or too long for max_length (metrics.json)" if too_long else ""))
    bar = None
    why = {source: "too_long" for source in too_long}  # of each record the pipeline left out
    runs = list(earlier.get("decoding") or [])
    if todo:
        decoder = make_decoder()
        decoder.plan_decoding()  # (said now: not through the bar)
        started, decoded = time.perf_counter(), 0
        if progress:  # (after the loading, which says what it loads: not through a bar already drawn)
            from fxjax.train.metrics import ProgressBar  # tqdm on a terminal, else a line every tenth

            bar = ProgressBar(len(records), len(records) - len(todo), True, desc="eval", unit="image")
        cfg = dataclasses.replace(prompt_config, batch_size=decoder.batch_size)
        with open(pred_path, "a", encoding="utf-8") as f:
            for texts, metas in decoder.batches(DataPipeline(cfg, records=todo)):
                for row in detection_metrics.score_completions(texts, [truth_of(m) for m in metas]):
                    row["resolved_source"] = source_key(row["source"])
                    f.write(json.dumps(row) + "\n")
                    done[row["resolved_source"]] = row
                    decoded += 1
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(texts), {})
        why.update(getattr(decoder, "dropped", {}))
        runs.append(decoding_run(decoder, decoded, time.perf_counter() - started))
    if bar is not None:
        bar.close()
    rows, missing = [], []
    for r in records:
        row = done.get(source_key(r.source))
        if row is None:
            missing.append(r.source)
            continue
        rows.append(dict(row, groups=groups_of(r, raw.get(r.source), group_by)))
    if missing:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(Counter(why.get(s, "?") for s in missing).items()))
        say(f"warning: {len(missing)} record(s) could not be evaluated, dropped by the data pipeline ({kinds}; "
            f"too_long: a prompt longer than max_length, decode: an image that fails to decode): "
            f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if not rows:
        raise ValueError("no record could be evaluated")
    # rows of records not evaluated now (an earlier run of a larger --limit): kept for a later resume, and
    # counted, so that a reader of predictions.jsonl knows which of its rows metrics.json covers
    wanted = {source_key(r.source) for r in records}
    outside = sum(1 for key in done if key not in wanted)
    if outside:
        say(f"note: {pred_path} also holds {outside} image(s) this evaluation leaves out (of an earlier, larger "
            f"--limit); metrics.json counts the {len(rows)} evaluated now (predictions_outside: {outside})")
    summary = detection_metrics.summarize(rows, group_by)
    summary.update(not_evaluated=missing, not_evaluated_why={s: why[s] for s in missing if s in why},
                   predictions_outside=outside, settings=settings, decoding=runs)
    if invalid_records:
        summary["invalid_records"] = list(invalid_records)
    write_json_whole(out / METRICS, summary)
    return summary


def prompt_data_config(args: argparse.Namespace, data: dict, tokenizer: str):
    from fxjax.data.config import DataConfig

    return DataConfig(data_files=tuple(args.data), tokenizer=tokenizer, root=args.root,
                      allow_absolute_paths=args.allow_absolute_paths, format=args.format, on_error=args.on_error,
                      min_pixels=data["min_pixels"], max_pixels=data["max_pixels"], max_length=data["max_length"],
                      mode="prompt", prompts=data["prompts"], long_images=data["long_images"],
                      system_prompt=data["system_prompt"],
                      user_prompt=data["user_prompt"], batch_size=args.batch_size, drop_remainder=False,
                      shuffle=False, seed=data["seed"], num_epochs=1, shard_index=0, shard_count=1,
                      max_image_pixels=args.max_image_pixels or DataConfig.max_image_pixels)


def evaluate_detector(args, records, report, detector, settings: dict, out: Path, say, after=None) -> dict:
    """`evaluate` of one detector (`settings`: its `settings_of`) into `out` (its weights loaded only when
    something is left to decode; `after`: a loaded detector of another step of the run, whose model it
    reuses, `Detector.load`)."""
    def make_decoder():
        return detector.decoder(args.batch_size, args.max_new_tokens, after=after)

    return evaluate(records, make_decoder, prompt_data_config(args, detector.data, detector.tokenizer), out,
                    settings=settings, group_by=args.group_by, fresh=args.fresh, progress=args.progress, say=say,
                    invalid_records=[str(e) for e in report.skipped])
