"""What a user watches: metrics.jsonl, TensorBoard (when a writer is installed) and a tqdm progress bar.

Only the main process (jax.process_index() == 0) writes. Every record is one JSON object per line with
``step`` and ``kind`` ("train" or "eval") and plain numbers, flushed at once so ``tail -f`` works.

A resumed run continues the same file: ``MetricsLogger(..., resume_step=N)`` first drops the records an
earlier attempt wrote past step N (the steps the resumed run computes again), so a reader sees each step
once; ``read_metrics`` returns one record per (kind, step) in any case (the last one written wins).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from fxjax import run_files
from fxjax.file_modes import replace_whole

logger = logging.getLogger(__name__)

__all__ = ["COMPLETIONS_FILE", "CompletionLog", "IntervalMeans", "MetricsLogger", "ProgressBar", "read_metrics",
           "tensorboard_writer"]

METRICS_FILE = run_files.METRICS_FILE  # (named in fxjax.run_files, which `fxjax report` reads without jax)
COMPLETIONS_FILE = "completions.jsonl"


def tensorboard_writer(directory: Path, purge_step: int | None = None):
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or None when neither is usable.

    `purge_step`: TensorBoard hides the events an earlier attempt logged at this step and after."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            with _without_torch() if module == "tensorboardX" else contextlib.nullcontext():
                mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(str(directory), purge_step=purge_step)
        except Exception:  # not installed, or torch without the tensorboard package
            continue
    return None


@contextlib.contextmanager
def _without_torch():
    """tensorboardX imports torch when it is installed, only to accept torch tensors (2-3 s per process);
    we log plain floats, so its import sees torch as absent unless the process already loaded it."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        yield
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _records(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, record or None when the line is not a JSON record, raw line) of a metrics.jsonl."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's (not a record), not the file's
        for n, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            step = record.get("step") if isinstance(record, dict) else None
            if not (isinstance(step, int) and not isinstance(step, bool) and isinstance(record.get("kind"), str)):
                record = None
            yield n, record, line


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the metrics.jsonl in a run directory), one per (kind, step):
    where a step was logged twice (a resumed run that did not drop them), the last record wins. Sorted by
    step, then in the order the kinds first appear.

    A last line cut short (a run killed while writing it) is skipped with a warning; any other line that
    is not a record is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = list(_records(path))
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    kind_order: dict[str, int] = {}
    for i, (n, record, line) in enumerate(rows):
        if record is None:
            if i == len(rows) - 1 and not line.endswith("\n"):
                logger.warning("%s:%d: skipped an incomplete last line (the run was killed while writing it)",
                               path, n)
                continue
            raise ValueError(f"{path}:{n}: not a metrics record (a JSON object with step and kind): "
                             f"{line.strip()[:80]!r}")
        kind_order.setdefault(record["kind"], len(kind_order))
        key = (record["kind"], record["step"])
        by_key.pop(key, None)  # re-inserted: the last record's values
        by_key[key] = record
    return sorted(by_key.values(), key=lambda r: (r["step"], kind_order[r["kind"]]))


def _drop_records_after(path: Path, step: int) -> int:
    """Rewrite `path` keeping the records with step <= `step` (atomically: a kill leaves the old file or
    the new one, never half of it). Returns how many records were dropped."""
    kept, dropped = [], 0
    for n, record, line in _records(path):
        if record is None:
            logger.warning("%s:%d: dropped a line that is not a metrics record: %r", path, n, line.strip()[:80])
            dropped += 1
        elif record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    if dropped:
        replace_whole(path, lambda f: f.writelines(kept))
    return dropped


def _kept_through(resume_step: int | None) -> int | None:
    """The last step whose records a run starting from `resume_step` keeps: that step for a resume from a
    checkpoint, none (-1) for a run from scratch (step 0: no checkpoint is ever saved there, and the records
    an earlier attempt logged at step 0, its evaluation at the start, are logged again), None: keep all."""
    if resume_step is None:
        return None
    return resume_step if resume_step > 0 else -1


def _plain(value: Any) -> Any:
    """A logged value as JSON takes it: numbers (Python, numpy, jax scalars) as int / float, a non-finite one
    as its string; text stays text (a completion reading "2024" or "NaN" is what the policy wrote)."""
    if isinstance(value, (str, bytes)):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    if isinstance(value, bool):
        return value
    if f.is_integer() and not isinstance(value, float) and abs(f) < 2**53:
        return int(f)
    return f if math.isfinite(f) else str(f)


class IntervalMeans:
    """Per-step values averaged over the steps between two logged records (train.log_every, and every
    checkpoint, whose state holds no interval), as HF Trainer averages its logged loss: `add` each step's
    values, `take` their means (over the finite ones; NaN when none was) and start the next interval; false
    when none was added since."""

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._values.setdefault(key, []).append(float(value))

    def __bool__(self) -> bool:
        return bool(self._values)

    def take(self) -> dict[str, float]:
        means = {}
        for key, values in self._values.items():
            finite = [v for v in values if math.isfinite(v)]
            means[key] = sum(finite) / len(finite) if finite else math.nan
        self._values = {}
        return means


class MetricsLogger:
    """Appends records to <output_dir>/metrics.jsonl (and TensorBoard events under <output_dir>/tensorboard).

    `resume_step`: the step a resumed run continues from (its restored checkpoint's). The records an
    earlier attempt logged after it are dropped from metrics.jsonl first, and TensorBoard hides its
    events after it, so every step appears once. 0, a run from scratch, drops them all, the evaluation at
    step 0 of an attempt killed before its first checkpoint too (the new run evaluates at its start
    again). None appends to what is there.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        self.companions: list = []  # other files of the run's log (CompletionLog), synced and closed with it
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept_through = _kept_through(resume_step)
            if kept_through is not None and self.path.exists():
                dropped = _drop_records_after(self.path, kept_through)
                if dropped:
                    logger.info("%s: dropped %d record(s) logged after step %d by the interrupted run",
                                self.path, dropped, kept_through)
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                purge = kept_through + 1 if kept_through is not None else None
                self._tb = tensorboard_writer(Path(output_dir) / "tensorboard", purge_step=purge)
                if self._tb is None:
                    logger.info("TensorBoard: no writer installed (tensorboardX or tensorboard); metrics go to %s",
                                self.path)

    def log(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3),
                  **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
            self._tb.flush()

    def value_at(self, kind: str, step: int, key: str) -> Any:
        """`key` of the record of `kind` at `step` in metrics.jsonl (None: no such record or key, or this
        process does not write): what a resumed run carries on from, such as GRPO's num_tokens."""
        if not self.enabled or not self.path.exists():
            return None
        found = [r for _, r, _ in _records(self.path) if r is not None and r["kind"] == kind and r["step"] == step]
        return found[-1].get(key) if found else None

    def logged(self, kind: str, step: int) -> bool:
        """Whether metrics.jsonl holds a record of `kind` at `step` (False where this process does not write)."""
        if not self.enabled or not self.path.exists():
            return False
        return any(r is not None and r["kind"] == kind and r["step"] == step for _, r, _ in _records(self.path))

    def sync(self) -> None:
        """Everything logged so far on disk (fsync), the companions' too: called at each checkpoint, so that a
        run on gcsfuse, which uploads a file only when it is synced or closed, does not lose the metrics of an
        attempt that is preempted (its checkpoint kept, its log never uploaded)."""
        _sync(self._file)
        for companion in self.companions:
            companion.sync()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for companion in self.companions:
            companion.close()


def _sync(file) -> None:
    """An open log file's lines on disk (None: nothing open)."""
    if file is not None:
        file.flush()
        os.fsync(file.fileno())


class CompletionLog:
    """<output_dir>/completions.jsonl: what a GRPO run sampled (grpo.log_completions), one JSON object per
    completion with ``step`` and ``kind`` "completion" (metrics.jsonl's line format, several lines a step).
    `resume_step`: the step the run starts from (0 for a run from scratch): the records an earlier attempt
    wrote after it are dropped first, so every step's completions appear once. Only the main process writes;
    each step's lines are written at once, to a file kept open (`sync`, `close`: reopened every step, a file
    on gcsfuse was uploaded whole at every step)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / COMPLETIONS_FILE
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept_through = _kept_through(resume_step)
            if kept_through is not None and self.path.exists():
                _drop_records_after(self.path, kept_through)

    def log(self, step: int, records: list[Mapping[str, Any]]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.writelines(json.dumps({"step": int(step), "kind": "completion",
                                          **{k: _plain(v) for k, v in r.items()}}) + "\n" for r in records)
        self._file.flush()

    def sync(self) -> None:
        _sync(self._file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ProgressBar:
    """tqdm over the optimiser steps (main process only); falls back to nothing when disabled. When stderr
    is not a terminal (CI, SLURM, a pipe) tqdm's carriage returns would make one endless line: then it
    writes a plain line about every tenth of the run instead."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train", unit: str = "step"):
        self._bar = None
        self._lines = None
        if enabled and not sys.stderr.isatty():
            every = max(1, total // 10)
            self._lines = dict(total=total, done=initial, every=every, next_at=(initial // every + 1) * every,
                               desc=desc, unit=unit, start=time.perf_counter(), first=initial, after_first=None)
        elif enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int, postfix: Mapping[str, Any]) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        elif self._lines is not None:
            state = self._lines
            state["done"] += n
            now = time.perf_counter()
            if state["after_first"] is None:  # this run's first update, its compilation in it: said at once,
                state["after_first"] = (now, state["done"])  # and left out of the rate after it
                took = f"{now - state['start']:.1f} s, compiling included if any"
            elif state["done"] >= state["next_at"] or state["done"] == state["total"]:
                since, at = state["after_first"]
                # (on the clock since the first: saves and evaluations in it, unlike a logged step_time)
                took = f"{(now - since) / max(1, state['done'] - at):.2f} s/{state['unit']} on the clock"
            else:
                return
            state["next_at"] = (state["done"] // state["every"] + 1) * state["every"]  # (updates of n > 1 too)
            print(" ".join([f"{state['desc']}: {state['unit']} {state['done']}/{state['total']}",
                            *(f"{k}={v}" for k, v in shown.items()), f"({took})"]), file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
