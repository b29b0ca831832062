"""fxjax.decode_weights: which weights a decoding pass gathers, and when "auto" gathers them. The gathered
decoding itself (tokens as one device's, no all-gather left in the compiled decode loop) runs on 8
simulated devices in tests/test_sharding.py; GRPO's rollout on it in tests/test_grpo.py."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from fxjax.config_mapping import ConfigError
from fxjax.decode_weights import choose_plan, gathered_spec
from fxjax.grpo_config import grpo_from_dict

GIB = 1024 ** 3


def test_gathered_spec_drops_only_the_fsdp_axis():
    assert gathered_spec(P("fsdp", "tensor")) == P(None, "tensor")
    assert gathered_spec(P("tensor", "fsdp")) == P("tensor", None)
    assert gathered_spec(P(("fsdp", "tensor"), None)) == P("tensor", None)  # a dimension split by both
    assert gathered_spec(P(("data", "fsdp", "tensor"))) == P(("data", "tensor"))
    assert gathered_spec(P(None, "tensor")) == P(None, "tensor") and gathered_spec(P()) == P()


def test_auto_gathers_when_the_copy_takes_at_most_half_the_free_memory():
    """A 7B's bf16 weights over fsdp 8 (13.5 GiB more per device) on an 80 GB GPU with 60 GiB free: gathered;
    a 72B's (120 GiB more): not, said with what it would take; a CPU (no memory limit): gathered."""
    seven = choose_plan("auto", fsdp=8, extra=int(13.5 * GIB), free=60 * GIB)
    assert seven.gather and seven.reason == ("the weights are gathered over fsdp=8 once per decoding pass (13.5 GiB "
                                             "more per device), 60.0 GiB free")
    big = choose_plan("auto", fsdp=8, extra=120 * GIB, free=60 * GIB)
    assert not big.gather and "(gathering them needs 120.0 GiB more per device, more than half of the 60.0 GiB free; " \
        "mesh.gather_for_decoding: always forces it)" in big.reason
    assert "for every generated token" in big.reason
    assert choose_plan("auto", fsdp=2, extra=30 * GIB, free=60 * GIB).gather  # (half exactly)
    assert not choose_plan("auto", fsdp=2, extra=30 * GIB + 1, free=60 * GIB).gather
    cpu = choose_plan("auto", fsdp=2, extra=3 * 1024 ** 2, free=None)
    assert cpu.gather and cpu.reason.endswith("(3.0 MiB more per device): the devices report no memory limit")
    assert choose_plan("always", fsdp=8, extra=120 * GIB, free=60 * GIB).gather
    assert not choose_plan("never", fsdp=8, extra=GIB, free=None).gather


def test_the_config_key_takes_trl_s_booleans_and_refuses_other_values():
    """mesh.gather_for_decoding: auto / always / never, and true / false as TRL's ds3_gather_for_generation."""
    def config(**mesh):
        return grpo_from_dict({"model": {"preset": "tiny"}, "data": {"train_files": ["train.jsonl"], "tokenizer": "tok"},
                               "mesh": mesh})

    assert config().mesh.gather_for_decoding == "auto"
    assert config(gather_for_decoding=True).mesh.gather_for_decoding == "always"
    assert config(gather_for_decoding=False).mesh.gather_for_decoding == "never"
    with pytest.raises(ConfigError, match="mesh.gather_for_decoding"):
        config(gather_for_decoding="sometimes")
    # TRL's own key, in a TRL-style file, names this one
    with pytest.raises(ConfigError, match=r"ds3_gather_for_generation: unknown key \(here mesh.gather_for_decoding "):
        grpo_from_dict({"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"},
                        "ds3_gather_for_generation": True})
