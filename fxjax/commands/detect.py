"""`fxjax detect IMAGE...`: run the detector on one's own images; verdict, regions, tags and an overlay each.

    images -> checked (size limits, EXIF orientation) -> prompt batches as SFT built them -> greedy decoding
      -> rewards parser, boxes scaled from the model's resized input back to the original image's pixels
      -> printed (text or JSON lines) + <out>/<name>.detect.png (boxes and captions drawn on the original)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fxjax.commands.arg_types import positive_int
from fxjax.commands.model_args import add_image_limit_argument, add_model_arguments, add_prompt_arguments
from fxjax.file_modes import require_writable

HELP = "run the detector on your own images: verdict, grounded regions, tags and an overlay PNG each"

DESCRIPTION = """\
Run a detector on images (PNG, JPEG, WebP, BMP, GIF, TIFF) of any size and mode the image processor takes
(aspect ratio up to 200; RGB, grey, palette, CMYK, with alpha: composited on white, as Qwen2.5-VL's
processor does; EXIF orientation applied; 16-bit and float images are reported, not analysed: the
processor's RGB conversion would clip them: 16-bit to white, float to black). An image whose tokens at
max_pixels would not fit in max_length beside the prompt (a 12 MP phone photo at Qwen's max_pixels is
15552 tokens, over the default max_length 8192) is analysed at the largest size that fits, with a note;
smaller images are untouched. For each image it prints
  * the verdict (real / generated),
  * the regions the model grounded: caption and box [x1, y1, x2, y2] in the ORIGINAL image's pixels (the
    model answers in the pixels of its resized input; the boxes are scaled back per axis),
  * the image-level tags,
and writes an overlay PNG to --out: the boxes and captions drawn on the original image (in DejaVu Sans:
Latin, Greek, Cyrillic and common symbols; not CJK), the verdict in the top-left corner. An answer that
does not parse (no <verdict>real|generated</verdict>) is printed raw with a note; it is never an error.
An image that cannot be read is reported and the others go on. From Python: fxjax.detector.ImageDetector.

With --json, one JSON object per image and line instead: image, size [w, h], model_size [w, h] (the
resized input), verdict, regions [{caption, box (original pixels), box_model}], tags, parsed, note,
truncated (the answer hit --max-new-tokens), overlay, completion; for an image that cannot be read
(missing, a directory, not an image): image, error."""

EPILOG = """\
exit status: 0 every image was analysed; 1 some image could not be read (the others are reported); 2 bad
options or model.

examples:
  fxjax detect photo.jpg scan.png --model export/merged     # an `fxjax export` merged model
  fxjax detect shots/*.jpg --run runs/grpo --out overlays --json > detections.jsonl"""


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files: PNG, JPEG, WebP, BMP, GIF or TIFF")
    add_model_arguments(p)
    add_prompt_arguments(p)
    p.add_argument("--out", default="detections", metavar="DIR",
                   help="folder for the overlay PNGs, <image name>.detect.png (default: ./detections); an "
                        "earlier run's overlay of the same name is replaced")
    p.add_argument("--no-overlay", dest="overlay", action="store_false", help="write no overlay PNGs")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per image and line (its 'index': the image's place among those "
                        "given, from 0; unreadable images first, the others as their batches finish)")
    p.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="images decoded together, a multiple of the mesh's data x fsdp devices (default: 4, "
                        "rounded up to such a multiple)")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="longest answer in tokens (default: the run's eval.max_new_tokens, with --run or as "
                        "its export recorded it (fxjax_export.json), else 1024)")
    add_image_limit_argument(p)
    p.set_defaults(func=run)


def detect_prompt(data: dict) -> dict[str, str]:
    """The system and user prompt for a user's images, from a detector's prompt settings: the ones given or
    trained with, else the built-in system prompt and the first template."""
    from fxjax.data.prompts import serving_prompt

    return serving_prompt(data["system_prompt"], data["user_prompt"])


def own_prompts_note(data: dict, system_given: bool, user_given: bool) -> str | None:
    """A note when the run trained on ms-swift records that carry their own prompts (data.prompts other
    than 'templates': SFT kept each record's system and user text) and the command line does not give
    both: detect then sends prompts such a model never trained with. None otherwise (its train files
    are not here, or not ms-swift). An export names its run's ms-swift train files (`own_prompt_files`), as
    the serving machine may not have them."""
    from fxjax.data.formats import file_starts_with_swift_record

    if data["prompts"] == "templates" or (system_given and user_given):
        return None
    swift = list(data.get("own_prompt_files") or
                 [f for f in data.get("train_files", ()) if file_starts_with_swift_record(f)])
    if not swift:
        return None
    return (f"the run trained on ms-swift records with their own prompts ({', '.join(swift)}; data.prompts "
            f"{data['prompts']!r}), which detect does not know: pass --system-prompt and --user-prompt with "
            "the texts those records carry")


def fitting_max_pixels(max_pixels: int, max_length: int, prompt_tokens: int) -> int:
    """The largest max_pixels whose image tokens (one per 28 x 28 pixels) fit in max_length beside the
    prompt's `prompt_tokens` text tokens, or `max_pixels` when that is smaller.

    Qwen's max_pixels (12845056, 16384 image tokens) admits images that max_length 8192 does not: a phone
    photo of 4032 x 3024 is 15552 tokens at it. Such an image could never have been a training example
    either (the pipeline drops it), so detect shrinks it to the largest size that fits rather than
    refusing it; smaller images are untouched (smart_resize only shrinks above max_pixels)."""
    from fxjax.image_processing import PIXELS_PER_TOKEN

    budget = max_length - prompt_tokens
    if budget < 4:
        raise ValueError(f"max_length {max_length} leaves no room for an image beside the prompt's "
                         f"{prompt_tokens} tokens")
    return min(max_pixels, budget * PIXELS_PER_TOKEN)


def image_records(paths: Sequence[str], *, system: str, user: str, min_pixels: int, max_pixels: int,
                  max_image_pixels: int | None = None, fit_pixels: int | None = None,
                  max_length: int | None = None) -> tuple[list, list[tuple[str, str]], list[tuple[str, str]]]:
    """(Records the prompt pipeline takes, [(path, why)] of the images that cannot be used, [(path, note)]
    of the images shrunk below max_pixels to fit `max_length`: `fit_pixels`, from `fitting_max_pixels`; and
    of files of several frames, analysed on the first as transformers' processor does).

    A user's image has no label; the records carry the prompt as an ms-swift record does (its own system
    and user text), so every image gets the same prompt. Their `label` is a placeholder that prompt-mode
    examples never use."""
    from fxjax.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, image_size
    from fxjax.data.records import Record
    from fxjax.image_processing import PIXELS_PER_TOKEN, model_input_size

    records, failed, shrunk = [], [], []
    for path in paths:
        if Path(path).is_dir():  # (image_size would call it "not a file", reported as no such file)
            failed.append((path, f"a directory, not an image file (its images: {Path(path) / '*'})"))
            continue
        try:
            width, height = image_size(path, max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS, True)
            mh, mw = model_input_size(height, width, min_pixels, max_pixels)  # the processor's own checks
            fh, fw = (mh, mw) if fit_pixels is None else \
                model_input_size(height, width, min(min_pixels, fit_pixels), fit_pixels)
            if (fh, fw) != (mh, mw):  # (a long thin image goes over max_pixels, as in HF, and may fit all the same)
                shrunk.append((path, f"at max_pixels {max_pixels} it would be {mw}x{mh} at the model's input "
                                     f"({mh * mw // PIXELS_PER_TOKEN} image tokens), more than max_length {max_length} allows; "
                                     f"analysed at {fw}x{fh} ({fh * fw // PIXELS_PER_TOKEN} image tokens; --max-pixels, "
                                     f"--max-length)"))
            frames = _frame_count(path)
            if frames > 1:
                shrunk.append((path, f"{frames} frames (an animation or a multi-page file): analysed on the "
                                     f"first, as transformers' processor does"))
        except FileNotFoundError:  # (also raised for an existing path that is not a regular file)
            failed.append((path, "no such file" if not Path(path).exists() else
                           "not a regular file (a pipe, socket or device): save the image to a file first"))
            continue
        except (OSError, ValueError, SyntaxError, ImageError) as err:
            failed.append((path, str(err) or type(err).__name__))
            continue
        records.append(Record(index=len(records), source=str(path), record_id=str(path),
                              image=str(Path(path).resolve()), width=width, height=height, label="real",
                              format="swift", system=system, user=user, assistant=""))
    return records, failed, shrunk


def _frame_count(path) -> int:
    import warnings

    from PIL import Image

    with warnings.catch_warnings():  # (the size limit was applied when the image was first opened)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))


def describe(text: str, meta: dict) -> dict[str, Any]:
    """One image's answer: verdict, regions with boxes in original pixels, tags, and a note when it did not parse."""
    from fxjax import rewards

    parsed = rewards.parse_completion(text, original_size=meta["original_size"], model_size=meta["model_size"])
    regions = [{"caption": c, "box": list(orig), "box_model": list(box)}
               for c, box, orig in zip(parsed.captions, parsed.boxes, parsed.boxes_original or ())]
    notes = []
    if parsed.label is None:
        notes.append("the answer has no <verdict>real</verdict> or <verdict>generated</verdict>"
                     + (f" (its verdict is {parsed.verdict!r})" if parsed.verdict is not None else "")
                     + "; shown raw")
    if parsed.skipped:
        notes.append(f"{len(parsed.skipped)} region(s) with a box that is not [x1, y1, x2, y2] were left out")
    if meta.get("truncated"):
        notes.append(f"the answer stopped at --max-new-tokens ({meta['completion_tokens']} tokens) before its "
                     f"end; raise it")
    (oh, ow), (mh, mw) = meta["original_size"], meta["model_size"]
    return {"image": meta["source"], "size": [ow, oh], "model_size": [mw, mh], "verdict": parsed.label,
            "regions": regions, "tags": list(parsed.tags), "parsed": parsed.label is not None,
            "note": "; ".join(notes) or None, "truncated": bool(meta.get("truncated")), "completion": text}


def overlay_path(out: Path, image: str, taken: set[str]) -> Path:
    """A name in `out` no earlier image of this run took; compared without case, as a case-insensitive file
    system (macOS, Windows) would (A.jpg and a.jpg shared one overlay file there)."""
    stem = Path(image).stem or "image"
    name, n = f"{stem}.detect.png", 1
    while name.casefold() in taken:
        n += 1
        name = f"{stem}-{n}.detect.png"
    taken.add(name.casefold())
    return out / name


OVERLAY_MIN_SIDE = 256  # an overlay of a smaller image is drawn on it enlarged (whole times, pixels kept sharp)


def write_overlay(result: dict, path: Path, max_image_pixels: int) -> None:
    from PIL import Image

    from fxjax.data.images import open_image
    from fxjax.overlay import draw_detection

    image = open_image(result["image"], max_image_pixels, decode=True)  # EXIF-oriented, as the model saw it
    try:
        # a 56 x 56 image left the verdict no room ("NO VERDI"): enlarged by a whole factor, boxes with it
        k = -(-OVERLAY_MIN_SIDE // max(image.size)) if max(image.size) < OVERLAY_MIN_SIDE else 1
        shown = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST) if k > 1 else image
        regions = [(r["caption"], [v * k for v in r["box"]]) for r in result["regions"]]
        note = None if result["parsed"] else "answer did not parse"
        draw_detection(shown, regions, result["verdict"], note).save(path)
    finally:
        image.close()


def format_result(result: dict) -> str:
    w, h = result["size"]
    lines = [f"{result['image']} ({w}x{h}): {result['verdict'] or 'NO VERDICT'}"]
    if result["regions"]:
        lines.append("  regions (boxes in original pixels: x1, y1, x2, y2):")
        for i, r in enumerate(result["regions"], 1):
            lines.append(f"    {i}. {r['caption'] or '(no caption)'}  [{', '.join(f'{v:.1f}' for v in r['box'])}]")
    if result["tags"]:
        lines.append(f"  tags: {', '.join(result['tags'])}")
    if result["note"]:
        lines.append(f"  note: {result['note']}")
    if not result["parsed"]:
        lines.append("  raw answer:")
        lines.extend(f"    | {line}" for line in (result["completion"] or "(empty)").splitlines() or ["(empty)"])
    if result.get("overlay"):
        lines.append(f"  overlay: {result['overlay']}")
    return "\n".join(lines)


def detect(records, decoder, prompt_config, *, out: Path | None,
           emit: Callable[[dict], None], notes: dict[str, str] | None = None,
           replaced: list[Path] | None = None) -> list[dict]:
    """Decode every record's image, describe the answer, write its overlay into `out` (None: none) and
    emit each result as it comes; returns the results in order. `notes`: image -> a note to add to its
    result (an image shrunk to fit max_length). `replaced` gets the overlays that replaced a file there."""
    import dataclasses

    from fxjax.data.pipeline import DataPipeline

    results, taken = [], set()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(prompt_config, batch_size=decoder.batch_size)
    for texts, metas in decoder.batches(DataPipeline(cfg, records=records)):
        for text, meta in zip(texts, metas):
            result = describe(text, meta)
            extra = (notes or {}).get(result["image"])
            if extra:
                result["note"] = "; ".join(n for n in (extra, result["note"]) if n)
            result["overlay"] = None  # (the key is always there for --json readers)
            if out is not None:
                path = overlay_path(out, result["image"], taken)
                if replaced is not None and path.exists():
                    replaced.append(path)
                write_overlay(result, path, cfg.max_image_pixels)
                result["overlay"] = str(path)
            emit(result)
            results.append(result)
    return results


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(f"fxjax detect: {text}", file=sys.stderr, flush=True)  # noqa: E731
    if args.overlay and Path(args.out).exists() and not Path(args.out).is_dir():
        raise FileExistsError(f"--out: {args.out} is a file; give a directory for the overlays (or --no-overlay)")
    made = None
    if args.overlay:  # made now: a folder that cannot be written is found before the weights load
        made = first_missing(Path(args.out))
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out: cannot create the overlay folder {args.out}: {err}") from None
        require_writable(args.out, "--out (or pass --no-overlay)")
    try:
        return _detect_images(args, say)
    finally:  # a run that wrote no overlay (it failed, or no image could be read) leaves no empty folder made for it
        if made is not None:
            remove_empty(Path(args.out), made)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet; None when it exists."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


def remove_empty(path: Path, top: Path) -> None:
    """Remove `path` and its parents up to `top` while they are empty (what `mkdir(parents=True)` made)."""
    for folder in (path, *path.parents):
        try:
            folder.rmdir()  # (only an empty folder; one holding anything stays)
        except OSError:
            return
        if folder == top:
            return


def detect_inputs(images: Sequence[str], detector, max_image_pixels: int | None):
    """(records, failed, shrunk, fit) of the images to analyse with `detector` (model_args.Detector): each
    image read and given the detector's prompts, shrunk where it would not fit max_length (`fit`: the
    largest pixel count that fits, `fitting_max_pixels`); the unreadable ones in `failed`, (path, why)."""
    from fxjax.data.examples import tokens_for

    data = detector.data
    prompt = detect_prompt(data)
    before, after = tokens_for(detector.tokenizer).prompt(prompt["system"], prompt["user"])
    fit = fitting_max_pixels(data["max_pixels"], data["max_length"], len(before) + len(after))
    records, failed, shrunk = image_records(images, **prompt, min_pixels=data["min_pixels"],
                                            max_pixels=data["max_pixels"], fit_pixels=fit,
                                            max_image_pixels=max_image_pixels, max_length=data["max_length"])
    return records, failed, shrunk, fit


def detect_config(detector, fit: int, batch_size: int, max_image_pixels: int | None):
    """The prompt-mode DataConfig `detect` decodes `detect_inputs`' records with."""
    from fxjax.data.config import DataConfig

    data = detector.data
    return DataConfig(data_files=("(images)",), tokenizer=detector.tokenizer,
                      min_pixels=min(data["min_pixels"], fit), max_pixels=fit, max_length=data["max_length"],
                      mode="prompt", prompts="auto", batch_size=batch_size, drop_remainder=False,
                      shuffle=False, num_epochs=1, shard_index=0, shard_count=1, on_error="skip",
                      max_image_pixels=max_image_pixels or DataConfig.max_image_pixels)


def _detect_images(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """`run` once --out exists: the model resolved, each image read, analysed and reported."""
    from fxjax.commands.model_args import resolve_detector

    def show(obj: dict) -> None:
        if "error" not in obj:
            print(json.dumps(obj) if args.json else format_result(obj) + "\n", flush=True)
        elif args.json:  # one object per image given, the unreadable ones too (said on stderr either way)
            print(json.dumps(obj), flush=True)

    detector = resolve_detector(args)  # (its options checked first: check_model_arguments)
    return 1 if analyse_images(args, detector, say, show) else 0


def analyse_images(args: argparse.Namespace, detector, say: Callable[[str], None],
                   emit: Callable[[dict], None]) -> list[tuple[str, str]]:
    """Analyse args.images with `detector` (model_args.Detector; its weights loaded here once): emit each
    result as it comes (with "index", the image's place among those given), and each image that cannot be
    analysed as {"index", "image", "error"}; returns those (path, why). What `fxjax detect` and
    fxjax.detector.ImageDetector run."""
    data = detector.data
    batch_size = detector.batch_size(args.batch_size, default=4)  # checked before any weights load
    note = own_prompts_note(data, args.system_prompt is not None, args.user_prompt is not None)
    if note:
        say(f"note: {note}")
    records, failed, shrunk, fit = detect_inputs(args.images, detector, args.max_image_pixels)
    # each object's "index", the image's place among those given (0-based): the unreadable ones are said
    # first, the others as their batches finish, so a script orders or joins by it
    places: dict[str, list[int]] = {}
    for i, given in enumerate(args.images):
        places.setdefault(str(given), []).append(i)

    def indexed(obj: dict) -> dict:
        left = places.get(str(obj["image"]))
        return {"index": left.pop(0) if left else None, **obj}

    def report_failed(path, why):
        say(f"{path}: cannot be analysed: {why}")
        emit(indexed({"image": str(path), "error": why}))

    for path, why in failed:
        report_failed(path, why)
    notes: dict[str, str] = {}
    for path, note in shrunk:
        say(f"{path}: {note}")
        notes[str(path)] = "; ".join(n for n in (notes.get(str(path)), note) if n)
    if records:
        decoder = detector.decoder(batch_size, detector.max_new_tokens)
        config = detect_config(detector, fit, batch_size, args.max_image_pixels)
        replaced: list[Path] = []
        results = detect(records, decoder, config, out=Path(args.out) if args.overlay else None,
                         emit=lambda r: emit(indexed(r)), notes=notes, replaced=replaced)
        if replaced:  # (silently before: an earlier run's overlays of the same names were gone)
            say(f"note: {len(replaced)} overlay(s) replaced those an earlier run wrote in {args.out} (e.g. "
                f"{replaced[0].name}); give another --out to keep both")
        done = {r["image"] for r in results}
        for record in records:
            if record.source not in done:  # the pipeline left it out (its warning is above)
                failed.append((record.source, "left out by the data pipeline (see its warning above)"))
                report_failed(*failed[-1])
    return failed
