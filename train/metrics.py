"""What a user watches: metrics.jsonl, TensorBoard (when a writer is installed) and a tqdm progress bar.

Only the main process (jax.process_index() == 0) writes. Every record is one JSON object per line with
``step`` and ``kind`` ("train" or "eval") and plain numbers, flushed at once so ``tail -f`` works.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "ProgressBar", "tensorboard_writer"]


def tensorboard_writer(directory: Path):
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or None when neither is usable."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(str(directory))
        except Exception:  # not installed, or torch without the tensorboard package
            continue
    return None


def _plain(value: Any) -> Any:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    if isinstance(value, bool):
        return value
    if f.is_integer() and not isinstance(value, float) and abs(f) < 2**53:
        return int(f)
    return f if math.isfinite(f) else str(f)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                self._tb = tensorboard_writer(Path(output_dir) / "tensorboard")
                if self._tb is None:
                    logger.info("TensorBoard: no writer installed (tensorboardX or tensorboard); metrics go to %s",
                                self.path)

    def log(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3),
                  **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar:
    """tqdm over the optimiser steps (main process only); falls back to nothing when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="sft", unit="step", file=sys.stderr,
                             dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int, postfix: Mapping[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
