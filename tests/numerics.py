"""Helpers the tests share that must not import jax (tests/sharding_worker.py imports this module before it
sets the device count): the error metric and a free localhost port for multi-process runs."""

from __future__ import annotations

import socket

import numpy as np


def rel_err(out, ref, floor: float = 1.0) -> float:
    """max|out - ref| / max(floor, max|ref|).

    With the default floor 1 it is relative for values above 1 and absolute below (logits, whose near-zero
    entries would make a pure ratio meaningless); floor 0 gives the pure relative error (gradients).
    """
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    scale = max(floor, float(np.abs(ref).max(initial=0.0)))
    diff = float(np.abs(out - ref).max(initial=0.0))
    return diff / scale if scale > 0 else diff


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a JAX coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def rms_rel_err(out, ref) -> float:
    """||out - ref||_2 / ||ref||_2: the typical relative error of a whole array, for comparing the size of
    two errors (a max is decided by one element and jumps between equally good bf16 runs)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.sum((out - ref) ** 2)) / np.sqrt(np.sum(ref ** 2)))
