"""What the SFT and GRPO loops do around their steps, written once: held-out evaluation, when to save,
fault points, preemption, the final save, the export and the clean-up.

Both loops iterate `LoopControl.updates(first)`, which runs `after_step(step)` after each update (it saves on
the cadence, evaluates periodically, honours `FXJAX_FAULT=after_step@N` and a preemption signal) and saves the
final state when the loop ends normally, then call `LoopControl.wrap_up` (the evaluation at the end and
`export_outputs`: the PEFT adapter / merged checkpoint of a finished run); leaving the LoopControl runs
`close_run`, which releases the checkpointer, the metrics files and the data iterator, whatever happened. A
non-finite loss or gradient stops the run (`NonFiniteError`) or skips the update (`handle_nonfinite`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from flax import nnx

from fxjax.host_exchange import allgather_json
from fxjax.train import faults
from fxjax.train.export import export_origin, save_adapter, save_merged, write_exports
from fxjax.train.metrics import ProgressBar
from fxjax.train.preemption import PreemptionSignals
from fxjax.train.step_trace import StepTrace


class NonFiniteError(RuntimeError):
    """A step produced a NaN/inf loss or gradient (train.on_nonfinite = "stop")."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: int | None, directory: Path):
        self.step, self.last_checkpoint = step, last_checkpoint
        where = (f"the last good checkpoint is step {last_checkpoint} in {directory}" if last_checkpoint is not None
                 else "no checkpoint was written before it")
        super().__init__(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
                         f"(loss {loss}, grad norm {grad_norm}); stopped without applying it; {where}. "
                         f"Set train.on_nonfinite=skip to skip such updates instead.")


def log_end(metrics, step: int, status: str) -> None:
    """The run's last record in metrics.jsonl, {"kind": "end", "status": ...} at the step it ended at:
    "finished" (trained to its end, evaluated and exported), "preempted" (a stop signal: its checkpoint saved,
    the same command resumes it) or "non-finite" (train.on_nonfinite: stop). Both a finished and a preempted
    run exit 0, so a script tells them apart by the last end record (a resumed run adds its own later)."""
    metrics.log(step, "end", {"status": status})


def handle_nonfinite(name: str, cfg, step: int, out: dict, checkpointer, skipped: int,
                     say: Callable[[str], None], record_stop: Callable[[], None]) -> int:
    """A non-finite loss or gradient at update `step`: raise NonFiniteError (train.on_nonfinite = "stop", the
    last good checkpoint kept), after `record_stop` logged the step (with "stopped": the run's metrics ended
    at its last good record, and its report read as a run that trained cleanly to its end), or count the
    skipped update ("skip"). Returns the new count of skipped updates."""
    if cfg.train.on_nonfinite == "stop":
        record_stop()
        checkpointer.wait()
        raise NonFiniteError(step, out["loss"], out["grad_norm"], checkpointer.latest_step(), checkpointer.directory)
    say(f"{name}: step {step}: non-finite loss/gradient (loss {out['loss']}, grad norm {out['grad_norm']}); "
        f"update skipped ({skipped + 1} so far)")
    return skipped + 1


@dataclass
class RunEvaluation:
    """Held-out evaluation inside a run: evaluates the current LoRA parameters, logs the metrics (tagged with
    the step) to metrics.jsonl and the console, and keeps them in `result.evals`."""

    name: str  # "sft" / "grpo": the console prefix
    evaluator: Any  # fxjax.train.evaluation.Evaluator
    metrics: Any  # fxjax.train.metrics.MetricsLogger
    result: Any  # SFTResult / GRPOResult (has .evals)
    generate: bool
    say: Callable[[str], None]

    def __call__(self, tag: str, step: int, model, params, base, rest) -> dict:
        nnx.update(model, params)
        values = self.evaluator.evaluate(model, params, base, rest, generate=self.generate).metrics()
        # tagged as the log says it (start, periodic, end of stage NAME, end): which model it measured
        self.metrics.log(step, "eval", dict(values, tag=tag))
        self.result.evals.append((step, values))
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                          if isinstance(v, (int, float)))  # the sample completions go to metrics.jsonl only
        self.say(f"{self.name}: eval ({tag}, step {step}): {shown}")
        return values


class LoopControl:
    """Save cadence, periodic evaluation, fault points and preemption of a training loop.

    `save(step)` writes the checkpoint of the state reached after `step` updates; `evaluate(tag)` runs the
    held-out evaluation (None: no evaluation); `first` is the step the run starts from (0, or the step of the
    checkpoint it resumed from); `bar` is the run's progress bar. `stage_ends` maps the step at which each of
    GRPO's reward stages ends to its name: each is saved whatever checkpoint.every says (and the checkpointer
    keeps it from pruning), and said; with eval.at_stage_ends (GRPO) it is evaluated too."""

    def __init__(self, name: str, cfg, *, steps_total: int, first: int, checkpointer, save: Callable[[int], None],
                 say: Callable[[str], None], show_progress: bool, evaluate: Callable[[str], Any] | None,
                 metrics, iterator, sync: Callable[[], None] | None = None,
                 stage_ends: Mapping[int, str] | None = None):
        self.name, self.steps_total, self.checkpointer = name, steps_total, checkpointer
        self.stage_ends = dict(stage_ends or {})
        self._save, self.say = save, say
        self.every, self.eval_every, self.eval_at_start = cfg.checkpoint.every, cfg.eval.every, cfg.eval.at_start
        self.eval_at_end = cfg.eval.at_end
        self.eval_at_stage_ends = bool(getattr(cfg.eval, "at_stage_ends", False))  # (GRPO's section only)
        self.last_saved = first if first else None  # a resumed run starts from its checkpoint
        self.first = self.done = first
        self.evaluate = evaluate
        self.bar = ProgressBar(steps_total, first, enabled=show_progress and cfg.train.progress_bar, desc=name)
        self.signals = PreemptionSignals()
        self.metrics = metrics
        self._closing = (metrics, iterator)
        # train.profile_steps: the loop's `sync` waits for the update before the window and the window's last
        # one on the device (None: the loop body has waited already)
        self.trace, self._sync = StepTrace.for_run(cfg.train, say), sync

    def __enter__(self) -> "LoopControl":
        """Take the preemption signals and, in a fresh run, evaluate at the start (cfg.eval.at_start); in a
        resumed run, make up the periodic evaluation of its checkpoint's step when metrics.jsonl lacks it. An
        error in either (or a second Ctrl-C) leaves nothing taken: Python calls __exit__ only once __enter__
        has returned, and a notebook's kernel kept the run's SIGTERM handler (a dead run's flag) for good."""
        self.signals.__enter__()
        try:
            if self.evaluate is not None and self.eval_at_start and self.last_saved is None:
                self.evaluate("start")
            due = None if self.last_saved is None else self._eval_due(self.last_saved)
            if due is not None and not allgather_json("eval-logged", self.metrics.logged("eval", self.last_saved))[0]:
                # the step's evaluation runs after its checkpoint is saved: a process killed in between (an
                # evaluation takes a while) leaves the checkpoint without it. The main process's file decides.
                self.evaluate(due)
        except BaseException as err:
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Give the signals back; finish pending saves; release the checkpointer, metrics files and the data
        iterator's workers, whatever happened; drop the run's closures (they hold its model and state: a
        notebook's next run would find them in memory until Python's cycle collector ran)."""
        self.signals.__exit__(*exc)
        try:
            self.trace.stop()  # (a run that stopped early: what was traced is written; never raises)
        finally:
            try:
                close_run(self.bar, self.checkpointer, *self._closing)
            finally:
                self._save = self.evaluate = self._sync = None

    def updates(self, first: int):
        """The loop: yields the 0-based number of each update to run, from `first` on; after each one does the
        bookkeeping of `after_step` and stops early when preempted (`preempted` set); at the end the final state
        is saved and committed. `done` counts the updates made."""
        self.done, self.preempted = first, False
        if first > self.steps_total:  # (it saved step `first` again, evaluated it again and logged it twice)
            from fxjax.config_mapping import ConfigError

            what = "its stages' steps" if self.name == "grpo" else "train.steps / train.epochs"
            raise ConfigError(f"{self.name}: the checkpoint this run resumes from is at step {first}, past the "
                              f"{self.steps_total} steps this config gives ({what}): nothing is left to train. "
                              f"Give more than {first} steps to train on ({first}: the run ends where it is, for "
                              f"its exports), or another train.output_dir (or checkpoint.dir) for a new run; fxjax "
                              f"eval / export --step read what it has")
        if first == self.steps_total:  # (a finished run's folder given again, often with new settings meant as
            # a new run: it trained nothing, said only by "0 steps run" at the end)
            self.say(f"note: {self.name}: the checkpoint this run resumes from is its last step ({first}): nothing "
                     f"is left to train, only the end's evaluation and exports; to train with other settings, give "
                     f"the run its own train.output_dir (or checkpoint.dir), or more steps")
        self.trace.plan(first, self.steps_total)
        if first < self.steps_total:  # (a quiet minute would read as a hang)
            self.say(f"{self.name}: step {first + 1} compiles its programs first (a minute or more on a CPU; "
                     "seconds from a warm compilation cache); progress follows")
        while self.done < self.steps_total:
            self.trace.before(self.done, self._sync)
            yield self.done
            self.done += 1
            self.trace.after(self.done, self._sync)
            if self.after_step(self.done):
                self.preempted = True
                break
        else:
            self.save(self.done)
        self.checkpointer.wait()

    def _eval_due(self, step: int) -> str | None:
        """The tag of the evaluation due after update `step` (a stage's end, or periodic), None if none is:
        the last step's is the end's, when there is one (eval.at_end)."""
        if self.evaluate is None or (step == self.steps_total and self.eval_at_end):
            return None
        if self.eval_at_stage_ends and step in self.stage_ends:
            return f"end of stage {self.stage_ends[step]}"
        return "periodic" if self.eval_every and step % self.eval_every == 0 else None

    def save(self, step: int) -> None:
        if self.last_saved != step:
            self._save(step)
            self.last_saved = step

    def after_step(self, step: int) -> bool:
        """The bookkeeping after update `step` (1-based); True when the loop must stop (preempted, saved)."""
        self.checkpointer.check_saved(step)
        if (self.every and step % self.every == 0) or step == self.steps_total or step in self.stage_ends:
            self.save(step)
        if step in self.stage_ends:
            stage = self.stage_ends[step]
            unique = list(self.stage_ends.values()).count(stage) == 1  # (a stage run twice: by its step)
            self.say(f"{self.name}: stage {stage} ended at step {step}; its checkpoint is kept from pruning "
                     f"(`--step {stage if unique else step}` of fxjax eval, detect and export)")
        due = self._eval_due(step)
        if due is not None and not self.signals.stop_requested():
            # (stopping: no held-out evaluation within the grace period; the resumed run makes it up)
            self.evaluate(due)
        if faults.armed("after_step", step):
            self.checkpointer.wait()
            faults.point("after_step", step, self.signals.local_stop)
        if not self.signals.stop_requested():
            return False
        self.save(step)
        self.checkpointer.wait()
        self.bar.close()
        # (a process of the run that got no signal itself stops because another did)
        got = f"received {self.signals.name()}" if self.signals.received is not None else \
            "another process of the run received a stop signal"
        if step == self.steps_total:  # exits now all the same: an export may take longer than a grace period
            self.say(f"{self.name}: {got} after the last step; saved step {step} to "
                     f"{self.checkpointer.directory}: training is complete, but the evaluation at the end and the "
                     "exports did not run; run the same command again to do them")
        else:
            self.say(f"{self.name}: {got}; saved step {step} to "
                     f"{self.checkpointer.directory}; exiting (resume by running the same command)")
        return True

    def evaluate_at_end(self) -> None:
        """The evaluation at the end (eval.at_end), unless the run was complete already and metrics.jsonl has
        it (the same command run again, e.g. for the exports, repeated it and logged the step's twice)."""
        if self.evaluate is None:
            return
        complete = self.first == self.done == self.steps_total
        if complete and allgather_json("end-eval-logged", self.metrics.logged("eval", self.done))[0]:
            self.say(f"{self.name}: the evaluation at the end (step {self.done}) is in metrics.jsonl already; "
                     "not repeated")
            return
        self.evaluate("end")

    def wrap_up(self, result, model, params, *, skipped: int, cfg, started: float) -> None:
        """After the loop: the counts and final parameters into `result`, and for a run that was not
        preempted the evaluation at the end (cfg.eval.at_end) and the exports."""
        self.signals.__exit__()  # exports are not preemptible steps: a signal now ends the process as usual
        self.bar.close()
        result.steps, result.skipped_steps, result.preempted = self.done, skipped, self.preempted
        nnx.update(model, params)
        model.eval()  # (returned ready for inference: LoRA dropout off, as generate and a notebook expect)
        result.params, result.model = params, model
        if result.preempted:
            log_end(self.metrics, self.done, "preempted")
        else:
            if cfg.eval.at_end:
                self.evaluate_at_end()
            try:
                result.exported.update(export_outputs(self.name, model, cfg, self.say, self.done))
            except BaseException:  # (a full disk, say): the training itself is done and saved
                self.say(f"{self.name}: training is complete (step {self.done}), but the export at the end failed "
                         "(below): free space or fix the folder, then run the same command again to write it")
                raise
            log_end(self.metrics, self.done, "finished")
        result.seconds = time.perf_counter() - started


def export_outputs(name: str, model, cfg, say: Callable[[str], None], step: int) -> dict[str, str]:
    """The PEFT adapter and / or merged HF checkpoint that cfg.export asks for, from the model's current LoRA
    (the state of `step`)."""
    ends = cfg.stage_ends() if hasattr(cfg, "stage_ends") else ()  # (GRPO's stages; resolved to steps by now)
    origin = export_origin(cfg, name, step, cfg.checkpoint_dir, ends) | {"at_end_of_training": True}

    def adapter() -> Path:
        folder = save_adapter(model, cfg.export.adapter_dir, data=cfg.data, tokenizer_dir=cfg.tokenizer,
                              origin=origin)
        say(f"{name}: wrote the PEFT adapter to {cfg.export.adapter_dir}")
        return folder

    def merged() -> Path:
        folder = save_merged(model, cfg.export.merged_dir, tokenizer_dir=cfg.tokenizer, data=cfg.data,
                             max_new_tokens=cfg.eval.max_new_tokens, origin=origin)
        say(f"{name}: wrote the merged HF checkpoint to {cfg.export.merged_dir}")
        return folder

    parts = [(part, Path(folder), write) for part, folder, write in (
        ("adapter", cfg.export.adapter_dir, adapter), ("merged checkpoint", cfg.export.merged_dir, merged)) if folder]
    written = write_exports(parts, step, lambda text: say(f"{name}: {text}"))
    return {"adapter" if part == "adapter" else "merged": folder for part, folder in written.items()}


def close_run(bar, checkpointer, metrics, iterator) -> None:
    """Finish pending saves and release the checkpointer, the metrics files and the data iterator's workers."""
    bar.close()
    try:
        checkpointer.wait()
    finally:
        checkpointer.close()
        metrics.close()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
