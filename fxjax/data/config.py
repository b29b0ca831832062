"""DataConfig: everything the data pipeline needs, validated when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain

from fxjax.data.formats import check_prompt
from fxjax.data.images import DEFAULT_MAX_IMAGE_PIXELS
from fxjax.image_processing import DEFAULT_MIN_PIXELS, RELEASE_MAX_PIXELS

__all__ = ["DataConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs; frozen, so one config always means one stream of batches."""

    data_files: tuple[str, ...]
    tokenizer: str  # model or tokenizer directory holding tokenizer.json (or the file itself)
    root: str | None = None  # image paths are relative to this (default: each JSONL file's folder)
    allow_absolute_paths: bool = False  # accept absolute image paths and links out of the root (a dataset you trust)
    format: str = "auto"  # "auto" | "native" | "swift"
    on_error: str = "raise"  # "raise" | "skip"
    check_decode: bool = True  # fully decode every image once while validating
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decompression-bomb limit (original pixels)
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = RELEASE_MAX_PIXELS
    max_length: int = 8192
    length_buckets: tuple[int, ...] = ()  # () -> powers of two from 64, capped by max_length
    long_samples: str = "truncate"  # "truncate" | "drop"
    long_images: str = "shrink"  # "shrink" (an image that leaves the example over max_length) | "drop"
    mode: str = "sft"  # "sft" (prompt + target, right-padded) | "prompt" (prompt only, left-padded; GRPO)
    prompts: str = "auto"  # "auto" (ms-swift records keep theirs) | "templates" | "record"
    # The next two apply to native records, and to ms-swift records only with prompts="templates" (with
    # "auto" they keep their own; the pipeline warns when these are set and so left unused).
    system_prompt: str | None = None  # None -> prompts.SYSTEM_PROMPT
    user_prompt: str | None = None  # None -> one of prompts.USER_TEMPLATES per record and epoch; a str: always it
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
    # The rows of every batch (positions in 0 .. batch_size - 1) this pipeline builds; None: all of them.
    # Multi-process training: the rows that live on this process's devices, so each process decodes and
    # tokenises only its share of one global example stream (see fxjax.data.pipeline).
    batch_rows: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.data_files, (str, bytes)) or not self.data_files:
            raise ValueError("data_files must be a non-empty tuple of JSONL paths")
        object.__setattr__(self, "data_files", tuple(str(f) for f in self.data_files))
        seen: dict[Path, str] = {}
        for f in self.data_files:  # its records would come twice with the same file:line (eval keys them by it)
            if Path(f).resolve() in seen:
                raise ValueError(f"data files: {f} is listed twice (as {seen[Path(f).resolve()]!r} too); list each "
                                 "file once (to weight a file, repeat its records in a file of their own)")
            seen[Path(f).resolve()] = f
        object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
        choices = dict(format=("auto", "native", "swift"), on_error=("raise", "skip"),
                       long_samples=("truncate", "drop"), long_images=("shrink", "drop"), mode=("sft", "prompt"),
                       prompts=("auto", "templates", "record"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_length", "batch_size", "min_pixels", "max_pixels", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        for name in ("worker_count", "read_threads", "prefetch_buffer_size", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.user_prompt is not None and not self.user_prompt.strip():
            raise ValueError("data.user_prompt must be a non-empty text or None (the templates)")
        check_prompt(self.system_prompt, "data.system_prompt", user=False)
        check_prompt(self.user_prompt, "data.user_prompt", user=True)
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"data.num_epochs must be positive or None, got {self.num_epochs}")
        if self.batch_rows is not None:
            rows = tuple(int(r) for r in self.batch_rows)
            object.__setattr__(self, "batch_rows", rows)
            if not rows or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= self.batch_size:
                raise ValueError(f"DataConfig.batch_rows must be increasing positions in [0, batch_size = "
                                 f"{self.batch_size}), got {rows}")
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

    @property
    def rows_per_batch(self) -> int:
        """How many rows of each batch this pipeline builds (batch_size unless batch_rows selects some)."""
        return self.batch_size if self.batch_rows is None else len(self.batch_rows)

    def shard_options(self) -> grain.sharding.ShardOptions:
        if self.shard_count is None:
            return grain.sharding.ShardByJaxProcess(drop_remainder=self.shard_drop_remainder)
        return grain.sharding.ShardOptions(self.shard_index, self.shard_count, self.shard_drop_remainder)
