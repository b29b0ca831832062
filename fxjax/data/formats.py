"""The two dataset formats: one JSON object -> a :class:`ParsedRecord`, or a :class:`RecordProblem` saying why not.

* native JSONL, one record per image::

    {"image": "rel/path.png", "label": "real" | "generated",
     "regions": [{"bbox": [x1, y1, x2, y2], "caption": "..."}], "tags": ["..."],
     "reasoning": "...", "generator": "...", "id": "..." (optional)}

  boxes in original-image pixels;
* ms-swift JSONL, the format the paper's FakeXplain dataset is released in::

    {"messages": [{"role": "system"?, ...}, {"role": "user", "content": "<image>..."},
                  {"role": "assistant", "content": "... <ref-object><bbox> ... <verdict>generated</verdict>"}],
     "images": ["rel/path.jpg"], "objects": {"ref": ["caption", ...], "bbox": [[x1, y1, x2, y2], ...]}}

  where the i-th ``<ref-object>`` / ``<bbox>`` placeholder pair is the i-th caption / box (in original-image
  pixels, or fractions of the image with ``"bbox_type": "norm1"``), and the label is the verdict.

Parsing needs no image: :func:`boxes_in_pixels` checks the boxes against the image size once it is known.
A problem's ``kind`` is a short category the loader counts skipped records by.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxjax.rewards.output_format import (BOX_END, BOX_START, FORMAT_MARKERS, LABELS, REF_END, REF_START, VERDICT_END,
                                         VERDICT_START, parse_verdict)

__all__ = [
    "Box",
    "ParsedRecord",
    "RecordProblem",
    "SWIFT_BBOX",
    "SWIFT_IMAGE",
    "SWIFT_REF",
    "boxes_in_pixels",
    "detect_format",
    "parse_record",
]

SWIFT_REF, SWIFT_BBOX, SWIFT_IMAGE = "<ref-object>", "<bbox>", "<image>"
# Qwen2.5-VL's chat and vision tokens (prompts and examples render with these)
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
# Strings that would break the chat structure or the image-token count anywhere in a prompt or target.
CHAT_TOKENS = (IM_START, IM_END, ENDOFTEXT, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
# ... plus those that would corrupt the output format inside a native record's free text.
_RESERVED = (*CHAT_TOKENS, REF_START, REF_END, BOX_START, BOX_END, *FORMAT_MARKERS)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2


def check_prompt(text: str | None, name: str, *, user: bool) -> None:
    """A configured prompt (data.system_prompt / data.user_prompt, or a command's flag): no chat or vision
    token (they would break the chat structure or the image-token count, as in a record), and the user
    prompt's one optional <image> tag only there (where the image goes). ValueError naming `name`."""
    if text is None:
        return
    for token in CHAT_TOKENS:
        if token in text:
            raise ValueError(f"{name} contains the reserved token {token!r}; the chat template adds it")
    if text.count(SWIFT_IMAGE) > (1 if user else 0):
        raise ValueError(f"{name}: {SWIFT_IMAGE} " + ("may appear once (where the image goes)" if user else
                                                       "belongs in the user prompt (where the image goes)"))


class RecordProblem(Exception):
    """Why one JSON object is not a valid record; the loader adds the file:line."""

    def __init__(self, problem: str, kind: str):
        super().__init__(problem)
        self.problem, self.kind = problem, kind


@dataclass(frozen=True)
class ParsedRecord:
    """A record's fields as the JSONL gives them, checked for everything that does not need the image."""

    image: str  # the path as written in the record
    record_id: str
    label: str  # "real" | "generated"
    regions: tuple[tuple[str, Box], ...]  # (caption, box) as given (pixels, or fractions for bbox_type norm1)
    format: str  # "native" | "swift"
    tags: tuple[str, ...] = ()
    reasoning: str = ""
    generator: str | None = None
    bbox_type: str = "real"  # "real" (pixels) | "norm1" (fractions of width / height)
    # ms-swift only: the record's own prompts and the assistant text with its placeholders.
    system: str | None = None
    user: str | None = None
    assistant: str | None = None


NATIVE_FIELDS = ("image", "label", "regions", "tags", "reasoning", "generator", "id")
# where other datasets keep a record's boxes and image path (COCO-like exports, one box per record, HF datasets)
BOX_KEYS = ("bbox", "bboxes", "box", "boxes", "annotations", "objects")
IMAGE_KEYS = ("file_name", "filename", "image_path", "img_path", "path", "filepath", "file", "img", "image_file",
              "images")


def misspelt_fields(obj: Any) -> list[tuple[str, str]]:
    """(key, the field it looks like) for the keys of a native record that are not fields but close to one
    the record lacks ("reason" for "reasoning"): other keys are kept (eval groups by them), these are most
    likely typos that would train on an empty reasoning or no tags."""
    import difflib

    if not isinstance(obj, dict) or detect_format(obj) != "native":
        return []
    absent = [f for f in NATIVE_FIELDS if f not in obj]
    boxes = [(key, "regions") for key in obj if key in BOX_KEYS and "regions" not in obj]  # (read as no boxes)
    return boxes + [(key, close[0]) for key in obj if key not in NATIVE_FIELDS and key not in BOX_KEYS
                    for close in [difflib.get_close_matches(str(key), absent, n=1, cutoff=0.75)] if close]


def _keys_note(obj: dict) -> str:
    """The record's keys, for an error about one it lacks (`image_path` given for `image`)."""
    if detect_format(obj) == "swift":  # (read as native by the format setting: that is said after this)
        return ""
    keys = list(map(str, obj))
    shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
    alias = next((k for k in keys if k.lower() in IMAGE_KEYS and isinstance(obj[k], str)), None)
    return f" (the record's keys: {shown}" + (f"; rename {alias!r} to 'image'" if alias else "") + ")"


def _boxes_elsewhere_note(obj: dict) -> str:
    """A generated record without regions whose boxes are under a key fxjax does not read."""
    found = [k for k in obj if k in BOX_KEYS]
    if not found:
        return ""
    return (f" (it has {', '.join(map(repr, found))}: boxes are read from 'regions' only, each "
            "{\"bbox\": [x1, y1, x2, y2], \"caption\": \"...\"}; docs/data.md converts other layouts)")


def detect_format(obj: dict) -> str:
    return "swift" if "messages" in obj else "native"


def file_starts_with_swift_record(path: str | Path) -> bool:
    """Whether the first record of a JSONL file is an ms-swift one (a "messages" key); False when unreadable."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = next((line for line in f if line.strip()), "")
        return isinstance(record := json.loads(line), dict) and "messages" in record
    except (OSError, ValueError):
        return False


def parse_record(obj: Any, format: str = "auto") -> ParsedRecord:
    """One decoded JSON line -> :class:`ParsedRecord`; ``format`` "auto" decides per record."""
    if not isinstance(obj, dict):
        raise RecordProblem(f"a record must be a JSON object, got {type(obj).__name__}", "schema")
    kind = format if format != "auto" else detect_format(obj)
    try:
        parsed = _parse_swift(obj) if kind == "swift" else _parse_native(obj)
    except RecordProblem as problem:
        looks = detect_format(obj)
        if format != "auto" and looks != kind and problem.kind in ("schema", "label"):
            # (--format native on an ms-swift record said "missing field 'image'", and nothing more)
            other = "an ms-swift record ('messages')" if looks == "swift" else "a native record (no 'messages')"
            raise RecordProblem(f"{problem.problem} (it looks like {other}, read as {kind} by the format "
                                f"setting: --format / data.format auto reads each record as it is)", problem.kind) \
                from None
        raise
    if parsed.label == "generated" and not parsed.regions:
        raise RecordProblem("a generated image must have at least one region"
                            + (_boxes_elsewhere_note(obj) if parsed.format == "native" else ""), "no_regions")
    if parsed.label == "real" and parsed.regions:
        raise RecordProblem(f"a real image must not have regions (has {len(parsed.regions)})", "schema")
    return parsed


def boxes_in_pixels(parsed: ParsedRecord, width: int, height: int, orientation: int = 1) -> tuple[Box, ...]:
    """The record's boxes in pixels of the ``width`` x ``height`` image (as displayed); each must lie inside it.
    ``orientation``: the file's EXIF orientation, for the message of a box outside the image."""
    # Fractions of the image read as pixels would train on boxes of one pixel in the corner: a record of
    # fractions only, or one such box among boxes in pixels.
    # (1.001: a fraction converted with float noise, 1.0001, is one too)
    fractions = [parsed.bbox_type == "real" and max(width, height) > 8 and all(v <= 1.001 for v in box)
                 for _, box in parsed.regions]
    if fractions and all(fractions):
        how = ("native records give boxes in pixels of the original image [x1, y1, x2, y2]; multiply by the width "
               "and height (or write ms-swift records with objects.bbox_type \"norm1\")" if parsed.format == "native"
               else "objects.bbox_type \"real\" (the default) means pixels of the original image; for fractions "
                    "set it to \"norm1\"")
        raise RecordProblem(f"every bbox coordinate is at most 1 on a {width}x{height} image: fractions of the "
                            f"image? {how}", "box_normalised")
    out = []
    what = "object" if parsed.format == "swift" else "region"
    for i, (_, box) in enumerate(parsed.regions):
        if fractions[i]:
            raise RecordProblem(f"{what} {i} bbox {[_fmt(v) for v in box]} has every coordinate at most 1 on a "
                                f"{width}x{height} image, where the other boxes are in pixels: a fraction of the "
                                "image? multiply it by the width and height", "box_normalised")
        given = box
        if parsed.bbox_type == "norm1":
            box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
        x1, y1, x2, y2 = box
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            shown = (f"{[_fmt(v) for v in given]} (bbox_type norm1: fractions of the image, "
                     f"{[_fmt(round(v, 2)) for v in box]} in pixels)") if parsed.bbox_type == "norm1" else \
                [_fmt(v) for v in box]
            raise RecordProblem(f"{what} {i} bbox {shown} lies outside the {width}x{height} image (width x height)"
                                + (_rotation_hint(width, height, orientation)
                                   or (_slip_hint(box, width, height) if parsed.bbox_type == "real" else "")
                                   or _thousandths_hint(box, width, height, parsed.bbox_type)), "box_outside")
        if x2 - x1 < 1 or y2 - y1 < 1:  # (written in whole pixels, the model would learn an empty box)
            raise RecordProblem(f"{what} {i} bbox {[_fmt(round(v, 3)) for v in box]} is under one pixel wide or "
                                f"high on the {width}x{height} image: the target would hold an empty box",
                                "box_tiny")
        out.append(box)
    return tuple(out)


def _rotation_hint(width: int, height: int, orientation: int) -> str:
    """A file stored with its axes swapped (EXIF orientation 5-8), as an annotation tool that ignores EXIF
    shows it."""
    if orientation not in (5, 6, 7, 8):
        return ""
    return (f"; the file is stored as {height}x{width} with EXIF orientation {orientation}, and boxes are read in "
            f"the displayed {width}x{height} frame (as transformers' load_image turns it; PIL: "
            f"ImageOps.exif_transpose(image).size): convert boxes drawn on the stored frame")


def _slip_hint(box: Box, width: int, height: int) -> str:
    """A box past the edge by at most 2 pixels (an annotation tool's rounding, a drag past the border): say by
    how much and what clamping it gives (nothing is clamped here: the fix is the dataset's)."""
    x1, y1, x2, y2 = box
    past = max(-x1, -y1, x2 - width, y2 - height)
    if past > 2:
        return ""
    clamped = [_fmt(round(v, 3)) for v in (max(x1, 0), max(y1, 0), min(x2, width), min(y2, height))]
    return (f"; it is {_fmt(round(past, 3))} px past the edge: clamped to the image it is {clamped} (x to [0, "
            f"{width}], y to [0, {height}]; docs/data.md's conversion recipe clamps)")


def _thousandths_hint(box: Box, width: int, height: int, bbox_type: str) -> str:
    """Qwen2-VL's grounding data gives boxes on a 0-1000 scale of the image (Qwen2.5-VL's, and fxjax's, are
    in pixels): a box well past the image's edge (not a pixel or two) whose numbers all lie in 0..1000 may be
    one, so show it in pixels."""
    if bbox_type != "real" or not all(0 <= v <= 1000 for v in box) or (box[2] <= 1.1 * width
                                                                     and box[3] <= 1.1 * height):
        return ""
    pixels = [_fmt(round(v * side / 1000, 1)) for v, side in zip(box, (width, height, width, height))]
    return f"; if it is on Qwen2-VL's 0-1000 scale of the image, in pixels it is {pixels}"


# ---- fields --------------------------------------------------------------------------------------

def _text(value: Any, what: str, *, allow_empty: bool = True, free_text: bool = True) -> str:
    if not isinstance(value, str):
        raise RecordProblem(f"{what} must be a string, got {type(value).__name__}", "schema")
    if not allow_empty and not value.strip():
        raise RecordProblem(f"{what} is empty", "schema")
    if free_text:
        for token in _RESERVED:
            if token in value:
                raise RecordProblem(f"{what} contains the reserved marker {token!r}", "schema")
    return value


def _caption(value: Any, what: str) -> str:
    """A region's caption, stripped: one line, as the output format reads it back (a caption across lines
    renders an SFT target whose box the parser, the IoU reward and eval never see)."""
    return _one_line(_text(value, what, allow_empty=False).strip(), what, "a caption stays on one line, or the "
                     "box after it is not read back (docs/format.md; `fxjax docs format`)")


def _tag(value: Any, what: str) -> str:
    """One image-level tag, stripped: the answer lists the tags on one line (`<tag>a, b</tag>`), so a line
    break inside one breaks the answer's format (a comma makes it two tags: the same text as giving two)."""
    return _one_line(_text(value, what, allow_empty=False).strip(), what, "the answer lists the tags on one line; "
                     "give each tag as its own one-line string")


def _one_line(text: str, what: str, why: str) -> str:
    """`text`, refused (`why`) where it spans lines: the output format reads a caption or the tags back within
    one line."""
    if "\n" in text or "\r" in text:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise RecordProblem(f"{what} {shown!r} spans lines: {why}", "schema")
    return text


def _label(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in LABELS:
        raise RecordProblem(f"unknown label {value!r}; expected one of {LABELS}", "label")
    return value.strip().lower()


def _box_numbers(box: Any, what: str) -> Box:
    if isinstance(box, list) and len(box) == 2 and all(isinstance(p, list) and len(p) == 2 for p in box):
        box = [box[0][0], box[0][1], box[1][0], box[1][1]]  # [[x1, y1], [x2, y2]]
    if not isinstance(box, list) or len(box) != 4:
        n = len(box) if isinstance(box, list) else type(box).__name__
        raise RecordProblem(f"{what} must be [x1, y1, x2, y2] (4 numbers), got {n} values: {box!r}", "box_arity")
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecordProblem(f"{what} has a non-numeric coordinate {v!r}", "box_arity")
        if not math.isfinite(v):
            raise RecordProblem(f"{what} has a non-finite coordinate {v!r}", "box_nonfinite")
    x1, y1, x2, y2 = (float(v) for v in box)
    if (x2 == x1 and y2 >= y1) or (y2 == y1 and x2 >= x1):
        # (no COCO hint: a COCO [x, y, w, h] reads flat only where w == x or h == y exactly, far rarer than an
        # empty box drawn by mistake; the file's inverted boxes, if it is COCO's, still name the convention)
        zero = " and ".join(side for side, flat in (("width (x1 = x2)", x2 == x1), ("height (y1 = y2)", y2 == y1))
                            if flat)
        raise RecordProblem(f"{what} {[_fmt(v) for v in box]} is empty: zero {zero}", "box_tiny")
    if x2 <= x1 or y2 <= y1:
        # COCO's [x, y, w, h] read as corners is inverted whenever w <= x or h <= y: say how to convert it
        coco = (f"; if it is COCO's [x, y, w, h], write corners [x, y, x + w, y + h] = "
                f"{[_fmt(x1), _fmt(y1), _fmt(x1 + x2), _fmt(y1 + y2)]}") if x2 > 0 and y2 > 0 else ""
        raise RecordProblem(f"{what} {box!r} is inverted (needs x1 < x2 and y1 < y2){coco}", "box_inverted")
    return x1, y1, x2, y2


def _fmt(v: float) -> int | float:
    return int(v) if float(v).is_integer() and abs(v) < 1e15 else v  # (1e300 printed as 301 digits)


def _record_id(obj: dict, image: str) -> str:
    """The record's "id" (a string or an integer), else its image path; a null id is no id."""
    given = obj.get("id")
    if given is None:
        return image
    if isinstance(given, bool) or not isinstance(given, (str, int)):
        raise RecordProblem(f"'id' must be a string or an integer, got {type(given).__name__}", "schema")
    return str(given)


def _generator(obj: dict) -> str | None:
    generator = obj.get("generator")
    if generator is not None and not isinstance(generator, str):
        raise RecordProblem(f"'generator' must be a string or null, got {type(generator).__name__}", "schema")
    return generator


# ---- native --------------------------------------------------------------------------------------

def _given(obj: dict, key: str, default: Any) -> Any:
    """obj[key], or `default` when it is absent or null; any other value, of whatever type, is returned for
    the caller to check (a wrong type is an error, never read as empty)."""
    value = obj.get(key)
    return default if value is None else value


def _parse_native(obj: dict) -> ParsedRecord:
    if "image" not in obj:
        raise RecordProblem("missing field 'image'" + _keys_note(obj), "schema")
    if "label" not in obj:
        raise RecordProblem("missing field 'label'", "label")
    label = _label(obj["label"])
    if obj.get("bbox_type") not in (None, "real"):  # an ms-swift key; fractions would be read as pixels here
        raise RecordProblem(f"'bbox_type' ({obj['bbox_type']!r}) is read from ms-swift records only (objects."
                            "bbox_type): native records give boxes in pixels of the original image; convert "
                            "fractions (x * width, y * height)", "schema")
    regions_in = _given(obj, "regions", [])
    if not isinstance(regions_in, list):
        raise RecordProblem(f"'regions' must be a list, got {type(regions_in).__name__}", "schema")
    if label == "real" and regions_in:  # (before the regions' own checks: a placeholder's empty caption said less)
        raise RecordProblem(f"a real image must not have regions (has {len(regions_in)}; a placeholder such as "
                            "{\"bbox\": [0, 0, 0, 0], \"caption\": \"\"} too): leave 'regions' out or empty", "schema")
    regions = []
    for i, region in enumerate(regions_in):
        if not isinstance(region, dict) or "bbox" not in region:
            has = f" (keys: {', '.join(map(str, region))})" if isinstance(region, dict) else \
                f", got {type(region).__name__}"
            raise RecordProblem(f"region {i} must be an object with 'bbox' and 'caption'{has}", "schema")
        if "caption" not in region:
            raise RecordProblem(f"region {i} has no 'caption' (keys: {', '.join(map(str, region))})", "schema")
        caption = _caption(region["caption"], f"region {i} caption")
        regions.append((caption, _box_numbers(region["bbox"], f"region {i} bbox")))
    tags = _given(obj, "tags", [])
    if not isinstance(tags, list):
        raise RecordProblem(f"'tags' must be a list of strings, got {type(tags).__name__}", "schema")
    tags = tuple(_tag(t, f"tag {i}") for i, t in enumerate(tags))  # (a comma in one renders as two: the same text)
    reasoning = _text(_given(obj, "reasoning", ""), "reasoning").strip()
    return ParsedRecord(image=obj["image"], record_id=_record_id(obj, obj["image"]), label=label,
                        regions=tuple(regions), format="native", tags=tags, reasoning=reasoning,
                        generator=_generator(obj))


# ---- ms-swift ------------------------------------------------------------------------------------

def _swift_messages(obj: dict) -> tuple[str | None, str, str]:
    """(system or None, user, assistant), with the placeholders and reserved tokens checked."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordProblem("'messages' must be a non-empty list", "schema")
    by_role: dict[str, list[str]] = {"system": [], "user": [], "assistant": []}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in by_role:
            sharegpt = isinstance(m, dict) and "from" in m and "value" in m
            raise RecordProblem(f"message {i} must have role system, user or assistant" + (
                " (a ShareGPT message, {\"from\": ..., \"value\": ...}: ms-swift's is {\"role\": \"user\", "
                "\"content\": ...}, from human -> user, gpt -> assistant)" if sharegpt else ""), "schema")
        if isinstance(m.get("content"), list):  # (OpenAI-style parts: [{"type": "image"}, {"type": "text", ...}])
            raise RecordProblem(f"message {i} ({m['role']}) content is a list of parts: ms-swift's is one string, "
                                f"with {SWIFT_IMAGE} where the image goes (the image's path in 'images')", "schema")
        by_role[m["role"]].append(_text(m.get("content"), f"message {i} ({m['role']}) content", free_text=False))
    if len(by_role["user"]) != 1 or len(by_role["assistant"]) != 1 or len(by_role["system"]) > 1:
        raise RecordProblem("expected one user and one assistant message (and at most one system message), got "
                            + ", ".join(f"{len(v)} {k}" for k, v in by_role.items()), "schema")
    if messages[-1].get("role") != "assistant":
        raise RecordProblem("the last message must be the assistant's", "schema")
    system = by_role["system"][0] if by_role["system"] else None
    user, assistant = by_role["user"][0], by_role["assistant"][0]
    if user.count(SWIFT_IMAGE) > 1:
        raise RecordProblem(f"the user message has {user.count(SWIFT_IMAGE)} {SWIFT_IMAGE} tags for one image",
                            "placeholders")
    for text, role in ((system or "", "system"), (user, "user")):
        for token in (SWIFT_REF, SWIFT_BBOX):
            if token in text:
                raise RecordProblem(f"{token} placeholder in the {role} message; only the assistant's are "
                                    "supported", "placeholders")
        for token in CHAT_TOKENS:  # a system prompt may describe the output format, so markers are fine
            if token in text:
                raise RecordProblem(f"the {role} message contains the reserved token {token!r}", "schema")
    for token in CHAT_TOKENS:
        if token in assistant:
            raise RecordProblem(f"the assistant message contains the reserved token {token!r}", "schema")
    if SWIFT_IMAGE in assistant or SWIFT_IMAGE in (system or ""):
        raise RecordProblem(f"{SWIFT_IMAGE} tag outside the user message", "placeholders")
    return system, user, assistant


def _swift_image(obj: dict) -> str:
    images = obj.get("images")
    if isinstance(images, str):  # ms-swift also accepts a single path
        images = [images]
    if isinstance(images, list) and len(images) == 1 and isinstance(images[0], dict):
        images = [images[0].get("path")]  # {"path": ...} entries, as ms-swift's image dicts
    if not isinstance(images, list) or len(images) != 1:
        hint = " (the record has 'image': ms-swift records name it 'images')" if images is None and "image" in obj \
            else ""
        raise RecordProblem(f"'images' must list exactly one image, got {images!r}{hint}", "schema")
    return images[0]


def _parse_swift(obj: dict) -> ParsedRecord:
    system, user, assistant = _swift_messages(obj)
    image = _swift_image(obj)
    objects = obj.get("objects") or {}
    if not isinstance(objects, dict):
        raise RecordProblem(f"'objects' must be an object with 'ref' and 'bbox', got {type(objects).__name__}",
                            "schema")
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    if not isinstance(refs, list) or not isinstance(boxes, list):
        raise RecordProblem("'objects.ref' and 'objects.bbox' must be lists", "schema")
    n_ref, n_box = assistant.count(SWIFT_REF), assistant.count(SWIFT_BBOX)
    if n_ref != len(refs) or n_box != len(boxes) or len(refs) != len(boxes):
        raise RecordProblem(f"placeholder count does not match the objects: {n_ref} {SWIFT_REF} and {n_box} "
                            f"{SWIFT_BBOX} in the assistant text, {len(refs)} refs and {len(boxes)} boxes in "
                            "'objects'", "placeholders")
    bbox_type = objects.get("bbox_type", "real")
    if bbox_type not in ("real", "norm1"):
        scale = " (boxes on a 0-1000 scale, as Qwen2-VL's grounding data: divide by 1000 and set norm1)" \
            if bbox_type in ("norm1000", "qwen") else ""
        raise RecordProblem(f"unsupported objects.bbox_type {bbox_type!r} (expected 'real' or 'norm1'){scale}",
                            "schema")
    verdict = parse_verdict(assistant)  # (the verdict as the label reward reads it back)
    if verdict is None and "label" not in obj:
        raise RecordProblem(f"no {VERDICT_START}...{VERDICT_END} in the assistant text and no 'label' field",
                            "label")
    label = _label(verdict if verdict is not None else obj["label"])
    if verdict is not None and "label" in obj and _label(obj["label"]) != label:
        raise RecordProblem(f"'label' {obj['label']!r} disagrees with the verdict {verdict!r}", "label")
    regions = tuple((_caption(c, f"object {i} ref"), _box_numbers(b, f"object {i} bbox"))
                    for i, (c, b) in enumerate(zip(refs, boxes)))
    return ParsedRecord(image=image, record_id=_record_id(obj, image), label=label, regions=regions,
                        format="swift", generator=_generator(obj), bbox_type=bbox_type, system=system, user=user,
                        assistant=assistant)
