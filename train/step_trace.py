"""`train.profile_steps`: a `jax.profiler` trace of a few steps of an SFT or GRPO run.

The trace starts before the update numbered `train.profile_start` (0-based, counted over the whole run: the
updates before it, the first one's compilation among them, stay out: the loop's `sync` waits for the one
before it to finish on the device first) and stops once `train.profile_steps`
updates have run and finished on the device: the loop's `sync` waits for the last traced one (SFT fetches its
metrics; a GRPO step has fetched them already). A run that stops early (preemption, an error) stops the
trace on its way out, so what was traced is written all the same.

A window that runs past the run's last update is cut there (said), so the final save, evaluation and
export stay out of it. A trace that cannot start or be written (a folder that cannot be made, a full disk,
a trace the user's code already runs) is said and the run goes on: a profile is never worth a run.

The trace goes to <train.output_dir>/profile/plugins/profile/<time>/ (<host>.xplane.pb, and
<host>.trace.json.gz), the layout TensorBoard's profile plugin reads (`tensorboard --logdir
<train.output_dir>/profile`, with tensorboard-plugin-profile installed); the .trace.json.gz opens in
Perfetto (ui.perfetto.dev) as it is. In a multi-process run each process writes into profile/process_<i>
(the files are named after the host, so two processes on one host would write over each other).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax

__all__ = ["StepTrace"]

PROFILE_DIR = "profile"


class StepTrace:
    """Starts and stops the profiler around updates [start, start + steps) of a loop (steps 0: off)."""

    def __init__(self, directory: Path, *, start: int, steps: int, say: Callable[[str], None]):
        self.directory, self.start, self.steps, self.say = Path(directory), start, steps, say
        self.end = start + steps  # the first update after the window (cut to the run's end by `plan`)
        self.active = False

    @classmethod
    def for_run(cls, train_section, say: Callable[[str], None]) -> "StepTrace":
        directory = Path(train_section.output_dir) / PROFILE_DIR
        if train_section.profile_steps and jax.process_count() > 1:
            directory = directory / f"process_{jax.process_index()}"
        return cls(directory, start=train_section.profile_start, steps=train_section.profile_steps, say=say)

    def plan(self, first: int, total: int) -> None:
        """Fit the window to a run from update `first` to `total`, and say where it traces less than asked."""
        if not self.steps:
            return
        if first > self.start:
            self.say(f"profile: train.profile_start {self.start} is before this run's first update ({first}, "
                     "resumed): nothing is traced")
        elif self.start >= total:
            self.say(f"profile: train.profile_start {self.start} is past the run's last update ({total - 1}, "
                     "0-based): nothing is traced")
        elif self.end > total:
            self.say(f"profile: {_span(self.start, self.end)} asked, the run ends at update {total - 1}: "
                     f"tracing {_span(self.start, total)}")
            self.end = total

    def before(self, update: int, sync: Callable[[], None] | None = None) -> None:
        """Before update `update` (0-based) runs: start the trace if it is the first one traced, once the
        update before it has finished on the device (`sync`): SFT dispatches an update while the one before
        still runs, whose tail would otherwise open the trace and count as the window's."""
        if not (self.steps and update == self.start and not self.active):
            return
        if sync is not None:
            sync()
        # host (runtime) and device events, without the Python tracer: it records every Python call, slows
        # the traced steps down and filled a two-step trace of the tiny model with a million events
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), profiler_options=options)
        except Exception as err:  # (a folder that cannot be made, a trace already running)
            self.say(f"profile: no trace: {type(err).__name__}: {err}")
            return
        self.active = True
        self.say(f"profile: tracing {_span(self.start, self.end)} (0-based) into {self.directory}")

    def after(self, done: int, sync: Callable[[], None] | None) -> None:
        """After `done` updates: once the last traced one has run, wait for it on the device, then stop."""
        if self.active and done >= self.end:
            if sync is not None:
                sync()
            self.stop()

    def stop(self) -> None:
        """Stop the trace if it runs (it is written now); a no-op otherwise. Never raises."""
        if not self.active:
            return
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as err:  # (a full disk, a folder that went away)
            self.say(f"profile: the trace could not be written: {type(err).__name__}: {err}")
            return
        self.say(f"profile: trace written under {self.directory} (`tensorboard --logdir {self.directory}` with "
                 "tensorboard-plugin-profile, or its .trace.json.gz in ui.perfetto.dev)")


def _span(start: int, end: int) -> str:
    """Updates start .. end - 1, as said: "update 3" or "updates 3-5"."""
    return f"update {start}" if end - start == 1 else f"updates {start}-{end - 1}"
