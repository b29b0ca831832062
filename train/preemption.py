"""SIGTERM / SIGINT / SIGHUP handling for training loops: a flag checked between steps, agreed by all
processes. SIGHUP is what a run in the foreground of an SSH session gets when the connection drops
(`tpu_setup.sh launch` without --detach): it killed every worker without a checkpoint. A process started
under nohup (SIGHUP ignored) keeps ignoring it."""

from __future__ import annotations

import signal
from typing import Any

import jax


class PreemptionSignals:
    """Context manager: SIGTERM/SIGINT/SIGHUP set a flag; `stop_requested()` is true on every process once any
    process got one (a second Ctrl-C raises KeyboardInterrupt at once)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
        self.received = signum

    def local_stop(self) -> bool:
        """This process got a signal (no collective: safe to poll in a wait loop)."""
        return self.received is not None

    def stop_requested(self) -> bool:
        """Whether any process got a signal; every process must make the same calls (once per step, and once
        more before an evaluation the step is due). Agreed through the
        coordination service's key-value store (fxjax.distributed.allgather_json), host to host: a device
        all-gather here would queue behind the step just dispatched and make every step wait for the
        previous one to finish."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from fxjax.distributed import allgather_json

            flag = any(allgather_json("stop_requested", flag))
        return flag

    def __exit__(self, *exc):
        """Give the previous handlers back (once: LoopControl gives them back before the exports, then
        again on leaving its block)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
