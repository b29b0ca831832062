"""Fault injection for crash-and-resume tests: stop the process at a named point of a step.

A run reads ``FXJAX_FAULT`` once at start-up: a comma-separated list of ``<point>@<step>``. When the loop
reaches ``point`` during step ``step`` (the step being computed, 1-based) it prints

    fxjax-fault: paused at <point>@<step>

to stderr and sleeps until a signal arrives: the test SIGKILLs it there (a crash at exactly that point),
or sends SIGTERM, after which the run goes on and takes its normal preemption path (save, exit 0).

Points:
    joined      SFT and GRPO, step 0: a multi-process run joined, its model not yet loaded (its stop signals
                held: `fxjax.train.preemption.hold_stop_signals`)
    rollout     GRPO: completions sampled and scored, the update not yet computed
    update      GRPO: the update computed on the device, not yet logged or saved
    after_step  SFT and GRPO: the step is done and its checkpoint (if it saves one) committed
    save        inside the background write of the step's checkpoint, so the crash leaves it half written
    save_error  SFT and GRPO: that background write fails as on a full disk (OSError ENOSPC; no pause)
    nan_batch   SFT and GRPO (its update's batch, after sampling): the step's pixel patches are NaN (no
                pause): the real step computes a non-finite loss, and the run stops or skips it
                (train.on_nonfinite), with the same compiled program as a normal run (tests reuse its
                compilation cache instead of compiling for a diverging lr)

This is the only test hook in the training code; with the variable unset each point is one dict lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "FXJAX_FAULT"
POINTS = ("joined", "rollout", "update", "after_step", "save", "save_error", "nan_batch")


def parse(spec: str | None) -> frozenset[tuple[str, int]]:
    """``"rollout@3,save@4"`` -> {("rollout", 3), ("save", 4)}; a clear error for anything else."""
    out = set()
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        point, sep, step = item.partition("@")
        if not sep or point not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}={spec!r}: expected <point>@<step> items with point one of {list(POINTS)}, "
                             f"got {item!r}")
        out.add((point, int(step)))
    return frozenset(out)


_ARMED = parse(os.environ.get(ENV))


def reload() -> None:
    """Re-read the environment (for in-process tests that set it after import)."""
    global _ARMED
    _ARMED = parse(os.environ.get(ENV))


def armed(name: str, step: int) -> bool:
    """Whether `name@step` is armed (lets a caller do preparatory work, e.g. wait for a save, only then)."""
    return (name, int(step)) in _ARMED


def point(name: str, step: int, should_stop=None) -> None:
    """Pause here if ``name@step`` is armed, until a signal arrives.

    `should_stop` (optional) is polled while waiting, so a SIGTERM caught by the run's handler ends the
    pause and the run continues into its preemption path; without it only a signal that kills the
    process ends it.
    """
    if (name, int(step)) not in _ARMED:
        return
    print(f"fxjax-fault: paused at {name}@{step}", file=sys.stderr, flush=True)
    while should_stop is None or not should_stop():
        time.sleep(0.05)


def write_error(step: int) -> None:
    """Raise ENOSPC if ``save_error@step`` is armed (the write of that step's checkpoint fails)."""
    if armed("save_error", step):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (FXJAX_FAULT save_error)")


def nan_patches(batch, step: int):
    """`batch` (a train.batching.StepBatch or GRPO's GroupBatch) with NaN pixel patches if ``nan_batch@step``
    is armed."""
    vision = batch.inputs.vision
    if vision is None or not armed("nan_batch", step):
        return batch
    print(f"fxjax-fault: NaN patches at nan_batch@{step}", file=sys.stderr, flush=True)
    poisoned = vision._replace(patches=vision.patches * float("nan"))
    return batch._replace(inputs=batch.inputs._replace(vision=poisoned))
