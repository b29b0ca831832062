"""The grounded output format (docs/format.md): the one place that knows its markers.

A completion is
    <think> reasoning
    <|object_ref_start|>caption<|object_ref_end|><|box_start|>[x1, y1, x2, y2]<|box_end|> ...
    <tag>tag, tag</tag>
    </think>
    <verdict>generated</verdict>
with boxes in absolute pixels of the image as the model sees it (after smart_resize).

Rendering (`render_completion`, `render_scaled_completion`) and parsing (`parse_completion`) live here so
the SFT data pipeline and the GRPO rewards agree on one format. Parsing follows the authors' regexes (docs/format.md)
exactly (the authors' regexes) and never raises on a string.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

THINK_START, THINK_END = "<think>", "</think>"
TAG_START, TAG_END = "<tag>", "</tag>"
VERDICT_START, VERDICT_END = "<verdict>", "</verdict>"
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
# Added to the tokenizer as special tokens by the authors; the grounding tokens already exist in Qwen's vocab.
FORMAT_MARKERS = (THINK_START, THINK_END, TAG_START, TAG_END, VERDICT_START, VERDICT_END)
LABELS = ("real", "generated")


def written_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """A box as a target writes it: each corner rounded to a whole pixel."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return x1, y1, x2, y2


def format_box(box: Sequence[float]) -> str:
    x1, y1, x2, y2 = written_box(box)
    return f"[{x1}, {y1}, {x2}, {y2}]"


def render_completion(label: str, regions: Sequence[tuple[str, Sequence[float]]] = (),
                      tags: Sequence[str] = (), reasoning: str = "") -> str:
    """The SFT target. `regions` are (caption, box) with boxes already in model-input pixels.

    The authors' format check for generated images wants `<think>` immediately followed by the first
    region, so a generated target puts its free-text reasoning after the regions, before the tags; a
    real one starts with it.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    region_lines = [f"{REF_START}{caption}{REF_END}{BOX_START}{format_box(box)}{BOX_END}"
                    for caption, box in regions]
    tag_lines = [f"{TAG_START}{', '.join(tags)}{TAG_END}"] if tags or label == "generated" else []
    if label == "generated" and region_lines:
        lines = [THINK_START + region_lines[0], *region_lines[1:], *([reasoning] if reasoning else [])]
    else:
        lines = [f"{THINK_START} {reasoning}".rstrip(), *region_lines]
    return "\n".join([*lines, *tag_lines, THINK_END, f"{VERDICT_START}{label}{VERDICT_END}"])


# ---- scaling between the original-image and model-input pixel frames ------------------------------

def scale_boxes(boxes, from_size: Sequence[float], to_size: Sequence[float]) -> np.ndarray:
    """Boxes [K, 4] (x1, y1, x2, y2) from a frame of size (h, w) to another (h, w), per axis.

    Model-input -> original: `scale_boxes(b, from_size=(rh, rw), to_size=(oh, ow))`; the reverse for targets.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    (fh, fw), (th, tw) = (tuple(float(v) for v in from_size), tuple(float(v) for v in to_size))
    if min(fh, fw, th, tw) <= 0:
        raise ValueError(f"sizes must be positive, got from {from_size} to {to_size}")
    return arr * np.array([tw / fw, th / fh, tw / fw, th / fh])


def render_scaled_completion(label: str, regions: Sequence[tuple[str, Sequence[float]]] = (),
                             tags: Sequence[str] = (), reasoning: str = "", *,
                             original_size: Optional[Sequence[float]] = None,
                             model_size: Optional[Sequence[float]] = None) -> str:
    """The SFT target with region boxes given in original-image pixels, scaled to model-input pixels.

    `original_size` and `model_size` are (h, w); without them the boxes are used as given.
    """
    if (original_size is None) != (model_size is None):
        raise ValueError("give both original_size and model_size, or neither")
    if original_size is not None and regions:
        scaled = scale_boxes([box for _, box in regions], original_size, model_size)
        regions = [(caption, box) for (caption, _), box in zip(regions, scaled)]
    return render_completion(label, regions, tags, reasoning)


# ---- parsing -------------------------------------------------------------------------------------

_E = re.escape
# The authors' region pattern is `REF(.*?)REF_END\s*BOX(.*?)BOX_END` (no DOTALL), their label check the first
# `<verdict>(.*?)</verdict>` (no DOTALL). The functions below compute the same matches in (near) linear time;
# the tests hold them to those regexes (tests/reference_format.py: the authors' code as written).
# Tags and think text: first `<tag>(.*?)</tag>` / `<think>(.*?)</think>` with DOTALL (see `_between`).
_WS_RE = re.compile(r"\s*")  # the regexes' \s, so whitespace means exactly what it means to `re`

# The authors' format checks (docs/format.md), kept verbatim for reference and for the tests.
# They are searched with DOTALL. The generated one nests a lazy `.*?` inside `(...)+`: on a completion with
# many regions and no closing tag/verdict, Python's backtracking takes time exponential in the number of
# regions, so `format_ok` below decides the same language with a linear scan instead (see `_ordered_tokens`).
AUTHORS_FORMAT_GENERATED = (
    _E(THINK_START) + "(" + _E(REF_START) + r".*?" + _E(REF_END) + r"\s*" + _E(BOX_START) + r".*?"
    + _E(BOX_END) + r".*?)+.*?" + _E(TAG_START) + r".*?" + _E(TAG_END) + r".*?" + _E(THINK_END) + r"\s*"
    + _E(VERDICT_START) + r".*?" + _E(VERDICT_END))
AUTHORS_FORMAT_REAL = (_E(THINK_START) + r".*?" + _E(THINK_END) + r"\s*" + _E(VERDICT_START) + r".*?"
                       + _E(VERDICT_END))

# Every `.*?` in those patterns runs under DOTALL, so each one is "any gap", and `(G)+ .*?` accepts the same
# strings as `G .*?` (the lazy tail of the first G can absorb any later repetitions). A search for a chain of
# tokens separated by arbitrary gaps succeeds iff the greedy scan that takes, for each token, the occurrence
# ending first at or after the previous token's end succeeds. Tokens: a literal, or (a, b) = a `\s*` b.
_GENERATED_TOKENS = (THINK_START + REF_START, (REF_END, BOX_START), BOX_END, TAG_START, TAG_END,
                     (THINK_END, VERDICT_START), VERDICT_END)
_REAL_TOKENS = (THINK_START, (THINK_END, VERDICT_START), VERDICT_END)

# Coordinates beyond this magnitude are treated as "not a box" (as are non-finite ones): they cannot be
# pixels of any image Qwen2.5-VL accepts, and they would overflow box areas to inf / nan.
MAX_ABS_COORD = 1e7

_JSON_NUM = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_JW = r"[ \t\n\r]*"  # JSON whitespace
_FAST_BOX_RE = re.compile(_JW + r"\[" + _JW + (_JW + "," + _JW).join([f"({_JSON_NUM})"] * 4) + _JW + r"\]" + _JW)


def _ordered_tokens(text: str, tokens) -> bool:
    pos = 0
    for token in tokens:
        if isinstance(token, str):
            i = text.find(token, pos)
            if i < 0:
                return False
            pos = i + len(token)
            continue
        first, second = token
        while True:
            i = text.find(first, pos)
            if i < 0:
                return False
            j = _WS_RE.match(text, i + len(first)).end()
            if text.startswith(second, j):
                pos = j + len(second)
                break
            pos = i + 1
    return True


def format_ok(text: str, label: str) -> bool:
    """The authors' format check for a ground truth `label` ("real" or "generated")."""
    return _ordered_tokens(text, _REAL_TOKENS if label == "real" else _GENERATED_TOKENS)


def _coords(values) -> Optional[tuple[float, float, float, float]]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            f = float(v)
        except (OverflowError, ValueError):
            return None
        if not math.isfinite(f) or abs(f) > MAX_ABS_COORD:
            return None
        out.append(f)
    return tuple(out)


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The text between box markers -> (x1, y1, x2, y2), or None when it is not a box.

    A box is a JSON list of four numbers or of two [x, y] pairs, every number finite with magnitude
    at most MAX_ABS_COORD. Anything else (including JSON's NaN / Infinity and booleans) is None.
    """
    m = _FAST_BOX_RE.fullmatch(text)
    if m is not None:  # four JSON numbers: never nan or bool; an overflow to inf fails the range test
        box = tuple(map(float, m.groups()))
        return box if min(box) >= -MAX_ABS_COORD and max(box) <= MAX_ABS_COORD else None
    try:
        value = json.loads(text)
    except Exception:  # JSONDecodeError, RecursionError on deep nesting, ValueError on huge ints
        return None
    if not isinstance(value, list) or len(value) not in (2, 4):
        return None
    if len(value) == 2:
        if not all(isinstance(p, list) and len(p) == 2 for p in value):
            return None
        value = [value[0][0], value[0][1], value[1][0], value[1][1]]
    return _coords(value)


def _between(text: str, start: str, end: str) -> Optional[str]:
    """re.search(start + "(.*?)" + end, DOTALL).group(1) in linear time (the regex is quadratic on failure)."""
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return None if j < 0 else text[i + len(start):j]


def parse_verdict(text: str) -> Optional[str]:
    """First `<verdict>(.*?)</verdict>` (no DOTALL), stripped and lower-cased; None when absent.

    Same result as `re.search` with that pattern, in linear time: a start whose first closing marker lies
    beyond a newline is skipped together with every start before that newline.
    """
    lo = len(VERDICT_START)
    pos, close = 0, -1
    while True:
        i = text.find(VERDICT_START, pos)
        if i < 0:
            return None
        if close < i + lo:
            close = text.find(VERDICT_END, i + lo)
            if close < 0:
                return None
        nl = text.find("\n", i + lo, close)
        if nl < 0:
            return text[i + lo:close].strip().lower()
        pos = nl + 1


def _positions(text: str, marker: str, start: int = 0) -> list[int]:
    out, i = [], text.find(marker, start)
    while i >= 0:
        out.append(i)
        i = text.find(marker, i + len(marker))
    return out


def _region_spans(text: str) -> list[tuple[str, str]]:
    """The authors' region regex's findall (above; tests/reference_format.REGION_RE) -> [(caption, raw box
    text)], without the regex's quadratic worst case.

    findall takes the leftmost REF at or after the end of the previous match; the lazy caption then takes the
    first REF_END on the same line that is followed by whitespace, BOX and a BOX_END on BOX's line. Fast path:
    the first REF_END after the REF qualifies; on the first region where it does not, the rest of the text
    goes to `_region_spans_from` (O(n log n)).
    """
    out, pos = [], 0
    while True:
        s = text.find(REF_START, pos)
        if s < 0:
            return out
        c0 = s + len(REF_START)
        j = text.find(REF_END, c0)
        if j < 0:
            return out
        if text.find("\n", c0, j) < 0:
            b = _WS_RE.match(text, j + len(REF_END)).end()
            if text.startswith(BOX_START, b):
                b += len(BOX_START)
                k = text.find(BOX_END, b)
                if k >= 0 and text.find("\n", b, k) < 0:
                    out.append((text[c0:j], text[b:k]))
                    pos = k + len(BOX_END)
                    continue
        out.extend(_region_spans_from(text, s))
        return out


def _region_spans_from(text: str, pos: int) -> list[tuple[str, str]]:
    """The general case of `_region_spans` from position `pos`, in O(n log n)."""
    ref_ends = _positions(text, REF_END, pos)
    if not ref_ends:
        return []
    newlines = _positions(text, "\n", pos)
    box_ends = _positions(text, BOX_END, pos)

    def next_newline(p: int) -> int:
        k = bisect_left(newlines, p)
        return newlines[k] if k < len(newlines) else len(text)

    # For each REF_END: the (start, end) of its box text when whitespace, BOX and a BOX_END on BOX's line
    # follow it, else None; then for each index the next REF_END index at or after it that has one.
    content = []
    for j in ref_ends:
        b = _WS_RE.match(text, j + len(REF_END)).end()
        if not text.startswith(BOX_START, b):
            content.append(None)
            continue
        b += len(BOX_START)
        k = bisect_left(box_ends, b)
        if k == len(box_ends) or next_newline(b) < box_ends[k]:
            content.append(None)
        else:
            content.append((b, box_ends[k]))
    next_valid, nxt = [0] * (len(ref_ends) + 1), len(ref_ends)
    next_valid[nxt] = nxt
    for idx in range(len(ref_ends) - 1, -1, -1):
        if content[idx] is not None:
            nxt = idx
        next_valid[idx] = nxt

    out = []
    while True:
        s = text.find(REF_START, pos)
        if s < 0:
            return out
        c0 = s + len(REF_START)
        v = next_valid[bisect_left(ref_ends, c0)]
        if v < len(ref_ends) and ref_ends[v] < next_newline(c0):
            b, k = content[v]
            out.append((text[c0:ref_ends[v]], text[b:k]))
            pos = k + len(BOX_END)
        else:
            pos = c0


def parse_regions(text: str):
    """(captions, boxes, skipped) in output order; `skipped` holds (caption, raw text) of unparsable boxes."""
    captions, boxes, skipped = [], [], []
    for caption, raw in _region_spans(text):
        box = parse_box(raw)
        if box is None:
            skipped.append((caption.strip(), raw))
        else:
            captions.append(caption.strip())
            boxes.append(box)
    return tuple(captions), tuple(boxes), tuple(skipped)


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says. `boxes` are in the completion's frame (model-input pixels);
    `boxes_original` are the same boxes in original-image pixels when the sizes were given."""

    format_ok_generated: bool  # the authors' format check for a generated ground truth
    format_ok_real: bool  # ... and for a real one
    verdict: Optional[str]  # first verdict, stripped + lower-cased (any word), None when absent
    boxes: tuple[tuple[float, float, float, float], ...]
    captions: tuple[str, ...]  # one per box, stripped
    tags: tuple[str, ...]  # first <tag> block, split at commas, stripped, empties dropped
    think: Optional[str] = None  # raw text of the first <think> ... </think> block
    skipped: tuple[tuple[str, str], ...] = ()  # (caption, raw text) of regions whose box did not parse
    boxes_original: Optional[tuple[tuple[float, float, float, float], ...]] = None

    @property
    def label(self) -> Optional[str]:
        """The verdict when it is one of LABELS, else None."""
        return self.verdict if self.verdict in LABELS else None

    def format_ok(self, truth: str) -> bool:
        return self.format_ok_real if truth == "real" else self.format_ok_generated

    def label_ok(self, truth: str) -> bool:
        return self.verdict is not None and self.verdict == truth

    @property
    def regions(self) -> tuple[tuple[str, tuple[float, float, float, float]], ...]:
        return tuple(zip(self.captions, self.boxes))


def parse_completion(text, *, original_size: Optional[Sequence[float]] = None,
                     model_size: Optional[Sequence[float]] = None) -> ParsedCompletion:
    """Parse a completion. Never raises on a string, whatever it holds (bytes are decoded, None is the empty
    string); another type is a TypeError (token ids: decode them first).

    With `original_size` and `model_size` ((height, width) each, not PIL's (width, height): the order of
    `fxjax eval`'s predictions.jsonl), `boxes_original` holds the boxes scaled from model-input pixels back
    to original-image pixels. Sizes that are not two positive numbers each, or one size without the other,
    are a ValueError (they left `boxes_original` None without a word).
    """
    if text is None:
        text = ""
    elif isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        raise TypeError(f"a completion is a string, got a {type(text).__name__}: decode the tokens first")
    if (original_size is None) != (model_size is None):
        raise ValueError("give both original_size and model_size ((height, width) each), or neither")
    captions, boxes, skipped = parse_regions(text)
    tag = _between(text, TAG_START, TAG_END)
    tags = () if tag is None else tuple(t.strip() for t in tag.split(",") if t.strip())
    think = _between(text, THINK_START, THINK_END)
    boxes_original = None
    if original_size is not None:
        try:
            sizes = [tuple(float(v) for v in size) for size in (original_size, model_size) if not isinstance(size, str)]
        except (ValueError, TypeError):
            sizes = []
        if [len(size) for size in sizes] != [2, 2] or min(min(size) for size in sizes) <= 0 or \
                not np.isfinite(sizes).all():
            raise ValueError(f"original_size and model_size are (height, width) pairs of positive numbers, got "
                             f"{original_size!r} and {model_size!r}")
        boxes_original = tuple(tuple(float(v) for v in b) for b in scale_boxes(boxes, model_size, original_size))
    return ParsedCompletion(
        format_ok_generated=format_ok(text, "generated"),
        format_ok_real=format_ok(text, "real"),
        verdict=parse_verdict(text),
        boxes=boxes,
        captions=captions,
        tags=tags,
        think=think,
        skipped=skipped,
        boxes_original=boxes_original,
    )
