"""train.loop_control.LoopControl, the cadence both training loops share, with stub collaborators: when it
saves, evaluates and stops (the real loops run it in tests/test_sft.py and tests/test_grpo.py)."""

from __future__ import annotations

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

    def close(self):
        pass


def _run(steps, *, every=0, eval_every=0, at_end=True, signal_at=None):
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every=every), train=SimpleNamespace(progress_bar=False),
                          eval=SimpleNamespace(every=eval_every, at_start=False, at_end=at_end))
    saved, evaluated, said = [], [], []
    control = LoopControl("sft", cfg, steps_total=steps, first=0, checkpointer=_Checkpointer(), save=saved.append,
                          say=said.append, show_progress=False,
                          evaluate=lambda tag: evaluated.append((tag, control.done)),
                          metrics=SimpleNamespace(close=lambda: None), iterator=None)
    with control:
        for update in control.updates(0):
            if update + 1 == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
    return control, saved, evaluated, said


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
