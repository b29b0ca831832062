"""Run set-up shared by SFT and GRPO: a global batch that cannot shard over the batch devices is an error
that says which numbers to change (or, opted in, a warning on every run), never a silent replication."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fxjax.train.run_setup import batch_divides
from fxjax.config_mapping import ConfigError


def mesh(data, fsdp, tensor=1):
    return SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def test_a_batch_that_divides_shards():
    said = []
    assert batch_divides("data.batch_size", 16, mesh(4, 2), allow_replicated=False, log=said.append)
    assert said == []


def test_a_batch_that_does_not_divide_is_an_error_naming_the_numbers():
    with pytest.raises(ConfigError) as err:
        batch_divides("data.batch_size", 1, mesh(8, 1), allow_replicated=False, log=print)
    text = str(err.value)
    assert "data.batch_size = 1" in text and "8 batch devices" in text and "multiple of 8" in text
    assert "mesh.allow_replicated_batch=true" in text


def test_opting_in_replicates_with_a_warning():
    said = []
    assert not batch_divides("data.batch_size", 3, mesh(2, 2), allow_replicated=True, log=said.append)
    assert len(said) == 1 and said[0].startswith("warning:") and "4x the work" in said[0]


def test_greedy_decoding_refuses_a_batch_the_mesh_would_replicate(tokenizer_dir):
    """eval / detect: --batch-size against the batch devices of the mesh (the in-training evaluation checks
    eval.batch_size with batch_divides at the run's start and passes allow_replicated)."""
    from jax.sharding import AbstractMesh

    from fxjax.train.inference import GreedyDecoder

    two = AbstractMesh((2, 1, 1), ("data", "fsdp", "tensor"))
    GreedyDecoder(None, str(tokenizer_dir), batch_size=4, max_new_tokens=2, mesh=two)
    with pytest.raises(ValueError, match=r"--batch-size 3 does not divide over the 2 batch devices .* multiple of 2"):
        GreedyDecoder(None, str(tokenizer_dir), batch_size=3, max_new_tokens=2, mesh=two)
    GreedyDecoder(None, str(tokenizer_dir), batch_size=3, max_new_tokens=2, mesh=two, allow_replicated=True)
