"""A reward term of a user's own for tests/test_grpo.py's runs (grpo.reward_funcs): shorter is better, and
it checks the columns every reward function is given (a wrong one fails the run, naming it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fxjax.train.reward_funcs import RESERVED


def brevity(completions, *, label, boxes, captions, tags, record, **kwargs):
    assert len(label) == len(boxes) == len(captions) == len(tags) == len(record) == len(completions)
    assert set(label) <= {"real", "generated"} and all(np.asarray(b).shape[-1:] in ((4,), (0,)) or
                                                       np.asarray(b).size == 0 for b in boxes)
    for i, source in enumerate(record):  # each column is its completion's record's (file:line, fxjax's layout)
        path, line = source.rsplit(":", 1)
        row = json.loads(Path(path).read_text().splitlines()[int(line) - 1])
        assert label[i] == row["label"] and tags[i] == list(row.get("tags", [])), (source, tags[i])
        assert captions[i] == [r["caption"] for r in row.get("regions", [])] and len(captions[i]) == len(boxes[i])
    # where training is (train.reward_funcs.PROGRESS, for a function that takes **kwargs): the sampling step
    # as metrics.jsonl numbers it, and its stage (the runs' stages: alpha, beta, gamma); TRL's
    # completion_ids: each completion's token ids through its EOS (all of them, one cut at the length limit);
    # and, as TRL passes a dataset's columns, the records' other keys, each as its completion's line holds it
    path = Path(record[0].rsplit(":", 1)[0])
    keys = {k for line in path.read_text().splitlines() for k in json.loads(line)} - RESERVED
    assert keys and set(kwargs) == {"step", "stage", "completion_ids"} | keys, (sorted(kwargs), sorted(keys))
    for i, source in enumerate(record):
        row = json.loads(Path(path).read_text().splitlines()[int(source.rsplit(":", 1)[1]) - 1])
        assert all(kwargs[key][i] == row.get(key) for key in keys), source
    assert isinstance(kwargs["step"], int) and kwargs["step"] >= 1 and kwargs["stage"] in ("alpha", "beta", "gamma")
    ids = kwargs["completion_ids"]
    assert len(ids) == len(completions) and all(isinstance(t, int) for row in ids for t in row)
    assert all(len(row) >= 1 for row in ids), ids
    return [-len(c) / 100 for c in completions]
