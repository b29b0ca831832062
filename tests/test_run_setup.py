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


def test_resume_skips_an_unreadable_checkpoint_and_names_the_folder_when_none_restores(tmp_path):
    """restore_latest with the real checkpointer: a damaged newest step is set aside and the one before
    restores; when no step restores, a RunLoadError (the CLI's 'error:' line, exit 2, not a traceback) says
    so, names the folder, keeps every step where it was, and carries the first line of orbax's error only."""
    import jax.numpy as jnp

    from fxjax.run_files import RunLoadError
    from fxjax.train.checkpointing import TrainCheckpointer
    from fxjax.train.run_setup import restore_latest

    def state(value):
        return {"params": {"w": jnp.full((4,), value, jnp.float32)}, "step": jnp.int32(value)}

    def damage(step):
        for f in (tmp_path / "ckpt" / str(step) / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.unlink()

    checkpointer = TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    for step in (1, 2):
        checkpointer.save(step, state(step), {"position": step}, {})
    checkpointer.wait()
    damage(2)
    said = []
    restored, data, _, step = restore_latest(checkpointer, state(0), said.append)
    assert step == 1 and data == {"position": 1} and float(restored["params"]["w"][0]) == 1.0
    assert any("checkpoint of step 2" in line and "cannot be restored" in line and "trying step 1" in line
               for line in said)
    assert (tmp_path / "ckpt" / "2.unreadable-0").is_dir()

    damage(1)
    with pytest.raises(RunLoadError) as err:
        restore_latest(checkpointer, state(0), said.append)
    text = str(err.value)
    assert f"no checkpoint in {tmp_path / 'ckpt'} restores (steps 1; the newest: " in text
    assert "Nothing was renamed" in text and "move" in text and "tensorstore_spec" not in text
    assert (tmp_path / "ckpt" / "1").is_dir()


def test_the_kept_start_lora_belongs_to_the_run_in_the_directory(tmp_path, tokenizer_dir):
    """keep_start_lora writes the starting adapter once; a resumed run keeps it, a new run in the same
    directory (checkpoint.resume false) replaces it with its own; resumed_start uses it only when the
    starting adapter is gone."""
    import json

    import jax
    from flax import nnx
    from safetensors.numpy import load_file

    from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora
    from fxjax.model_init import init_model
    from fxjax.peft_io import save_peft_adapter
    from fxjax.train.run_setup import keep_start_lora, resumed_start
    from fxjax.train_config import from_dict

    model = init_model("tiny", seed=0)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=("q_proj",)), rngs=nnx.Rngs(params=0))

    def adapter(seed, name):  # the model with other LoRA values, and those values saved as an adapter
        for _, v in nnx.to_flat_state(nnx.state(model, LORA_PARAMS)):
            v.set_value(jax.random.normal(jax.random.key(seed), v.get_value().shape))
        return model, save_peft_adapter(model, tmp_path / name)

    def config(adapter_dir, resume):
        return from_dict({"model": {"preset": "tiny", "adapter": str(adapter_dir)},
                          "data": {"tokenizer": str(tokenizer_dir), "train_files": ["unused.jsonl"]},
                          "train": {"output_dir": str(tmp_path / "run"), "steps": 1},
                          "checkpoint": {"resume": resume}})

    def kept():
        return load_file(str(tmp_path / "run" / "checkpoints" / "start_lora" / "adapter_model.safetensors"))

    first, first_dir = adapter(1, "first")
    assert keep_start_lora(first, config(first_dir, True)) == tmp_path / "run" / "checkpoints" / "start_lora"
    second, second_dir = adapter(2, "second")
    want = kept()
    keep_start_lora(second, config(second_dir, True))  # a resume (here with another adapter): the copy stays
    assert all((kept()[k] == want[k]).all() for k in want)
    keep_start_lora(second, config(second_dir, False))  # a new run in the same directory: its own copy
    now, theirs = kept(), load_file(str(second_dir / "adapter_model.safetensors"))
    assert set(now) == set(theirs) and all((now[k] == theirs[k]).all() for k in theirs)
    assert not any((now[k] == want[k]).all() for k in want)
    start = json.loads((tmp_path / "run" / "checkpoints" / "start_lora" / "fxjax_start.json").read_text())
    assert start["adapter"] == str(second_dir.resolve())
    assert not (tmp_path / "run" / "checkpoints" / "start_lora.partial").exists()

    lines = []
    assert resumed_start(config(second_dir, True), lines.append).model.adapter == str(second_dir)  # still here
    gone = tmp_path / "gone"
    assert resumed_start(config(gone, False), lines.append).model.adapter == str(gone)  # a new run: no copy used
    assert lines == []
    moved = resumed_start(config(gone, True), lines.append)
    assert moved.model.adapter == str(tmp_path / "run" / "checkpoints" / "start_lora")
    assert lines == [f"model.adapter={gone} is not here: the LoRA's shape from the run's copy in "
                     f"{tmp_path / 'run' / 'checkpoints' / 'start_lora'}"]
