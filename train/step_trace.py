"""`train.profile_steps`: a `jax.profiler` trace of a few steps of an SFT or GRPO run.

The trace starts before the update numbered `train.profile_start` (0-based, counted over the whole run: the
updates before it, the first one's compilation among them, stay out) and stops once `train.profile_steps`
updates have run and finished on the device: the loop's `sync` waits for the last traced one (SFT fetches its
metrics; a GRPO step has fetched them already). A run that stops early (preemption, an error) stops the
trace on its way out, so what was traced is written all the same.

Every process traces its own host and devices into <train.output_dir>/profile/plugins/profile/<time>/
(<host>.xplane.pb, and <host>.trace.json.gz), the layout TensorBoard's profile plugin reads
(`tensorboard --logdir <train.output_dir>/profile`, with tensorboard-plugin-profile installed); the
.trace.json.gz opens in Perfetto (ui.perfetto.dev) as it is.
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
        self.active = False

    @classmethod
    def for_run(cls, train_section, say: Callable[[str], None]) -> "StepTrace":
        return cls(Path(train_section.output_dir) / PROFILE_DIR, start=train_section.profile_start,
                   steps=train_section.profile_steps, say=say)

    def plan(self, first: int, total: int) -> None:
        """Say what a run from update `first` of `total` will trace, when it traces nothing it was asked to."""
        if not self.steps:
            return
        if first > self.start:
            self.say(f"profile: train.profile_start {self.start} is before this run's first update ({first}, "
                     "resumed): nothing is traced")
        elif self.start >= total:
            self.say(f"profile: train.profile_start {self.start} is past the run's last update ({total - 1}, "
                     "0-based): nothing is traced")

    def before(self, update: int) -> None:
        """Before update `update` (0-based) runs: start the trace if it is the first one traced."""
        if self.steps and update == self.start and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            # host (runtime) and device events, without the Python tracer: it records every Python call,
            # slows the traced steps down and filled a two-step trace of the tiny model with a million events
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            jax.profiler.start_trace(str(self.directory), profiler_options=options)
            self.active = True
            self.say(f"profile: tracing updates {self.start}-{self.start + self.steps - 1} (0-based) into "
                     f"{self.directory}")

    def after(self, done: int, sync: Callable[[], None] | None) -> None:
        """After `done` updates: once the last traced one has run, wait for it on the device, then stop."""
        if self.active and done >= self.start + self.steps:
            if sync is not None:
                sync()
            self.stop()

    def stop(self) -> None:
        """Stop the trace if it runs (it is written now); a no-op otherwise."""
        if not self.active:
            return
        self.active = False
        jax.profiler.stop_trace()
        self.say(f"profile: trace written under {self.directory} (`tensorboard --logdir {self.directory}` with "
                 "tensorboard-plugin-profile, or its .trace.json.gz in ui.perfetto.dev)")
