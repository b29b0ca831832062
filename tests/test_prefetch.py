"""train.prefetch.StepBatches: the step batches the SFT loop builds in a background thread.

* the real data pipeline (demo images, the Qwen tokenizer): prefetched batches equal the batches built in
  line, in order, and the state handed to a checkpoint after k batches resumes a fresh pipeline at exactly
  batch k + 1 (although the producer has read further ahead);
* an exception raised while building a batch surfaces in the consumer's next(); close() stops a producer
  blocked on a full queue (no thread left behind).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fxjax.data.demo_data import make_demo_data
from fxjax.data.pipeline import DataConfig, DataPipeline
from fxjax.train.prefetch import StepBatches

ACCUM = 2


@pytest.fixture(scope="module")
def pipeline(tokenizer_dir, tmp_path_factory):
    files = make_demo_data(tmp_path_factory.mktemp("prefetch"), n=6, seed=0, test_fraction=0.0, min_side=48,
                           max_side=64)
    return DataPipeline(DataConfig(data_files=(str(files["train"]),), tokenizer=str(tokenizer_dir),
                                   min_pixels=3136, max_pixels=3136, max_length=512, length_buckets=(256, 512),
                                   batch_size=1, shard_index=0, shard_count=1, shuffle=True, seed=5))


def make_step(source, floor):
    """ACCUM micro-batches; the floor records the longest batch so far (as build_step_batch's floor does)."""
    micro = [next(source) for _ in range(ACCUM)]
    longest = max([floor.get("length", 0)] + [m["input_ids"].shape[1] for m in micro])
    return micro, dict(floor, length=longest, seen=floor.get("seen", 0) + 1)


def ids(item) -> list[list[int]]:
    return [m["input_ids"].tolist() for m in item.batch]


def test_prefetched_batches_equal_inline_ones_and_the_saved_state_resumes_exactly(pipeline):
    steps = 5  # 10 examples: past the 6-record epoch, so a reshuffled epoch is crossed
    inline = StepBatches(iter(pipeline), make_step, floor={}, count=steps, background=False)
    want = [ids(item) for item in inline]
    inline.close()
    assert len(want) == steps and len({str(w) for w in want}) > 1

    ahead = StepBatches(iter(pipeline), make_step, floor={}, count=steps, background=True, depth=2)
    got = [ids(next(ahead)) for _ in range(2)]
    time.sleep(0.5)  # let the producer run ahead: the underlying iterator is past batch 2 now
    state, floor = ahead.get_state(), dict(ahead.floor)
    got += [ids(item) for item in ahead]
    ahead.close()
    assert got == want
    assert floor["seen"] == 2

    resumed_iterator = iter(pipeline)
    resumed_iterator.set_state(state)
    resumed = StepBatches(resumed_iterator, make_step, floor=floor, count=steps - 2, background=True)
    rest = list(resumed)
    resumed.close()
    assert [ids(item) for item in rest] == want[2:]
    assert rest[-1].floor["seen"] == steps
    for a, b in zip(rest, list(StepBatches(iter(pipeline), make_step, floor={}, count=steps))[2:]):
        for ma, mb in zip(a.batch, b.batch):
            np.testing.assert_array_equal(ma["pixel_values"], mb["pixel_values"])


class Counting:
    """A minimal checkpointable iterator: yields 0, 1, 2, ...; fails on `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.n, self.fail_at, self.closed = 0, fail_at, False

    def __next__(self):
        if self.n == self.fail_at:
            raise ValueError(f"record {self.n}: cannot decode")
        self.n += 1
        return self.n - 1

    def get_state(self):
        return {"n": self.n}

    def close(self):
        self.closed = True


def plain(source, floor):
    return next(source), floor


def test_a_producer_error_surfaces_in_the_loop_after_the_good_batches():
    batches = StepBatches(Counting(fail_at=3), plain, floor={}, count=10)
    assert [next(batches).batch for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="record 3: cannot decode"):
        next(batches)
    assert batches.get_state() == {"n": 3}
    batches.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    source = Counting()
    batches = StepBatches(source, plain, floor={}, count=1000, depth=1)
    assert next(batches).batch == 0
    time.sleep(0.3)  # the producer fills the queue and blocks
    assert source.n < 5
    batches.close()
    assert source.closed
    assert not any(t.name == "fxjax-step-batches" and t.is_alive() for t in threading.enumerate())
