"""`fxjax selfcheck`'s decoding check (the whole command runs in tests/test_layering.py)."""

from __future__ import annotations

import numpy as np

from fxjax.model.generate import greedy_generate
from fxjax.model_init import init_model
from fxjax.selfcheck import _decode_agrees


def test_decode_check_compares_every_token_with_an_uncached_forward():
    """It compared the first decoded token only, which comes from the prefill (the forward's own
    computation): a KV cache that broke every later token passed."""
    model = init_model("tiny", seed=0)
    ids = np.random.RandomState(0).randint(1000, 20000, size=(1, 7))
    out = greedy_generate(model, ids, max_new_tokens=6, eos_token_ids=())
    ok, detail = _decode_agrees(model, out, ids.shape[1], None, None)
    assert ok and detail == "all 6 tokens agree"
    broken = out.copy()
    broken[0, ids.shape[1] + 3] = (broken[0, ids.shape[1] + 3] + 1) % model.config.text.vocab_size
    ok, detail = _decode_agrees(model, broken, ids.shape[1], None, None)
    assert not ok and detail.startswith("token 3 (") and "disagree" in detail
