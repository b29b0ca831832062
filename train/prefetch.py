"""Step batches built on the host ahead of the training loop, in a background thread.

Decoding, tokenising and `build_step_batch` take host time; done between two steps they leave the device
idle. `StepBatches` runs them in one producer thread that stays at most `depth` step batches ahead, so the
next batch is ready while the device runs the current step.

Exact resume: the producer reads the data iterator ahead of the loop, so the iterator's own position is
not the loop's. Every batch carries the iterator state and the shape floor reached once it was built;
`get_state()` / `floor` are those of the last batch the loop took, which is what a checkpoint must hold.
At most `count` batches are built (the steps left), so nothing is read past the run's end.

An exception in the producer (a bad record, a decode error) is raised by the loop's `next()` with its
original traceback; `close()` stops the thread (it never outlives the run) and closes the data iterator.
With `background=False` the same batches are built in the caller's thread, on demand (no overlap).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

__all__ = ["HostBatch", "StepBatches"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a blocked producer or consumer checks for shutdown
CLOSE_TIMEOUT_S = 60  # how long close() waits for the batch being built


class HostBatch(NamedTuple):
    batch: Any  # what `make` built (a train.batching.StepBatch)
    floor: dict  # the shape floor after this batch
    position: dict  # the data iterator's state after this batch's micro-batches


class _Done(NamedTuple):
    error: BaseException | None  # None: `count` batches built


class StepBatches:
    """Iterator of `HostBatch`es: `make(iterator, floor) -> (batch, new floor)` applied `count` times.

    `floor` is the shape floor to start from; `depth` bounds how many built batches wait in the queue."""

    def __init__(self, iterator, make: Callable[[Any, dict], tuple[Any, dict]], *, floor: dict, count: int,
                 depth: int = 2, background: bool = True):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._iterator, self._make, self._left = iterator, make, int(count)
        self.floor = dict(floor)
        self._position = copy.deepcopy(iterator.get_state())
        self.background = background
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False

    # ---- the loop's side -------------------------------------------------------------------------------

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> HostBatch:
        if self._finished:
            raise StopIteration
        if not self.background:
            if self._left <= 0:
                raise StopIteration
            item = self._build(self.floor)
            self._left -= 1
        else:
            item = self._take()
        self.floor, self._position = item.floor, item.position
        return item

    @property
    def stopping(self) -> bool:
        """Whether `close()` was called: a `make` waiting on other processes (their batch sizes) gives up."""
        return self._stop.is_set()

    def get_state(self) -> dict:
        """The data iterator's state after the last batch handed out (what a checkpoint saves)."""
        return copy.deepcopy(self._position)

    def close(self) -> None:
        """Stop the producer (waiting for the batch it may be building) and close the data iterator."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while thread.is_alive() and time.monotonic() < deadline:
                self._drain()  # a producer blocked on a full queue sees the stop
                thread.join(_POLL_S)
            if thread.is_alive():  # stuck inside the data iterator: a daemon thread, it ends with the process
                logger.warning("the step-batch producer did not stop within %d s; leaving it behind",
                               CLOSE_TIMEOUT_S)
                return
        self._drain()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def _take(self) -> HostBatch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="fxjax-step-batches", daemon=True)
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the step-batch producer thread ended without a result") from None
        if isinstance(item, _Done):
            self._finished = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    # ---- the producer ----------------------------------------------------------------------------------

    def _build(self, floor: dict) -> HostBatch:
        batch, floor = self._make(self._iterator, floor)
        return HostBatch(batch, floor, copy.deepcopy(self._iterator.get_state()))

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False when asked to stop first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        floor = self.floor
        try:
            for _ in range(self._left):
                if self._stop.is_set():
                    return
                item = self._build(floor)
                floor = item.floor
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the loop, which raises it
            self._put(_Done(error))
            return
        self._put(_Done(None))
