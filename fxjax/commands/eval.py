"""`fxjax eval`: the detector's metrics on a labelled test set, resumable, with one prediction per image.

    records -> (not yet in predictions.jsonl) -> prompt batches -> greedy decoding with the KV cache
      -> rewards parser and scoring (fxjax.detection_metrics) -> predictions.jsonl (appended per batch)
      -> metrics.json + a table

The decoding is `fxjax.train.inference.GreedyDecoder` (the training-time evaluation's); the prompts are
built exactly as SFT built them (fxjax.data: same templates and seed, or an ms-swift record's own prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from fxjax.commands.model_args import add_image_limit_argument, add_model_arguments, add_prompt_arguments
from fxjax.file_modes import require_writable

HELP = "measure the detector on a labelled JSONL test set: accuracy, P/R/F1, format rate, mean IoU"

DESCRIPTION = """\
Evaluate a detector on a labelled dataset (native or ms-swift JSONL, e.g. the FakeXplain test split):
greedy decoding with the KV cache in batches, each completion parsed and scored with the rewards'
parser (docs/format.md, docs/rewards.md: `fxjax docs format`, `fxjax docs rewards`), and the paper's metrics.

Metrics (metrics.json and the printed table):
  accuracy     share of images whose first <verdict> equals the truth
  precision, recall, F1 of the class "generated" (no verdict counts as not "generated"; F1 2TP / (2TP + FP
               + FN): 0 when no image is called generated); none on a set or group of one true class
  format rate  share of completions passing the authors' format check for their true label
  mean IoU     matched IoU (each predicted box takes the nearest unmatched true box by centre distance;
               sum of IoUs / number of true boxes), averaged over the generated images with boxes
  confusion    truth (real, generated) x predicted (real, generated, none = no usable verdict)
  truncated    share of completions that hit --max-new-tokens without a stop token (raise it if not 0)
  ci95         95% intervals: Wilson's for accuracy, format rate and recall; mean IoU +/- 1.96 SE
  by GROUP     the same metrics per value of each --group-by field (default: the generator's name);
               a group of one true class (a generator's images) has no precision or F1

Outputs in --out:
  predictions.jsonl  one line per image: id, source file:line (and resolved_source, with the file's absolute
                     path: what a resume matches), true label and boxes, the completion, its
                     verdict (null without one) and the predicted class (real, generated or none), regions
                     (caption, box in model-input pixels and in original pixels), tags, format_ok, correct,
                     per-image IoU (null for real images), completion_tokens and truncated (no stop token
                     within --max-new-tokens)
  metrics.json       the metrics above, the settings, any record that could not be evaluated (and why:
                     too_long for --max-length, when a run trained with data.long_images: drop or not even
                     min_pixels fits; or an image that fails to decode) and `decoding`: for each run that
                     decoded (a resume adds one) its images, seconds, images/s, batch size, mesh and devices
  settings.json      what the predictions were made with (checked on resume)
With several --step values, those three files per step in --out/<stage> (--out/step-N for a number), and
  eval_report.png    the steps' metrics side by side, with their 95% intervals (as `fxjax report` draws them)

Resume: run the same command again. Images already in predictions.jsonl are not decoded again (an
interrupted eval loses at most the batch it was decoding), nor those metrics.json lists as too long for
--max-length (the same settings make the same prompts); changed settings (model, step, pixels,
prompts, max new tokens, data files) are refused unless --fresh."""

EPILOG = """\
examples:
  fxjax eval --run runs/sft --data data/test.jsonl --out runs/sft/eval
  fxjax eval --run runs/grpo --step beta --data data/test.jsonl --out runs/grpo/eval-beta   # after stage beta
  fxjax eval --run runs/grpo --step alpha beta gamma --data data/test.jsonl --out runs/grpo/eval   # each stage
  fxjax eval --model runs/merged --data FakeXplain/test.jsonl --batch-size 16 --max-new-tokens 1024
  fxjax eval --model Qwen2.5-VL-3B --adapter runs/adapter --data test.jsonl --limit 100 --group-by generator"""

PREDICTIONS, METRICS, SETTINGS = "predictions.jsonl", "metrics.json", "settings.json"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, several_steps=True)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, nargs="+", metavar="FILE.jsonl",
                   help="labelled dataset file(s), native or ms-swift JSONL; image paths relative to each file")
    g.add_argument("--root", metavar="DIR", help="folder the image paths are relative to (default: each file's)")
    g.add_argument("--format", choices=("auto", "native", "swift"), default="auto",
                   help="record format (default: auto, per record)")
    g.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept absolute image paths and symbolic links out of the dataset root (only for a "
                        "dataset you trust; refused by default)")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="an invalid record: stop (default), or skip it (listed in metrics.json and on stderr)")
    g.add_argument("--limit", type=int, metavar="N", help="evaluate the first N valid records only")
    add_image_limit_argument(g)
    g.add_argument("--group-by", nargs="*", default=["generator"], metavar="FIELD",
                   help="break the metrics down by these fields: the generator, regions (their number), or "
                        "any top-level key of the JSONL records (default: generator; --group-by alone: no "
                        "breakdown)")
    add_prompt_arguments(p)
    g = p.add_argument_group("decoding and output")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="prompts decoded together, a multiple of the mesh's data x fsdp devices (default: 8, "
                        "rounded up to such a multiple)")
    g.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="longest completion in tokens (default: the run's eval.max_new_tokens, with --run or as its "
                        "export recorded it (fxjax_export.json), else 1024); a longer one is cut and usually fails "
                        "the format check")
    g.add_argument("--out", default="eval", metavar="DIR",
                   help="output folder: predictions.jsonl, metrics.json, settings.json (default: ./eval)")
    g.add_argument("--fresh", action="store_true", help="discard predictions already in --out and start over")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def parse_eval_args(argv: Sequence[str]) -> argparse.Namespace:
    """`fxjax eval ARGV` as the command reads it (its defaults, its checks of each option), for a caller in
    Python: the demo's phases, bench/demo_policy.py."""
    parser = argparse.ArgumentParser(prog="fxjax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


# ---- predictions.jsonl -----------------------------------------------------------------------------

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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """Write settings.json, or check that the predictions already in `out` were made with these settings."""
    path = out / SETTINGS
    if fresh:
        for name in (PREDICTIONS, METRICS, SETTINGS):
            (out / name).unlink(missing_ok=True)
    require_same_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


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
        changed = _differences(saved, settings)
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
    if not isinstance(metrics, dict) or metrics.get("settings") != json.loads(json.dumps(settings)):
        return {}
    return metrics


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

def raw_objects(records) -> dict[str, dict]:
    """source (file:line) -> the record's JSON object, for grouping fields fxjax does not model."""
    wanted: dict[str, set[int]] = {}
    for r in records:
        file, _, line = r.source.rpartition(":")
        wanted.setdefault(file, set()).add(int(line))
    from fxjax.data.records import numbered_lines

    out = {}
    for file, lines in wanted.items():
        # numbered as load_records numbers them (a lone "\r" ends a line too: a file with "\r\r\n" ends
        # took other records' values); bytes, so a line that is not UTF-8 (skipped there under --on-error
        # skip) is never decoded
        for n, line in numbered_lines(Path(file)):
            if n in lines:
                out[f"{file}:{n}"] = json.loads(line)
    return out


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


def truth_of(meta: dict, groups: dict) -> dict:
    """The scoring truth of one pipeline example (boxes already in the model's resized-image pixels)."""
    return {"id": meta["record_id"], "source": meta["source"], "label": meta["label"], "boxes": meta["boxes"],
            "model_size": list(meta["model_size"]), "original_size": list(meta["original_size"]), "groups": groups,
            **{k: meta[k] for k in ("completion_tokens", "truncated") if k in meta}}


# ---- the evaluation --------------------------------------------------------------------------------

def evaluate(records, make_decoder: Callable[[], Any], prompt_config, out: Path, *, settings: dict,
             group_by: Sequence[str] = (), fresh: bool = False, progress: bool = True,
             say: Callable[[str], None] = print) -> dict:
    """Decode what predictions.jsonl in `out` lacks (less what an earlier run found too long,
    `too_long_before`), score it, and summarise every record; returns the
    metrics (also written to metrics.json). `make_decoder()` gives a GreedyDecoder (its `batch_size` and
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
    raw = raw_objects(records) if set(group_by) - known else {}
    for name in set(group_by) - known:  # a typo would make one group of every image, "(none)"
        if not any(isinstance(obj, dict) and name in obj for obj in raw.values()):
            fields = sorted(known | {k for obj in raw.values() if isinstance(obj, dict) for k in obj})
            raise ValueError(f"--group-by {name}: no record of the data has a field {name!r} (fields: "
                             f"{', '.join(fields)})")
    by_source = {r.source: r for r in records}
    if len(todo) < len(records):
        say(f"resuming: {len(records) - len(todo)} of {len(records)} images already in {pred_path}"
            + (" or too long for max_length (metrics.json)" if too_long else ""))
    bar = None
    why = {source: "too_long" for source in too_long}  # of each record the pipeline left out
    runs = list(earlier.get("decoding") or [])
    if todo:
        decoder = make_decoder()
        started, decoded = time.perf_counter(), 0
        if progress:  # (after the loading, which says what it loads: not through a bar already drawn)
            from fxjax.train.metrics import ProgressBar  # tqdm on a terminal, else a line every tenth

            bar = ProgressBar(len(records), len(records) - len(todo), True, desc="eval", unit="image")
        cfg = dataclasses.replace(prompt_config, batch_size=decoder.batch_size)
        with open(pred_path, "a", encoding="utf-8") as f:
            for texts, metas in decoder.batches(DataPipeline(cfg, records=todo)):
                truths = [truth_of(m, groups_of(by_source[m["source"]], raw.get(m["source"]), group_by))
                          for m in metas]
                for row in detection_metrics.score_completions(texts, truths):
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
    (out / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
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


def _weights_identity(source: dict) -> dict:
    """What identifies the weights beyond their paths, so a resume notices an overwritten export: the
    adapter's files' sha256 (small), the size and mtime of the model directory's safetensors and JSON files
    (weights, index, config; hashing GBs would be slow). With --run the base model's, and the mtime of the
    step's checkpoint directory: a run does not rewrite a step, but one started again from scratch (its
    checkpoints moved away) writes a new one."""
    identity = {}
    step_dir = Path(source["run"]) / str(source["step"]) if source.get("run") and source.get("step") is not None \
        else None
    if step_dir is not None and step_dir.is_dir():
        identity["checkpoint_mtime_ns"] = step_dir.stat().st_mtime_ns
    if source.get("adapter"):
        adapter = Path(source["adapter"])
        identity["adapter_sha256"] = {f.name: _sha256(str(f)) for f in sorted(adapter.iterdir())
                                      if f.suffix in (".safetensors", ".json")}
    model = source.get("model") or source.get("base")
    if model and Path(model).is_dir():
        identity["model_files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                                   for f in sorted(Path(model).iterdir()) if f.suffix in (".safetensors", ".json")}
    return identity


def settings_of(args: argparse.Namespace, source: dict, data: dict, tokenizer: str) -> dict:
    """What decides the predictions, recorded and compared on resume: the weights, decoding, prompt settings,
    the tokenizer, the data files' contents and where their images are read from (predictions are keyed by
    file:line, so another --root would otherwise reuse answers about other images)."""
    from fxjax.train.export import PROMPT_SETTING_KEYS  # not at the top: --help imports no fxjax.train

    return {"model": {**source, **_weights_identity(source)}, "decoding": "greedy",
            "max_new_tokens": args.max_new_tokens,
            **{k: data[k] for k in PROMPT_SETTING_KEYS},
            "tokenizer": str(Path(tokenizer).resolve()),
            "images": {"root": str(Path(args.root).resolve()) if args.root else None, "format": args.format,
                       "allow_absolute_paths": bool(args.allow_absolute_paths)},
            "data": {str(Path(f).resolve()): _sha256(f) for f in args.data}}


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(f"fxjax eval: {text}", file=sys.stderr, flush=True)  # noqa: E731
    from fxjax.commands.model_args import check_model_arguments

    check_model_arguments(args)
    for f in args.data:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--data: {f} " + ("is a directory, not a JSONL file" if Path(f).is_dir()
                                                       else "is not a regular file" if Path(f).exists()
                                                       else "does not exist"))
    from fxjax.commands.data_check import check_root

    check_root(getattr(args, "root", None))
    for name in ("batch_size", "max_new_tokens", "limit", "max_image_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FileExistsError(f"--out: {args.out} is a file; give a directory for the predictions and metrics")
    require_writable(args.out, "--out")
    records, report = eval_records(args, say)
    steps = args.step if isinstance(args.step, list) else [args.step]
    detectors = [step_detector(args, step) for step in steps]
    if args.max_new_tokens is None:  # (the steps of one run: the longest any of them was evaluated with)
        args.max_new_tokens = max(d.max_new_tokens for d in detectors)
    settings = [settings_of(args, d.source, d.data, d.tokenizer) for d in detectors]  # (hashes the data: once)
    if len(detectors) > 1:
        from fxjax.commands.eval_steps import check_distinct_steps, evaluate_steps, step_folder

        check_distinct_steps(steps, [d.source["step"] for d in detectors])
        if not args.fresh:  # a folder that would refuse its step: said now, not after the steps before it ran
            for value, step_settings in zip(steps, settings):
                require_same_settings(Path(args.out) / step_folder(value), step_settings)
    args.batch_size = detectors[0].batch_size(args.batch_size, default=8)  # checked before any weights load
    out = Path(args.out)
    if len(detectors) == 1:
        summary = evaluate_detector(args, records, report, detectors[0], settings[0], out, say)
        from fxjax.detection_metrics import metrics_table

        print(metrics_table(summary))
        print(f"\nwrote {out / METRICS} and {out / PREDICTIONS} ({summary['examples']} images)")
        return 0
    return evaluate_steps(args, records, report, detectors, settings, steps, out, say)


def eval_records(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[list, Any]:
    """The records --data names (--root, --format, --on-error, --allow-absolute-paths, --max-image-pixels),
    the first --limit of them, and the load report (the skipped ones said)."""
    from fxjax.commands.data_check import quiet_logger
    from fxjax.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from fxjax.data.records import load_records

    with quiet_logger("fxjax.data.records"):  # (it logs each skipped record, and a summary: said once below)
        records, report = load_records(args.data, args.root, args.format, args.on_error,
                                       allow_absolute_paths=args.allow_absolute_paths,
                                       max_image_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)
    if report.skipped:
        say(f"{report.summary()}; skipped: " + "; ".join(str(e) for e in report.skipped))
    if not records:
        raise ValueError(f"no valid records in {', '.join(args.data)}: {report.summary()}")
    return (records[:args.limit] if args.limit else records), report


def step_detector(args: argparse.Namespace, step):
    """The detector of one of --step's values (or of --model / --adapter: step None)."""
    from fxjax.commands.model_args import resolve_detector

    return resolve_detector(argparse.Namespace(**{**vars(args), "step": step}))


def evaluate_detector(args, records, report, detector, settings: dict, out: Path, say, after=None) -> dict:
    """`evaluate` of one detector (`settings`: its `settings_of`) into `out` (its weights loaded only when
    something is left to decode; `after`: a loaded detector of another step of the run, whose model it
    reuses, `Detector.load`)."""
    def make_decoder():
        return detector.decoder(args.batch_size, args.max_new_tokens, after=after)

    summary = evaluate(records, make_decoder, prompt_data_config(args, detector.data, detector.tokenizer), out,
                       settings=settings, group_by=args.group_by, fresh=args.fresh, progress=args.progress, say=say)
    if report.skipped:
        summary["invalid_records"] = [str(e) for e in report.skipped]
        (out / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
