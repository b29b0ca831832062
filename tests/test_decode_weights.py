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
    cpu = choose_plan("auto", fsdp=2, extra=3 * 1024 ** 2, free=None, cpu=True)
    assert cpu.gather and cpu.reason.endswith("(3.0 MiB more per device): CPU devices, in the host's memory")
    # an accelerator that reports no memory is not guessed at
    unknown = choose_plan("auto", fsdp=8, extra=GIB, free=None, source="--gather-for-decoding")
    assert not unknown.gather and unknown.reason.endswith(
        "(the devices report no free memory to size the gathered copy by; --gather-for-decoding: always gathers it)")
    assert choose_plan("always", fsdp=8, extra=120 * GIB, free=60 * GIB).gather
    never = choose_plan("never", fsdp=8, extra=GIB, free=None, cpu=True, source="--gather-for-decoding")
    assert not never.gather and never.reason.endswith(": --gather-for-decoding is never")


def test_fsdp_of_one_gathers_nothing_and_says_nothing():
    """The partition rules name fsdp in a weight's layout whatever its size; on a mesh of fsdp 1 (the data
    parallel default, one device) "gathering" would have made a second copy of every such weight."""
    from fxjax.decode_weights import decode_plan, weights_for_decoding
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.model_init import init_model
    from flax import nnx

    model = init_model("tiny", seed=0, mesh=make_mesh(MeshConfig(1, 1, 1)))
    assert any("fsdp" in str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(nnx.state(model)))
    plan = decode_plan(model, "always")
    assert not plan.gather and not plan.splits
    assert weights_for_decoding(model, True) is model


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


def test_eval_and_detect_take_the_flag_else_the_runs_own_setting():
    """`fxjax eval` / `detect`: --gather-for-decoding when given, else a --run's mesh.gather_for_decoding
    (its split is the run's too), else auto; the plan's reason names which."""
    import argparse

    from fxjax.commands.model_args import Detector
    from fxjax.config_sections import MeshSection

    def setting(flag, run_mesh):
        return Detector(argparse.Namespace(gather_for_decoding=flag), "tok", run_mesh=run_mesh).gather_setting()

    assert setting(None, None) == ("auto", "--gather-for-decoding")
    assert setting(None, MeshSection(fsdp=8, gather_for_decoding="never")) == ("never", "the run's mesh.gather_for_decoding")
    assert setting("always", MeshSection(gather_for_decoding="never")) == ("always", "--gather-for-decoding")
    assert choose_plan("never", fsdp=8, extra=GIB, free=None, source="the run's mesh.gather_for_decoding").reason \
        .endswith(": the run's mesh.gather_for_decoding is never")
