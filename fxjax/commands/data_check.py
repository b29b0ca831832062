"""`fxjax data check FILE.jsonl ...`: validate a dataset and describe it before training or evaluating on it.

Every record goes through the same validation as training (fxjax.data.records.load_records, in skip mode so
that all problems are found in one run), then the valid ones are described: label balance, regions per
generated image, image sizes and, with a tokenizer, token lengths as training would build them
(fxjax.data.examples.ExampleBuilder.text: same prompts, image-token count and target, no image decoding).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator, Sequence

from fxjax.commands.arg_types import positive_int
from fxjax.commands.training import relative_to_config_hint

_DESCRIPTION = """\
Validate a JSONL dataset (native or ms-swift, e.g. the FakeXplain release) exactly as training and
evaluation read it, and describe it.

Prints:
  * record counts: valid and invalid (by kind of problem);
  * label balance (real / generated), data formats and generators;
  * regions per generated image;
  * an image-size histogram (longer side, original pixels);
  * a token-length histogram (prompt + image tokens + target, as SFT builds it), when --tokenizer is
    given; without it that histogram is skipped with a note;
  * warnings about valid records: keys that look misspelt ('reason' for 'reasoning'), images used by more
    than one record (labelled both ways: a contradiction) or in more than one file (a train/test leak),
    an image being its file's content (a copy under another name is the same image), and an id given to
    records of other images in one file;
  * the invalid records as FILE:LINE: [kind] what is wrong (the first --show of each kind; --show all
    lists every one).

With --config (an `fxjax sft` or `fxjax grpo` config) it checks that run's data: its train and eval files
(unless FILEs are given), its tokenizer, pixel limits, max_length, prompts (data.system_prompt,
data.user_prompt) and, for GRPO, the prompt lengths the policy starts from.

Image paths are relative to the JSONL file's folder (or --root); absolute paths, and symbolic links out
of the root, are refused unless --allow-absolute-paths is given. The record formats: docs/data.md (`fxjax
docs data` prints it)."""

_EPILOG = """\
exit status:
  0  every record is valid
  1  at least one record is invalid (the first --show of each kind listed), or (with a tokenizer) every valid one is too
     long for max_length whatever training cuts: nothing would train
  2  the check could not run (a missing or empty file, a bad option, a missing tokenizer)

examples:
  fxjax data check data/FakeXplain/train.jsonl --tokenizer runs/model --max-pixels 1003520
  fxjax data check --config configs/recipes/paper_3b_sft.yaml --set model.path=/models/Qwen2.5-VL-3B"""

_BAR_WIDTH = 40


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools (check: validate a JSONL dataset and describe it)",
                                 description="Dataset tools. `fxjax data check FILE.jsonl` validates a dataset "
                                             "and prints counts, label balance and histograms.")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = actions.add_parser("check", help="validate a JSONL dataset; print counts, histograms and every invalid "
                                         "record", description=_DESCRIPTION, epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", metavar="FILE.jsonl",
                   help="dataset files (native or ms-swift JSONL; default with --config: its train and eval files)")
    p.add_argument("--config", metavar="YAML",
                   help="an `fxjax sft` or `fxjax grpo` config: check its data.train_files and data.eval_files "
                        "(or the FILEs given) with its data settings and tokenizer, as that run reads them "
                        "(GRPO: prompt lengths); the options below override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: override a config value, as the training command's --set (repeatable)")
    p.add_argument("--kind", choices=("sft", "grpo"),
                   help="with --config: read the data as that command does (GRPO: prompts without their answers; "
                        "default: grpo for a config with a grpo or stages section, else sft)")
    p.add_argument("--root", metavar="DIR",
                   help="folder the image paths are relative to (default: each JSONL file's folder)")
    p.add_argument("--format", choices=("auto", "native", "swift"),
                   help="record format (default: auto, per record: a 'messages' key means ms-swift; with "
                        "--config, its data.format)")
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept absolute image paths and symbolic links out of the dataset root (only for a "
                        "dataset you trust; refused by default)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="model or tokenizer directory with tokenizer.json (e.g. what `fxjax init` writes); "
                        "needed for the token-length histogram")
    p.add_argument("--min-pixels", type=positive_int, metavar="N",
                   help="smallest model-input image area, as data.min_pixels (default: the pipeline's)")
    p.add_argument("--max-pixels", type=positive_int, metavar="N",
                   help="largest model-input image area, as data.max_pixels; sets the image-token count "
                        "(default: the pipeline's)")
    p.add_argument("--max-length", type=positive_int, metavar="N",
                   help="count the examples longer than N tokens, as data.max_length (default: the pipeline's)")
    p.add_argument("--long-images", choices=("shrink", "drop"),
                   help="an image whose tokens leave the example over max_length, as data.long_images: shrink "
                        "(resized to fit; the default) or drop")
    p.add_argument("--prompts", choices=("auto", "templates"),
                   help="prompts for the token lengths: auto (ms-swift records keep their own; the default) or "
                        "templates")
    p.add_argument("--max-image-pixels", type=positive_int, metavar="N",
                   help="refuse images of more pixels than this, before decoding them (a decompression-bomb "
                        "guard; default: --config's data.max_image_pixels, else 89478485, PIL's)")
    p.add_argument("--no-decode", action="store_true",
                   help="read image headers only: faster, but an image whose body is corrupt passes")
    p.add_argument("--bins", type=positive_int, default=10, metavar="N", help="bars per histogram (default: 10)")
    p.add_argument("--threads", type=positive_int, default=8, metavar="N", help="threads opening images (default: 8)")
    p.add_argument("--show", type=_shown, default=SHOWN_PER_KIND, metavar="N|all",
                   help=f"invalid records listed per kind of problem (default: {SHOWN_PER_KIND}; `all` lists every "
                        "one): the counts by kind always cover all of them")
    p.set_defaults(func=run)


SHOWN_PER_KIND = 20  # = LOGGED_PER_KIND of fxjax/data/records.py (a test says so), not imported: `--help` loads no PIL


def _shown(text: str) -> int | None:
    """--show: a count of at least 1, or "all" (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a count of at least 1 or `all`, got {text!r}")
    return int(text)


def check_root(root: str | None) -> None:
    """--root (of data check and eval) names a folder: else every record's image read as "missing"."""
    if root is not None and not Path(root).is_dir():
        raise NotADirectoryError(f"--root: {root} " + ("is a file, not a folder" if Path(root).exists()
                                                       else "does not exist"))


@contextlib.contextmanager
def quiet_logger(logger_name: str) -> Iterator[None]:
    """The loader logs each skipped record; this command prints them itself, once."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _bars(rows: Sequence[tuple[str, int]], total: int | None = None) -> list[str]:
    """Text bars, one per (label, count); with ``total``, the share of it too."""
    top = max((n for _, n in rows), default=0) or 1
    label_width = max((len(label) for label, _ in rows), default=0)
    count_width = max((len(str(n)) for _, n in rows), default=1)
    lines = []
    for label, n in rows:
        bar = "#" * max(1 if n else 0, round(_BAR_WIDTH * n / top))
        share = f" {100 * n / total:5.1f}%" if total else ""
        lines.append(f"  {label:>{label_width}}  {n:>{count_width}}{share}  {bar}")
    return lines


def _histogram(values: Sequence[int], bins: int) -> list[str]:
    """Integer values: one bar per value when there are few, else ``bins`` ranges of whole numbers."""
    import numpy as np

    values = np.asarray(values, np.int64)
    distinct = np.unique(values)
    if len(distinct) <= bins:
        return _bars([(str(v), int((values == v).sum())) for v in distinct])
    edges = np.unique(np.round(np.linspace(values.min(), values.max() + 1, bins + 1)).astype(np.int64))
    counts, _ = np.histogram(values, edges)
    return _bars([(f"{a}-{b - 1}", int(n)) for a, b, n in zip(edges[:-1], edges[1:], counts)])


def _summary(values: Sequence[int]) -> str:
    import numpy as np

    return f"min {min(values)}, median {int(np.median(values))}, max {max(values)}"


def _describe_records(records, bins: int) -> list[str]:
    from collections import Counter

    out = []
    labels = Counter(r.label for r in records)
    out += ["", "labels:", *_bars([(k, labels.get(k, 0)) for k in ("real", "generated")], len(records))]
    formats = Counter(r.format for r in records)
    out.append("formats: " + ", ".join(f"{k} {n}" for k, n in sorted(formats.items())))
    generators = Counter(r.generator for r in records if r.generator)
    if generators:
        out.append(f"generators ({len(generators)}): " + ", ".join(f"{k} {n}" for k, n in generators.most_common()))
    regions = [len(r.regions) for r in records if r.label == "generated"]
    if regions:
        out += ["", f"regions per generated image: mean {sum(regions) / len(regions):.2f}, {_summary(regions)}",
                *_histogram(regions, bins)]
    sides = [max(r.width, r.height) for r in records]
    smallest = min(records, key=lambda r: r.width * r.height)
    largest = max(records, key=lambda r: r.width * r.height)
    out += ["", f"image size, longer side in pixels: {_summary(sides)} (smallest {smallest.width}x{smallest.height}, "
                f"largest {largest.width}x{largest.height}, width x height)", *_histogram(sides, bins)]
    return out


def _by_label(records) -> str:
    from collections import Counter

    labels = Counter(r.label for r in records)
    return ", ".join(f"{k} {labels[k]}" for k in ("real", "generated") if labels[k])


def _describe_tokens(records, cfg, bins: int) -> tuple[list[str], int, list[str]]:
    """(the token-length lines, how many records training drops whatever it cuts: GRPO prompts over
    max_length, SFT examples whose prompt alone reaches it; the SFT records training refuses, whose boxes
    are under a pixel at the model's input)."""
    from fxjax.data.examples import ExampleBuilder, empty_written_box

    builder = ExampleBuilder(cfg, len(records))
    prompts_only = cfg.mode == "prompt"  # GRPO: the prompt is the example; the policy writes the rest
    totals, image_tokens, prompt_over, empty_boxes, shrunk, over = [], [], [], [], [], []
    for record in records:
        text = builder.text(record)
        if not prompts_only and empty_written_box(text.boxes) is not None:
            empty_boxes.append(record.source)
        totals.append(len(text.prompt_ids) + (0 if prompts_only else len(builder.completion_ids(text.target))))
        image_tokens.append(text.num_image_tokens)
        if text.shrunk_from:
            shrunk.append(record)
        if totals[-1] > cfg.max_length:
            over.append(record)
        if len(text.prompt_ids) >= cfg.max_length:  # (no room for one target token: dropped whatever is cut)
            prompt_over.append(record.source)
    what = "prompt + image tokens (GRPO prompts)" if prompts_only else "prompt + image tokens + target"
    consequence = ": GRPO drops them" if prompts_only else ": training truncates their reasoning or drops them"
    lines = ["", f"token length ({what}; min_pixels {cfg.min_pixels}, max_pixels {cfg.max_pixels}): "
                 f"{_summary(totals)}",
             f"  image tokens per image: {_summary(image_tokens)}"]
    if shrunk:
        lines.append(f"  images shrunk below max_pixels to fit max_length {cfg.max_length} (data.long_images: "
                     f"shrink): {len(shrunk)} ({_by_label(shrunk)}; e.g. {shrunk[0].source}); the lengths here are "
                     "at the shrunk sizes")
    lines.append(f"  over max_length {cfg.max_length}: {len(over)}"
                 + (f" ({_by_label(over)}){consequence}" if over else ""))
    if empty_boxes:
        lines.append(f"  boxes under a pixel at the model's input: {len(empty_boxes)} record(s), which training "
                     f"refuses (data.on_error: skip leaves them out; e.g. {empty_boxes[0]}; all listed below): raise "
                     f"data.max_pixels or fix the boxes")
    if prompt_over and not prompts_only:
        lines.append(f"  of them {len(prompt_over)} whose prompt with its image tokens alone reaches max_length, so "
                     f"training drops them whatever it cuts (e.g. {prompt_over[0]}): "
                     + ("lower data.max_pixels (--max-pixels) or raise data.max_length" if cfg.long_images == "drop"
                        else "raise data.max_length, or lower data.min_pixels (shrinking stops there)"))
    return lines + _histogram(totals, bins), len(over) if prompts_only else len(prompt_over), empty_boxes


def _describe_image_tokens(records, cfg) -> list[str]:
    """Without a tokenizer: the images whose tokens alone reach max_length (training shrinks or drops them)."""
    from fxjax.image_processing import image_tokens, model_input_size

    def tokens(record) -> int:
        return image_tokens(*model_input_size(record.height, record.width, cfg.min_pixels, cfg.max_pixels))

    large = [r for r in records if tokens(r) >= cfg.max_length]
    if not large:
        return []
    fate = ("training shrinks them to fit (data.long_images: shrink)" if cfg.long_images == "shrink" else
            "training drops them (data.long_images: drop; `shrink` resizes them to fit)")
    return [f"  images whose tokens at max_pixels {cfg.max_pixels} alone reach max_length {cfg.max_length}: "
            f"{len(large)} ({_by_label(large)}; e.g. {large[0].source}, {large[0].width}x{large[0].height}, "
            f"{tokens(large[0])} tokens): {fate}"]


def _config_data(path: str, overrides: list[str], kind: str | None = None, files: Sequence[str] = ()):
    """(the DataConfig a training config's run reads its data with, its train + eval files, "sft" or "grpo").

    kind: how the run reads its data (None: "grpo" for a config with a grpo or stages section, in the file
    or a --set, else "sft"). files: the FILEs given, which stand in for data.train_files (the shipped
    configs leave it empty). A data check needs no run length: an SFT config without train.steps or
    train.epochs (the shipped sft's) is checked all the same."""
    import json

    from fxjax.config_mapping import dotted_keys
    from fxjax.grpo_config import load_grpo_config
    from fxjax.run_files import saved_run_kind
    from fxjax.train import grpo, sft
    from fxjax.train_config import load_sft_config, read_yaml_config

    raw = read_yaml_config(path)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    sections = {re.split(r"[.\[]", key, maxsplit=1)[0] for key in given}  # (stages[1].steps: "stages")
    own = saved_run_kind(set(raw) | sections)
    if kind == "sft" and own == "grpo":
        raise ValueError(f"--kind sft: {path} is a GRPO config (it has a grpo or stages section): leave --kind out, "
                         "or give an SFT config")
    kind = kind or own
    extra = [f"data.train_files={json.dumps(list(files))}"] if files else []
    if kind == "grpo" and own == "sft":  # (an SFT config's run length: GRPO's comes from its stages)
        extra += ["train.steps=null", "train.epochs=null"]
    lengths = {key for key, value in dotted_keys(raw).items() if value is not None} | {
        key for key, _, value in (o.partition("=") for o in overrides) if value.strip() not in ("", "null", "~")}
    if kind == "sft" and not {"train.steps", "train.epochs"} & {key.strip() for key in lengths}:
        extra.append("train.steps=1")  # (the data check trains nothing)
    if kind == "grpo":
        cfg, data_config = load_grpo_config(path, [*overrides, *extra]), grpo.data_config
    else:
        cfg, data_config = load_sft_config(path, [*overrides, *extra]), sft.data_config
    return data_config(cfg), (*cfg.data.train_files, *cfg.data.eval_files), kind


def _data_config(args: argparse.Namespace):
    """The DataConfig to check with: the training config's (--config) or the pipeline's defaults, with the
    options given on top; and the files to check."""
    import dataclasses

    from fxjax.data.config import DataConfig

    options = {k: v for k, v in dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                     max_length=args.max_length, max_image_pixels=args.max_image_pixels,
                                     root=args.root, format=args.format, prompts=args.prompts,
                                     long_images=args.long_images,
                                     tokenizer=args.tokenizer).items() if v is not None}
    if args.allow_absolute_paths:
        options["allow_absolute_paths"] = True
    if args.no_decode:
        options["check_decode"] = False
    if args.config is None:
        if args.set:
            raise ValueError("--set overrides values of --config; give the config")
        if args.kind:
            raise ValueError("--kind says how --config's run reads its data; give the config")
        if not args.files:
            raise ValueError("give the dataset files to check, or --config with a training config")
        # DataConfig validates the options and supplies the pipeline's defaults for those not given.
        base, files = DataConfig(data_files=tuple(args.files), tokenizer=""), tuple(args.files)
    else:
        base, config_files, args.kind = _config_data(args.config, args.set, args.kind, args.files)
        files = tuple(args.files) or config_files
    check_root(args.root)
    for file in files:  # (load_records's own error names the file only)
        if not Path(file).exists() and relative_to_config_hint(file, args.config):
            raise FileNotFoundError(f"dataset file {file} does not exist{relative_to_config_hint(file, args.config)}")
    return dataclasses.replace(base, data_files=files, **options)


def _invalid_lines(errors, shown: int | None) -> list[str]:
    """One line per invalid record, in file order, up to `shown` of each kind (None: all), then how many of
    each kind were left out: 10,000 records of a wrong --root printed 10,000 lines, 1.2 MB."""
    from fxjax.data.records import first_of_each_kind, left_out_note

    listed, left = first_of_each_kind(errors, shown)
    lines = [f"  {e.where}: [{e.kind}] {e.problem}" for e in listed]
    if left:
        lines.append(f"  ... and {left_out_note(left)}: --show all lists every one")
    return lines


def run(args: argparse.Namespace) -> int:
    from fxjax.data.records import load_records
    from fxjax.train_config import config_read

    cfg = _data_config(args)
    from fxjax.data.tokenizer import tokenizer_json

    if cfg.tokenizer and tokenizer_json(cfg.tokenizer) is None:
        # before every image is read and decoded, which can take minutes
        source = ("--tokenizer" if args.tokenizer else "the config's data.tokenizer, else its model.path")
        what = "does not exist" if not Path(cfg.tokenizer).exists() else "holds no tokenizer.json"
        raise FileNotFoundError(f"tokenizer: {cfg.tokenizer} {what} ({source})")
    with quiet_logger("fxjax.data.records"):
        records, report = load_records(cfg.data_files, cfg.root, cfg.format, on_error="skip",
                                       check_decode=cfg.check_decode, max_image_pixels=cfg.max_image_pixels,
                                       num_threads=args.threads, allow_absolute_paths=cfg.allow_absolute_paths)
    invalid = len(report.skipped)
    read = f": {config_read(args.config)}" if args.config and config_read(args.config) else ""
    lines = [f"fxjax data check: {', '.join(cfg.data_files)}"
             + (f" (as `fxjax {args.kind} --config {args.config}` reads them{read})" if args.config else ""),
             f"records: {report.lines}, valid {len(records)}, invalid {invalid}"]
    if invalid:
        lines.append("  invalid by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(report.counts().items())))
    unusable = 0  # valid records that training would drop all the same (too long whatever it cuts)
    refused = []  # valid records that SFT refuses (boxes under a pixel at the model's input)
    if records:
        lines += _describe_records(records, args.bins)
        if cfg.tokenizer:
            token_lines, unusable, refused = _describe_tokens(records, cfg, args.bins)
            lines += token_lines
        else:
            lines += ["", "token length: skipped (give --tokenizer DIR, a directory with tokenizer.json such as "
                          "`fxjax init` writes)", *_describe_image_tokens(records, cfg)]
            if cfg.mode == "sft":  # (the boxes at max_pixels need no tokenizer; shrinking for max_length does)
                from fxjax.data.examples import box_tiny_at_max_pixels

                refused = [r.source for r in records if box_tiny_at_max_pixels(r, cfg) is not None]
    from fxjax.commands.dataset_warnings import coco_warning, dataset_warnings

    warnings = dataset_warnings(records, report.hints, threads=args.threads) + coco_warning(report.skipped, records)
    if warnings:
        lines += ["", f"warnings ({len(warnings)}; the records are valid, but check these):"]
        lines += [f"  {w}" for w in warnings]
    if invalid:
        lines += ["", f"invalid records ({invalid}):", *_invalid_lines(report.skipped, args.show)]
        if report.counts().get("image_missing") == report.lines:
            relative_to = f"--root {cfg.root}" if cfg.root else "the folder of each file (no --root)"
            lines.append(f"  no record's image was found: their paths are read relative to {relative_to}; is that "
                         "where the images are? (--root DIR, or data.root)")
    if refused:
        lines += ["", f"records training refuses ({len(refused)}; valid as records, their boxes under a pixel at the "
                      f"model's input) [box_tiny]:"]
        lines += [f"  {where}" for where in refused]
    nothing_left = bool(records) and unusable == len(records)  # (valid, every one, yet nothing to train on)
    failed = invalid or nothing_left or refused
    lines += ["", f"{'FAILED' if failed else 'OK'}: {invalid} of {report.lines} records invalid"
              + (f"; training refuses {len(refused)} more (box_tiny, above)" if refused else "")
              + (f"; training would drop every valid one ({unusable}) as too long for max_length {cfg.max_length}"
                 if nothing_left else "")
              + (f"; {len(warnings)} warning(s) above" if warnings else "")]
    print("\n".join(lines))
    return 1 if failed else 0
