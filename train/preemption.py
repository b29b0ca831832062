"""SIGTERM / SIGINT / SIGHUP handling for training loops: a flag checked between steps, agreed by all
processes. SIGHUP is what a run in the foreground of an SSH session gets when the connection drops
(`tpu_setup.sh launch` without --detach): it killed every worker without a checkpoint. A process started
under nohup (SIGHUP ignored) keeps ignoring it."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax


_HELD: "PreemptionSignals | None" = None  # from joining a multi-process run until its loop takes them


def hold_stop_signals() -> None:
    """From now until a training loop takes them (`PreemptionSignals`), keep SIGTERM and SIGHUP for it:
    joining a multi-process run starts JAX's preemption service, whose own SIGTERM handler caught the signal
    and dropped it, so a preemption notice while the model loaded or a checkpoint was restored (minutes on a
    pod) was lost and the run trained on until the VM was killed. The loop then stops after its first step,
    with a checkpoint, as for a signal during training. (Ctrl-C is left as it is: it stops a start at once.)"""
    global _HELD
    if _HELD is None:
        _HELD = PreemptionSignals((signal.SIGTERM, signal.SIGHUP), stops="after its first step").__enter__()


def release_held_signals() -> None:
    """The handlers from before `hold_stop_signals` back, when no loop took the signals (a run that failed before
    its loop: a process that goes on, a test's or a notebook's, keeps SIGTERM as it had it)."""
    global _HELD
    held, _HELD = _HELD, None
    if held is not None:
        held.__exit__()


def held_signal() -> bool:
    """Whether a signal arrived while held (`hold_stop_signals`), before a loop took them."""
    return _HELD is not None and _HELD.received is not None


def _write_now(text: str) -> None:
    """`text` to stderr's file descriptor in one write: a handler that printed through sys.stderr while the
    interrupted code was printing would raise (a reentrant call into the same buffered stream)."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:  # (no stderr: nothing to tell)
        pass


class PreemptionSignals:
    """Context manager: SIGTERM/SIGINT/SIGHUP set a flag; `stop_requested()` is true on every process once any
    process got one (a second Ctrl-C raises KeyboardInterrupt at once). A signal held since the run's start
    (`hold_stop_signals`) counts as received."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP), stops="after the step in progress"):
        """`stops`: when the run stops, as the handler says it at once (held while a run loads: after its
        first step)."""
        self.received: int | None = None
        self._stops = stops
        self._previous: dict[int, Any] = {}
        self._signals = tuple(signals)

    def __enter__(self):
        global _HELD
        held, _HELD = _HELD, None
        if held is not None:  # (its handlers go back first, so that these give back the ones before it)
            held.__exit__()
            self.received = held.received
        for sig in self._signals:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # (started under nohup: a hang-up is meant to leave the run going)
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:  # (said at once: a step, an evaluation or a compilation can take minutes)
            again = "; Ctrl-C again stops at once, without one" if signum == signal.SIGINT else ""
            _write_now(f"fxjax: received {signal.Signals(signum).name}: the run stops {self._stops}, with a "
                       f"checkpoint{again}\n")
        self.received = signum

    def name(self) -> str | None:
        """The signal this process received ("SIGTERM"), None if none."""
        return None if self.received is None else signal.Signals(self.received).name

    def local_stop(self) -> bool:
        """This process got a signal (no collective: safe to poll in a wait loop)."""
        return self.received is not None

    def stop_requested(self) -> bool:
        """Whether any process got a signal; every process must make the same calls (once per step, and once
        more before an evaluation the step is due). Agreed through the
        coordination service's key-value store (fxjax.host_exchange.allgather_json), host to host: a device
        all-gather here would queue behind the step just dispatched and make every step wait for the
        previous one to finish."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from fxjax.host_exchange import allgather_json

            flag = any(allgather_json("stop_requested", flag))
        return flag

    def __exit__(self, *exc):
        """Give the previous handlers back (once: LoopControl gives them back before the exports, then
        again on leaving its block)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
