"""train.loop_control.LoopControl, the cadence both training loops share, with stub collaborators: when it
saves, evaluates and stops (the real loops run it in tests/test_sft.py and tests/test_grpo.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from fxjax.train.loop_control import LoopControl


class _Checkpointer:
    directory = Path("ckpt")

    def wait(self):
        pass

    def check_saved(self, step):
        pass

    def close(self):
        pass


def _run(steps, *, every=0, eval_every=0, at_end=True, signal_at=None, first=0, metrics=None, profile=(2, 0),
         sync=None, body=None, stage_ends=None, eval_stage_ends=False, wrap_up=None):
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every=every),
                          train=SimpleNamespace(progress_bar=False, output_dir="out", profile_start=profile[0],
                                                profile_steps=profile[1]),
                          eval=SimpleNamespace(every=eval_every, at_start=False, at_end=at_end,
                                               at_stage_ends=eval_stage_ends))
    saved, evaluated, said = [], [], []
    control = LoopControl("sft", cfg, steps_total=steps, first=first, checkpointer=_Checkpointer(),
                          save=saved.append, say=said.append, show_progress=False,
                          evaluate=lambda tag: evaluated.append((tag, control.done)),
                          metrics=metrics or SimpleNamespace(close=lambda: None, log=lambda *args: None),
                          iterator=None, sync=sync,
                          stage_ends=stage_ends)
    with control:
        for update in control.updates(first):
            if body is not None:
                body(update)
            if update + 1 == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
        if wrap_up is not None:  # (in the block, as the loops' wrap_up: the control lets go of the run at its end)
            wrap_up(control)
    return control, saved, evaluated, said


class _Profiler:
    """jax.profiler's start_trace / stop_trace, recorded in order with the loop's updates and syncs."""

    def __init__(self, monkeypatch, events):
        import jax

        def start_trace(directory, profiler_options):
            assert profiler_options.python_tracer_level == 0  # (the Python tracer floods a trace)
            events.append(("start", Path(directory).name))

        monkeypatch.setattr(jax.profiler, "start_trace", start_trace)
        monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop",)))


@pytest.mark.parametrize("first, signal_at, expected", [
    # updates 1-2 traced; the loop's sync waits for update 0 on the device before the start (its tail stays
    # out of the trace) and for update 2 before the stop
    (0, None, [("update", 0), ("sync",), ("start", "profile"), ("update", 1), ("update", 2), ("sync",), ("stop",),
               ("update", 3)]),
    # a signal during update 1 (preempted after it): the trace stops on the way out
    (0, 2, [("update", 0), ("sync",), ("start", "profile"), ("update", 1), ("stop",)]),
    # resumed at update 3, past profile_start 1: no trace, and said
    (3, None, [("update", 3)]),
])
def test_the_trace_covers_the_asked_updates_and_waits_for_the_last(monkeypatch, tmp_path, first, signal_at,
                                                                    expected):
    monkeypatch.chdir(tmp_path)
    events = []
    _Profiler(monkeypatch, events)
    control, _, _, said = _run(4, first=first, signal_at=signal_at, profile=(1, 2),
                               sync=lambda: events.append(("sync",)), body=lambda u: events.append(("update", u)))
    assert events == expected
    if first == 3:
        assert "profile: train.profile_start 1 is before this run's first update (3, resumed)" in said[0]
    else:
        assert "profile: tracing updates 1-2 (0-based) into out/profile" in said
        assert (tmp_path / "out" / "profile").is_dir()


def test_a_window_past_the_end_is_cut_there_and_stops_before_the_final_save(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    events = []
    _Profiler(monkeypatch, events)
    control, saved, _, said = _run(4, profile=(2, 5), sync=lambda: events.append(("sync",)),
                                   body=lambda u: events.append(("update", u)))
    assert events == [("update", 0), ("update", 1), ("sync",), ("start", "profile"), ("update", 2), ("update", 3),
                      ("sync",), ("stop",)]
    assert said[0] == "profile: updates 2-6 asked, the run ends at update 3: tracing updates 2-3"
    assert saved == [4]  # (the final save, after the trace stopped: it is not in it)


def test_a_trace_that_fails_never_stops_the_run_nor_hides_its_error(monkeypatch, tmp_path):
    """start_trace failing (a trace of the user's already running, a folder that cannot be made) or
    stop_trace failing (a full disk) is said and the run goes on; an error of the run itself comes out as
    itself, and the run's files are closed, even when stopping the trace fails on the way out."""
    import jax

    monkeypatch.chdir(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("Profile has already been started")

    monkeypatch.setattr(jax.profiler, "start_trace", fail)
    control, saved, _, said = _run(4, profile=(1, 2))
    assert control.done == 4 and saved == [4]
    assert "profile: no trace: RuntimeError: Profile has already been started" in said

    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory, profiler_options: None)
    monkeypatch.setattr(jax.profiler, "stop_trace", fail)
    control, saved, _, said = _run(4, profile=(1, 2))
    assert control.done == 4 and "profile: the trace could not be written: RuntimeError: Profile has " \
                                  "already been started" in said

    closed = []

    def step(update):
        if update == 1:
            raise ValueError("the run's own error")

    metrics = SimpleNamespace(close=lambda: closed.append("metrics"))
    with pytest.raises(ValueError, match="the run's own error"):
        _run(4, profile=(1, 2), body=step, metrics=metrics)
    assert closed == ["metrics"]

    # and should stopping the trace itself raise (a bug of ours), the run's files are closed all the same
    from fxjax.train.step_trace import StepTrace

    def broken_stop(self):
        raise RuntimeError("a bug in StepTrace.stop")

    monkeypatch.setattr(StepTrace, "stop", broken_stop)
    with pytest.raises(RuntimeError, match="a bug in StepTrace.stop"):
        _run(4, profile=(1, 2), body=step, metrics=metrics)
    assert closed == ["metrics", "metrics"]


def test_each_process_of_a_multi_process_run_traces_into_its_own_folder(monkeypatch):
    """The trace's files are named after the host: two processes on one host wrote over each other."""
    import jax

    from fxjax.train.step_trace import StepTrace

    train = SimpleNamespace(output_dir="out", profile_start=2, profile_steps=1)
    assert StepTrace.for_run(train, print).directory == Path("out/profile")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert StepTrace.for_run(train, print).directory == Path("out/profile/process_1")


def test_no_trace_unless_asked(monkeypatch):
    events = []
    _Profiler(monkeypatch, events)
    _run(4, sync=lambda: events.append(("sync",)))
    assert events == []


def test_each_stage_end_is_saved_off_the_cadence_and_said():
    """GRPO's stage ends (steps 3 and 5 of 7) are saved besides every 4th step and the last, each once, and
    each is said with the --step that loads it; a run resumed at a stage end does not save it again."""
    _, saved, _, said = _run(7, every=4, stage_ends={3: "alpha", 5: "beta", 7: "gamma"})
    assert saved == [3, 4, 5, 7]
    assert [line for line in said if "ended" in line] == [
        f"sft: stage {name} ended at step {step}; its checkpoint is kept from pruning (`--step {name}` of fxjax "
        "eval, detect and export)" for name, step in (("alpha", 3), ("beta", 5), ("gamma", 7))]
    _, saved, _, said = _run(7, every=4, first=2, stage_ends={3: "alpha", 5: "alpha", 7: "gamma"})
    assert saved == [3, 4, 5, 7]  # (resumed from 2)
    # a stage run twice is loaded by its step
    assert [line.split("(")[1] for line in said if "ended" in line] == [
        "`--step 3` of fxjax eval, detect and export)", "`--step 5` of fxjax eval, detect and export)",
        "`--step gamma` of fxjax eval, detect and export)"]


@pytest.mark.parametrize("at_end", [True, False])
def test_each_stage_end_is_evaluated_with_eval_at_stage_ends(tmp_path, at_end):
    """eval.at_stage_ends (GRPO): the held-out evaluation after each stage, besides eval.every (the last
    stage's end is the end's evaluation when eval.at_end); off, only eval.every; a run resumed from a stage
    end whose evaluation metrics.jsonl lacks makes it up first."""
    from fxjax.train.metrics import MetricsLogger

    ends = {3: "alpha", 5: "beta", 7: "gamma"}
    _, _, evaluated, _ = _run(7, eval_every=4, at_end=at_end, stage_ends=ends, eval_stage_ends=True)
    assert evaluated == [("end of stage alpha", 3), ("periodic", 4), ("end of stage beta", 5)] + (
        [] if at_end else [("end of stage gamma", 7)])
    assert _run(7, eval_every=4, at_end=at_end, stage_ends=ends)[2] == [("periodic", 4)]
    # a signal during the step that ends alpha: saved, and no evaluation within the grace period
    control, saved, evaluated, _ = _run(7, at_end=at_end, stage_ends=ends, eval_stage_ends=True, signal_at=3)
    assert control.preempted and saved == [3] and evaluated == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "kind": "train", "loss": 1.0}) + "\n")
    _, _, evaluated, _ = _run(7, first=3, stage_ends=ends, eval_stage_ends=True,
                              metrics=MetricsLogger(tmp_path, tensorboard=False, resume_step=3))
    assert evaluated == [("end of stage alpha", 3), ("end of stage beta", 5)]


@pytest.mark.parametrize("at_end", [True, False])
def test_the_last_steps_periodic_evaluation_runs_unless_the_end_evaluates(at_end):
    control, saved, evaluated, _ = _run(4, every=2, eval_every=2, at_end=at_end)
    assert saved == [2, 4] and not control.preempted
    assert evaluated == [("periodic", 2)] + ([] if at_end else [("periodic", 4)])


def test_a_signal_after_the_last_step_says_what_is_left():
    control, saved, _, said = _run(3, signal_at=3)
    assert control.preempted and saved == [3]
    assert "after the last step" in said[-1] and "exports did not run; run the same command again" in said[-1]
    control, saved, _, said = _run(3, signal_at=2)
    assert control.preempted and control.done == 2 and saved == [2] and said[-1].endswith("running the same command)")


def test_a_resumed_run_makes_up_its_checkpoints_evaluation_when_the_log_lacks_it(tmp_path):
    """A step's evaluation runs after its checkpoint is saved: a run killed in between resumes from that
    checkpoint with the evaluation missing from metrics.jsonl, and makes it up first; one that has it does not."""
    from fxjax.train.metrics import MetricsLogger

    def resumed_from(step, records):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return _run(6, every=2, eval_every=2, first=step,
                    metrics=MetricsLogger(tmp_path, tensorboard=False, resume_step=step))[2]

    train_4 = {"step": 4, "kind": "train", "loss": 1.0}
    assert resumed_from(4, [train_4]) == [("periodic", 4)]
    assert resumed_from(4, [train_4, {"step": 4, "kind": "eval", "loss": 1.5}]) == []
    assert resumed_from(3, [{"step": 3, "kind": "train"}]) == [("periodic", 4)]  # step 3 is not an evaluation step


def test_a_complete_run_run_again_does_not_repeat_its_end_evaluation(tmp_path):
    """The same command after a complete run (for the exports, or by mistake) resumes at the last step: the
    evaluation at the end is made only when metrics.jsonl lacks it (a signal after the last step)."""
    from fxjax.train.metrics import MetricsLogger

    def again(records):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        _, _, evaluated, said = _run(4, every=2, first=4, wrap_up=LoopControl.evaluate_at_end,
                                     metrics=MetricsLogger(tmp_path, tensorboard=False, resume_step=4))
        return evaluated, said

    train_4 = {"step": 4, "kind": "train", "loss": 1.0}
    evaluated, said = again([train_4, {"step": 4, "kind": "eval", "loss": 1.5}])
    assert evaluated == [] and said[-1] == "sft: the evaluation at the end (step 4) is in metrics.jsonl already; not repeated"
    assert again([train_4])[0] == [("end", 4)]
    _, _, evaluated, _ = _run(4, every=2, first=2, wrap_up=LoopControl.evaluate_at_end)  # resumed before the end
    assert evaluated == [("end", 4)]


def test_a_failed_export_at_the_end_says_that_training_is_complete(monkeypatch):
    """A full disk at the end-of-run export gave a bare traceback: nothing said that the training was done
    and saved, and that the same command again writes the export (it resumes at the last step)."""
    from flax import nnx

    import fxjax.train.loop_control as loop_control

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop_control, "export_outputs", full_disk)
    control, _, _, said = _run(2, every=2, at_end=False)
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    result = SimpleNamespace(exported={})
    cfg = SimpleNamespace(eval=SimpleNamespace(at_end=False))
    with pytest.raises(OSError, match="No space left"):
        control.wrap_up(result, model, nnx.state(model), skipped=0, cfg=cfg, started=0.0)
    assert said[-1] == ("sft: training is complete (step 2), but the export at the end failed (below): free space "
                        "or fix the folder, then run the same command again to write it")


def test_an_end_of_run_export_failing_after_the_adapter_says_the_folders_hold_different_steps(tmp_path, monkeypatch):
    """export.adapter_dir written, then export.merged_dir failing left the merged folder of an earlier run (or
    none) beside this run's adapter, and nothing said so."""
    import fxjax.train.loop_control as loop_control
    from fxjax.train.export import PROMPT_SETTINGS_FILE

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    origins = []
    monkeypatch.setattr(loop_control, "save_adapter", lambda model, folder, data, tokenizer_dir, origin:
                        origins.append(origin) or Path(folder))
    monkeypatch.setattr(loop_control, "save_merged", full_disk)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / PROMPT_SETTINGS_FILE).write_text("{}")  # an earlier run's export
    export = SimpleNamespace(adapter_dir=str(tmp_path / "adapter"), merged_dir=str(tmp_path / "merged"))
    run = dict(tokenizer=None, data=None, model=SimpleNamespace(path=None, preset="tiny", from_run=None),
               checkpoint_dir=tmp_path / "ckpt", eval=SimpleNamespace(max_new_tokens=64),
               stage_ends=lambda: (("alpha", 10), ("beta", 20), ("gamma", 30)))
    cfg, said = SimpleNamespace(export=export, **run), []
    with pytest.raises(OSError, match="No space left"):
        loop_control.export_outputs("grpo", None, cfg, said.append, 30)
    assert said == [f"grpo: wrote the PEFT adapter to {tmp_path / 'adapter'}",
                    f"grpo: wrote the adapter ({tmp_path / 'adapter'}) of step 30, but writing the merged checkpoint "
                    f"failed (below): {tmp_path / 'merged'} still holds an earlier export, not step 30, so the "
                    "folders no longer match"]
    # (the folder records which run and step it holds: fxjax_export.json)
    assert {k: origins[0][k] for k in ("checkpoints", "kind", "step", "stage", "stage_end", "base_model",
                                        "max_new_tokens")} == {
        "checkpoints": str(tmp_path / "ckpt"), "kind": "grpo", "step": 30, "stage": "gamma", "stage_end": True,
        "base_model": "tiny", "max_new_tokens": 64}
    export = SimpleNamespace(adapter_dir=None, merged_dir=str(tmp_path / "new"))
    said.clear()
    with pytest.raises(OSError):  # one folder: nothing to match
        loop_control.export_outputs("grpo", None, SimpleNamespace(export=export, **run), said.append, 30)
    assert said == []


def test_a_checkpoint_past_the_configs_steps_is_an_error_not_a_second_end():
    """A finished run of 10 steps run again with stages of 8: it saved step 10 again and logged a second
    evaluation at the end; now an error naming both counts, before anything is saved or evaluated."""
    from fxjax.config_mapping import ConfigError

    with pytest.raises(ConfigError, match=r"sft: the checkpoint this run resumes from is at step 10, past the 8 steps "
                                          r"this config gives \(train.steps / train.epochs\): nothing is left to "
                                          r"train\. Give more than 10 steps to train on \(10: the run ends "
                                          r"where it is, for its exports\)"):
        _run(8, first=10)
    control, saved, _, said = _run(8, first=8)  # (at its end: the same command again, for its exports): no error,
    assert control.done == 8 and saved == []  # nothing trained and its checkpoint not written again
    assert said[0] == ("note: sft: the checkpoint this run resumes from is its last step (8): nothing is left to "
                       "train, only the end's evaluation and exports; to train with other settings, give the run its "
                       "own train.output_dir (or checkpoint.dir), or more steps"), said


def test_a_dropped_ssh_connection_stops_the_run_as_a_preemption():
    """SIGHUP (the foreground of an SSH session that drops: `tpu_setup.sh launch` without --detach) killed
    every worker without a checkpoint; it now sets the flag SIGTERM sets, and the previous handler is back
    after."""
    from fxjax.train.preemption import PreemptionSignals

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (the suite may run under nohup: HUP ignored)
    try:
        with PreemptionSignals() as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.local_stop() and signals.received == signal.SIGHUP and signals.stop_requested()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        # started under nohup (HUP ignored): a hang-up leaves the run going, as nohup means
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with PreemptionSignals() as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert not signals.local_stop()
    finally:
        signal.signal(signal.SIGHUP, before)


def test_the_model_a_run_returns_is_ready_for_inference(monkeypatch):
    """run_sft's model came back in train mode: LoRA dropout on, so two calls differed and greedy_generate
    failed inside a jit (flax's TraceContextError) unless the caller knew to call model.eval()."""
    from flax import nnx

    import fxjax.train.loop_control as loop_control

    monkeypatch.setattr(loop_control, "export_outputs", lambda *args: {})
    logged = []
    control, _, _, _ = _run(2, every=2, at_end=False,
                            metrics=SimpleNamespace(close=lambda: None, log=lambda *args: logged.append(args)))
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    model.train()
    result = SimpleNamespace(exported={})
    control.wrap_up(result, model, nnx.state(model, nnx.Param), skipped=0, cfg=SimpleNamespace(
        eval=SimpleNamespace(at_end=False)), started=0.0)
    assert result.model is model and model.layers[1].deterministic
    assert logged == [(2, "end", {"status": "finished"})]  # (after the exports: the run's last record)


_PROBED: dict = {}


def probe_runner(cfg):
    """A training runner that records whether SIGTERM is held as the loop would find it, then fails before it."""
    from fxjax.train import preemption

    _PROBED["held"] = preemption._HELD is not None and signal.getsignal(signal.SIGTERM) is not _PROBED["before"]
    raise RuntimeError("failed before the loop")


def test_the_command_holds_a_stop_signal_until_the_loop_and_gives_it_back_when_none_runs(tmp_path, tokenizer_dir):
    """`fxjax sft` / `grpo` hold SIGTERM from the join on (a preemption notice while the model loads stops the run
    after its first step: tests/test_sft.py); a run that fails before its loop gives the handler back, so that
    a process that goes on (a test's, a notebook's) keeps SIGTERM as it had it."""
    from fxjax.commands.training import run_training
    from fxjax.train import preemption
    from fxjax.train_config import load_sft_config

    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "label": "real"}\n')
    (tmp_path / "run.yaml").write_text(
        f"model: {{preset: tiny}}\ndata: {{tokenizer: {tokenizer_dir}, train_files: [{tmp_path / 'train.jsonl'}]}}\n"
        f"train: {{steps: 1, output_dir: {tmp_path / 'run'}}}\n")
    _PROBED.update(before=signal.getsignal(signal.SIGTERM))
    with pytest.raises(RuntimeError, match="failed before the loop"):
        run_training("sft", SimpleNamespace(config=str(tmp_path / "run.yaml"), set=[]), load_sft_config,
                     f"{__name__}:probe_runner")
    assert _PROBED["held"]
    assert signal.getsignal(signal.SIGTERM) is _PROBED["before"] and preemption._HELD is None


@pytest.mark.parametrize("error", [RuntimeError("RESOURCE_EXHAUSTED: Out of memory"), KeyboardInterrupt()])
def test_an_error_in_the_start_evaluation_gives_back_the_signals_and_closes_the_run(error):
    """The start evaluation (or a resumed run's made-up one) failing, or a second Ctrl-C during it, raised out
    of LoopControl.__enter__, so its __exit__ never ran: a notebook's kernel kept the dead run's handlers (SIGTERM
    then set a flag nobody read: the process ignored it) and its checkpointer, metrics files and data
    workers. Now the start's error leaves the signals as they were and the run's parts closed; the run's
    closures (its model and state) are dropped on the way out, as after any run."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    closed = []

    class Checkpointer(_Checkpointer):
        def close(self):
            closed.append("checkpointer")

    def evaluate(tag):
        raise error

    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every=0),
                          train=SimpleNamespace(progress_bar=False, output_dir="out", profile_start=2, profile_steps=0),
                          eval=SimpleNamespace(every=0, at_start=True, at_end=True, at_stage_ends=False))
    control = LoopControl("sft", cfg, steps_total=3, first=0, checkpointer=Checkpointer(), save=lambda step: None,
                          say=lambda text: None, show_progress=False, evaluate=evaluate,
                          metrics=SimpleNamespace(close=lambda: closed.append("metrics")),
                          iterator=SimpleNamespace(close=lambda: closed.append("iterator")))
    with pytest.raises(type(error)):
        with control:
            pass
    assert {sig: signal.getsignal(sig) for sig in previous} == previous
    assert closed == ["checkpointer", "metrics", "iterator"]
    assert control._save is None and control.evaluate is None  # (nothing of the run's held from here)


def test_a_stop_signal_is_said_at_once_and_a_second_ctrl_c_stops_at_once(capfd):
    """A stop signal set a flag and said nothing until the step in progress (an evaluation, step 1's
    compilation: minutes on a large model) had ended, which invited a second Ctrl-C. Now its handler says at
    once what will happen, and how to stop at once; SIGTERM (a preemption) is said too, once."""
    def body(update):
        if update == 0:
            os.kill(os.getpid(), signal.SIGINT)
            assert capfd.readouterr().err == ("fxjax: received SIGINT: the run stops after the step in progress, "
                                              "with a checkpoint; Ctrl-C again stops at once, without one\n")
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)

    control, saved, _, _ = _run(3, every=5, body=body)
    assert control.preempted and saved == [1]
    control, saved, _, _ = _run(3, every=5, body=lambda update: [os.kill(os.getpid(), signal.SIGTERM)] * 2)
    assert control.preempted and saved == [1]
    assert capfd.readouterr().err == ("fxjax: received SIGTERM: the run stops after the step in progress, with a "
                                      "checkpoint\n")
    from fxjax.train import preemption

    preemption.hold_stop_signals()  # (while a run loads: no step in progress yet)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.held_signal()
    finally:
        preemption.release_held_signals()
    assert capfd.readouterr().err == "fxjax: received SIGTERM: the run stops after its first step, with a checkpoint\n"


def test_a_grpo_run_of_steps_that_train_on_nothing_is_said_once_a_streak():
    """Every group's rewards equal (zero_std_group_fraction 1.0) for QUIET_STEPS steps in a row: the log says
    the updates trained on nothing, and why where every completion ran to the length limit (a start that has
    not learned the format: a newcomer's 300-step run from the base model went by without a word)."""
    from fxjax.train.signal_watch import QUIET_STEPS, SignalWatch

    said = []
    watch = SignalWatch(said.append)
    truncated, quiet = ({"zero_std_group_fraction": 1.0, "truncated_fraction": t} for t in (1.0, 0.5))
    signal = {"zero_std_group_fraction": 0.5, "truncated_fraction": 1.0}
    for step in range(1, QUIET_STEPS):
        watch.after_step(step, truncated)
    watch.after_step(QUIET_STEPS, signal)  # (a step with signal ends the streak: nothing said)
    assert said == []
    for step in range(QUIET_STEPS + 1, 3 * QUIET_STEPS + 1):
        watch.after_step(step, truncated)
    assert len(said) == 1 and said[0].startswith(f"grpo: warning: steps {QUIET_STEPS + 1}-{2 * QUIET_STEPS}: in every "
                                                 "group the completions got equal rewards")
    assert "every completion ran to grpo.max_completion_length" in said[0] and "model.from_run" in said[0]
    watch.after_step(100, signal)
    for step in range(101, 101 + QUIET_STEPS):
        watch.after_step(step, quiet)
    assert len(said) == 2 and "(grpo.temperature, grpo.num_generations)" in said[1] and "max_completion" not in said[1]
    for step in range(200, 200 + QUIET_STEPS):  # (a step without groups, NaN, is no quiet step)
        watch.after_step(step, quiet if step % 2 else {"zero_std_group_fraction": float("nan")})
    assert len(said) == 2
