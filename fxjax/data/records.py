"""The two dataset formats, validated record by record.

* native JSONL, one record per image::

    {"image": "rel/path.png", "label": "real" | "generated",
     "regions": [{"bbox": [x1, y1, x2, y2], "caption": "..."}], "tags": ["..."],
     "reasoning": "...", "generator": "...", "id": "..." (optional)}

  boxes in original-image pixels;
* the paper's released ms-swift JSONL (REFERENCE.md section 4)::

    {"messages": [{"role": "system"?, ...}, {"role": "user", "content": "<image>..."},
                  {"role": "assistant", "content": "... <ref-object><bbox> ... <verdict>generated</verdict>"}],
     "images": ["rel/path.jpg"], "objects": {"ref": ["caption", ...], "bbox": [[x1, y1, x2, y2], ...]}}

  where the i-th ``<ref-object>`` / ``<bbox>`` placeholder pair is the i-th caption / box.

Every problem is a :class:`DataError` whose message starts with ``file:line``. ``on_error="raise"``
raises the first one in file order; ``"skip"`` drops those records, logs each (in file order) and counts
them by kind in the :class:`LoadReport`, whose ``summary()`` is logged at the end. Image paths are
resolved under the dataset root (absolute paths, ``..`` and symlinks leaving the root are rejected);
images are opened with a whitelist of raster formats, a decompression-bomb limit, EXIF orientation
applied, and (``check_decode``) fully decoded once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

from PIL import Image, ImageOps

from fxjax.image_processing import MAX_ASPECT_RATIO
from fxjax.rewards.output_format import (BOX_END, BOX_START, FORMAT_MARKERS, LABELS, REF_END, REF_START, VERDICT_END,
                                   VERDICT_START)

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DataError",
    "LoadReport",
    "Record",
    "Region",
    "SWIFT_BBOX",
    "SWIFT_IMAGE",
    "SWIFT_REF",
    "load_records",
    "open_image",
    "resolve_image_path",
]

logger = logging.getLogger(__name__)

SWIFT_REF, SWIFT_BBOX, SWIFT_IMAGE = "<ref-object>", "<bbox>", "<image>"
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit (about 0.25 GiB of RGBA)
# Strings that would break the chat structure or the image-token count anywhere in a prompt or target.
_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
# ... plus those that would corrupt the output format inside a native record's free text.
_RESERVED = (*_CHAT_TOKENS, REF_START, REF_END, BOX_START, BOX_END, *FORMAT_MARKERS)
_VERDICT_RE = re.compile(re.escape(VERDICT_START) + r"(.*?)" + re.escape(VERDICT_END))


class DataError(ValueError):
    """A bad record: ``where`` is ``file:line``, ``kind`` a short category used for counting skips."""

    def __init__(self, where: str, problem: str, kind: str = "invalid"):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem, self.kind = where, problem, kind

    def __reduce__(self):  # picklable across grain worker processes
        return DataError, (self.where, self.problem, self.kind)


@dataclass(frozen=True)
class Region:
    caption: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


@dataclass(frozen=True)
class Record:
    """One validated example; ``index`` is its position among the loaded records (stable id for seeding)."""

    index: int
    source: str  # "file:line"
    record_id: str
    image: str  # absolute path, inside the dataset root
    width: int  # original size (after EXIF orientation)
    height: int
    label: str  # "real" | "generated"
    regions: tuple[Region, ...] = ()
    tags: tuple[str, ...] = ()
    reasoning: str = ""
    generator: str | None = None
    format: str = "native"  # "native" | "swift"
    # ms-swift only: the record's own prompts and the assistant text with its placeholders.
    system: str | None = None
    user: str | None = None
    assistant: str | None = None


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    lines: int = 0
    loaded: int = 0
    skipped: list[DataError] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(e.kind for e in self.skipped)

    def summary(self) -> str:
        text = f"loaded {self.loaded} of {self.lines} records from {', '.join(self.files)}"
        if self.skipped:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts().items()))
            text += f"; skipped {len(self.skipped)} ({kinds})"
        return text


# ---- images -------------------------------------------------------------------------------------

def resolve_image_path(root: Path, rel: Any) -> Path:
    """``root / rel`` if it stays inside ``root``; raises ValueError (with the reason) otherwise."""
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"image path must be a non-empty string, got {rel!r}")
    if "\x00" in rel:
        raise ValueError(f"image path {rel!r} contains a NUL byte")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise ValueError(f"image path {rel!r} is absolute; paths must be relative to the dataset root {root}")
    parts = re.split(r"[\\/]", rel)
    if ".." in parts:
        raise ValueError(f"image path {rel!r} escapes the dataset root {root} through '..'")
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {rel!r} resolves to {path}, outside the dataset root {root}")
    return path


def open_image(path: str | Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               decode: bool = True) -> Image.Image:
    """Open an image file safely: allowed formats only, size limit checked before decoding,
    EXIF orientation applied (as transformers' ``load_image``). Raises ``OSError``/``ValueError``
    with a one-line reason; ``FileNotFoundError`` when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist" if not path.exists() else f"{path} is not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
        try:
            image = Image.open(path, formats=ALLOWED_IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            raise _BombError(f"image {path} exceeds the decompression-bomb limit: {err}") from None
        except Image.UnidentifiedImageError:
            raise _NotImageError(f"{path} is not an image in an accepted format {ALLOWED_IMAGE_FORMATS}") from None
    width, height = image.size
    if width * height > max_image_pixels:
        image.close()
        raise _BombError(f"image {path} is {width}x{height} = {width * height} pixels, over the "
                         f"decompression-bomb limit of {max_image_pixels}")
    if width <= 0 or height <= 0:
        raise _UndecodableError(f"image {path} is empty ({width}x{height})")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        image.close()
        raise _AspectError(f"image {path} is {width}x{height}: aspect ratio over Qwen2.5-VL's limit of "
                           f"{MAX_ASPECT_RATIO}")
    if decode:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
                image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise _UndecodableError(f"image {path} cannot be decoded: {err}") from None
    return image


class _BombError(ValueError):
    kind = "image_too_large"


class _AspectError(ValueError):
    kind = "image_aspect"


class _NotImageError(ValueError):
    kind = "not_an_image"


class _UndecodableError(ValueError):
    kind = "image_undecodable"


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without decoding."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _image_size(path: Path, max_image_pixels: int, decode: bool) -> tuple[int, int]:
    image = open_image(path, max_image_pixels, decode=decode)
    try:
        return image.size if decode else _oriented_size(image)
    finally:
        image.close()


# ---- record parsing -----------------------------------------------------------------------------

class _Problem(Exception):
    def __init__(self, problem: str, kind: str):
        super().__init__(problem)
        self.problem, self.kind = problem, kind


def _text(value: Any, what: str, *, allow_empty: bool = True, free_text: bool = True) -> str:
    if not isinstance(value, str):
        raise _Problem(f"{what} must be a string, got {type(value).__name__}", "schema")
    if not allow_empty and not value.strip():
        raise _Problem(f"{what} is empty", "schema")
    if free_text:
        for token in _RESERVED:
            if token in value:
                raise _Problem(f"{what} contains the reserved marker {token!r}", "schema")
    return value


def _label(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in LABELS:
        raise _Problem(f"unknown label {value!r}; expected one of {LABELS}", "label")
    return value.strip().lower()


def _box_numbers(box: Any, what: str) -> tuple[float, float, float, float]:
    if (isinstance(box, list) and len(box) == 2 and all(isinstance(p, list) and len(p) == 2 for p in box)):
        box = [box[0][0], box[0][1], box[1][0], box[1][1]]  # [[x1, y1], [x2, y2]]
    if not isinstance(box, list) or len(box) != 4:
        n = len(box) if isinstance(box, list) else type(box).__name__
        raise _Problem(f"{what} must be [x1, y1, x2, y2] (4 numbers), got {n} values: {box!r}", "box_arity")
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Problem(f"{what} has a non-numeric coordinate {v!r}", "box_arity")
        if not math.isfinite(v):
            raise _Problem(f"{what} has a non-finite coordinate {v!r}", "box_nonfinite")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise _Problem(f"{what} {box!r} is inverted or empty (needs x1 < x2 and y1 < y2)", "box_inverted")
    return x1, y1, x2, y2


def _check_inside(box: tuple[float, ...], width: int, height: int, what: str) -> None:
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise _Problem(f"{what} {[_fmt(v) for v in box]} lies outside the {width}x{height} image "
                       f"(width x height)", "box_outside")


def _fmt(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def _parse_native(obj: dict) -> dict:
    if "image" not in obj:
        raise _Problem("missing field 'image'", "schema")
    if "label" not in obj:
        raise _Problem("missing field 'label'", "label")
    label = _label(obj["label"])
    regions_in = obj.get("regions") or []
    if not isinstance(regions_in, list):
        raise _Problem(f"'regions' must be a list, got {type(regions_in).__name__}", "schema")
    regions = []
    for i, region in enumerate(regions_in):
        if not isinstance(region, dict) or "bbox" not in region:
            raise _Problem(f"region {i} must be an object with 'bbox' and 'caption'", "schema")
        caption = _text(region.get("caption", ""), f"region {i} caption", allow_empty=False)
        regions.append(Region(caption.strip(), _box_numbers(region["bbox"], f"region {i} bbox")))
    tags = obj.get("tags") or []
    if not isinstance(tags, list):
        raise _Problem(f"'tags' must be a list of strings, got {type(tags).__name__}", "schema")
    tags = tuple(_text(t, f"tag {i}", allow_empty=False).strip() for i, t in enumerate(tags))
    reasoning = _text(obj.get("reasoning") or "", "reasoning").strip()
    generator = obj.get("generator")
    if generator is not None and not isinstance(generator, str):
        raise _Problem(f"'generator' must be a string or null, got {type(generator).__name__}", "schema")
    return dict(image=obj["image"], label=label, regions=tuple(regions), tags=tags, reasoning=reasoning,
                generator=generator, format="native")


def _parse_swift(obj: dict) -> dict:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Problem("'messages' must be a non-empty list", "schema")
    by_role: dict[str, list[str]] = {"system": [], "user": [], "assistant": []}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in by_role:
            raise _Problem(f"message {i} must have role system, user or assistant", "schema")
        by_role[m["role"]].append(_text(m.get("content"), f"message {i} ({m['role']}) content", free_text=False))
    if len(by_role["user"]) != 1 or len(by_role["assistant"]) != 1 or len(by_role["system"]) > 1:
        raise _Problem("expected one user and one assistant message (and at most one system message), got "
                       + ", ".join(f"{len(v)} {k}" for k, v in by_role.items()), "schema")
    if messages[-1].get("role") != "assistant":
        raise _Problem("the last message must be the assistant's", "schema")
    system = by_role["system"][0] if by_role["system"] else None
    user, assistant = by_role["user"][0], by_role["assistant"][0]
    images = obj.get("images")
    if isinstance(images, list) and len(images) == 1 and isinstance(images[0], dict):
        images = [images[0].get("path")]
    if not isinstance(images, list) or len(images) != 1:
        raise _Problem(f"'images' must list exactly one image, got {images!r}", "schema")
    if user.count(SWIFT_IMAGE) > 1:
        raise _Problem(f"the user message has {user.count(SWIFT_IMAGE)} {SWIFT_IMAGE} tags for one image",
                       "placeholders")
    for text, role in ((system or "", "system"), (user, "user")):
        for token in (SWIFT_REF, SWIFT_BBOX):
            if token in text:
                raise _Problem(f"{token} placeholder in the {role} message; only the assistant's are supported",
                               "placeholders")
        for token in _CHAT_TOKENS:  # a system prompt may describe the output format, so markers are fine
            if token in text:
                raise _Problem(f"the {role} message contains the reserved token {token!r}", "schema")
    for token in _CHAT_TOKENS:
        if token in assistant:
            raise _Problem(f"the assistant message contains the reserved token {token!r}", "schema")
    if SWIFT_IMAGE in assistant or SWIFT_IMAGE in (system or ""):
        raise _Problem(f"{SWIFT_IMAGE} tag outside the user message", "placeholders")

    objects = obj.get("objects") or {}
    if not isinstance(objects, dict):
        raise _Problem(f"'objects' must be an object with 'ref' and 'bbox', got {type(objects).__name__}", "schema")
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    if not isinstance(refs, list) or not isinstance(boxes, list):
        raise _Problem("'objects.ref' and 'objects.bbox' must be lists", "schema")
    n_ref, n_box = assistant.count(SWIFT_REF), assistant.count(SWIFT_BBOX)
    if n_ref != len(refs) or n_box != len(boxes) or len(refs) != len(boxes):
        raise _Problem(f"placeholder count does not match the objects: {n_ref} {SWIFT_REF} and {n_box} "
                       f"{SWIFT_BBOX} in the assistant text, {len(refs)} refs and {len(boxes)} boxes in 'objects'",
                       "placeholders")
    bbox_type = objects.get("bbox_type", "real")
    if bbox_type not in ("real", "norm1"):
        raise _Problem(f"unsupported objects.bbox_type {bbox_type!r} (expected 'real' or 'norm1')", "schema")
    verdict = _VERDICT_RE.search(assistant)
    if verdict is None and "label" not in obj:
        raise _Problem(f"no {VERDICT_START}...{VERDICT_END} in the assistant text and no 'label' field", "label")
    label = _label(verdict.group(1) if verdict else obj["label"])
    if verdict and "label" in obj and _label(obj["label"]) != label:
        raise _Problem(f"'label' {obj['label']!r} disagrees with the verdict {verdict.group(1)!r}", "label")
    regions = tuple(Region(_text(c, f"object {i} ref", allow_empty=False).strip(),
                           _box_numbers(b, f"object {i} bbox")) for i, (c, b) in enumerate(zip(refs, boxes)))
    generator = obj.get("generator") if isinstance(obj.get("generator"), str) else None
    return dict(image=images[0], label=label, regions=regions, tags=(), reasoning="", generator=generator,
                format="swift", system=system, user=user, assistant=assistant, bbox_type=bbox_type)


def _detect_format(obj: dict) -> str:
    return "swift" if "messages" in obj else "native"


# ---- loading ------------------------------------------------------------------------------------

def _iter_lines(path: Path) -> Iterable[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="strict") as f:
        n = 0
        while True:
            n += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{n}", f"file is not valid UTF-8: {err}", "json") from None
            if not line:
                return
            yield n, line


def load_records(files: str | Path | Sequence[str | Path], root: str | Path | None = None,
                 format: str = "auto", on_error: str = "raise", check_decode: bool = True,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, num_threads: int = 8
                 ) -> tuple[list[Record], LoadReport]:
    """Parse and validate JSONL ``files``; image paths are relative to ``root`` (default: each file's folder).

    ``format``: "native", "swift" or "auto" (per record: a "messages" key means ms-swift).
    Returns the valid records (``index`` = position in this list) and a report of what was skipped.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format not in ("auto", "native", "swift"):
        raise ValueError(f"format must be 'auto', 'native' or 'swift', got {format!r}")
    files = [files] if isinstance(files, (str, Path)) else list(files)
    report = LoadReport(files=[str(f) for f in files])

    errors: list[tuple[tuple[int, int], DataError]] = []  # ((file, line), error)

    # Pass 1: JSON and schema (cheap, in order). In raise mode, stop at the first problem.
    parsed: list[tuple[tuple[int, int], str, dict]] = []
    for file_index, file in enumerate(map(Path, files)):
        if not file.is_file():
            raise FileNotFoundError(f"dataset file {file} does not exist")
        base = Path(root) if root is not None else file.parent
        for n, line in _iter_lines(file):
            if on_error == "raise" and errors:
                break
            if not line.strip():
                continue
            report.lines += 1
            where, pos = f"{file}:{n}", (file_index, n)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append((pos, DataError(where, f"invalid JSON: {err}", "json")))
                continue
            try:
                if not isinstance(obj, dict):
                    raise _Problem(f"a record must be a JSON object, got {type(obj).__name__}", "schema")
                kind = format if format != "auto" else _detect_format(obj)
                fields = _parse_swift(obj) if kind == "swift" else _parse_native(obj)
                if fields["label"] == "generated" and not fields["regions"]:
                    raise _Problem("a generated image must have at least one region", "no_regions")
                if fields["label"] == "real" and fields["regions"]:
                    raise _Problem(f"a real image must not have regions (has {len(fields['regions'])})", "schema")
                try:
                    fields["path"] = resolve_image_path(base, fields["image"])
                except ValueError as err:
                    raise _Problem(str(err), "image_path") from None
                fields["record_id"] = str(obj.get("id", fields["image"]))
            except _Problem as p:
                errors.append((pos, DataError(where, p.problem, p.kind)))
                continue
            parsed.append((pos, where, fields))

    # Pass 2: images (I/O bound: threads), then boxes against the image size.
    def check(item) -> tuple[int, int] | DataError:
        _, where, fields = item
        try:
            width, height = _image_size(fields["path"], max_image_pixels, check_decode)
        except FileNotFoundError as err:
            return DataError(where, f"missing image: {err}", "image_missing")
        except (_BombError, _NotImageError, _UndecodableError, _AspectError) as err:
            return DataError(where, str(err), err.kind)
        except (OSError, ValueError, SyntaxError) as err:
            return DataError(where, f"image {fields['path']} cannot be read: {err}", "image_undecodable")
        if fields.get("bbox_type") == "norm1":
            fields["regions"] = tuple(Region(r.caption, (r.bbox[0] * width, r.bbox[1] * height,
                                                         r.bbox[2] * width, r.bbox[3] * height))
                                      for r in fields["regions"])
        try:
            for i, r in enumerate(fields["regions"]):
                _check_inside(r.bbox, width, height,
                              f"{'object' if fields['format'] == 'swift' else 'region'} {i} bbox")
        except _Problem as p:
            return DataError(where, p.problem, p.kind)
        return width, height

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(check, parsed)) if num_threads > 1 else [check(p) for p in parsed]

    records: list[Record] = []
    for (pos, where, fields), result in zip(parsed, results):
        if isinstance(result, DataError):
            errors.append((pos, result))
            continue
        records.append(Record(
            index=-1, source=where, record_id=fields["record_id"], image=str(fields["path"]),
            width=result[0], height=result[1], label=fields["label"], regions=fields["regions"],
            tags=fields["tags"], reasoning=fields["reasoning"], generator=fields["generator"],
            format=fields["format"], system=fields.get("system"), user=fields.get("user"),
            assistant=fields.get("assistant")))
    errors.sort(key=lambda e: e[0])
    if errors and on_error == "raise":
        raise errors[0][1]
    for _, err in errors:
        logger.warning("skipping record: %s", err)
        report.skipped.append(err)
    records = [dataclasses.replace(r, index=i) for i, r in enumerate(records)]
    report.loaded = len(records)
    if report.skipped:
        logger.warning("%s", report.summary())
    return records, report
