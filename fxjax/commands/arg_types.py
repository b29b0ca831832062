"""argparse types of the commands' numeric flags: one wording for every command's bad number.

argparse says "argument --X: <message>" before each message; its own int/float types said
"invalid int value: 'x'", and checks made after parsing said "--x must be >= 1" without the word
"argument": five wordings for one mistake across the commands. These types give one, at parse time,
before any file is read or any weight loaded. (No jax, no numpy: `--help` stays instant.)
"""

from __future__ import annotations

import argparse
import math

from fxjax.config_mapping import SEED_LIMIT


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # (argparse's own message named the function: "invalid integer value")
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count, a size or a limit: 1 or more."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def seed(text: str) -> int:
    """--seed: numpy, grain and nnx.Rngs all take [0, 2**32) (a larger seed overflowed nnx)."""
    value = integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**32), got {value}")
    return value


def number(text: str) -> float:
    """A finite real number (its range is checked by the function that takes it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
