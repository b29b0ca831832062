"""`fxjax eval`: the detector's metrics on a labelled test set, resumable, with one prediction per image.

    records -> (not yet in predictions.jsonl) -> prompt batches -> greedy decoding with the KV cache
      -> rewards parser and scoring (fxjax.detection_metrics) -> predictions.jsonl (appended per batch)
      -> metrics.json + a table

The decoding is `fxjax.train.inference.GreedyDecoder` (the training-time evaluation's); the prompts are
built exactly as SFT built them (fxjax.data: same templates and seed, or an ms-swift record's own prompt).
This module is the command (its arguments, the records, the detector, several steps); the folder it fills
and the evaluation itself are fxjax.commands.eval_folder's.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fxjax.commands.arg_types import positive_int
from fxjax.commands.eval_folder import METRICS, PREDICTIONS, evaluate_detector, require_same_settings
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
                     within --max-new-tokens), original_size and model_size as [height, width] (the order
                     fxjax.rewards.parse_completion takes; `fxjax detect --json` writes [width, height])
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
prompts, max new tokens, data files) are refused unless --fresh.

From Python: fxjax.evaluate.evaluate(DATA, out=..., run=..., step=...), these options as keywords; it returns
metrics.json (for several steps, one per step)."""

EPILOG = """\
examples:
  fxjax eval --run runs/sft --data data/test.jsonl --out runs/sft/eval
  fxjax eval --run runs/grpo --step beta --data data/test.jsonl --out runs/grpo/eval-beta   # after stage beta
  fxjax eval --run runs/grpo --step alpha beta gamma --data data/test.jsonl --out runs/grpo/eval   # each stage
  fxjax eval --model runs/merged --data FakeXplain/test.jsonl --batch-size 16 --max-new-tokens 1024
  fxjax eval --model Qwen2.5-VL-3B --adapter runs/adapter --data test.jsonl --limit 100 --group-by generator"""


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
    g.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N valid records only (the images after them are not opened)")
    add_image_limit_argument(g)
    g.add_argument("--group-by", nargs="*", default=["generator"], metavar="FIELD",
                   help="break the metrics down by these fields: the generator, regions (their number), or "
                        "any top-level key of the JSONL records (default: generator; --group-by alone: no "
                        "breakdown)")
    add_prompt_arguments(p)
    g = p.add_argument_group("decoding and output")
    g.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="prompts decoded together, a multiple of the mesh's data x fsdp devices (default: 8, "
                        "rounded up to such a multiple)")
    g.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="longest completion in tokens (default: the run's eval.max_new_tokens, with --run or as its "
                        "export recorded it (fxjax_export.json), else 1024); a longer one is cut and usually fails "
                        "the format check")
    g.add_argument("--out", default="eval", metavar="DIR",
                   help="output folder: predictions.jsonl, metrics.json, settings.json (default: ./eval)")
    g.add_argument("--fresh", "--overwrite", action="store_true",
                   help="discard predictions already in --out and start over (--overwrite, as other commands spell it)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def parse_eval_args(argv: Sequence[str]) -> argparse.Namespace:
    """`fxjax eval ARGV` as the command reads it (its defaults, its checks of each option), for a caller in
    Python: the demo's phases, bench/demo_policy.py."""
    parser = argparse.ArgumentParser(prog="fxjax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


# ---- what made the predictions (settings.json) ------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def settings_of(args: argparse.Namespace, source: dict, data: dict, tokenizer: str,
                records_key: dict) -> dict:
    """What decides the predictions, recorded and compared on resume: the weights, decoding, prompt settings,
    the tokenizer, the data files' contents and where their images are read from (predictions are keyed by
    file:line, so another --root would otherwise reuse answers about other images), and `records_key`, the
    fingerprint of every record loaded, in order (`eval_records`): a record's prompt template is drawn by its
    place among them, so the files in another order, or other records skipped (--on-error skip, another
    --max-image-pixels), prompt the same image otherwise."""
    from fxjax.train.export import PROMPT_SETTING_KEYS  # not at the top: --help imports no fxjax.train

    return {"model": {**source, **_weights_identity(source)}, "decoding": "greedy",
            "max_new_tokens": args.max_new_tokens,
            **{k: data[k] for k in PROMPT_SETTING_KEYS},
            "tokenizer": str(Path(tokenizer).resolve()),
            "images": {"root": str(Path(args.root).resolve()) if args.root else None, "format": args.format,
                       "allow_absolute_paths": bool(args.allow_absolute_paths)},
            "data": {str(Path(f).resolve()): _sha256(f) for f in args.data}, "records": records_key}


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
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FileExistsError(f"--out: {args.out} is a file; give a directory for the predictions and metrics")
    require_writable(args.out, "--out")
    from fxjax.commands.eval_steps import step_folder
    from fxjax.train.run_lock import locked_eval_folders

    steps = args.step if isinstance(args.step, list) and len(args.step) > 1 else []
    # (one eval at a time in a folder, or in a step's folder of it: they mixed their predictions)
    with locked_eval_folders([args.out, *(Path(args.out) / step_folder(value) for value in steps)], say):
        return _evaluate(args, say)


def _evaluate(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """`run` once its options are checked and --out is locked."""
    records, report, records_key = eval_records(args, say)
    steps = args.step if isinstance(args.step, list) else [args.step]
    detectors = [step_detector(args, step) for step in steps]
    if args.max_new_tokens is None:  # (the steps of one run: the longest any of them was evaluated with)
        args.max_new_tokens = max(d.max_new_tokens for d in detectors)
    # (hashes the data once)
    settings = [settings_of(args, d.source, d.data, d.tokenizer, records_key) for d in detectors]
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
        n = summary["examples"]
        print(f"\nwrote {out / METRICS} and {out / PREDICTIONS} ({n} image{'s' * (n != 1)})")
        return 0
    return evaluate_steps(args, records, report, detectors, settings, steps, out, say)


def eval_records(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[list, Any, dict]:
    """The records --data names (--root, --format, --on-error, --allow-absolute-paths, --max-image-pixels),
    the first --limit of them (the images after them not opened), the load report (the skipped ones said),
    and the fingerprint of every record loaded (`settings_of`'s `records_key`; those after --limit's counted
    as valid: another --limit resumes the same folder)."""
    from fxjax.commands.data_check import quiet_logger
    from fxjax.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from fxjax.data.pipeline import records_fingerprint
    from fxjax.data.records import LOGGED_PER_KIND, first_of_each_kind, left_out_note, load_records

    with quiet_logger("fxjax.data.records"):  # (it logs each skipped record, and a summary: said once below)
        records, report = load_records(args.data, args.root, args.format, args.on_error,
                                       allow_absolute_paths=args.allow_absolute_paths,
                                       max_image_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
                                       limit=args.limit)
    if report.skipped:  # (every one in metrics.json's invalid_records; a wrong --root makes thousands)
        named, left = first_of_each_kind(report.skipped, LOGGED_PER_KIND)
        say(f"{report.summary()}; skipped: " + "; ".join(str(e) for e in named)
            + (f"; and {left_out_note(left)}, named in {METRICS}'s invalid_records" if left else ""))
    if not records:
        raise ValueError(f"no valid records in {', '.join(args.data)}: {report.summary()}")
    return records, report, records_fingerprint(records, report.unchecked)


def step_detector(args: argparse.Namespace, step):
    """The detector of one of --step's values (or of --model / --adapter: step None)."""
    from fxjax.commands.model_args import resolve_detector

    return resolve_detector(argparse.Namespace(**{**vars(args), "step": step}))
