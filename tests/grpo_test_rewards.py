"""A reward term of a user's own for tests/test_grpo.py's runs (grpo.reward_funcs): shorter is better, and
it checks the columns every reward function is given (a wrong one fails the run, naming it)."""

from __future__ import annotations

import numpy as np


def brevity(completions, *, label, boxes, record, **kwargs):
    assert len(label) == len(boxes) == len(record) == len(completions)
    assert set(label) <= {"real", "generated"} and all(np.asarray(b).shape[-1:] in ((4,), (0,)) or
                                                       np.asarray(b).size == 0 for b in boxes)
    assert all(":" in r for r in record)  # file:line
    return [-len(c) / 100 for c in completions]
