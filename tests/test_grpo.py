"""`fxjax grpo` end to end on the tiny preset (real Qwen tokenizer, demo images), in subprocesses:

* the run goes through the stages alpha -> beta -> gamma, logging every metric tagged with its stage;
* two processes (gloo, one CPU device each) compute what one process with two devices does, each reading,
  decoding and scoring only its own prompts;
* with shared prompts (each prompt through the decoder once per update, the default that every other run
  here uses) the run on two devices trains as with full sequences: the same samples, losses, gradient
  norms and LoRA parameters;
* `grpo.log_completions` writes every completion with the rewards it was given, once per step after resumes;
* every run here makes `grpo.num_iterations: 2` updates per step (TRL's mu: the sampling policy's log-probs
  stored, the ratio clipped): the learning rate follows the schedule over all the updates, and a resumed run
  counts its checkpoint's updates as steps / 2 (the kill chain below would otherwise end early or redo
  steps); a step logs the mean of its updates' metrics. (num_iterations 1, TRL's default and the demo's,
  runs end to end in the demo; its loss against TRL's is tests/test_grpo_loss.py's);
* resume is exact: a run SIGKILLed during a save, stopped by SIGTERM during an update (saves, exits 0), and
  resumed each time, with its newest checkpoint corrupted and its starting adapter
  gone before the last resume (reported, the previous checkpoint and the run's copy of the adapter used),
  ends with LoRA parameters bitwise equal to an uninterrupted run. (A
  SIGKILL at `after_step`, the pause both loops share in train.loop_control, is tests/test_sft.py's.)

Subprocesses share a persistent XLA compilation cache, so each program compiles once per session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fxjax.data.demo_data import make_demo_data
from fxjax.run_files import committed_steps
from launch import decoded_sources, launch_two, stream_sources, subprocess_env, traced_events, wait_all

TIMEOUT = 300
DECODE_TRACE = str(Path(__file__).with_name("decode_trace.py"))
STAGES = [{"name": "alpha", "steps": 2}, {"name": "beta", "steps": 2}, {"name": "gamma", "steps": 2}]


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    import jax
    from flax import nnx

    from fxjax.hf_save import save_pretrained
    from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora
    from fxjax.model_init import init_model
    from fxjax.peft_io import save_peft_adapter

    root = tmp_path_factory.mktemp("grpo")
    files = make_demo_data(root / "data", n=10, seed=0, test_fraction=0.2, min_side=56, max_side=84, multiple=28)
    model = init_model("tiny", seed=0)
    model_dir = save_pretrained(model, root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    # Start from an adapter with non-zero B (as after SFT): the policy differs from the reference, so the KL
    # term has a gradient even when a random model's G completions all score alike (zero advantages), and
    # every step's update depends on what was sampled, the dropout masks and the data order.
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj", "qkv", "fc2")),
               rngs=nnx.Rngs(params=0, dropout=0))
    for _, v in nnx.to_flat_state(nnx.state(model, LORA_PARAMS)):
        v.set_value(0.3 * jax.random.normal(jax.random.key(7), v.get_value().shape))
    adapter_dir = save_peft_adapter(model, root / "sft_adapter")
    config = {
        "model": {"path": str(model_dir), "adapter": str(adapter_dir), "dtype": "float32", "remat": "none"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "qkv", "fc2"]},
        "data": {"train_files": [str(files["train"])], "min_pixels": 3136, "max_pixels": 3136, "max_length": 384,
                 "batch_size": 2, "seed": 1},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 1},
        "train": {"loss_chunk": 64, "progress_bar": False, "output_dir": str(root / "out")},
        "checkpoint": {"every": 1, "keep": 10},
        "eval": {"at_end": False},
        "grpo": {"num_generations": 2, "max_completion_length": 6, "temperature": 1.0, "top_k": 50, "beta": 0.04,
                 "num_iterations": 2, "log_completions": True,
                 # a term of the user's own (TRL's reward_funcs), imported by every process of every run
                 "reward_funcs": [{"name": "brevity", "function": "grpo_test_rewards:brevity", "weight": 0.5}]},
        "stages": STAGES,
    }
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    env = subprocess_env(compilation_cache=root / "xla_cache", FXJAX_LOCAL_DEVICE_COUNT="2", PYTHONUNBUFFERED="1",
                         PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                  os.environ.get("PYTHONPATH")])))
    return {"root": root, "config": path, "env": env}


def grpo(setup, name: str, *, env=None, until: str | None = None, then=signal.SIGKILL, config=None,
         sets=(), report: bool = False) -> tuple[int, str]:
    """Run `fxjax grpo` into <root>/<name>; with `until`, send `then` once that text appears on stderr. The
    end-of-run report.png (about 2 s of plotting) only with `report`: the straight run checks it."""
    out = setup["root"] / name
    args = [sys.executable, "-m", "fxjax.cli", "grpo", "--config", str(config or setup["config"]),
            "--set", f"train.output_dir={out}", "--set", f"export.adapter_dir={out / 'adapter'}",
            *([] if report else ["--no-report"])]
    args += [a for item in sets for a in ("--set", item)]
    log = out.with_suffix(".log")
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(args, env={**setup["env"], **(env or {})}, stdout=f, stderr=f)
        deadline = time.time() + TIMEOUT
        sent = False
        while proc.poll() is None:
            if until and not sent and until in log.read_text():
                proc.send_signal(then)
                sent = True
            if time.time() > deadline:
                proc.kill()
                raise AssertionError(f"timeout; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    text = log.read_text()
    if until:
        assert sent, f"never reached {until!r}:\n{text[-3000:]}"
    return proc.returncode, text


def adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def completions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(setup):
    # what an attempt killed before its first checkpoint left: the run starts from scratch and drops it
    out = setup["root"] / "straight"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 99.0}\n')
    (out / "completions.jsonl").write_text('{"step": 1, "completion": "stale"}\n')
    # A checkpoint every 5 steps, the newest kept: the stage ends 2, 4 and 6 are saved and kept all the same.
    # The held-out evaluation at each stage's end (eval.at_stage_ends, on by default; eval.at_end off) on
    # the 2 test records: it changes nothing of the training (the resumed runs below, without it, end equal).
    evaluation = [f"data.eval_files=[{setup['root'] / 'data' / 'test.jsonl'}]", "eval.batch_size=2",
                  "eval.max_new_tokens=6"]
    code, log = grpo(setup, "straight", report=True, sets=["checkpoint.every=5", "checkpoint.keep=1", *evaluation])
    assert code == 0, log[-3000:]
    assert committed_steps(out / "checkpoints") == [2, 4, 6]
    for stage, step in (("alpha", 2), ("beta", 4), ("gamma", 6)):
        assert (f"grpo: stage {stage} ended at step {step}; its checkpoint is kept from pruning (`--step {stage}` "
                "of fxjax eval, detect and export)") in log
        assert f"grpo: eval (end of stage {stage}, step {step}): " in log
    assert f"wrote the report {out / 'report.png'}" in log and (out / "report.png").stat().st_size > 20_000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["examples"] == 2 and "format_rate" in r for r in evals)
    assert [r["tag"] for r in evals] == [f"end of stage {s}" for s in ("alpha", "beta", "gamma")]  # (as the log)
    assert 99.0 not in [r.get("loss") for r in records] and "stale" not in (out / "completions.jsonl").read_text()
    train = [r for r in records if r.get("kind", "train") == "train"]  # (the runs compared with it: no eval)
    return adapter_tensors(setup["root"] / "straight" / "adapter"), train, log


def test_stages_in_order_with_every_metric(setup, straight):
    from fxjax.grpo_config import load_grpo_config
    from fxjax.train.optimizer import make_schedule

    _, records, log = straight
    train = [r for r in records if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in train] == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
    # The stage's weights are the reward config's (w_iou 1.0, 1.5, 2.0), all six logged (two were), and the
    # start says each stage's reward
    from fxjax import rewards
    from fxjax.rewards.stages import describe_weights

    assert [r["weights/w_iou"] for r in train[::2]] == [1.0, 1.5, 2.0]
    for stage, first in (("alpha", 0), ("beta", 2), ("gamma", 4)):
        weights = rewards.load_stage(stage)
        assert {k[len("weights/"):]: v for k, v in train[first].items() if k.startswith("weights/")} == \
            {**dataclasses.asdict(weights), "brevity": 0.5}  # (and the grpo.reward_funcs term's)
        assert f"grpo: stage {stage} (steps {first + 1}-{first + 2}): {describe_weights(weights)}" in log
    assert "grpo: reading the records of 1 file and checking each image file once (decoded whole: data.check_decode)" in log
    for key in ("reward/total_mean", "reward/total_std", "reward/format_mean", "reward/label_mean",
                "reward/iou_mean", "format_rate", "verdict_accuracy", "kl", "clip_ratio/region_mean", "entropy",
                "completion_length_mean", "completion_length_max", "completion_length_min", "terminated_length_mean",
                "terminated_length_min", "terminated_length_max", "truncated_fraction", "zero_std_group_fraction",
                "num_tokens",
                "rollout_time", "update_time", "rollout_tokens_per_s", "loss", "grad_norm", "learning_rate"):
        assert all(key in r for r in train), key
    assert all(0 < r["completion_length_mean"] <= 6 for r in train)
    # TRL's num_tokens: every step's prompt + completion tokens so far (each step's as update_tokens_per_s counts)
    each = [r["update_tokens_per_s"] * r["update_time"] for r in train]
    assert [r["num_tokens"] for r in train] == pytest.approx(list(np.cumsum(each)), rel=1e-6)
    # The policy starts away from the reference (a non-zero adapter): the KL and the update are not zero.
    assert all(r["kl"] > 0 and r["grad_norm"] > 1e-6 for r in train)
    # num_iterations 2: the schedule runs over all 12 updates, and a step logs the rate of its last update
    # (updates 1, 3, ..., 11, 0-based; a schedule over the 6 steps would have ended at step 3)
    schedule = make_schedule(load_grpo_config(setup["config"]).optim, 12)
    assert [r["learning_rate"] for r in train] == pytest.approx([float(schedule(u)) for u in range(1, 12, 2)],
                                                                rel=1e-6)
    assert train[3]["learning_rate"] > 0.1 * float(schedule(0))
    assert " with the adapter " in log and "(its rank, alpha and targets; lora.* unused)" in log  # the adapter's
    assert "fxjax grpo: 6 steps in " in log and ", the last step (stage gamma): reward " in log


def test_logged_completions_are_the_ones_scored(setup, straight):
    """grpo.log_completions: completions.jsonl holds every sampled completion (6 steps x 2 prompts x G 2),
    each scored again by `rewards.score` with its stage's weights gives its logged rewards, and each step's
    mean is the metrics' reward/total_mean."""
    from fxjax import rewards
    from fxjax.grpo_config import load_grpo_config
    from fxjax.train.grpo_stages import stage_weights

    cfg = load_grpo_config(setup["config"])
    got = completions(setup["root"] / "straight")
    assert [r["step"] for r in got] == [s for s in range(1, 7) for _ in range(4)]
    assert [r["sample"] for r in got] == [0, 1] * 12 and {r["kind"] for r in got} == {"completion"}
    assert all(r["record"].startswith(str(setup["root"] / "data")) and r["label"] in ("real", "generated")
               for r in got)
    for r in got:  # each completion was scored against the record it names (its label and its regions)
        path, line = r["record"].rsplit(":", 1)
        record = json.loads(Path(path).read_text().splitlines()[int(line) - 1])
        assert (r["label"], len(r["true_boxes"])) == (record["label"], len(record["regions"])), r["record"]
        assert r["id"] == str(record.get("id", record["image"]))  # (eval's predictions name records so)
    assert {r["label"] for r in got} == {"real", "generated"}
    train = {r["step"]: r for r in straight[1] if r.get("kind", "train") == "train"}
    for step in range(1, 7):
        rows = [r for r in got if r["step"] == step]
        assert {r["stage"] for r in rows} == {train[step]["stage"]}
        weights = stage_weights(cfg, step - 1)[1]
        targets = [{"label": r["label"], "boxes": np.asarray(r["true_boxes"], np.float64).reshape(-1, 4)}
                   for r in rows[::2]]  # one per prompt
        again = rewards.score([r["completion"] for r in rows], targets, weights=weights, group_size=2)
        brevity = [-len(r["completion"]) / 100 for r in rows]  # grpo.reward_funcs: weight 0.5 in every stage
        again["total"] = again["total"] + 0.5 * np.asarray(brevity)
        again["brevity"] = brevity
        for key in ("total", "format", "label", "iou", "brevity"):
            np.testing.assert_allclose([r[f"reward/{key}"] for r in rows], again[key], rtol=1e-6, err_msg=key)
        assert np.mean([r["reward/total"] for r in rows]) == pytest.approx(train[step]["reward/total_mean"], rel=1e-6)
        assert np.mean(brevity) == pytest.approx(train[step]["reward/brevity_mean"], rel=1e-6)
        # the step's logged means and weights give its total (R_G logged as reward/iou_relaxed)
        t, w = train[step], {k.split("/")[1]: v for k, v in train[step].items() if k.startswith("weights/")}
        assert t["reward/iou_relaxed_mean"] == pytest.approx(np.mean([r["reward/iou_relaxed"] for r in rows]))
        rebuilt = (w["base"] + w["w_iou"] * t["reward/iou_relaxed_mean"]
                   + w["label_minus"] + (w["label_plus"] - w["label_minus"]) * t["reward/label_mean"]
                   + w["format_minus"] + (w["format_plus"] - w["format_minus"]) * t["reward/format_mean"]
                   + w["brevity"] * t["reward/brevity_mean"])
        assert w["brevity"] == 0.5  # (grpo.reward_funcs' weight, logged beside the stage's)
        assert rebuilt == pytest.approx(t["reward/total_mean"], rel=1e-6, abs=1e-9)
        assert np.mean([r["completion_tokens"] for r in rows]) == pytest.approx(train[step]["completion_length_mean"])
        for group in (rows[:2], rows[2:]):  # advantages are centred within each prompt's group (up to the
            # rounding of float32 totals, as TRL's: ~1e-4 of an advantage where a group's totals differ little)
            assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=2e-4)


def test_killed_everywhere_and_resumed_equals_uninterrupted(setup, straight):
    ckpt = setup["root"] / "chain" / "checkpoints"
    # The chain starts from its own copy of the SFT adapter, which is gone before the last resume (the run
    # moved to another machine): that resume builds the model from the run's copy (checkpoints/start_lora).
    adapter = setup["root"] / "chain_sft_adapter"
    shutil.copytree(setup["root"] / "sft_adapter", adapter)
    sets = [f"model.adapter={adapter}"]
    # (a SIGKILL while a step samples or updates leaves what one inside the next step's save does: the
    # checkpoint before it the newest; the save's is the one that also leaves a half-written step behind)
    kills = [("save@4", signal.SIGKILL), ("update@5", signal.SIGTERM)]
    seen = []
    for point, sig in kills:
        code, log = grpo(setup, "chain", env={"FXJAX_FAULT": point}, until=f"fxjax-fault: paused at {point}",
                         then=sig, sets=sets)
        seen.append((point, code, committed_steps(ckpt)))
    assert [code for _, code, _ in seen] == [-signal.SIGKILL, 0], seen
    assert seen[0][2][-1] == 3  # killed inside 4's save: step 3 is the newest
    assert seen[1][2][-2:] == [4, 5]  # resumed from 3: step 4 redone and saved; SIGTERM during step 5 saved it
    assert "resumed from step 3 (stage beta)" in log
    # Corrupt the newest checkpoint: the next run reports it and resumes from the one before.
    for f in (ckpt / "5").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in f.parts:
            f.write_bytes(b"\0" * 7)
    shutil.rmtree(adapter)
    code, log = grpo(setup, "chain", sets=sets)
    assert code == 0, log[-3000:]
    assert "checkpoint of step 5" in log and "cannot be restored" in log
    assert f"model.adapter={adapter} is not here: the LoRA's shape from the run's copy in {ckpt / 'start_lora'}" in log
    assert "resuming with a different" not in log  # the run's config is unchanged; only where the shape came from
    assert "resuming on mesh" not in log  # nor the devices' split
    assert (ckpt / "5.unreadable-0").is_dir() and committed_steps(ckpt)[-1] == 6  # kept aside, step 5 redone
    got = adapter_tensors(setup["root"] / "chain" / "adapter")
    want = straight[0]
    start = adapter_tensors(setup["root"] / "sft_adapter")
    assert set(got) == set(want) == set(start)
    assert any(not np.array_equal(want[k], start[k]) for k in want)  # training moved the parameters
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # completions.jsonl: what each attempt logged past the step it was resumed from is dropped
    assert completions(setup["root"] / "chain") == completions(setup["root"] / "straight")
    # num_tokens carries on over the resumes (from the record of the step each resumed from)
    assert [r["num_tokens"] for r in train_records(setup["root"] / "chain")] == \
        [r["num_tokens"] for r in train_records(setup["root"] / "straight")]


def test_a_non_finite_update_stops_the_run_with_its_step_the_last_record(setup):
    """NaN pixel patches in step 2's update (FXJAX_FAULT=nan_batch@2): the run stops naming the step and the
    last good checkpoint (step 1), and metrics.jsonl ends with the step, marked "stopped" (it ended at step
    1, and the report read as a run that trained cleanly to its end), its rewards in it."""
    code, log = grpo(setup, "nan-stop", env={"FXJAX_FAULT": "nan_batch@2"})
    assert code == 3, log[-3000:]
    assert "fxjax-fault: NaN patches at nan_batch@2" in log
    assert "non-finite loss at step 2" in log and "the last good checkpoint is step 1" in log, log[-3000:]
    assert committed_steps(setup["root"] / "nan-stop" / "checkpoints") == [1]
    records = [json.loads(line) for line in (setup["root"] / "nan-stop" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and "stopped" not in train[0] and train[-1]["loss"] == "nan"
    assert train[-1]["stopped"] == "non-finite" and train[-1]["stage"] == "alpha"
    # (and what the step sampled and scored before its update went non-finite: its rewards, as every step's)
    assert {k for k in train[0] if k.startswith("reward/")} == {k for k in train[-1] if k.startswith("reward/")}
    assert isinstance(train[-1]["reward/total_mean"], float) and "format_rate" in train[-1]
    assert records[-1] == {**records[-1], "step": 2, "kind": "end", "status": "non-finite"}
    from fxjax.commands.report import build_report

    assert "the run stopped at step 2: non-finite loss or gradient" in build_report(records).get_suptitle()


def test_each_checkpoint_records_the_reward_values_and_a_resume_names_the_weight_edited(setup, straight):
    """The reward file is read once, at the start; its values go into every checkpoint's config (the path
    alone, grpo.reward_config, is the same after an edit), so a resume after an edit names the weight."""
    import copy

    from fxjax import rewards
    from fxjax.grpo_config import load_grpo_config
    from fxjax.run_files import CONFIG_FILE, read_run_config
    from fxjax.train.grpo import GRPO_WATCHED
    from fxjax.train.grpo_stages import reward_record
    from fxjax.train.resume_check import check_resume_config

    ckpt = setup["root"] / "straight" / "checkpoints"
    saved = json.loads((ckpt / "6" / CONFIG_FILE).read_text())
    values = rewards.load_config(load_grpo_config(setup["config"]).grpo.reward_config)
    assert saved["rewards"] == reward_record(values) and saved["rewards"]["stages.beta.w_iou"] == 1.5
    edited = copy.deepcopy(values)
    edited["stages"]["beta"]["w_iou"], edited["eta"] = 3.0, 1.2
    said = []
    check_resume_config(saved, {**saved, "rewards": reward_record(edited)}, said.append, GRPO_WATCHED)
    assert said == ["warning: resuming with a different reward config than the checkpoint's (the reward weights or "
                    "the IoU relaxation changed): rewards.eta: 1.1 -> 1.2; rewards.stages.beta.w_iou: 1.5 -> 3.0"]
    said.clear()  # a checkpoint written before the values were recorded: nothing to compare them with
    check_resume_config({k: v for k, v in saved.items() if k != "rewards"}, saved, said.append, GRPO_WATCHED)
    assert said == []
    assert read_run_config(ckpt, 6)[1] == "grpo"  # (eval, export: the record is not a config section)


def test_a_run_whose_starting_adapter_moved_exports_from_its_own_copy(setup, straight, tmp_path):
    """A run started from model.adapter keeps that adapter's shape in its checkpoint directory (start_lora/):
    with the adapter gone (the run copied to another machine), `fxjax export --run` writes the same adapter as
    the run's own export; a run without that copy is an error naming the missing adapter."""
    from fxjax.cli import main
    from fxjax.train.run_loading import RunLoadError, load_run

    source = setup["root"] / "straight" / "checkpoints"
    kept = source / "start_lora"
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (kept, setup["root"] / "sft_adapter")]
    assert configs[0].pop("base_model_name_or_path") == str(setup["root"] / "model")  # the base it was loaded on
    assert configs[0] == {k: v for k, v in configs[1].items() if k != "base_model_name_or_path"}
    start = adapter_tensors(setup["root"] / "sft_adapter")
    assert {k: v.tolist() for k, v in adapter_tensors(kept).items()} == {k: v.tolist() for k, v in start.items()}
    moved = tmp_path / "moved" / "checkpoints"
    shutil.copytree(source, moved)
    for config in moved.glob("*/config/config.json"):  # the saved config names an adapter that is not here
        saved = json.loads(config.read_text())
        saved["model"]["adapter"] = str(tmp_path / "elsewhere" / "sft_adapter")
        config.write_text(json.dumps(saved))
    assert main(["export", "--run", str(moved.parent), "--out", str(tmp_path / "export"), "--adapter-only"]) == 0
    got, want = adapter_tensors(tmp_path / "export" / "adapter"), straight[0]
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the model at the end of stage alpha (step 2, kept from pruning): by its name, as by its step
    assert main(["export", "--run", str(moved.parent), "--step", "alpha", "--out", str(tmp_path / "alpha"),
                 "--adapter-only"]) == 0
    assert main(["export", "--run", str(moved.parent), "--step", "2", "--out", str(tmp_path / "step2"),
                 "--adapter-only"]) == 0
    alpha, step2 = adapter_tensors(tmp_path / "alpha" / "adapter"), adapter_tensors(tmp_path / "step2" / "adapter")
    assert {k: v.tolist() for k, v in alpha.items()} == {k: v.tolist() for k, v in step2.items()}
    assert any(not np.array_equal(alpha[k], want[k]) for k in want)
    assert any(not np.array_equal(alpha[k], start[k]) for k in start)
    shutil.rmtree(moved / "start_lora")
    with pytest.raises(RunLoadError, match=r"model\.adapter=.*elsewhere.*keeps no copy"):
        load_run(moved.parent)


def test_a_resume_with_renamed_stages_keeps_the_names_its_checkpoints_were_trained_under():
    """Resumed at step 2 of alpha x1, beta x1 with stages gamma x1, beta x2: every later checkpoint recorded
    gamma ending at 1 (the model that finished alpha, under `--step gamma`) and alpha nowhere."""
    from fxjax.train.grpo_stages import trained_stage_ends

    said = []
    ends = trained_stage_ends([("alpha", 1), ("beta", 2)], [("gamma", 1), ("beta", 3)], 2, said.append)
    assert ends == [("alpha", 1), ("beta", 2), ("beta", 3)]  # (beta twice: --step beta asks for the number)
    assert said == ["warning: the stages ended by step 2 keep the names and ends they were trained under (alpha "
                    "at step 1, beta at step 2), whatever the stages list now says; fxjax eval, detect and "
                    "export's --step STAGE find them so"]
    said.clear()  # unchanged stages, or a stage lengthened past the step resumed from: nothing to say
    assert trained_stage_ends([("alpha", 1), ("beta", 2)], [("alpha", 1), ("beta", 4)], 1, said.append) == \
        [("alpha", 1), ("beta", 4)]
    assert trained_stage_ends(None, [("alpha", 3)], 2, said.append) == [("alpha", 3)] and said == []


def test_updates_done_counts_steps_and_rejects_a_foreign_count():
    from fxjax.train.grpo import updates_done

    assert updates_done(0, 2, None) == 0 and updates_done(6, 2, 3) == 3 and updates_done(5, 1, 5) == 5
    with pytest.raises(ValueError, match="checkpoint of step 2 holds 5 "):  # not a multiple of its step: foreign
        updates_done(5, 2, 2)
    # a multiple of another count: saved with num_iterations 1 (3), resumed with 2: said as the setting that
    # changed (it read as a foreign count)
    with pytest.raises(ValueError, match=r"grpo.num_iterations: the run was saved with 1 update\(s\) a step \(step 10: "
                                         r"10 updates\) and is resumed with 2; it cannot change on resume"):
        updates_done(10, 2, 10)


def test_update_metrics_average_a_steps_updates():
    """With num_iterations updates a step logs each metric's mean over them (the first update never clips:
    its ratio is 1), the last update's learning rate, and "finite" only if every update was."""
    from fxjax.train.grpo import update_metrics

    updates = [{"loss": 1.0, "clip_ratio/region_mean": 0.0, "learning_rate": 2e-4, "finite": True},
               {"loss": 3.0, "clip_ratio/region_mean": 0.5, "learning_rate": 1e-4, "finite": np.bool_(True)}]
    assert update_metrics(updates) == {"loss": 2.0, "clip_ratio/region_mean": 0.25, "learning_rate": 1e-4,
                                       "finite": True}
    assert update_metrics([updates[0], dict(updates[1], finite=np.bool_(False))])["finite"] is False
    assert update_metrics(updates[:1]) == updates[0]


def prompt_stream(setup, n: int) -> list[tuple[int, str]]:
    """(epoch, record source) of the first `n` prompts of the one-process GRPO prompt stream."""
    from fxjax.grpo_config import load_grpo_config
    from fxjax.train.grpo import data_config

    return stream_sources(data_config(load_grpo_config(setup["config"])), n)


def test_two_processes_equal_one_process(setup, straight):
    """2 processes x 1 CPU device (gloo) == 1 process x 2 devices: same prompts, same samples, same LoRA;
    each process reads, decodes and scores only its own prompts (tests/decode_trace.py records them)."""
    out = setup["root"] / "multi"
    args = ["grpo", "--config", str(setup["config"]), "--set", f"train.output_dir={out}",
            "--set", f"export.adapter_dir={out / 'adapter'}", "--no-report"]
    env = {**setup["env"], "FXJAX_TEST_DECODE_LOG": str(out / "decoded")}
    procs, logs = launch_two(args, env, setup["root"] / "multi", entry=(DECODE_TRACE,))
    codes = wait_all(procs, logs, timeout=TIMEOUT)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    assert "2 process(es), 2 cpu device(s)" in logs[0].read_text()
    assert "checking each image file once, by one of the 2 processes (decoded whole" in logs[0].read_text()
    multi, want = adapter_tensors(out / "adapter"), straight[0]
    assert multi.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(multi[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # The metrics (process 0 writes them) saw the same completions and rewards.
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ours[-1] == {**ours[-1], "step": 6, "kind": "end", "status": "finished"}  # (written once, by process 0)
    ours = [r for r in ours if r["kind"] == "train"]
    for a, b in zip(ours, straight[1]):
        for key in ("reward/total_mean", "completion_length_mean", "format_rate"):
            assert a[key] == pytest.approx(b[key]), key
    assert len(ours) == len(straight[1]) == 6
    # completions.jsonl (process 0 writes every process's rows): the same as one process's
    multi_rows, one_rows = completions(out), completions(setup["root"] / "straight")
    assert [(r["step"], r["record"], r["sample"], r["completion"]) for r in multi_rows] == \
        [(r["step"], r["record"], r["sample"], r["completion"]) for r in one_rows]
    assert [r["reward/total"] for r in multi_rows] == pytest.approx([r["reward/total"] for r in one_rows])
    # Process r decoded only row r of each batch of 2 prompts, i.e. elements 2k + r of the one-process
    # stream (read-ahead may go past the 6 steps, never into the other's rows), and every step's own row.
    stream = prompt_stream(setup, 40)
    decoded = [decoded_sources(out / f"decoded-{r}.txt") for r in range(2)]
    for r in range(2):
        assert set(decoded[r]) <= set(stream[r::2]), (r, sorted(set(decoded[r]) - set(stream[r::2]))[:3])
        assert set(stream[r:12:2]) <= set(decoded[r])
    assert not set(decoded[0]) & set(decoded[1])
    # the records' check at the start: each image opened (and decoded whole: data.check_decode) by one process only
    opened = [[line.split(" ", 1) for line in (out / f"decoded-checked-{r}.txt").read_text().splitlines()]
              for r in range(2)]
    assert {how for lines in opened for how, _ in lines} == {"decoded"}
    checked = [[path for _, path in lines] for lines in opened]
    train_file = Path(yaml.safe_load(setup["config"].read_text())["data"]["train_files"][0])
    images = {str((train_file.parent / json.loads(line)["image"]).resolve()) for line in train_file.read_text().splitlines()}
    assert checked[0] and checked[1] and not set(checked[0]) & set(checked[1])
    assert set(checked[0]) | set(checked[1]) == images and len(checked[0]) + len(checked[1]) == len(images)
    # each process's own prompt-iterator position is in the checkpoint
    saved = json.loads((out / "checkpoints" / "6" / "data" / "data_state.json").read_text())["iterator"]
    assert saved["process_count"] == 2 and [p["batches"] for p in saved["processes"]] == [6, 6]


def test_an_invalid_held_out_file_is_refused_before_the_model_loads(setup):
    """As SFT's (tests/test_sft.py): a missing held-out image stops the run before the model loads."""
    train_file = Path(yaml.safe_load(setup["config"].read_text())["data"]["train_files"][0])
    held_out = train_file.with_name("held_out_bad.jsonl")  # (its records' image paths resolve there)
    good = train_file.read_text(encoding="utf-8").splitlines()[0]
    held_out.write_text(good + "\n" + json.dumps({"image": "gone.png", "label": "real"}) + "\n", encoding="utf-8")
    code, log = grpo(setup, "held_out_bad", sets=[f"data.eval_files=[{held_out}]", "eval.at_end=true"])
    assert code == 2, log[-3000:]
    assert f"fxjax grpo: error: {held_out}:2: missing image: image " in log and "Traceback" not in log, log[-3000:]
    assert "grpo: 1 process(es)" not in log, log[-3000:]  # (the line that follows the model's load)


def test_shared_prompts_on_fsdp_train_as_data_parallel_full_sequences_on_two_devices(setup):
    """`grpo.share_prompts` on mesh fsdp 2 (the weights split over the two devices and gathered once for each
    rollout: fxjax.decode_weights; prompts and completions sharded over the batch axis, the reference pass
    too) against full sequences on data 2: the same samples, the same update. LoRA dropout off in both:
    with shared prompts a prompt's G completions share its dropout masks, so with dropout the runs differ by
    design. (One run for both changes: each is also checked alone, tests/test_grpo_batch.py for the shared
    prompts' sequences, tests/test_sharding.py for the gathered decoding.)"""
    adapter = setup["root"] / "sft_adapter_no_dropout"  # a run takes the dropout of the adapter it starts from
    shutil.copytree(setup["root"] / "sft_adapter", adapter, dirs_exist_ok=True)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(adapter_config, lora_dropout=0.0)))
    config = yaml.safe_load(setup["config"].read_text())
    config["model"]["adapter"] = str(adapter)
    config["lora"]["dropout"] = 0.0
    # (in epochs: 0.4 of the 8 training prompts at 2 a step rounds up to 2 steps, the path a paper-style
    # config of one epoch a stage takes)
    config["stages"] = [{"name": "alpha", "epochs": 0.4}]
    path = setup["root"] / "grpo_no_dropout.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = {}
    for share in (False, True):
        name = f"share_{share}"
        # (the shared run also traces its second step with jax.profiler: that changes none of its numbers)
        extra = ["train.profile_start=1", "train.profile_steps=1", "mesh.fsdp=2"] if share else []
        code, log = grpo(setup, name, config=path, sets=[f"grpo.share_prompts={str(share).lower()}", *extra])
        assert code == 0, log[-3000:]
        assert "2 cpu device(s)" in log
        gathered = "rollouts: the weights are gathered over fsdp=2 once per decoding pass ("
        assert (gathered in log and "): CPU devices, in the host's memory" in log) == share, log[-3000:]
        assert ("rollouts:" in log) == share  # (at data 2, fsdp 1: nothing split, nothing copied or said)
        if share:  # the step's reference log-probs (beta > 0) and its update
            assert "profile: tracing update 1 (0-based)" in log and "profile: trace written under" in log
            names = {e.get("name") for e in traced_events(setup["root"] / name)}
            assert {"PjitFunction(step)", "PjitFunction(run)"} <= names, sorted(n for n in names if "Pjit" in str(n))
        assert "stage alpha: 0.4 epoch(s) of 8 prompts at 2 a step = 2 steps" in log
        runs[share] = adapter_tensors(setup["root"] / name / "adapter"), train_records(setup["root"] / name)
    (full, full_log), (shared, shared_log) = runs[False], runs[True]
    assert len(full_log) == len(shared_log) == 2
    for a, b in zip(full_log, shared_log):
        assert a["reward/total_mean"] == b["reward/total_mean"] and a["completion_length_mean"] == b["completion_length_mean"]
        for key in ("loss", "grad_norm", "kl", "update_tokens_per_s"):
            if key == "update_tokens_per_s":  # the same tokens counted, whichever way the update runs them
                assert a[key] * a["update_time"] == pytest.approx(b[key] * b["update_time"], rel=1e-6)
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    start = adapter_tensors(setup["root"] / "sft_adapter")
    assert any(not np.array_equal(full[k], start[k]) for k in full)
    for key in full:  # (lr 1e-2 with Adam: an entry whose gradient is near 0 moves by up to 1e-2 on its sign)
        np.testing.assert_allclose(shared[key], full[key], rtol=1e-4, atol=1e-5, err_msg=key)


def train_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "train"]


def test_batch_order_takes_each_shard_once_in_the_batch_order(monkeypatch):
    """Processes send their rows shard by shard; a shard two processes hold (a replicated batch, or a mesh
    whose tensor axis spans processes) is kept once, and the batch comes out in shard order whatever the
    process order."""
    from fxjax.train import grpo
    from fxjax.train.batching import ProcessRows

    parts = [{"shards": [2, 3], "rows": ["c0", "c1", "d0", "d1"]}, {"shards": [0, 1], "rows": ["a0", "a1", "b0", "b1"]},
             {"shards": [2, 3], "rows": ["c0", "c1", "d0", "d1"]}]
    monkeypatch.setattr(grpo, "allgather_json", lambda name, value: parts)
    mine = ProcessRows(shards=(2, 3), shard_ids=(2, 3), rows=(4, 5, 6, 7), batch_size=8)
    assert grpo.batch_order("test", mine, ["c0", "c1", "d0", "d1"]) == ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"]
    # main_only (the completions only process 0 writes): the same order there, None at the others
    monkeypatch.setattr(grpo, "allgather_json", None)
    monkeypatch.setattr(grpo, "gather_json_to_main", lambda name, value: parts)
    assert grpo.batch_order("test", mine, ["c0", "c1", "d0", "d1"], main_only=True) == \
        ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"]
    monkeypatch.setattr(grpo, "gather_json_to_main", lambda name, value: None)
    assert grpo.batch_order("test", mine, ["c0", "c1", "d0", "d1"], main_only=True) is None


def test_the_run_logs_are_synced_with_each_checkpoint_and_opened_once(tmp_path, monkeypatch):
    """gcsfuse uploads a file when it is synced or closed: metrics.jsonl, open for the whole run, reached the
    bucket only at its end (a preempted attempt lost its log though its checkpoints were kept), and
    completions.jsonl, reopened every step, was uploaded whole at every step. The log and its companions are
    fsynced at each checkpoint (MetricsLogger.sync, which the loops' saves call) and opened once."""
    from fxjax.train import metrics as metrics_module

    opened, synced = [], []
    real_open, real_fsync = open, os.fsync
    monkeypatch.setattr(metrics_module, "open", lambda *a, **k: (opened.append(Path(a[0]).name), real_open(*a, **k))[1],
                        raising=False)
    monkeypatch.setattr(metrics_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    run_log = metrics_module.MetricsLogger(tmp_path, resume_step=0, tensorboard=False)  # (its writer syncs itself)
    completions = metrics_module.CompletionLog(tmp_path, resume_step=0)
    run_log.companions.append(completions)
    for step in (1, 2, 3):
        run_log.log(step, "train", {"loss": 1.0})
        completions.log(step, [{"completion": f"{step}a"}])
    assert opened.count("completions.jsonl") == 1 and not synced
    run_log.sync()
    assert len(synced) == 2  # (both files)
    run_log.close()
    assert len((tmp_path / "completions.jsonl").read_text().splitlines()) == 3
    for module in ("sft", "grpo"):  # each loop's save syncs the log before it saves the checkpoint
        source = (Path(__file__).parents[1] / "train" / f"{module}.py").read_text()
        save = source[source.index("    def save(step: int) -> None:"):]
        assert save.index("metrics.sync()") < save.index("checkpointer.save(")


def test_completion_log_keeps_each_step_once(tmp_path):
    """A run starts by dropping the records past the step it starts from: all of them for a run from
    scratch (an attempt killed before its first checkpoint), those after step N when it resumes from N."""
    from fxjax.train.metrics import CompletionLog

    log = CompletionLog(tmp_path, resume_step=0)
    for step in (1, 2, 3):
        log.log(step, [{"completion": f"{step}a"}, {"completion": f"{step}b"}])
    log.close()
    again = CompletionLog(tmp_path, resume_step=2)
    again.log(3, [{"completion": "3c"}])
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"], r["completion"]) for r in rows] == [
        (1, "completion", "1a"), (1, "completion", "1b"), (2, "completion", "2a"), (2, "completion", "2b"),
        (3, "completion", "3c")]
    CompletionLog(tmp_path, enabled=False, resume_step=0)  # only the main process touches the file
    assert len((tmp_path / "completions.jsonl").read_text().splitlines()) == 5
    CompletionLog(tmp_path, resume_step=0)
    assert (tmp_path / "completions.jsonl").read_text() == ""


def test_the_closing_line_says_the_last_step_as_sft_does_and_a_preempted_run_draws_no_report(monkeypatch,
                                                                                                capsys):
    """`fxjax grpo` ended on a JSON object where `fxjax sft` ends on a sentence; now both end on one line of
    the same form: the steps reached (and run, when resumed), the time, what the last step gave, where the
    checkpoints are. A last step without generated images has no mean IoU (NaN): "n/a", not "nan". A
    preempted run says how it goes on and draws no report (as `fxjax sft`: its machine is being taken)."""
    import argparse
    from types import SimpleNamespace

    from fxjax.commands import grpo as grpo_command
    from fxjax.commands import training

    result = SimpleNamespace(history=[{"stage": "gamma", "reward/total_mean": 1.5, "format_rate": 1.0,
                                       "verdict_accuracy": 0.5, "mean_iou_generated": float("nan")}],
                             steps=3, total_steps=3, preempted=False, resumed_from=None, seconds=1.0,
                             checkpoint_dir="runs/g/checkpoints", exported={})
    reports = []
    monkeypatch.setattr(training, "report", lambda *a: reports.append(a[0]))
    for run, line in ((result, "fxjax grpo: 3 steps in 1s, the last step (stage gamma): reward 1.500, format 100%, "
                               "verdict 50%, mean IoU on generated images n/a (no generated image); checkpoints in "
                               "runs/g/checkpoints\n"),
                      (SimpleNamespace(**{**vars(result), "resumed_from": 2}), "fxjax grpo: step 3 reached, 1 step "
                                                                             "run from step 2 in 1s, the last step"),
                      (SimpleNamespace(**{**vars(result), "resumed_from": 3, "history": []}),
                       "fxjax grpo: step 3 reached, 0 steps run from step 3 in 1s, no step run; checkpoints in")):
        monkeypatch.setattr(training, "run_training", lambda *a, run=run: (None, run))
        assert grpo_command.run(argparse.Namespace()) == 0
        assert capsys.readouterr().out.startswith(line)
    assert reports == ["grpo"] * 3
    preempted = SimpleNamespace(**{**vars(result), "steps": 2, "preempted": True})
    monkeypatch.setattr(training, "run_training", lambda *a: (None, preempted))
    assert grpo_command.run(argparse.Namespace()) == 0
    out, err = capsys.readouterr()
    assert out == "" and ("fxjax grpo: preempted at step 2/3 (resume by running the same command); checkpoint in "
                          "runs/g/checkpoints") in err
    assert reports == ["grpo"] * 3
    from fxjax.train.grpo import progress_postfix  # the progress line of such a step says it the same way

    step = {"reward/total_mean": 1.5, "format_rate": 1.0, "mean_iou_generated": float("nan")}
    assert progress_postfix(step, "gamma") == {"stage": "gamma", "reward": 1.5, "fmt": 1.0, "iou_gen": "n/a"}
    assert progress_postfix({**step, "mean_iou_generated": 0.12345}, "alpha")["iou_gen"] == 0.123


def test_the_start_says_each_stages_reward_and_what_runs_otherwise_than_it_reads(tmp_path):
    """A reward file with a positive penalty is warned about by stage; a stages list beside the continuous
    schedule (ignored) and luspo at token level (its paper's is sequence) get a note."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.rewards.stages import CONFIG_PATH
    from fxjax.train.grpo_stages import say_stage_weights

    reward_file = tmp_path / "rewards.yaml"
    text = CONFIG_PATH.read_text()
    assert "label_minus: -2.0" in text
    reward_file.write_text(text.replace("label_minus: -2.0", "label_minus: 1.0", 1))
    base = {"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"}}
    cfg = grpo_from_dict({**base, "grpo": {"reward_config": str(reward_file), "loss_type": "luspo",
                                           "max_completion_length": 64},
                          "stages": [{"name": "alpha", "steps": 2}, {"name": "beta", "steps": 3}]})
    said: list[str] = []
    say_stage_weights(cfg, 5, said.append)
    assert said[0].startswith("grpo: stage alpha (steps 1-2): total = ") and said[1].startswith("grpo: stage beta "
                                                                                                 "(steps 3-5): ")
    assert said[2] == ("warning: stage beta: label_minus +1 is positive: a wrong verdict earns a reward (the *_minus "
                       "values are added as written; a penalty is negative)")
    assert said[3].startswith("note: grpo.loss_type luspo with importance_sampling_level token") and len(said) == 4
    said.clear()  # GSPO's sequence ratio with a loss that sums token terms weighs each sequence by its length (TRL warns)
    gspo_dapo = grpo_from_dict({**base, "grpo": {"loss_type": "dapo", "importance_sampling_level": "sequence",
                                                 "max_completion_length": 64}})
    say_stage_weights(gspo_dapo, 300, said.append)
    assert said[-1] == ("note: importance_sampling_level sequence with grpo.loss_type dapo: that loss sums per-token "
                        "terms, so each sequence weighs as its length (TRL warns too); GSPO's setup is loss_type grpo")
    said.clear()  # held-out decoding longer than any rollout (eval.max_new_tokens 512 by default): a note
    with_eval = grpo_from_dict({**base, "data": {**base["data"], "eval_files": ["e.jsonl"]},
                                "grpo": {"max_completion_length": 64}})
    say_stage_weights(with_eval, 300, said.append)
    assert said[-1] == ("note: eval.max_new_tokens 512 is above grpo.max_completion_length 64: the held-out "
                        "evaluation may decode longer than any rollout (its time grows with it); --set "
                        "eval.max_new_tokens=64 to match")
    said.clear()
    continuous = grpo_from_dict({**base, "train": {"steps": 7}, "grpo": {"schedule": "continuous"},
                                 "stages": [{"name": "alpha", "steps": 2}]})
    say_stage_weights(continuous, 7, said.append)
    assert said[0].startswith("grpo: continuous schedule: total = ") and said[0].endswith("at step 7")
    assert said[1] == ("note: grpo.schedule=continuous: the stages list (alpha) is not used (the weights follow the "
                       "reward config's continuous section over train.steps)")
    # every paper weight 0 with a reward term of one's own (TRL's way of training on one's function alone):
    # the term varies, so no "learns nothing" warning; with that term's weight 0 too, the warning
    reward_file.write_text("stages:\n  zero: {" + ", ".join(f"{k}: 0.0" for k in ("base", "w_iou", "label_plus",
                                                                                 "label_minus", "format_plus",
                                                                                 "format_minus")) + "}\n")
    for weight, warned in ((1.0, False), (0.0, True)):
        said.clear()
        own = grpo_from_dict({**base, "grpo": {"reward_config": str(reward_file), "reward_funcs": [
            {"name": "brevity", "function": "my_rewards:brevity", "weight": weight}]}, "stages": [{"name": "zero", "steps": 2}]})
        say_stage_weights(own, 2, said.append)
        assert any("stage zero: every completion scores the same" in line for line in said) == warned, said


def test_each_step_samples_with_its_own_key_and_weights():
    """The sampling key differs at every step and is the same at that step of a resumed run; the reward
    weights are the stage's (stages) or the continuous schedule's at the step, starting at w_iou_start."""
    import jax

    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.grpo import rollout_key
    from fxjax.train.grpo_stages import stage_weights

    keys = [np.asarray(jax.random.key_data(rollout_key(3, step))) for step in range(6)]
    assert len({k.tobytes() for k in keys}) == 6
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(rollout_key(3, 4))), keys[4])  # (a resume)
    assert np.asarray(jax.random.key_data(rollout_key(4, 0))).tobytes() != keys[0].tobytes()
    base = {"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"}}
    staged = grpo_from_dict({**base, "stages": [{"name": "alpha", "steps": 2}, {"name": "gamma", "steps": 3}]})
    assert [stage_weights(staged, k)[0] for k in range(5)] == ["alpha"] * 2 + ["gamma"] * 3
    continuous = grpo_from_dict({**base, "train": {"steps": 4}, "grpo": {"schedule": "continuous"}})
    # ../shared/REFERENCE.md: w_G(t) = 0.5 + 0.5 * t / T over the T steps (t = 0 at the first)
    assert [stage_weights(continuous, k)[1].w_iou for k in range(4)] == [0.5 + 0.5 * k / 4 for k in range(4)]


def test_a_steps_updates_use_the_stored_log_probs_of_the_policy_that_sampled():
    """`updates_on`: with num_iterations updates a step stores the sampling policy's (and the reference's)
    log-probs once, before its first update, and every update gets them (a batch without them makes every
    ratio 1, so the PPO clip never acts), each update starting from the state the previous one left."""
    from collections import namedtuple

    from fxjax.train.grpo import updates_on

    Batch = namedtuple("Batch", "tokens old_logps ref_logps")
    State = namedtuple("State", "params step")
    seen, asked = [], []

    def logps_fn(params, base, rest, batch):
        asked.append(params)
        return f"old({params})", f"ref({params})"

    def step_fn(state, base, rest, batch):
        seen.append((state, batch))
        return State(f"{state.params}+", state.step + 1), {"update": state.step}

    state, updates = updates_on(step_fn, logps_fn, State("p", 0), "base", "rest", Batch("t", None, None), 3)
    assert asked == ["p"] and state == State("p+++", 3) and updates == [{"update": 0}, {"update": 1}, {"update": 2}]
    assert [s for s, _ in seen] == [State("p", 0), State("p+", 1), State("p++", 2)]
    assert all(b == Batch("t", "old(p)", "ref(p)") for _, b in seen)
    _, updates = updates_on(step_fn, None, State("q", 0), "base", "rest", Batch("t", None, None), 1)
    assert seen[-1][1] == Batch("t", None, None) and len(updates) == 1  # num_iterations 1, beta 0: none needed
