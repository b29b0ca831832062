"""One record -> one model example: pixels, the chat prompt and target as token ids, and the label mask.

    builder = ExampleBuilder(cfg, records_per_epoch=len(records))
    example = builder.build(record, epoch=0)   # dict of numpy arrays + meta, or Dropped(kind, message)
    text = builder.text(record)                # the token side only (no image decoding): lengths, targets

An example (numpy): ``input_ids`` / ``attention_mask`` / ``labels`` [L] int32 (labels are *unshifted*, HF
style: -100 everywhere except the assistant span, i.e. the completion and its final ``<|im_end|>``),
``pixel_values`` [rows, 1176] float32, ``image_grid_thw`` [1, 3] int64, and ``meta`` (record id, source
``file:line``, label, original and model-input size (h, w), target boxes in model-input pixels, epoch,
template, truncation). In ``mode="prompt"`` (GRPO) the ids stop after ``<|im_start|>assistant\\n``.

Long samples (``max_length`` counts every token, image tokens included):
``long_samples="truncate"`` cuts the end of the reasoning (the longest run of free text in the completion,
i.e. outside every marker / region / tag / verdict span), keeps its trailing newline and re-encodes it, and
never touches the prompt, the image tokens, the grounded regions, the tags, the verdict or the closing
``<|im_end|>``; if removing the whole reasoning is not enough (or the prompt alone does not fit) the
example is :class:`Dropped`. ``"drop"`` drops every over-long example.
Before either, ``long_images="shrink"`` (the default) resizes an image whose tokens leave the example over
max_length to the largest size at which the whole example fits (not below min_pixels); where no size does,
the reasoning is cut at any size, and the image keeps the largest size at which the cut example fits (its
full size, when that one does). Its boxes are scaled to that size as to any other. ``"drop"`` keeps every
image at max_pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from fxjax.data.config import DataConfig
from fxjax.data.formats import ENDOFTEXT, IM_END
from fxjax.data.images import open_image
from fxjax.data.prompts import IMAGE_PAD, USER_TEMPLATES, pick_template, prompt_parts, record_prompt, render_target
from fxjax.data.records import DataError, Record
from fxjax.data.tokenizer import load_tokenizer, token_id
from fxjax.image_processing import image_tokens, model_input_size, process_image
from fxjax.rewards.output_format import (BOX_END, BOX_START, REF_END, REF_START, TAG_END, TAG_START, THINK_END,
                                         THINK_START, VERDICT_END, VERDICT_START, written_box)

__all__ = [
    "IGNORE_INDEX",
    "Dropped",
    "ExampleBuilder",
    "ExampleText",
    "RecordTokens",
    "tokens_for",
]

IGNORE_INDEX = -100
PAD_TOKEN = ENDOFTEXT  # Qwen's pad token


class Dropped(NamedTuple):
    """Placeholder for an example the pipeline leaves out; counted and logged downstream."""

    kind: str
    message: str
    source: str = ""  # the record's file:line
    # False: only this epoch's prompt template makes it too long, another epoch's may fit (the templates
    # differ in length), so it does not count towards "every record was dropped" (BatchIterator)
    lasting: bool = True


class RecordTokens:
    """The tokenizer plus the ids the pipeline needs (built lazily in each worker process)."""

    def __init__(self, path: str):
        self.tok = load_tokenizer(path, add_format_markers=True)
        ids = functools.partial(token_id, self.tok)
        self.pad, self.im_end, self.image_pad = ids(PAD_TOKEN), ids(IM_END), ids(IMAGE_PAD)
        self.openers = {ids(a): ids(b) for a, b in ((REF_START, REF_END), (BOX_START, BOX_END),
                                                   (TAG_START, TAG_END), (VERDICT_START, VERDICT_END))}
        self.singles = {ids(THINK_START), ids(THINK_END), self.im_end, *self.openers.values()}
        self._prompt_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def prompt(self, system: str, user: str) -> tuple[list[int], list[int]]:
        """The prompt's ids before and after the image tokens (cached: few distinct prompts repeat)."""
        key = (system, user)
        ids = self._prompt_cache.get(key)
        if ids is None:  # (read-ahead threads may race here; the worst case is encoding twice)
            if len(self._prompt_cache) > 256:
                self._prompt_cache = {}
            before, after = prompt_parts(system, user)
            ids = self._prompt_cache[key] = (self.encode(before), self.encode(after))
        return ids

    def free_mask(self, ids: Sequence[int]) -> np.ndarray:
        """True at completion tokens that are plain reasoning text (outside every structural span)."""
        free = np.zeros(len(ids), bool)
        closer = None
        for i, t in enumerate(ids):
            if closer is not None:
                if t == closer:
                    closer = None
            elif t in self.openers:
                closer = self.openers[t]
            elif t not in self.singles:
                free[i] = True
        return free


def empty_written_box(boxes) -> int | None:
    """The first box (model-input pixels) that the target writes empty: its corners rounded to whole pixels
    (`written_box`, as `format_box` writes them) meet on an axis."""
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = written_box(box)
        if x1 == x2 or y1 == y2:
            return i
    return None


def _last_true(lo: int, hi: int, make, keep):
    """make(p) for the largest p in [lo, hi] with keep(make(p)), by bisection (keep true up to a point and
    false after it); None when keep holds for none."""
    found = None
    while lo <= hi:
        mid = (lo + hi) // 2
        made = make(mid)
        if keep(made):
            found, lo = made, mid + 1
        else:
            hi = mid - 1
    return found


def box_tiny_error(source: str, region: int, box, model_size: tuple[int, int]) -> DataError:
    """The box_tiny error of record `source`'s region `region`, whose `box` (model-input pixels) the target
    would write empty at `model_size` (height, width)."""
    return DataError(source, f"region {region} box {[round(float(v), 2) for v in box]} is under one pixel wide "
                             f"or high at the model's input ({model_size[1]}x{model_size[0]}): the target would "
                             f"hold an empty box (raise min_pixels / max_pixels)", "box_tiny")


def model_boxes(record: Record, height: int, width: int) -> np.ndarray:
    """The record's boxes (original-image pixels) in the pixels of its image resized to height x width,
    float64, one row [x1, y1, x2, y2] per region."""
    scale = np.array([width / record.width, height / record.height] * 2)
    return np.array([r.bbox for r in record.regions], np.float64).reshape(-1, 4) * scale


def box_tiny_at_max_pixels(record: Record, cfg: DataConfig) -> DataError | None:
    """The box_tiny error of a record whose SFT target would write a box empty at the model's input at
    data.max_pixels (None when every box keeps a pixel): found for every record when a pipeline starts, not
    at the step that first builds the record (hours into a run). An image that data.long_images shrinks
    below max_pixels is checked again when its example is built."""
    if not record.regions:
        return None
    height, width = model_input_size(record.height, record.width, cfg.min_pixels, cfg.max_pixels)
    boxes = model_boxes(record, height, width)
    empty = empty_written_box(boxes.astype(np.float32))
    return None if empty is None else box_tiny_error(record.source, empty, boxes[empty], (height, width))


def truncate_reasoning(tokens: RecordTokens, ids: list[int], overflow: int) -> list[int] | None:
    """Shorten the longest run of free text in the completion (the reasoning) by at least ``overflow``
    tokens, cutting its end but keeping its trailing whitespace (the newline before the regions); the
    shortened run is re-encoded so the ids stay canonical. None if even an empty run is too long."""
    free = tokens.free_mask(ids)
    runs, start = [], None
    for i, f in enumerate([*free, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    if not runs:
        return None
    start, end = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    run_text = tokens.tok.decode(ids[start:end], skip_special_tokens=False)
    separator = run_text[len(run_text.rstrip()):]
    budget = end - start - overflow
    for cut_at in range(min(end - 1, start + budget), start - 1, -1):
        kept = tokens.tok.decode(ids[start:cut_at], skip_special_tokens=False)
        if kept.endswith("\ufffd"):  # half of a multi-byte character
            continue
        new = tokens.encode(kept.rstrip() + separator) if (kept.strip() or separator) else []
        if len(new) <= budget:
            return ids[:start] + new + ids[end:]
    return None


@functools.lru_cache(maxsize=4)
def _cached_tokens(path: str, mtime_ns: int) -> RecordTokens:
    return RecordTokens(path)


def tokens_for(path: str) -> RecordTokens:
    """The tokenizer of ``path``, loaded once per process (and again if its tokenizer.json changes)."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    return _cached_tokens(str(path), file.stat().st_mtime_ns if file.exists() else 0)


@dataclass(frozen=True)
class ExampleText:
    """The token side of one example, computed from the record alone (its image is not decoded)."""

    prompt_ids: list[int]  # the whole prompt, image tokens included
    target: str  # the assistant text (boxes in model-input pixels), without the closing <|im_end|>
    boxes: np.ndarray  # [regions, 4] float32, model-input pixels
    model_size: tuple[int, int]  # (height, width) the image processor resizes to
    num_image_tokens: int
    template: int  # user template index; -1 when an ms-swift record keeps its own prompt
    max_pixels: int  # the image processor's max_pixels for this example (below data.max_pixels when shrunk)
    shrunk_from: tuple[int, int] | None = None  # (height, width) at data.max_pixels, when shrunk to fit max_length


class ExampleBuilder:
    """``(index, record) -> example dict | Dropped``; ``index`` counts over epochs (epoch = index // n)."""

    def __init__(self, cfg: DataConfig, records_per_epoch: int):
        self.cfg = cfg
        self.records_per_epoch = max(1, records_per_epoch)
        self._tokens: RecordTokens | None = None

    def __getstate__(self):
        return {"cfg": self.cfg, "records_per_epoch": self.records_per_epoch, "_tokens": None}

    @property
    def tokens(self) -> RecordTokens:
        if self._tokens is None:
            self._tokens = tokens_for(self.cfg.tokenizer)
        return self._tokens

    def __call__(self, index: int, record: Record) -> dict | Dropped:
        return self.build(record, epoch=index // self.records_per_epoch)

    def text(self, record: Record, epoch: int = 0, template: int | None = None) -> ExampleText:
        """Prompt ids and target text; the image-token count follows from the size the record was validated at.

        With data.long_images "shrink", an image whose tokens at data.max_pixels leave the example over
        max_length (beside the prompt's text and, in SFT, the whole target) is resized to the largest size
        that fits: a 4032 x 3024 phone photo is 15552 tokens at Qwen's max_pixels, over max_length 8192, and
        "drop" would leave every such photo out of training; where no size fits the whole example, see
        `_largest_fitting`. (`fxjax detect` bounds the image by the tokens left beside its prompt,
        `fitting_max_pixels`: a size no larger than this, often the same.)"""
        cfg, tk = self.cfg, self.tokens
        template = pick_template(cfg.seed, record.index, epoch) if template is None else template
        system, user = record_prompt(record, template, cfg.system_prompt, cfg.prompts, cfg.user_prompt)
        if (record.format == "swift" and cfg.prompts != "templates") or cfg.user_prompt is not None:
            template = -1  # the record's own prompt or data.user_prompt: no template
        before, after = tk.prompt(system, user)
        text = self._sized(record, before, after, template, cfg.max_pixels)
        if cfg.long_images == "drop" or cfg.max_pixels <= cfg.min_pixels:
            return text
        length = self._length(text)
        if length <= cfg.max_length:
            return text
        shrunk = self._largest_fitting(record, before, after, template, text, length - len(text.prompt_ids))
        return dataclasses.replace(shrunk, shrunk_from=text.model_size) if shrunk is not None else text

    def _largest_fitting(self, record: Record, before: list[int], after: list[int], template: int,
                         full: ExampleText, completion_bound: int) -> ExampleText | None:
        """The example at the largest image size below `full`'s (a max_pixels from min_pixels on) whose length
        fits max_length. When none does, its reasoning is cut at any size (data.long_samples: truncate) or it
        is dropped: then None where the cut example fits at the full size (a long reasoning
        beside a small image was cut all the same and its image shrunk to min_pixels, a ninth of the pixels
        eval and GRPO read it at), else the largest size at which the cut one fits, else the smallest size
        min_pixels admits (to be dropped); None too when min_pixels admits none below. The size, and with it
        the length, falls with max_pixels, so each is a bisection over max_pixels: an estimate from the
        token overflow, rounded down by smart_resize, undershot min_pixels and left images at full size that
        fit at a smaller one. `completion_bound`: the completion's length at full size, which a smaller
        image's is not above (its box numbers take as many digits or fewer), so a size whose prompt leaves
        room for it fits without encoding the target again."""
        cfg, below = self.cfg, full.max_pixels - 1
        known: dict[tuple[int, int], bool] = {}  # model size -> fits (nearby max_pixels give the same size)

        def fits(text: ExampleText) -> bool:
            room = cfg.max_length - len(text.prompt_ids)
            if room >= completion_bound:  # (GRPO's prompts: a bound of 0, a prompt of max_length fits)
                return True
            if room <= 0:
                return False
            if text.model_size not in known:
                known[text.model_size] = self._length(text) <= cfg.max_length
            return known[text.model_size]

        def fits_cut(text: ExampleText) -> bool:
            return self._fits(len(text.prompt_ids), text.target)

        def admitted(text: ExampleText) -> bool:  # (smart_resize's rounding at a max_pixels near min_pixels
            return text.model_size[0] * text.model_size[1] >= cfg.min_pixels  # can go below it)

        def sized(pixels: int) -> ExampleText:
            return self._sized(record, before, after, template, pixels)

        def largest(keep) -> ExampleText | None:  # (keep holds up to a size, admitted from a size on)
            found = _last_true(cfg.min_pixels, below, sized, keep)
            return found if found is not None and admitted(found) else None

        fitting = largest(fits)
        if fitting is not None:
            return fitting
        if cfg.mode == "sft" and cfg.long_samples == "truncate":
            if fits_cut(full):
                return None
            cut = largest(fits_cut)
            if cut is not None:
                return cut
        # none fits at all: the smallest size min_pixels admits (the last one, counting down, that it admits)
        return _last_true(-below, -cfg.min_pixels, lambda p: sized(-p), admitted)

    def _sized(self, record: Record, before: list[int], after: list[int], template: int,
               max_pixels: int) -> ExampleText:
        cfg = self.cfg
        height, width = model_input_size(record.height, record.width, cfg.min_pixels, max_pixels)
        n_image_tokens = image_tokens(height, width)
        boxes = model_boxes(record, height, width).astype(np.float32)
        return ExampleText(prompt_ids=before + [self.tokens.image_pad] * n_image_tokens + after,
                           target=render_target(record, boxes), boxes=boxes, model_size=(height, width),
                           num_image_tokens=n_image_tokens, template=template, max_pixels=max_pixels)

    def _length(self, text: ExampleText) -> int:
        """The example's whole length: the prompt, and in SFT the target with its closing <|im_end|>."""
        if self.cfg.mode == "prompt":
            return len(text.prompt_ids)
        if len(text.prompt_ids) + len(text.target) + 1 <= self.cfg.max_length:
            return len(text.prompt_ids) + len(text.target) + 1  # (a bound: no token is shorter than a character)
        return len(text.prompt_ids) + len(self.completion_ids(text.target))

    def completion_ids(self, target: str) -> list[int]:
        return self.tokens.encode(target) + [self.tokens.im_end]

    def _pixels(self, record: Record, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        image = open_image(record.image, cfg.max_image_pixels, decode=True)
        try:
            if image.size != (record.width, record.height):
                raise ValueError(f"image {record.image} is now {image.size[0]}x{image.size[1]}, validated "
                                 f"as {record.width}x{record.height}")
            return process_image(image, min_pixels=cfg.min_pixels, max_pixels=max_pixels)
        finally:
            image.close()

    def _fits(self, prompt_length: int, target: str) -> bool:
        """Whether a prompt of this length and the target fit max_length (the reasoning cut if so configured)."""
        cfg = self.cfg
        if prompt_length > cfg.max_length or (cfg.mode == "sft" and prompt_length >= cfg.max_length):
            return False
        if cfg.mode == "prompt":
            return True
        completion = self.completion_ids(target)
        overflow = prompt_length + len(completion) - cfg.max_length
        return overflow <= 0 or (cfg.long_samples == "truncate" and
                                 truncate_reasoning(self.tokens, completion, overflow) is not None)

    def _fits_another_epoch(self, record: Record, text: ExampleText) -> bool:
        """A too-long example whose prompt is a template (picked per epoch): whether the shortest one fits."""
        if text.template < 0:
            return False
        shortest = min(len(self.text(record, template=t).prompt_ids) for t in range(len(USER_TEMPLATES)))
        return self._fits(shortest, text.target)

    def build(self, record: Record, epoch: int = 0) -> dict | Dropped:
        cfg = self.cfg
        text = self.text(record, epoch)
        try:
            pixel_values, grid = self._pixels(record, text.max_pixels)
        except (OSError, ValueError, SyntaxError) as err:
            error = DataError(record.source, f"cannot decode image: {err}", "decode")
            if cfg.on_error == "raise":
                raise error from None
            return Dropped("decode", str(error), record.source)
        empty = empty_written_box(text.boxes) if cfg.mode == "sft" else None
        if empty is not None:  # (the pipeline's start checked it at max_pixels; data.long_images shrank it further)
            error = box_tiny_error(record.source, empty, text.boxes[empty], text.model_size)
            if cfg.on_error == "raise":
                raise error
            return Dropped("box_tiny", str(error), record.source)
        assert text.model_size == (int(grid[0, 1]) * 14, int(grid[0, 2]) * 14)
        assert text.num_image_tokens == int(grid.prod()) // 4
        prompt_ids = text.prompt_ids
        meta = dict(record_id=record.record_id, index=record.index, source=record.source, label=record.label,
                    generator=record.generator, original_size=(record.height, record.width),
                    model_size=text.model_size, boxes=text.boxes, captions=tuple(r.caption for r in record.regions), tags=record.tags,
                    epoch=epoch, template=text.template, target=text.target, prompt_length=len(prompt_ids),
                    num_image_tokens=text.num_image_tokens, truncated=0, shrunk_from=text.shrunk_from)
        if len(prompt_ids) > cfg.max_length or (cfg.mode == "sft" and len(prompt_ids) >= cfg.max_length):
            return Dropped("too_long", f"{record.source}: the prompt alone is {len(prompt_ids)} tokens "
                                       f"({text.num_image_tokens} image tokens), max_length is {cfg.max_length}: "
                                       + ("lower max_pixels or raise max_length" if cfg.long_images == "drop" else
                                          "not even at min_pixels does it fit; raise max_length or shorten the prompt"),
                           record.source, lasting=not self._fits_another_epoch(record, text))
        if cfg.mode == "prompt":
            input_ids, labels = prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
        else:
            completion = self.completion_ids(text.target)
            overflow = len(prompt_ids) + len(completion) - cfg.max_length
            if overflow > 0:
                cut = truncate_reasoning(self.tokens, completion, overflow) if cfg.long_samples == "truncate" else None
                if cut is None:
                    return Dropped("too_long", f"{record.source}: {len(prompt_ids) + len(completion)} tokens "
                                               f"> max_length {cfg.max_length}" +
                                   (" even with the reasoning removed" if cfg.long_samples == "truncate" else ""),
                                   record.source, lasting=not self._fits_another_epoch(record, text))
                meta["truncated"] = len(completion) - len(cut)
                completion = cut
            input_ids = prompt_ids + completion
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion
        return dict(input_ids=np.asarray(input_ids, np.int32),
                    attention_mask=np.ones(len(input_ids), np.int32),
                    labels=np.asarray(labels, np.int32),
                    pixel_values=pixel_values, image_grid_thw=grid, meta=meta)
