"""Examples -> padded batches: length buckets, padding, and the checkpointable batch iterator.

A batch stacks ids to [B, bucket] (right padding with ``<|endoftext|>``, mask 0, labels -100; left padding
in ``mode="prompt"`` so that generation starts at the same position for every row), concatenates pixel
rows to [sum rows, 1176] and grids to [B, 3], and keeps ``meta`` as a list. Padding to a few fixed bucket
lengths keeps the number of distinct shapes (and so of jit compilations) small.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import grain
import numpy as np

from fxjax.data.config import DataConfig
from fxjax.data.examples import IGNORE_INDEX, Dropped
from fxjax.image_processing import image_tokens

__all__ = ["BatchIterator", "bucket_length", "collate"]

logger = logging.getLogger(__name__)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` tokens."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


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


class BatchDataset(grain.IterDataset):
    """A grain IterDataset of examples (or ``Dropped``) -> one of padded batches."""

    def __init__(self, parent: grain.IterDataset, cfg: DataConfig, pad_id: int, epoch_size: int | None = None,
                 records: dict | None = None):
        super().__init__(parent)
        self._cfg, self._pad_id, self._epoch_size, self._records = cfg, pad_id, epoch_size, records

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self._cfg, self._pad_id, self._epoch_size, self._records)


class BatchIterator(grain.DatasetIterator):
    """Skips (and counts) dropped examples, groups ``batch_size`` examples and pads them.

    epoch_size: the records this process's stream holds, for a stream that repeats forever (None for a
    finite one, which ends); when that many different records have been dropped for good (`Dropped.lasting`:
    not a drop that another epoch's prompt template would avoid) with no example kept in between, every
    record is dropped: an error, not a wait forever on a stream that yields nothing (every prompt longer
    than data.max_length, say). A record that gives an example resets the count, so any stream that can
    yield never meets it, whatever its order or batch_rows.
    `dropped_sources`: each dropped record's source -> kind (for `fxjax eval`; not part of the state).
    State: the upstream grain state plus the drop/truncation counters, all JSON-serialisable, and `records`
    (`records_fingerprint` of the records the stream reads): the position means the same batches only over
    the same records, so `set_state` refuses a state saved over others.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, pad_id: int, epoch_size: int | None = None,
                 records: dict | None = None):
        super().__init__(parent)
        self._cfg, self._pad_id, self._epoch_size, self._records = cfg, pad_id, epoch_size, records
        self._dropped_since_kept: set[str] = set()
        self.dropped_sources: dict[str, str] = {}
        self._pad_side = "left" if cfg.mode == "prompt" else "right"
        self.dropped: Counter = Counter()
        self.truncated = 0
        self.shrunk = 0
        self._shrunk_sources: set[str] = set()  # (each shrunk image is logged once, not at every epoch)
        self.batches = 0

    def __next__(self) -> dict:
        batch: list[dict] = []
        while len(batch) < self._cfg.rows_per_batch:
            try:
                example = next(self._parent)
            except StopIteration:
                if batch and not self._cfg.drop_remainder:
                    break
                raise
            if isinstance(example, Dropped):
                self.dropped[example.kind] += 1
                logger.warning("dropped example (%s): %s", example.kind, example.message)
                self.dropped_sources[example.source] = example.kind
                if example.lasting:
                    self._dropped_since_kept.add(example.source)
                if self._epoch_size is not None and len(self._dropped_since_kept) >= self._epoch_size:
                    raise ValueError(self._nothing_left())
                continue
            self._dropped_since_kept.clear()
            if example["meta"]["truncated"]:  # reported as drops are: the run trains on a shortened target
                self.truncated += 1
                logger.warning("truncated example: %s: reasoning cut by %d tokens to fit max_length %d "
                               "(data.long_samples: truncate)", example["meta"]["source"],
                               example["meta"]["truncated"], self._cfg.max_length)
            shrunk_from = example["meta"].get("shrunk_from")
            if shrunk_from:
                self.shrunk += 1
                if example["meta"]["source"] not in self._shrunk_sources:
                    self._shrunk_sources.add(example["meta"]["source"])
                    logger.warning("shrunk image: %s: %dx%d instead of %dx%d at max_pixels (%d image tokens), so "
                                   "that the example fits max_length %d (data.long_images: shrink)",
                                   example["meta"]["source"], *example["meta"]["model_size"][::-1], *shrunk_from[::-1],
                                   image_tokens(*shrunk_from), self._cfg.max_length)
            batch.append(example)
        self.batches += 1
        return collate(batch, self._cfg.buckets, self._pad_id, self._pad_side)

    def _nothing_left(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.dropped.items()))
        hint = ("raise data.max_length or lower data.max_pixels (fewer image tokens)" if "too_long" in self.dropped
                else "the warnings above say why")
        return (f"{', '.join(self._cfg.data_files)}: every record was dropped (all {self._epoch_size} of this "
                f"process's, with no example kept in between; dropped so far: {kinds}), so no batch can be built; "
                f"{hint}")

    def get_state(self) -> dict[str, Any]:
        state = {"parent": self._parent.get_state(), "dropped": dict(self.dropped),
                 "truncated": self.truncated, "shrunk": self.shrunk, "batches": self.batches}
        if self._records is not None:
            state["records"] = self._records
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("records")  # states saved before fingerprints existed have none
        if saved is not None and self._records is not None and saved != self._records:
            raise ValueError(
                f"{', '.join(self._cfg.data_files)}: the records differ from those the saved data position was "
                f"taken over ({saved['count']} records, fingerprint {saved['sha256']}; now {self._records['count']}, "
                f"{self._records['sha256']}): a record added, removed (an image now unreadable, with "
                "data.on_error=skip) or moved, so the run would not continue with the batches it left off at. "
                "Restore the data as it was, or start a new run from this one (model.from_run)")
        self._parent.set_state(state["parent"])
        self.dropped = Counter(state["dropped"])
        self.truncated = int(state["truncated"])
        self.shrunk = int(state.get("shrunk", 0))  # (states saved before images were shrunk have none)
        self.batches = int(state["batches"])

    def report(self) -> str:
        text = (f"{self.batches} batches; {self.truncated} examples with truncated reasoning; {self.shrunk} with "
                "an image shrunk to fit max_length")
        if self.dropped:
            text += "; dropped " + ", ".join(f"{k} {n}" for k, n in sorted(self.dropped.items()))
        return text

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()
