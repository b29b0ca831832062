"""Run set-up shared by SFT and GRPO: a global batch that cannot shard over the batch devices is an error
that says which numbers to change (or, opted in, a warning on every run), never a silent replication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
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
    assert "mesh.allow_replicated_batch=true" in text and "lower optim.grad_accum to keep the effective batch" in text
    with pytest.raises(ConfigError) as err:  # not a training batch: nothing to accumulate
        batch_divides("eval.batch_size", 3, mesh(4, 1), allow_replicated=False, log=print, accumulates=False)
    assert "set eval.batch_size to a multiple of 4 (e.g. 4), or move devices" in str(err.value)
    assert "grad_accum" not in str(err.value)


def test_a_grpo_batch_in_micro_batches_names_the_batch_size_that_divides():
    """GRPO's data.batch_size prompts a step in optim.grad_accum updates: each micro-batch must shard. The
    error read "data.batch_size / optim.grad_accum (a micro-batch's prompts) = 4 ... (e.g. 8)" where
    data.batch_size was 8 already; it names the batch size to set."""
    assert batch_divides("data.batch_size", 16, mesh(8, 1), allow_replicated=False, log=print, micro_batches=2)
    with pytest.raises(ConfigError) as err:
        batch_divides("data.batch_size", 8, mesh(8, 1), allow_replicated=False, log=print, micro_batches=2)
    assert str(err.value).startswith(
        "data.batch_size 8 / optim.grad_accum 2 = 4 rows a micro-batch, which do not divide over the 8 batch devices "
        "(mesh.data 8 x mesh.fsdp 1): set data.batch_size to a multiple of 8 x 2 = 16 (e.g. 16), or lower "
        "optim.grad_accum, or move devices to mesh.tensor; or set mesh.allow_replicated_batch=true")


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


def test_eval_and_detect_take_a_batch_the_mesh_splits_before_any_weights_load():
    """The default batch is rounded up to a multiple of the mesh's batch devices (8 on an 8-GPU host with
    --run, whose default mesh puts every device on the data axis); a given one that does not divide is an
    error naming --batch-size, from the mesh alone (no weights loaded: `model` stays None)."""
    import argparse

    from jax.sharding import AbstractMesh

    from fxjax.commands.model_args import Detector

    eight = Detector(args=argparse.Namespace(run="RUN", mesh=None), tokenizer="tok",
                     mesh=AbstractMesh((4, 2, 1), ("data", "fsdp", "tensor")))
    assert eight.batch_size(None, default=4) == 8 and eight.batch_size(None, default=8) == 8
    assert eight.batch_size(None, default=9) == 16 and eight.batch_size(16, default=4) == 16
    with pytest.raises(ValueError, match=r"--batch-size 4 does not divide over the 8 batch devices .* \(e\.g\. 8\)"):
        eight.batch_size(4, default=4)
    assert eight.model is None
    # --model: every device on the data axis (one here; it was no mesh, the other devices of a host idle)
    one = Detector(args=argparse.Namespace(run=None, mesh=None), tokenizer="tok")
    assert one.batch_size(None, default=4) == 4 and one.batch_size(3, default=4) == 3
    import jax

    assert dict(one.mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_a_save_that_fails_after_its_commit_names_the_step_on_disk_not_an_older_one(tmp_path, monkeypatch):
    """A walk-through: an older checkpoint that could not be removed (an immutable folder) failed orbax's save
    of step 9 after step 9 was committed; the run said "step 9 could not be saved ... the last good checkpoint
    is step 7: free space", and a resume went on from step 9. Now it says that step 9 was written and is the
    newest to resume from; a save that never committed is said as before."""
    import jax.numpy as jnp

    from fxjax.train.checkpointing import CheckpointSaveError, TrainCheckpointer

    checkpointer = TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(1, {"w": jnp.ones(2)}, {"position": 1}, {})
    checkpointer.save(2, {"w": jnp.ones(2)}, {"position": 2}, {})

    def failed():
        raise PermissionError(1, "Operation not permitted", "_CHECKPOINT_METADATA")

    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", failed)
    monkeypatch.setattr(checkpointer.manager, "latest_step", lambda: 1)  # (orbax's list, without the step)
    with pytest.raises(CheckpointSaveError, match=r"the checkpoint of step 2 was written to .*ckpt, but saving it "
                       r"failed after \(removing older checkpoints or writing their metadata: PermissionError: .*\); "
                       r"stopped after step 3; fix the folder and run the same command again to resume from step "
                       r"2, the newest there"):
        checkpointer.check_saved(3)
    checkpointer._pending = 5  # a save that never committed: as before
    with pytest.raises(CheckpointSaveError, match=r"the checkpoint of step 5 could not be saved to .* the last good "
                                                  r"checkpoint is step 1: free space"):
        checkpointer.check_saved(6)


def test_resume_skips_an_unreadable_checkpoint_and_names_the_folder_when_none_restores(tmp_path):
    """restore_latest with the real checkpointer: a damaged newest step is set aside and the one before
    restores; when no step restores, a RunLoadError (the CLI's 'error:' line, exit 2, not a traceback) says
    so, names the folder, keeps every step where it was, and carries the first line of orbax's error only."""
    import jax.numpy as jnp

    from fxjax.run_files import RunLoadError
    from fxjax.train.checkpointing import TrainCheckpointer
    from fxjax.train.resume import restore_latest

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


def test_a_checkpoint_of_other_shapes_is_refused_naming_its_lora_settings(tmp_path):
    """The same layout with other shapes (another LoRA rank): an error naming the array, both shapes and the
    checkpoint's LoRA settings, before orbax's own traceback (only the end-to-end SFT test covered it)."""
    import jax.numpy as jnp

    from fxjax.train.checkpointing import TrainCheckpointer

    checkpointer = TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(3, {"params": {"lora_a": jnp.zeros((4, 2))}, "step": jnp.int32(3)}, {"position": 3},
                      {"lora": {"rank": 2, "target_modules": "all-linear"}})
    checkpointer.wait()
    with pytest.raises(ConfigError, match=r"step 3 in .*ckpt was written with other model or LoRA settings than "
                                          r"this run's \(its lora: rank 2, target_modules all-linear\): 1 array\(s\) "
                                          r"differ in shape, e.g. params.lora_a \(4, 2\) there, \(4, 8\) here"):
        checkpointer.restore({"params": {"lora_a": jnp.zeros((4, 8))}, "step": jnp.int32(0)}, 3)
    checkpointer.close()


def test_a_checkpoint_of_other_lora_targets_or_layout_shapes_is_refused_not_set_aside(tmp_path):
    """Other LoRA targets (names the run lacks) are another run's settings: refused naming them, as for another
    rank, where the resume warned of a damaged checkpoint at every step and then said to move the directory
    away; in the other decoder layout (scan_layers) another rank's shapes are named the same way."""
    import jax.numpy as jnp

    from fxjax.train.checkpointing import TrainCheckpointer
    from fxjax.train.resume import restore_latest

    lora = {"rank": 2, "target_modules": ["q_proj"]}
    checkpointer = TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    for step in (1, 2):
        checkpointer.save(step, {"params": {"q_proj": jnp.ones((4, 2))}, "step": jnp.int32(step)}, {"position": step},
                          {"lora": lora})
    said = []
    wider = {"params": {"q_proj": jnp.zeros((4, 2)), "v_proj": jnp.zeros((4, 2))}, "step": jnp.int32(0)}
    with pytest.raises(ConfigError, match=r"step 2 in .*ckpt was written with other model or LoRA settings than this "
                                          r"run's \(its lora: rank 2, target_modules \['q_proj'\]\): .*lacks "
                                          r"\['params.v_proj'\].*Resume it with its own settings"):
        restore_latest(checkpointer, wider, said.append)
    assert said == [] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]

    # saved looped (one entry per layer, rank 2), resumed under scan_layers (one stacked entry) at rank 8
    def decoder_layers(value):
        return {"decoder": {"layers": value}}

    checkpointer.save(3, {"params": decoder_layers({str(i): {"up_proj": jnp.ones((4, 2))} for i in range(2)}),
                          "step": jnp.int32(3)}, {"position": 3}, {"lora": lora})
    stacked = {"params": decoder_layers({"up_proj": jnp.zeros((2, 4, 8))}), "step": jnp.int32(0)}
    with pytest.raises(ConfigError, match=r"step 3 .* 2 array\(s\) differ in shape, e.g. "
                                          r"params.decoder.layers.0.up_proj \(4, 2\) there, \(4, 8\) here"):
        restore_latest(checkpointer, stacked, said.append)
    assert said == []
    checkpointer.close()


def test_the_kept_start_lora_belongs_to_the_run_in_the_directory(tmp_path, tokenizer_dir, monkeypatch):
    """keep_start_lora writes the starting adapter once; a resumed run from the same adapter keeps it, a run
    from another adapter or a new run (checkpoint.resume false) replaces it with its own; only a copy of
    the run's own start stands in for a missing adapter (resumed_start, the CLI's path check)."""
    import json
    import shutil

    import jax
    from flax import nnx
    from safetensors.numpy import load_file

    from fxjax.commands.training import check_paths
    from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora
    from fxjax.model_init import init_model
    from fxjax.peft_io import save_peft_adapter
    from fxjax.train.run_setup import keep_start_lora, resumed_start
    from fxjax.train_config import from_dict

    model = init_model("tiny", seed=0)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=("q_proj",)), rngs=nnx.Rngs(params=0))
    copy = tmp_path / "run" / "checkpoints" / "start_lora"

    def adapter(seed, name):  # the model with other LoRA values, and those values saved as an adapter
        for _, v in nnx.to_flat_state(nnx.state(model, LORA_PARAMS)):
            v.set_value(jax.random.normal(jax.random.key(seed), v.get_value().shape))
        return save_peft_adapter(model, tmp_path / name)

    def config(adapter_dir, resume):
        return from_dict({"model": {"preset": "tiny", "adapter": str(adapter_dir)},
                          "data": {"tokenizer": str(tokenizer_dir), "train_files": [str(tokenizer_dir / "tokenizer.json")]},
                          "train": {"output_dir": str(tmp_path / "run"), "steps": 1},
                          "checkpoint": {"resume": resume}})

    def kept_from(adapter_dir):  # the copy holds that adapter's values and names it
        now, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (copy, adapter_dir))
        named = json.loads((copy / "fxjax_start.json").read_text())["adapter"] == str(adapter_dir.resolve())
        return named and set(now) == set(theirs) and all((now[k] == theirs[k]).all() for k in theirs)

    first = adapter(1, "first")
    assert keep_start_lora(model, config(first, True)) == copy and kept_from(first)
    (copy / "marker").write_text("")
    # the same run again before its first checkpoint: nothing trained from the copy, which is written again
    # (a from_run start's newest step may have moved on: the copy restarted from the step it copied, silently)
    keep_start_lora(model, config(first, True))
    assert kept_from(first) and not (copy / "marker").exists()
    (copy / "marker").write_text("")
    (copy.parent / "1").mkdir()  # a committed checkpoint
    keep_start_lora(model, config(first, True))  # the same run resumed: its copy stays as it was
    assert (copy / "marker").exists()
    # process 0's view decides on every process (the write gathers: a host that decided alone could hang the
    # others); here process 0 (stubbed) sees no copy to resume from, so this process writes it too
    from fxjax.train import run_setup

    with monkeypatch.context() as stub:
        stub.setattr(run_setup, "allgather_json", lambda name, mine, timeout_s: [False, mine])
        keep_start_lora(model, config(first, True))
    assert kept_from(first) and not (copy / "marker").exists()
    (copy / "marker").write_text("")
    second = adapter(2, "second")
    keep_start_lora(model, config(second, True))  # another start in the same directory: its own copy
    assert kept_from(second) and not (copy / "marker").exists()
    (copy / "marker").write_text("")
    keep_start_lora(model, config(second, False))  # a new run from the same adapter: written again
    assert kept_from(second) and not (copy / "marker").exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["1", "start_lora"]  # no partial or replaced folder left

    lines = []
    # still here: the copy all the same (the folder may hold another adapter since), and what changed is said
    assert resumed_start(config(second, True), lines.append).model.adapter == str(copy) and lines == []
    settings = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**settings, "lora_alpha": 64, "use_rslora": True}))
    assert resumed_start(config(second, True), lines.append).model.adapter == str(copy)
    assert lines == [f"model.adapter {second} now holds another adapter than the run started from (lora_alpha 64 "
                     f"there, 4 in the run's copy; use_rslora True there, False in the run's copy): the run's copy "
                     f"in {copy} gives the LoRA's shape"]
    (second / "adapter_config.json").write_text(json.dumps(settings))
    lines.clear()
    moved = tmp_path / "moved"
    shutil.move(second, moved)
    assert resumed_start(config(second, False), lines.append).model.adapter == str(second)  # a new run: no copy
    assert resumed_start(config(first, True), lines.append).model.adapter == str(first)  # the copy is second's
    assert lines == []
    check_paths(config(second, True))  # the path check lets it be missing only when the run resumes
    with pytest.raises(FileNotFoundError, match="model.adapter: .*second does not exist"):
        check_paths(config(second, False))
    shutil.rmtree(first)
    with pytest.raises(FileNotFoundError, match="model.adapter: .*first does not exist"):
        check_paths(config(first, True))
    assert resumed_start(config(first, True), lines.append).model.adapter == str(first)  # an error later, not a copy
    resumed = resumed_start(config(second, True), lines.append)
    assert resumed.model.adapter == str(copy)
    assert lines == [f"model.adapter={second} is not here: the LoRA's shape from the run's copy in {copy}"]

    # a relative model.adapter still names its start after the project moved (the record keeps it as given)
    project = tmp_path / "project"
    project.mkdir()
    shutil.move(moved, project / "sft")
    monkeypatch.chdir(project)
    keep_start_lora(model, config(Path("sft"), True))
    assert kept_from(project / "sft")
    monkeypatch.chdir(tmp_path)  # here "sft" names a folder that is not there
    assert resumed_start(config(Path("sft"), True), lines.append).model.adapter == str(copy)
    assert lines[-1] == f"model.adapter=sft is not here: the LoRA's shape from the run's copy in {copy}"
    # ... and read from another folder than the one the run started from, where "sft" is, it is there: not
    # said to be missing (a newcomer's eval from another folder was told "is not here")
    (copy.parent / "1" / "data").mkdir(parents=True, exist_ok=True)
    (copy.parent / "1" / "data" / "data_state.json").write_text(json.dumps({"cwd": str(project)}))
    said = len(lines)
    assert resumed_start(config(Path("sft"), True), lines.append).model.adapter == str(copy) and len(lines) == said


def test_the_first_log_line_names_what_the_model_starts_from_and_lora_enabled_false_is_refused(tmp_path,
                                                                                                monkeypatch):
    """The lora section shapes fresh adapters only: a start from an adapter or a run says lora.* is unused
    (the SFT log printed the config's rank and alpha, and "model None" for a run), and enabled=false, which
    an adapter let through while training it all the same, is refused."""
    from fxjax.train.run_joining import join_run
    from fxjax.train.run_setup import start_description
    from fxjax.train_config import ConfigError, load_sft_config

    base = ["data.train_files=[t.jsonl]", "data.tokenizer=tok", "train.steps=1"]
    fresh = load_sft_config(overrides=base + ["model.preset=tiny", "lora.rank=4", "lora.alpha=8"])
    assert start_description(fresh) == "preset tiny, fresh LoRA r=4 alpha=8.0"
    adapter = load_sft_config(overrides=base + ["model.path=/m/base", "model.adapter=/m/adapter"])
    assert start_description(adapter) == ("/m/base with the adapter /m/adapter (its rank, alpha and targets; "
                                          "lora.* unused)")
    # an adapter exported from a run on another base folder (not a copy of it): said in the run's first line (a
    # raw OtherBaseWarning came out of the model's loading, with its source line)
    for name in ("trained-on", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "fxjax_export.json").write_text(json.dumps({"base_model": str(tmp_path / "trained-on")}))
    elsewhere = load_sft_config(overrides=base + [f"model.path={tmp_path / 'other'}",
                                                  f"model.adapter={tmp_path / 'adapter'}"])
    assert start_description(elsewhere).endswith(
        f"(its rank, alpha and targets; lora.* unused) (warning: {tmp_path / 'adapter'} was trained on "
        f"{tmp_path / 'trained-on'} (its fxjax_export.json), not {tmp_path / 'other'}: if these weights differ, its "
        "answers mean nothing)")
    # an adapter of a run on a preset records its name, no folder: a folder of that name here is not its base
    (tmp_path / "adapter" / "fxjax_export.json").write_text(json.dumps({"base_model": "tiny"}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert "warning" not in start_description(elsewhere)
    run = load_sft_config(overrides=base + ["model.from_run=runs/sft", "model.from_run_step=40"])
    assert start_description(run) == "the run runs/sft at step 40 (its base model and LoRA; lora.* unused)"
    for steps, text in (([3, 7], "step 7 (its newest)"), ([], "its newest step")):  # (was "at step newest")
        for step in steps:
            (tmp_path / "sft" / "checkpoints" / str(step)).mkdir(parents=True)
        newest = load_sft_config(overrides=base + [f"model.from_run={tmp_path / 'sft' if steps else tmp_path / 'gone'}"])
        assert start_description(newest).startswith(f"the run {newest.model.from_run} at {text} (its base")
    ckpt = tmp_path / "resumed" / "checkpoints"  # a run that will resume says its LoRA values are the checkpoint's
    (ckpt / "5").mkdir(parents=True)
    again = load_sft_config(overrides=base + ["model.preset=tiny", "lora.rank=4", "lora.alpha=8",
                                              f"train.output_dir={tmp_path / 'resumed'}"])
    assert start_description(again) == ("preset tiny, fresh LoRA r=4 alpha=8.0; resuming, so the LoRA values are "
                                        "its checkpoint's (below)")
    no_resume = load_sft_config(overrides=base + ["model.preset=tiny", f"train.output_dir={tmp_path / 'resumed'}",
                                                  "checkpoint.resume=false"])
    assert "resuming" not in start_description(no_resume)
    for cfg in (fresh, adapter):
        off = load_sft_config(overrides=base + ["lora.enabled=false"] + (
            ["model.preset=tiny"] if cfg is fresh else ["model.path=/m/base", "model.adapter=/m/adapter"]))
        with pytest.raises(ConfigError, match="lora.enabled: SFT trains LoRA adapters only"):
            join_run("sft", off, log=None)


def test_a_new_run_is_refused_where_an_earlier_run_has_checkpoints(tmp_path, tokenizer_dir):
    """checkpoint.resume false into a checkpoint directory that holds steps: an error naming the key, the
    directory and the steps, before anything is built (join_run, which sft and grpo call first)."""
    from fxjax.train.run_joining import join_run
    from fxjax.train_config import from_dict

    def config(resume):
        return from_dict({"model": {"preset": "tiny"},
                          "data": {"tokenizer": str(tokenizer_dir), "train_files": ["t.jsonl"]},
                          "train": {"output_dir": str(tmp_path / "run"), "steps": 1},
                          "checkpoint": {"resume": resume}})

    join_run("sft", config(False), None)  # no checkpoints yet
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "start_lora").mkdir()
    assert join_run("sft", config(True), None)[0]  # resuming is what the directory is for
    with pytest.raises(ConfigError, match=r"checkpoint\.resume: false, but .*run/checkpoints holds the checkpoints "
                                          r"of an earlier run \(steps 4\)"):
        join_run("grpo", config(False), None)


def test_a_checkpoint_folder_where_folders_cannot_be_renamed_is_refused_at_the_start(tmp_path, tokenizer_dir,
                                                                                     monkeypatch):
    """orbax renames each checkpoint's temporary folder when it is complete; a gcsfuse mount refuses folder
    renames by default (--rename-dir-limit 0), so a run there failed at its first checkpoint, hours in:
    join_run tries one first and says what to mount with. The check leaves nothing behind."""
    import errno
    import os

    from fxjax.train.run_joining import join_run
    from fxjax.train_config import from_dict

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"tokenizer": str(tokenizer_dir), "train_files": ["t.jsonl"]},
                     "train": {"output_dir": str(tmp_path / "run"), "steps": 1}})
    assert join_run("sft", cfg, None)[0]
    real = os.rename

    def gcsfuse_rename(src, dst, *args, **kwargs):
        if os.path.isdir(src):
            raise OSError(errno.ENOTSUP, "Operation not supported", str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", gcsfuse_rename)
    with pytest.raises(ValueError, match=r"checkpoint.dir: .*run/checkpoints: a folder cannot be renamed in .* "
                                         r"\(Operation not supported\), and each checkpoint is written to a "
                                         r"temporary folder renamed when complete; on gcsfuse, mount with "
                                         r"--rename-dir-limit"):
        join_run("sft", cfg, None)
    assert not [p for p in tmp_path.rglob(".fxjax-rename-check-*")]


def test_a_warmup_as_long_as_the_run_is_a_warning_at_the_start():
    """warmup is clamped to the run: optim.warmup_steps >= the run's updates gives a run that only warms up
    (never decays), said once at the start; a shorter one says nothing."""
    from fxjax.config_sections import OptimSection
    from fxjax.train.run_setup import warn_long_warmup

    said = []
    warn_long_warmup(OptimSection(warmup_steps=10), 10, said.append)
    assert said == ["warning: optim.warmup_steps 10 >= the run's 10 updates: the learning rate rises over the "
                    "whole run and never decays (to 0.0001 at the last update)"]
    warn_long_warmup(OptimSection(warmup_steps=9), 10, said.append)
    warn_long_warmup(OptimSection(), 1, said.append)  # warmup_ratio: a share of the run, never all of it
    assert len(said) == 1


def test_an_end_of_run_export_over_a_folder_of_other_files_or_an_unwritable_one_is_refused_at_the_start(
        tmp_path, tokenizer_dir, unwritable_dir, capsys):
    """The end-of-run export replaces its folder whole: export.adapter_dir / merged_dir naming a folder of
    the user's own files deleted them after training (no question asked); an unwritable export folder or
    train.output_dir failed with a traceback at the first write, the export's only after the whole run.
    join_run (what sft and grpo call first) refuses both; an empty folder or a former export is replaced."""
    from fxjax.cli import main
    from fxjax.train.export import PROMPT_SETTINGS_FILE
    from fxjax.train.run_joining import join_run
    from fxjax.train_config import from_dict

    def config(**export):
        return from_dict({"model": {"preset": "tiny"},
                          "data": {"tokenizer": str(tokenizer_dir), "train_files": ["t.jsonl"]},
                          "train": {"output_dir": str(export.pop("output_dir", tmp_path / "run")), "steps": 1},
                          "export": export})

    precious = tmp_path / "precious"
    (precious / "eval").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine\n")
    for key in ("adapter_dir", "merged_dir"):
        with pytest.raises(FileExistsError, match=rf"export\.{key}: .*precious holds files that are not an fxjax "
                                                  r"export \(eval/, notes\.txt\); the export at the end"):
            join_run("sft", config(**{key: str(precious)}), None)
    assert sorted(p.name for p in precious.iterdir()) == ["eval", "notes.txt"]
    former, empty = tmp_path / "former", tmp_path / "empty"
    former.mkdir(), empty.mkdir()
    (former / PROMPT_SETTINGS_FILE).write_text("{}\n")
    (former / "adapter_model.safetensors").write_text("")
    assert join_run("sft", config(adapter_dir=str(former), merged_dir=str(empty)), None)[0]
    assert join_run("sft", config(merged_dir=str(tmp_path / "new" / "merged")), None)[0]
    # an export of this run is replaced (a resume, a rerun); one of another run, which a config copied with only
    # its train.output_dir changed replaced without a word (the SFT adapter a GRPO config starts from), is not
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    for spelt in (tmp_path / "run" / "checkpoints", tmp_path / "link" / "checkpoints"):  # (the same folder)
        (former / "fxjax_export.json").write_text(json.dumps({"checkpoints": str(spelt), "step": 4}))
        assert join_run("sft", config(adapter_dir=str(former)), None)[0]
    (former / "fxjax_export.json").write_text(json.dumps({"checkpoints": str(tmp_path / "moved-away"), "step": 4}))
    assert join_run("sft", config(adapter_dir=str(former), output_dir=tmp_path / "other-run"), None)[0]  # (gone)
    (former / "fxjax_export.json").write_text(json.dumps({"checkpoints": str(tmp_path / "run" / "checkpoints"),
                                                          "step": 4}))
    with pytest.raises(FileExistsError, match=rf"export\.adapter_dir: {former} holds the export of another run "
                                              rf"\(step 4 of {tmp_path / 'run' / 'checkpoints'}, its "
                                              r"fxjax_export\.json\), which the export at the end of this run would "
                                              r"replace: give this run its own export\.adapter_dir"):
        join_run("sft", config(adapter_dir=str(former), output_dir=tmp_path / "other-run"), None)
    with pytest.raises(NotADirectoryError, match=r"export\.merged_dir: .*notes\.txt is a file, not a folder"):
        join_run("sft", config(merged_dir=str(precious / "notes.txt")), None)
    with pytest.raises(ValueError, match=rf"export\.adapter_dir: {unwritable_dir}/adapter cannot be written "
                                         rf"\({unwritable_dir} is not writable\)"):
        join_run("sft", config(adapter_dir=str(unwritable_dir / "adapter")), None)
    with pytest.raises(ValueError, match=r"train\.output_dir: .*read-only/run cannot be written"):
        join_run("sft", config(output_dir=unwritable_dir / "run"), None)
    # `fxjax export` checks its --out before it loads a run; any command's PermissionError is a one-line error
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(unwritable_dir / "out")]) == 2
    assert main(["make-demo-data", str(unwritable_dir / "data"), "--n", "10"]) == 2
    said = capsys.readouterr().err.splitlines()
    assert said[0] == f"fxjax export: error: --out: {unwritable_dir}/out/merged cannot be written ({unwritable_dir} is not writable)"
    assert said[1].startswith("fxjax make-demo-data: error: [Errno ") and str(unwritable_dir) in said[1]


def test_a_second_run_in_a_folder_a_run_is_training_in_is_refused_naming_it(tmp_path, tokenizer_dir, capsys):
    """Two runs in one train.output_dir (or one checkpoint.dir) pruned and overwrote each other's
    checkpoints; now the second `fxjax sft` is refused at its start, naming the first, and the lock goes
    with the process that held it (here killed with SIGKILL)."""
    import signal
    import subprocess
    import sys

    import yaml
    from launch import subprocess_env

    from fxjax.cli import main
    from fxjax.train.run_lock import LOCK_FILE, locked_run_dirs
    from fxjax.train_config import from_dict

    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "label": "real"}\n')
    config = {"model": {"preset": "tiny"}, "train": {"output_dir": str(tmp_path / "run"), "steps": 1},
              "data": {"tokenizer": str(tokenizer_dir), "train_files": [str(tmp_path / "t.jsonl")]},
              "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    holder = ("import sys, time, yaml\nfrom fxjax.train.run_lock import locked_run_dirs\n"
              "from fxjax.train_config import from_dict\n"
              "with locked_run_dirs(from_dict(yaml.safe_load(open(sys.argv[1]))), True, print):\n"
              "    print('holding', flush=True)\n    time.sleep(600)\n")
    other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "run.yaml")], stdout=subprocess.PIPE,
                             text=True, env=subprocess_env())
    try:
        assert other.stdout.readline() == "holding\n"
        assert main(["sft", "--config", str(tmp_path / "run.yaml")]) == 2
        err = capsys.readouterr().err
        assert (f"fxjax sft: error: train.output_dir: another fxjax run is training in {tmp_path / 'run'} (pid "
                f"{other.pid} on ") in err and "give this run its own train.output_dir / checkpoint.dir" in err, err
        # a run of another output folder but the same checkpoint.dir is the same collision
        assert main(["sft", "--config", str(tmp_path / "run.yaml"), "--set", f"train.output_dir={tmp_path / 'b'}"]) == 2
        assert f"checkpoint.dir: another fxjax run is training in {tmp_path / 'ckpt'} (pid {other.pid}" in \
            capsys.readouterr().err
        assert not (tmp_path / "ckpt").exists()  # (the lock of a checkpoint.dir lies beside it)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=60)
    with locked_run_dirs(from_dict(config), True, print):  # the killed holder's lock went with it
        assert "pid " in (tmp_path / "run" / LOCK_FILE).read_text()


def test_a_run_given_another_runs_checkpoints_as_its_checkpoint_dir_is_refused(tmp_path):
    """Run A keeps its checkpoints in its own folder (the default, A/checkpoints) and locked A only; run B of
    another output folder with checkpoint.dir=A/checkpoints locked a file beside that folder that A never
    took: both trained, each pruning the other's steps (a walk-through saw "Unable to find the step 4 for
    deletion"). Both now lock the checkpoint folder's own file."""
    from fxjax.config_mapping import ConfigError
    from fxjax.train.run_lock import locked_run_dirs
    from fxjax.train_config import from_dict

    def config(output: str, **checkpoint: str):
        return from_dict({"model": {"preset": "tiny"}, "train": {"output_dir": str(tmp_path / output), "steps": 1},
                          "data": {"train_files": ["t.jsonl"], "tokenizer": str(tmp_path)}, "checkpoint": checkpoint})

    with locked_run_dirs(config("A"), True, print):
        with pytest.raises(ConfigError, match=f"checkpoint.dir: another fxjax run is training in {tmp_path / 'A'}/"
                                              f"checkpoints"):
            with locked_run_dirs(config("B", dir=str(tmp_path / "A" / "checkpoints")), True, print):
                pass
        with locked_run_dirs(config("C"), True, print):  # (another run's own folders: no conflict)
            pass




def test_a_run_that_fails_in_its_lock_leaves_no_folder_it_made_and_no_lock_file_it_made(tmp_path):
    """A run refused after taking its locks (an invalid record found at load) left a new output folder holding
    only its hidden lock file. Now what it created and left empty goes; a folder of the user's, or one the run
    wrote into, stays (its lock file goes); a run that ends well keeps its lock files, as before."""
    from fxjax.train.run_lock import LOCK_FILE, locked_run_dirs
    from fxjax.train_config import from_dict

    def config(output, checkpoints):
        return from_dict({"model": {"preset": "tiny"}, "train": {"output_dir": str(output), "steps": 1},
                          "data": {"train_files": ["t.jsonl"], "tokenizer": str(tmp_path)},
                          "checkpoint": {"dir": str(checkpoints)}})

    with pytest.raises(ValueError, match="bad record"):
        with locked_run_dirs(config(tmp_path / "new" / "run", tmp_path / "new2" / "ckpt"), True, print):
            assert (tmp_path / "new" / "run" / LOCK_FILE).is_file() and (tmp_path / "new2" / f".ckpt{LOCK_FILE}").is_file()
            raise ValueError("bad record")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with locked_run_dirs(config(tmp_path / "mine", tmp_path / "wrote" / "ckpt"), True, print):
            (tmp_path / "wrote" / "ckpt").mkdir()
            (tmp_path / "wrote" / "ckpt" / "1").write_text("a step")
            raise KeyboardInterrupt
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "mine", "mine/notes.txt", "wrote", "wrote/ckpt", "wrote/ckpt/1"]
    with locked_run_dirs(config(tmp_path / "done", tmp_path / "done" / "ckpt"), True, print):
        pass
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == sorted([LOCK_FILE, f".ckpt{LOCK_FILE}"])


# In a fresh process: the `fxjax` command's start (main, here with --help), then a 64 MB malloc: how many
# mmapped blocks it added (glibc's mallinfo2().hblks), then JAX on the CPU and the run's note.
_MALLOC_PROBE = """
import ctypes, sys
from fxjax import cli, host_allocator as ha
sys.argv = ["fxjax", "--help"]
try:  # as the fxjax command calls it (main() with no argv), or as Python code does (PROBE_FROM_PYTHON)
    cli.main(["--help"]) if "PROBE_FROM_PYTHON" in __import__("os").environ else cli.main()
except SystemExit:
    pass
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                             "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
added = libc.mallinfo2().hblks - before
import jax
print(added, "|", ha.cpu_memory_note(jax.devices()[0].platform) or "-")
"""


def test_cpu_runs_keep_freed_memory_only_where_jax_runs_on_the_cpu_alone(tmp_path, monkeypatch):
    """The `fxjax` command sets glibc's malloc to keep freed memory (fxjax/host_allocator.py: a 64 MB block then
    comes from the heap, not a mapping glibc would unmap at free) only for a CPU-only JAX, with glibc's malloc
    and no other allocator loaded or tuning set, before JAX is imported, and not opted out; the run's note
    says which it is, never on a GPU or TPU."""
    import importlib.util

    from fxjax import host_allocator as ha

    assert ha.jax_on_cpu_only({"JAX_PLATFORMS": "cpu"}) and ha.jax_on_cpu_only({"JAX_PLATFORM_NAME": "CPU"})
    assert not ha.jax_on_cpu_only({"JAX_PLATFORMS": "cuda,cpu"}) and not ha.jax_on_cpu_only({"JAX_PLATFORMS": "tpu"})
    installed = {"jax_plugins"}  # nothing named: a GPU or TPU plugin installed means JAX may not run on the CPU
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert not ha.jax_on_cpu_only({})
    installed = set()
    assert ha.jax_on_cpu_only({})
    monkeypatch.undo()
    maps = tmp_path / "maps"
    maps.write_text("7f0 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert ha.preloaded_allocator({}, maps) == "tcmalloc"
    maps.write_text("7f0 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert ha.preloaded_allocator({"LD_PRELOAD": "libjemalloc.so.2"}, maps) is None  # (what is loaded counts)
    unreadable = tmp_path / "absent"
    for preload in ("/a/libfoo.so /b/libjemalloc.so.2", "/a/libfoo.so:/b/libmimalloc.so"):  # as ld.so reads it
        assert ha.preloaded_allocator({"LD_PRELOAD": preload}, unreadable) in ("jemalloc", "mimalloc")
    assert ha.preloaded_allocator({"LD_PRELOAD": "/a/libfoo.so"}, unreadable) is None
    for env in ({"FXJAX_SYSTEM_MALLOC": "1"}, {"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}):
        assert ha.opted_out(env), env
    assert not ha.opted_out({"FXJAX_SYSTEM_MALLOC": "0", "GLIBC_TUNABLES": "glibc.rtld.nns=2"})
    # in this process JAX is imported already: too late for the settings to help, so nothing is set
    assert not ha.keep_freed_memory({"JAX_PLATFORMS": "cpu"})

    def run(**env):
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", ha.OPT_OUT) and not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env={**clean, "JAX_PLATFORMS": "cpu", **env},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]
    assert run() == ("0 | host memory: glibc's malloc keeps what XLA frees, so steps do not re-zero it "
                     f"({ha.MEASURED}; the process keeps its peak memory; FXJAX_SYSTEM_MALLOC=1 leaves malloc as it is)")
    assert run(FXJAX_SYSTEM_MALLOC="1") == "1 | -"  # opted out: glibc maps the block (and unmaps it at free)
    # main([...]) from Python (a notebook's kernel): the process's malloc is left as it is, and the tip says so
    tip = run(PROBE_FROM_PYTHON="1")
    assert tip.startswith("1 | tip: ") and "fxjax.cli.main([...]) included" in tip, tip
    tip = run(JAX_PLATFORMS="", JAX_PLATFORM_NAME="cpu", XLA_FLAGS="")  # (the same, through the older variable)
    assert tip.startswith("0 | host memory:"), tip
    assert ha.cpu_memory_note("gpu") is None and ha.cpu_memory_note("tpu") is None
    assert "start it with the `fxjax` command in a shell" in ha.cpu_memory_note("cpu", {})  # (not kept here)


def test_stage_end_checkpoints_outlive_keep_and_load_by_the_stage_name(tmp_path):
    """A GRPO run's stage ends (TrainCheckpointer's `preserve`) stay however many checkpoints come after
    them, also through a resume (a new manager over the folder); `--step beta` (resolve_step) is the step
    where beta ended, from the stage ends the newest checkpoint records; a stage the run has not finished,
    one it does not have, and a run without stages are errors naming the stages or steps."""
    import jax.numpy as jnp

    from fxjax.grpo_config import GRPOConfig
    from fxjax.run_files import RunLoadError, kept_stage_end_steps, resolve_step, step_or_stage
    from fxjax.train.checkpointing import TrainCheckpointer

    stages = [{"name": "alpha", "steps": 2}, {"name": "beta", "steps": 2}, {"name": "gamma", "steps": 2}]
    config = GRPOConfig().to_dict() | {"stages": stages}
    config["model"]["path"] = str(tmp_path / "base")
    config["data"]["train_files"] = ["train.jsonl"]
    ends = [["alpha", 2], ["beta", 4], ["gamma", 6]]

    def save(checkpointer, steps, data_state=None, saved_config=config):
        for step in steps:
            checkpointer.save(step, {"w": jnp.full((2,), step, jnp.float32)},
                              {"stage_ends": ends} if data_state is None else data_state, saved_config)
        checkpointer.wait()

    def run_folder(name, steps, data_state, saved_config):
        """A folder of checkpoints of `steps` (none pruned) written with that data state and config."""
        checkpointer = TrainCheckpointer(tmp_path / name, keep=5, async_save=False)
        save(checkpointer, steps, data_state, saved_config)
        checkpointer.close()
        return tmp_path / name

    ckpt = tmp_path / "ckpt"
    checkpointer = TrainCheckpointer(ckpt, keep=1, async_save=False, preserve=[2, 4, 6])
    save(checkpointer, [1, 2, 3])
    assert checkpointer.all_steps() == [2, 3]
    with pytest.raises(RunLoadError, match=r"has not finished stage 'beta' \(it ends at step 4; the newest "
                                           r"checkpoint is step 3\); steps that exist: 2, 3"):
        resolve_step(ckpt, "beta")
    checkpointer.close()
    checkpointer = TrainCheckpointer(ckpt, keep=1, async_save=False, preserve=[2, 4, 6])  # resumed
    save(checkpointer, [4, 5])
    assert checkpointer.all_steps() == [2, 4, 5]
    checkpointer.close()
    assert [resolve_step(ckpt, step_or_stage(name))[0] for name in ("alpha", "beta", " 5")] == [2, 4, 5]
    assert resolve_step(ckpt, "alpha")[2] == "grpo" and resolve_step(ckpt, "4")[0] == 4  # (the API: "4" a step)
    assert step_or_stage("+-3") == "+-3" and step_or_stage("-3") == -3
    # the ends reached (2 and 4); gamma's 6 was only planned by then: a resume whose stages moved it (a walk-
    # through lengthened gamma) kept step 6, which ended no stage, for good
    assert kept_stage_end_steps(ckpt) == {2, 4} and kept_stage_end_steps(tmp_path / "none") == set()
    with pytest.raises(RunLoadError, match=r"has no stage 'delta' \(alpha ends at step 2, beta ends at step 4, "
                                           r"gamma ends at step 6\)"):
        resolve_step(ckpt, "delta")
    # without `preserve` (as before): the newest only, the stage ends pruned
    checkpointer = TrainCheckpointer(ckpt, keep=1, async_save=False)
    save(checkpointer, [6])
    assert checkpointer.all_steps() == [6]
    checkpointer.close()
    with pytest.raises(RunLoadError, match=r"no checkpoint of step 4, where stage 'beta' ended .*steps that "
                                           r"exist: 6"):
        resolve_step(ckpt, "beta")

    sft = run_folder("sft", [3], {}, {"model": {"path": "base"}, "data": {"train_files": ["t.jsonl"]},
                                      "train": {"steps": 3}})
    with pytest.raises(RunLoadError, match=r"step 'beta' \(a stage's end\): the run in .* has no reward stages "
                                           r".*steps that exist: 3"):
        resolve_step(sft, "beta")

    # a checkpoint from before the stage ends were recorded: from its config's stages when they are steps
    old = run_folder("old", [2, 3], {}, config)
    assert resolve_step(old, "alpha")[0] == 2 and kept_stage_end_steps(old) == set()
    epochs = run_folder("epochs", [2], {}, config | {"stages": [{"name": "alpha", "epochs": 1.0}]})
    with pytest.raises(RunLoadError, match=r"has no reward stages \(an SFT run, a continuous GRPO schedule, or a "
                                           r"run from before fxjax recorded them when its stages are in epochs\)"):
        resolve_step(epochs, "alpha")


def test_held_out_records_that_show_a_training_image_are_warned_about(tmp_path):
    """SFT and GRPO trained and evaluated on the same image without a word (only `fxjax data check`
    warned); the run says how many held-out records share a training image, a copy of it under another
    name included (paths alone missed it)."""
    from fxjax.train.run_setup import warn_held_out_overlap

    def record(source, image, size=(64, 48)):
        return SimpleNamespace(source=source, image=image, width=size[0], height=size[1])

    train = [record("train.jsonl:1", "/d/a.png"), record("train.jsonl:2", "/d/b.png")]
    said: list[str] = []
    assert warn_held_out_overlap(train, [record("test.jsonl:1", "/d/c.png")], said.append) == [] and said == []
    held_out = [record("test.jsonl:1", "/d/c.png"), record("test.jsonl:2", "/d/b.png")]
    assert warn_held_out_overlap(train, held_out, said.append) == [held_out[1]]
    assert said == ["warning: 1 of the 2 held-out record(s) show a training image (e.g. test.jsonl:2: /d/b.png): the "
                    "held-out metrics overstate what the model learned"]
    for name, content in (("a.png", b"one"), ("b.png", b"two"), ("a_copy.png", b"one"), ("c.png", b"thr")):
        (tmp_path / name).write_bytes(content)  # (a, b, c: one size, three contents)
    train = [record("train.jsonl:1", str(tmp_path / "a.png")), record("train.jsonl:2", str(tmp_path / "b.png"))]
    held_out = [record("test.jsonl:1", str(tmp_path / "c.png")), record("test.jsonl:2", str(tmp_path / "a_copy.png"))]
    assert warn_held_out_overlap(train, held_out, said.append) == [held_out[1]]
    assert warn_held_out_overlap(train, held_out[:1], said.append) == []


def test_the_held_out_overlap_reads_only_the_files_that_could_be_copies(tmp_path, monkeypatch):
    """Process 0 hashed every file whose byte size another file shared, training files among themselves
    included (most of a large dataset, while the other hosts waited): now only the files whose pixel size,
    then byte size, a file of the other side has too."""
    from fxjax.data import images
    from fxjax.train.run_setup import warn_held_out_overlap

    def record(source, name, content, size):
        (tmp_path / name).write_bytes(content)
        return SimpleNamespace(source=source, image=str(tmp_path / name), width=size[0], height=size[1])

    train = [record(f"train.jsonl:{i}", f"t{i}.png", b"%03d" % i, (64, 48)) for i in range(20)]  # one byte size
    train += [record("train.jsonl:21", "u.png", b"7777", (32, 32)), record("train.jsonl:22", "v.png", b"888", (32, 32))]
    held_out = [record("test.jsonl:1", "h1.png", b"7777", (32, 32)), record("test.jsonl:2", "h2.png", b"99", (64, 48))]
    hashed: list[str] = []
    digest = images._content_digest
    monkeypatch.setattr(images, "_content_digest", lambda path: (hashed.append(Path(path).name), digest(path))[1])
    assert warn_held_out_overlap(train, held_out, lambda line: None) == [held_out[0]]
    assert sorted(hashed) == ["h1.png", "u.png"]  # (v.png: same pixel size, another byte size; t*: no held-out byte size)


def test_a_resume_with_another_batch_size_names_it(monkeypatch, tmp_path):
    """A resume whose data.batch_size changed failed with an error that blamed the mesh ("reads 1 on this
    mesh... resume on the mesh split it was saved on") when the mesh was the same: the batch is named."""
    from types import SimpleNamespace

    from fxjax.config_mapping import ConfigError
    from fxjax.train import resume

    saved_cfg = {"kind": "sft", "data": {"batch_size": 2}}
    data_state = {"iterator": {"process_count": 1, "processes": [{}], "rows_per_batch": [2]}}
    monkeypatch.setattr(resume, "restore_latest", lambda *a: ("state", data_state, saved_cfg, 10))
    monkeypatch.setattr(resume, "saved_run_kind", lambda saved: "sft")

    def run_with(batch_size):
        cfg = SimpleNamespace(checkpoint=SimpleNamespace(resume=True),
                              to_dict=lambda: {"kind": "sft", "data": {"batch_size": batch_size}})
        return resume.resume_run("sft", SimpleNamespace(directory=tmp_path), "state",
                                 SimpleNamespace(set_state=lambda s: None), cfg, lambda text: None,
                                 watched=(), rows_per_batch=batch_size)

    with pytest.raises(ConfigError, match=r"data.batch_size: the checkpoint of step 10 in .* was saved with "
                                          r"data.batch_size=2 and this run has 1; .* set data.batch_size=2"):
        run_with(1)
    assert run_with(2).step == 10


def test_a_checkpointer_quiets_the_reads_and_writes_a_failed_one_leaves_behind_and_nothing_else(tmp_path,
                                                                                                 monkeypatch):
    """A checkpoint that does not restore left orbax's other reads running; at exit they printed "Event loop
    is closed" tracebacks, "Exception ignored in: <coroutine ...>" and "Task exception was never retrieved"
    with TensorStore specs (up to 19,679 lines below the run's error, in some runs). A failed save's writes
    did alike, rarely: a closed-loop traceback from a TensorStore thread after the run's one-line error
    (through sys.excepthook or the unraisable hook), in a run that never restored. A checkpointer installs a
    filter for exactly those when it is made; other unraisable errors, the main thread's errors and other
    asyncio records still print."""
    import logging
    import sys
    import threading
    import types

    from fxjax.train.checkpointing import TrainCheckpointer

    printed = []  # what reaches the hook that was there before (Python's own prints them)
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    excepted = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, traceback: excepted.append(str(error)))
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))
    TrainCheckpointer(tmp_path / "ckpt", async_save=False)  # (made only: a fresh run's saves are behind it)

    def in_a_thread(error: BaseException) -> None:  # (as TensorStore's thread calls PyErr_Print)
        thread = threading.Thread(target=sys.excepthook, args=(type(error), error, None))
        thread.start()
        thread.join()

    in_a_thread(RuntimeError("Event loop is closed"))
    assert excepted == []
    in_a_thread(RuntimeError("a thread's own error"))
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)  # (the main thread's: printed)
    assert excepted == ["a thread's own error", "Event loop is closed"]

    def unraisable(error, obj=None):
        return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None,
                                     object=obj)

    orbax_coroutine = types.SimpleNamespace(cr_code=types.SimpleNamespace(
        co_filename="/x/site-packages/orbax/checkpoint/_src/serialization/serialization.py"))
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    sys.unraisablehook(unraisable(Exception("Encountered error while reading array index"), orbax_coroutine))
    assert printed == []
    sys.unraisablehook(unraisable(RuntimeError("something of the user's")))
    assert [str(u.exc_value) for u in printed] == ["something of the user's"]

    def kept(msg: str) -> bool:
        return bool(asyncio_logger.filter(logging.LogRecord("asyncio", logging.ERROR, "", 0, msg, None, None)))

    assert not kept("Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() done, "
                    "defined at /x/site-packages/orbax/checkpoint/_src/serialization/serialization.py:394>>")
    assert not kept("Future exception was never retrieved\nfuture: <Future finished exception=ValueError('OUT_OF_"
                    "RANGE: Error reading \"params.w\" in OCDBT database at local file \"/c/1/state/\"')>")
    assert kept("Future exception was never retrieved\nfuture: <Future finished exception=ValueError('a reward "
                "function of the user's')>")  # (another asyncio error of the process still prints)
    assert kept("Exception in callback Handle._run()")
