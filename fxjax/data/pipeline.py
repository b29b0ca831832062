"""The grain input pipeline: records -> padded, bucketed batches of HF-shaped numpy arrays.

    source (validated records) -> shard (this process's share) -> shuffle (per epoch) -> repeat
      -> [decode -> fxjax.process_image -> boxes rescaled -> prompt template -> tokenize -> labels]
         (grain MapDataset.map_with_index; runs in ``worker_count`` worker processes via mp_prefetch)
      -> skip dropped examples (counted) -> batch + pad to a length bucket (main process)

Per example (numpy): ``input_ids`` / ``attention_mask`` / ``labels`` [L] int32 (labels are *unshifted*, HF
style: -100 everywhere except the assistant span, i.e. the completion and its final ``<|im_end|>``),
``pixel_values`` [rows, 1176] float32, ``image_grid_thw`` [1, 3] int64, and ``meta`` (record id, source
``file:line``, label, original and model-input size (h, w), target boxes in model-input pixels, epoch,
template, truncation). A batch stacks ids to [B, bucket] (right padding with ``<|endoftext|>``, mask 0,
labels -100; left padding in ``mode="prompt"``), concatenates pixel rows to [sum rows, 1176] and grids to
[B, 3], and keeps ``meta`` as a list.

Long samples (``max_length`` counts every token, image tokens included):
  ``long_samples="truncate"`` (default) cuts the end of the reasoning (the longest run of free text in the
  completion, i.e. outside every marker / region / tag / verdict span), keeps its trailing newline and
  re-encodes it, and never touches the prompt, the image tokens, the grounded regions, the tags, the
  verdict or the closing ``<|im_end|>``; if removing the whole reasoning is not enough (or the prompt
  alone does not fit) the example is dropped. ``"drop"`` drops every over-long example. Drops are counted
  by kind (``too_long``, and for ``on_error="skip"`` decode errors) in the iterator state and logged with
  the record's file:line; truncations are counted too (``BatchIterator.report()``).

Sharding: the record list is split by ``ShardOptions`` (explicit ``shard_index``/``shard_count``, or
``ShardByJaxProcess``) as ``records[index::count]`` before shuffling, so the shards of one epoch cover
every record exactly once. The iterator's ``get_state()`` is a JSON-serialisable dict; ``set_state`` on a
fresh iterator of the same config continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import grain
import numpy as np

from fxjax.data.prompts import IMAGE_PAD, pick_template, prompt_parts, record_prompt, render_target
from fxjax.data.records import (DEFAULT_MAX_IMAGE_PIXELS, DataError, LoadReport, Record, load_records,
                                open_image)
from fxjax.data.tokenizer import load_tokenizer, token_id
from fxjax.image_processing import model_input_size, process_image
from fxjax.rewards.output_format import (BOX_END, BOX_START, REF_END, REF_START, TAG_END, TAG_START, THINK_END,
                                   THINK_START, VERDICT_END, VERDICT_START)

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "DataPipeline",
    "Dropped",
    "ExampleBuilder",
    "bucket_length",
    "collate",
    "shard_indices",
]

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
PAD_TOKEN = "<|endoftext|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs; frozen, so one config always means one stream of batches."""

    data_files: tuple[str, ...]
    tokenizer: str  # model or tokenizer directory holding tokenizer.json (or the file itself)
    root: str | None = None  # image paths are relative to this (default: each JSONL file's folder)
    format: str = "auto"  # "auto" | "native" | "swift"
    on_error: str = "raise"  # "raise" | "skip"
    check_decode: bool = True  # fully decode every image once while validating
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decompression-bomb limit (original pixels)
    min_pixels: int = 3136
    max_pixels: int = 12845056
    max_length: int = 8192
    length_buckets: tuple[int, ...] = ()  # () -> powers of two from 64, capped by max_length
    long_samples: str = "truncate"  # "truncate" | "drop"
    mode: str = "sft"  # "sft" (prompt + target, right-padded) | "prompt" (prompt only, left-padded; GRPO)
    prompts: str = "auto"  # "auto" (ms-swift records keep theirs) | "templates" | "record"
    system_prompt: str | None = None  # None -> prompts.SYSTEM_PROMPT
    batch_size: int = 1
    drop_remainder: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None -> repeat forever
    worker_count: int = 0  # grain worker processes (0: decode in this process)
    worker_buffer_size: int = 2  # examples buffered per worker
    read_threads: int = 2  # threads per process reading ahead
    prefetch_buffer_size: int = 8  # examples read ahead per process
    shard_index: int | None = None  # None with shard_count None -> ShardByJaxProcess
    shard_count: int | None = None
    shard_drop_remainder: bool = False

    def __post_init__(self):
        if isinstance(self.data_files, (str, bytes)) or not self.data_files:
            raise ValueError("data_files must be a non-empty tuple of JSONL paths")
        object.__setattr__(self, "data_files", tuple(str(f) for f in self.data_files))
        object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
        choices = dict(format=("auto", "native", "swift"), on_error=("raise", "skip"),
                       long_samples=("truncate", "drop"), mode=("sft", "prompt"),
                       prompts=("auto", "templates", "record"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DataConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_length", "batch_size", "min_pixels", "max_pixels", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("worker_count", "read_threads", "prefetch_buffer_size", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"DataConfig.num_epochs must be positive or None, got {self.num_epochs}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("set both shard_index and shard_count, or neither (ShardByJaxProcess)")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
        if self.length_buckets and (sorted(set(self.length_buckets)) != list(self.length_buckets)
                                    or self.length_buckets[0] <= 0):
            raise ValueError(f"length_buckets must be positive and strictly increasing, got {self.length_buckets}")
        if self.length_buckets and self.length_buckets[-1] < self.max_length:
            raise ValueError(f"the largest length bucket {self.length_buckets[-1]} is below max_length "
                             f"{self.max_length}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DataConfig fields: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("data_files"), str):
            d["data_files"] = (d["data_files"],)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.length_buckets:
            return self.length_buckets
        out, b = [], 64
        while b < self.max_length:
            out.append(b)
            b *= 2
        return (*out, self.max_length)

    def shard_options(self) -> grain.sharding.ShardOptions:
        if self.shard_count is None:
            return grain.sharding.ShardByJaxProcess(drop_remainder=self.shard_drop_remainder)
        return grain.sharding.ShardOptions(self.shard_index, self.shard_count, self.shard_drop_remainder)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def shard_indices(n: int, options: grain.sharding.ShardOptions) -> range:
    """The record positions of one shard: every ``shard_count``-th record from ``shard_index``."""
    end = n - n % options.shard_count if options.drop_remainder else n
    return range(options.shard_index, end, options.shard_count)


class Dropped(NamedTuple):
    """Placeholder for an example the pipeline leaves out; counted and logged downstream."""

    kind: str
    message: str


# ---- one example ---------------------------------------------------------------------------------

class _Tokens:
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


def _truncate_reasoning(tokens: _Tokens, ids: list[int], overflow: int) -> list[int] | None:
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
def _cached_tokens(path: str, mtime_ns: int) -> _Tokens:
    return _Tokens(path)


def tokens_for(path: str) -> _Tokens:
    """The tokenizer of ``path``, loaded once per process (and again if its tokenizer.json changes)."""
    from pathlib import Path

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    return _cached_tokens(str(path), file.stat().st_mtime_ns if file.exists() else 0)


class ExampleBuilder:
    """``(index, record) -> example dict | Dropped``; ``index`` counts over epochs (epoch = index // n)."""

    def __init__(self, cfg: DataConfig, records_per_epoch: int):
        self.cfg = cfg
        self.records_per_epoch = max(1, records_per_epoch)
        self._tokens: _Tokens | None = None

    def __getstate__(self):
        return {"cfg": self.cfg, "records_per_epoch": self.records_per_epoch, "_tokens": None}

    @property
    def tokens(self) -> _Tokens:
        if self._tokens is None:
            self._tokens = tokens_for(self.cfg.tokenizer)
        return self._tokens

    def __call__(self, index: int, record: Record) -> dict | Dropped:
        return self.build(record, epoch=index // self.records_per_epoch)

    def build(self, record: Record, epoch: int = 0) -> dict | Dropped:
        cfg, tk = self.cfg, self.tokens
        try:
            image = open_image(record.image, cfg.max_image_pixels, decode=True)
            try:
                if image.size != (record.width, record.height):
                    raise ValueError(f"image {record.image} is now {image.size[0]}x{image.size[1]}, validated "
                                     f"as {record.width}x{record.height}")
                pixel_values, grid = process_image(image, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            finally:
                image.close()
        except (OSError, ValueError, SyntaxError) as err:
            error = DataError(record.source, f"cannot decode image: {err}", "decode")
            if cfg.on_error == "raise":
                raise error from None
            return Dropped("decode", str(error))
        height, width = model_input_size(record.height, record.width, cfg.min_pixels, cfg.max_pixels)
        assert (height, width) == (int(grid[0, 1]) * 14, int(grid[0, 2]) * 14)
        n_image_tokens = int(grid.prod()) // 4
        scale = np.array([width / record.width, height / record.height] * 2)
        boxes = (np.array([r.bbox for r in record.regions], np.float64).reshape(-1, 4) * scale).astype(np.float32)

        template = pick_template(cfg.seed, record.index, epoch)
        system, user = record_prompt(record, template, cfg.system_prompt, cfg.prompts)
        if record.format == "swift" and cfg.prompts != "templates":
            template = -1
        before, after = tk.prompt(system, user)
        prompt_ids = before + [tk.image_pad] * n_image_tokens + after
        target = render_target(record, boxes)
        meta = dict(record_id=record.record_id, index=record.index, source=record.source, label=record.label,
                    generator=record.generator, original_size=(record.height, record.width),
                    model_size=(height, width), boxes=boxes, captions=tuple(r.caption for r in record.regions),
                    epoch=epoch, template=template, target=target, prompt_length=len(prompt_ids),
                    num_image_tokens=n_image_tokens, truncated=0)
        if len(prompt_ids) > cfg.max_length or (cfg.mode == "sft" and len(prompt_ids) >= cfg.max_length):
            return Dropped("too_long", f"{record.source}: the prompt alone is {len(prompt_ids)} tokens "
                                       f"({n_image_tokens} image tokens), max_length is {cfg.max_length}")
        if cfg.mode == "prompt":
            input_ids, labels = prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
        else:
            completion = tk.encode(target) + [tk.im_end]
            overflow = len(prompt_ids) + len(completion) - cfg.max_length
            if overflow > 0:
                cut = _truncate_reasoning(tk, completion, overflow) if cfg.long_samples == "truncate" else None
                if cut is None:
                    return Dropped("too_long", f"{record.source}: {len(prompt_ids) + len(completion)} tokens "
                                               f"> max_length {cfg.max_length}" +
                                   (" even with the reasoning removed" if cfg.long_samples == "truncate" else ""))
                meta["truncated"] = len(completion) - len(cut)
                completion = cut
            input_ids = prompt_ids + completion
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion
        return dict(input_ids=np.asarray(input_ids, np.int32),
                    attention_mask=np.ones(len(input_ids), np.int32),
                    labels=np.asarray(labels, np.int32),
                    pixel_values=pixel_values, image_grid_thw=grid, meta=meta)


# ---- batches -------------------------------------------------------------------------------------

def collate(examples: Sequence[dict], buckets: Sequence[int], pad_id: int, pad_side: str = "right") -> dict:
    """Pad ids to the smallest bucket that fits the longest example; concatenate image rows and grids."""
    length = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    b = len(examples)
    input_ids = np.full((b, length), pad_id, np.int32)
    attention_mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        span = slice(0, n) if pad_side == "right" else slice(length - n, length)
        input_ids[i, span] = e["input_ids"]
        attention_mask[i, span] = 1
        labels[i, span] = e["labels"]
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=np.concatenate([e["pixel_values"] for e in examples]),
                image_grid_thw=np.concatenate([e["image_grid_thw"] for e in examples]),
                # (copies: arrays from worker processes live in shared memory until released)
                meta=[{**e["meta"], "boxes": np.array(e["meta"]["boxes"], np.float32)} for e in examples])


class _BatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, cfg: DataConfig, pad_id: int):
        super().__init__(parent)
        self._cfg, self._pad_id = cfg, pad_id

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self._cfg, self._pad_id)


class BatchIterator(grain.DatasetIterator):
    """Skips (and counts) dropped examples, groups ``batch_size`` examples and pads them.

    State: the upstream grain state plus the drop/truncation counters, all JSON-serialisable.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, pad_id: int):
        super().__init__(parent)
        self._cfg, self._pad_id = cfg, pad_id
        self._pad_side = "left" if cfg.mode == "prompt" else "right"
        self.dropped: Counter = Counter()
        self.truncated = 0
        self.batches = 0

    def __next__(self) -> dict:
        batch: list[dict] = []
        while len(batch) < self._cfg.batch_size:
            try:
                example = next(self._parent)
            except StopIteration:
                if batch and not self._cfg.drop_remainder:
                    break
                raise
            if isinstance(example, Dropped):
                self.dropped[example.kind] += 1
                logger.warning("dropped example (%s): %s", example.kind, example.message)
                continue
            self.truncated += example["meta"]["truncated"] > 0
            batch.append(example)
        self.batches += 1
        return collate(batch, self._cfg.buckets, self._pad_id, self._pad_side)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "dropped": dict(self.dropped),
                "truncated": self.truncated, "batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.dropped = Counter(state["dropped"])
        self.truncated = int(state["truncated"])
        self.batches = int(state["batches"])

    def report(self) -> str:
        text = f"{self.batches} batches; {self.truncated} examples with truncated reasoning"
        if self.dropped:
            text += "; dropped " + ", ".join(f"{k} {n}" for k, n in sorted(self.dropped.items()))
        return text

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


# ---- the pipeline --------------------------------------------------------------------------------

class DataPipeline:
    """``DataPipeline(cfg)`` loads and validates the records; ``iter(pipeline)`` yields padded batches.

    ``records`` (already validated, e.g. from :func:`load_records`) skips loading. ``report`` holds what
    loading skipped; ``BatchIterator.report()`` what the pipeline dropped or truncated.
    """

    def __init__(self, cfg: DataConfig, records: Sequence[Record] | None = None,
                 report: LoadReport | None = None):
        self.cfg = cfg
        if records is None:
            records, report = load_records(cfg.data_files, cfg.root, cfg.format, cfg.on_error, cfg.check_decode,
                                           cfg.max_image_pixels)
            logger.info("%s", report.summary())
        self.records = list(records)
        self.report = report
        if cfg.prompts == "record":
            native = next((r for r in self.records if r.format != "swift"), None)
            if native is not None:
                raise ValueError(f"{native.source}: prompts='record' needs ms-swift records (native records "
                                 "have no prompts of their own); use 'auto' or 'templates'")
        self.shard = cfg.shard_options()
        self.indices = shard_indices(len(self.records), self.shard)
        if not self.indices:
            raise ValueError(f"shard {self.shard.shard_index} of {self.shard.shard_count} has no records "
                             f"({len(self.records)} in total)")
        self.pad_id = tokens_for(cfg.tokenizer).pad

    def __len__(self) -> int:
        """Records in this process's shard (one epoch)."""
        return len(self.indices)

    def examples(self) -> grain.MapDataset:
        """The per-example MapDataset (after shard, shuffle, repeat, build); elements may be ``Dropped``."""
        shard_records = [self.records[i] for i in self.indices]
        ds = grain.MapDataset.source(shard_records)
        if self.cfg.shuffle:
            ds = ds.shuffle(seed=self.cfg.seed)
        ds = ds.repeat(self.cfg.num_epochs)
        return ds.map_with_index(ExampleBuilder(self.cfg, len(shard_records)))

    def dataset(self) -> grain.IterDataset:
        cfg = self.cfg
        ds = self.examples().to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                              prefetch_buffer_size=cfg.prefetch_buffer_size))
        if cfg.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app use their defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                             per_worker_buffer_size=cfg.worker_buffer_size))
        return _BatchDataset(ds, cfg, self.pad_id)

    def __iter__(self) -> BatchIterator:
        return iter(self.dataset())
