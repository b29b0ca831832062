"""The grain input pipeline: records -> padded, bucketed batches of HF-shaped numpy arrays.

    source (validated records) -> shard (this process's share) -> shuffle (per epoch) -> repeat
      -> [decode -> fxjax.process_image -> boxes rescaled -> prompt template -> tokenize -> labels]
         (grain MapDataset.map_with_index; runs in ``worker_count`` worker processes via mp_prefetch)
      -> skip dropped examples (counted) -> batch + pad to a length bucket (main process)

Where each part lives:

* :mod:`fxjax.data.config` - :class:`DataConfig`, every option of the pipeline;
* :mod:`fxjax.data.records` - loading and validating the JSONL records (formats in
  :mod:`fxjax.data.formats`, image checks in :mod:`fxjax.data.images`);
* :mod:`fxjax.data.examples` - one record -> one example (pixels, prompt and target ids, labels, meta),
  and how long samples are truncated or dropped;
* :mod:`fxjax.data.batching` - padding to length buckets and the checkpointable batch iterator;
* this module - :class:`DataPipeline`, which assembles them into a grain dataset.

Rows per process: with ``batch_rows`` set, the pipeline reads one global example stream (the same shuffle
on every process) but yields only those rows of each global batch of ``batch_size``: batch g's row r is
stream element ``g * batch_size + r``, and elements of other rows are never decoded or tokenised (the
per-example map is lazy). Multi-process training gives each process the rows on its own devices, so the
processes' batches put side by side are the one-process batch. (A dropped example is replaced by the next
element of the same process's share, so with drops the rows of a batch depend on the split.)

Sharding: the record list is split by ``ShardOptions`` (explicit ``shard_index``/``shard_count``, or
``ShardByJaxProcess``) as ``records[index::count]`` before shuffling, so the shards of one epoch cover
every record exactly once. The iterator's ``get_state()`` is a JSON-serialisable dict; ``set_state`` on a
fresh iterator of the same config continues with exactly the next batch. Drops are counted by kind
(``too_long``, and for ``on_error="skip"`` decode errors) in the iterator state and logged with the
record's file:line; truncations are counted too (``BatchIterator.report()``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Sequence

import grain

from fxjax.data.batching import BatchDataset, BatchIterator, bucket_length, collate
from fxjax.data.config import DataConfig
from fxjax.data.examples import IGNORE_INDEX, Dropped, ExampleBuilder, box_tiny_at_max_pixels, tokens_for
from fxjax.data.records import DataError, ImageShare, LoadReport, Record, load_records, load_warning

__all__ = [
    "IGNORE_INDEX",
    "BatchIterator",
    "BatchRows",
    "DataConfig",
    "DataPipeline",
    "Dropped",
    "ExampleBuilder",
    "bucket_length",
    "collate",
    "reading_note",
    "shard_indices",
    "tokens_for",
]

logger = logging.getLogger(__name__)


def shard_indices(n: int, options: grain.sharding.ShardOptions) -> range:
    """The record positions of one shard: every ``shard_count``-th record from ``shard_index``."""
    end = n - n % options.shard_count if options.drop_remainder else n
    return range(options.shard_index, end, options.shard_count)


class BatchRows(grain.MapDataset):
    """The elements of `rows` (positions in each consecutive group of `batch_size`) of a MapDataset, in order:
    element k is parent element ``(k // len(rows)) * batch_size + rows[k % len(rows)]``."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, batch_size: int, rows: Sequence[int]):
        super().__init__(parent)
        self._batch_size, self._rows = int(batch_size), tuple(int(r) for r in rows)
        self._length = len(parent) // self._batch_size * len(self._rows)

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        group, row = divmod(index, len(self._rows))
        return group * self._batch_size + self._rows[row]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._parent_index(i) for i in indices])  # noqa: SLF001

    def __str__(self) -> str:
        return f"BatchRows(batch_size={self._batch_size}, rows={self._rows})"


def reading_note(cfg: DataConfig, processes: int = 1) -> str:
    """What a pipeline's start does before its first count (the records of every file read, each image file
    opened: a large dataset takes minutes there, which a run passed in silence); `processes` split the
    opening of the images (`ImageShare`)."""
    files = len(cfg.data_files)
    how = "decoded whole: data.check_decode" if cfg.check_decode else "its header: data.check_decode false"
    who = "once" if processes == 1 else f"once, by one of the {processes} processes"
    return (f"reading the records of {files} file{'s' if files != 1 else ''} and checking each image file {who} "
            f"({how})")


def records_fingerprint(records: Sequence[Record], unchecked: Sequence[tuple[str, str, str]] = ()) -> dict:
    """The count and a hash of the records' ids, labels and image file names, in order: what a saved data
    position is valid for (where the files lie is left out, so a moved dataset still resumes; an edited
    caption too, the stream's order being unchanged). `unchecked`: those of records after them whose images
    a limit left unopened (`LoadReport.unchecked`), counted as the valid records they are unless an image
    says otherwise: the same fingerprint as without a limit when every image is good."""
    digest = hashlib.sha256()
    for record_id, label, image in [(r.record_id, r.label, Path(r.image).name) for r in records] + list(unchecked):
        digest.update(f"{record_id}\t{label}\t{image}\n".encode("utf-8", "surrogatepass"))
    return {"count": len(records) + len(unchecked), "sha256": digest.hexdigest()[:16]}


def records_in_view(n: int, batch_size: int, rows: Sequence[int] | None, shuffle: bool) -> int:
    """How many of the `n` records a process's stream ever holds. All of them, except for `rows` of an
    unshuffled stream: stream element p is record p % n and the process takes the p with p % batch_size in
    `rows`, so it holds record r only if r = row (mod gcd(n, batch_size)) for one of its rows (a shuffled
    stream draws another order every epoch, so it reaches every record)."""
    if rows is None or shuffle:
        return n
    g = math.gcd(n, batch_size)
    return n // g * len({r % g for r in rows})


class DataPipeline:
    """``DataPipeline(cfg)`` loads and validates the records; ``iter(pipeline)`` yields padded batches.

    ``records`` (already validated, e.g. from :func:`load_records`) skips loading. ``report`` holds what
    loading skipped; ``BatchIterator.report()`` what the pipeline dropped or truncated.
    """

    def __init__(self, cfg: DataConfig, records: Sequence[Record] | None = None,
                 report: LoadReport | None = None, image_share: ImageShare | None = None):
        self.cfg = cfg
        # the records' warnings, said by the first process of a run (`image_share` with `records` given: only
        # which process this is)
        self._warn = load_warning(image_share, logger)
        if records is None:  # (image_share: the processes of a run split the images' opening, load_records)
            records, report = load_records(cfg.data_files, cfg.root, cfg.format, cfg.on_error, cfg.check_decode,
                                           cfg.max_image_pixels, allow_absolute_paths=cfg.allow_absolute_paths,
                                           image_share=image_share)
            logger.info("%s", report.summary())
            if cfg.mode == "sft":  # (records given were loaded, and checked, by the caller's pipeline)
                self._check_tiny_boxes(records)
        self.records = list(records)
        self.report = report
        files = ", ".join(cfg.data_files)
        if not self.records:
            why = f": {report.summary()}" if report is not None else ""
            raise ValueError(f"no valid records in {files}{why}")
        if cfg.prompts == "record":
            native = next((r for r in self.records if r.format != "swift"), None)
            if native is not None:
                raise ValueError(f"{native.source}: prompts='record' needs ms-swift records (native records "
                                 "have no prompts of their own); use 'auto' or 'templates'")
        own = sum(r.format == "swift" for r in self.records)
        if own and cfg.prompts == "auto" and (cfg.system_prompt is not None or cfg.user_prompt is not None):
            self._warn("data.system_prompt / data.user_prompt do not apply to the %d ms-swift record(s) of %s: "
                           "with data.prompts=auto they keep their own prompts (data.prompts=templates uses yours)",
                           own, files)
        self.shard = cfg.shard_options()
        self.indices = shard_indices(len(self.records), self.shard)
        if not self.indices:
            raise ValueError(f"shard {self.shard.shard_index} of {self.shard.shard_count} has no records: "
                             f"{files} hold only {len(self.records)} valid records for {self.shard.shard_count} "
                             "shards")
        self.pad_id = tokens_for(cfg.tokenizer).pad

    def _check_tiny_boxes(self, records: Sequence[Record]) -> None:
        """SFT records whose target would write a box empty at the model's input (`box_tiny_at_max_pixels`):
        under data.on_error raise an error now (it stopped the run at the step that first built the record,
        hours in); under skip a warning naming them, the records kept in place and each dropped where its
        example is built (as before: the records' order, their prompt templates and the stream a checkpoint
        holds are those of earlier runs of the same data)."""
        errors = [e for e in (box_tiny_at_max_pixels(r, self.cfg) for r in records) if e is not None]
        if not errors:
            return
        if self.cfg.on_error == "raise":
            more = f" (and {len(errors) - 1} more record(s) like it)" if len(errors) > 1 else ""
            raise DataError(errors[0].where, errors[0].problem + more, errors[0].kind)
        self._warn("%d record(s) have a box under a pixel at the model's input, which training leaves out "
                       "(data.on_error: skip) [box_tiny]: %s", len(errors),
                       "; ".join(e.where for e in errors[:10]) + (" ..." if len(errors) > 10 else ""))

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
        ds = ds.map_with_index(ExampleBuilder(self.cfg, len(shard_records)))
        if self.cfg.batch_rows is not None:  # after the (lazy) map: other rows are never built
            ds = BatchRows(ds, self.cfg.batch_size, self.cfg.batch_rows)
        return ds

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
        # a stream that repeats forever and drops every record would never yield (nor end): an error then; a
        # finite one ends, and its caller counts what was dropped (fxjax eval lists them)
        in_view = records_in_view(len(self.indices), cfg.batch_size, cfg.batch_rows, cfg.shuffle)
        return BatchDataset(ds, cfg, self.pad_id, epoch_size=in_view if cfg.num_epochs is None else None,
                            records=records_fingerprint([self.records[i] for i in self.indices]))

    def __iter__(self) -> BatchIterator:
        return iter(self.dataset())
