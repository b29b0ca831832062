"""`fxjax sft` end to end on the tiny preset (real Qwen tokenizer, demo images), in subprocesses:

* resume is exact: 4 steps straight == 4 steps SIGKILLed during the save of 4 (the checkpoint of 2 stays
  good), resume from 2 (SIGTERM at 3: saved, exit 0), resume from 3 to 4; the exported LoRA parameters are
  bitwise equal;
* two processes (gloo on localhost, one CPU device each), SIGKILLed after step 2 and resumed, == one process
  with two devices: LoRA parameters and the held-out evaluation (loss, greedy-generation metrics, the greedy
  completions themselves);
* a non-finite loss stops the run naming the step (last good checkpoint kept), or is skipped.

Subprocesses share a persistent XLA compilation cache, so each program compiles once per session.
"""

from __future__ import annotations

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

from fxjax.run_files import committed_steps
from launch import (decoded_sources, launch_two, stream_sources, subprocess_env, traced_events, traced_step_calls,
                    wait_all)

from fxjax.data.demo_data import make_demo_data
from fxjax.train.metrics import read_metrics

TIMEOUT = 240


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    """A tiny random model in HF layout with the real tokenizer, 12 demo images, an SFT config."""
    from fxjax.hf_save import save_pretrained
    from fxjax.model_init import init_model

    root = tmp_path_factory.mktemp("sft")
    files = make_demo_data(root / "data", n=12, seed=0, test_fraction=0.25, min_side=64, max_side=112)
    model_dir = save_pretrained(init_model("tiny", seed=0), root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    config = {
        "model": {"path": str(model_dir), "dtype": "float32", "remat": "full"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "qkv", "fc2"]},
        "data": {"train_files": [str(files["train"])], "min_pixels": 3136, "max_pixels": 3136, "max_length": 384,
                 "length_buckets": [384], "batch_size": 2, "seed": 1},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 1},
        # log_every 3 beside checkpoints every 2: a record at each checkpoint too (2, 3, 4), so that a run
        # resumed from step 2 logs what the straight run does
        "train": {"steps": 4, "loss_chunk": 256, "progress_bar": False, "output_dir": str(root / "out"),
                  "log_every": 3},
        "checkpoint": {"every": 2, "keep": 3},
        "eval": {"at_end": False},
    }
    path = root / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    env = subprocess_env(compilation_cache=root / "xla_cache", FXJAX_LOCAL_DEVICE_COUNT="2", PYTHONUNBUFFERED="1")
    return dict(root=root, config=path, env=env, files=files, model=model_dir)


def sft(setup, name: str, *, env=None, until: str | None = None, then: int | None = None, extra=(),
        report: bool = False):
    """Run `fxjax sft` for run `name` (its own checkpoint dir and adapter dir unless given in extra). With
    `until`, wait for that line on stderr and send signal `then`. Returns (returncode, stderr text). The
    end-of-run report.png (about 2 s of plotting) only with `report`: the straight run checks it."""
    root = setup["root"]
    args = [sys.executable, "-m", "fxjax.cli", "sft", "--config", str(setup["config"]),
            "--set", f"checkpoint.dir={root / name / 'ckpt'}", "--set", f"export.adapter_dir={root / name / 'adapter'}",
            "--set", f"train.output_dir={root / name}", *([] if report else ["--no-report"])]
    for item in extra:
        args += ["--set", item]
    log_path = root / f"{name}-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, env={**setup["env"], **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if until is not None:
                deadline = time.time() + TIMEOUT
                while until not in log_path.read_text():
                    if proc.poll() is not None or time.time() > deadline:
                        raise AssertionError(f"{name}: never printed {until!r}:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.05)
                os.kill(proc.pid, then)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log_path.read_text()


def adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def eval_at_end_args(setup) -> list[str]:
    """--set arguments for a held-out evaluation (loss + greedy generation) at the end of a run."""
    return ["--set", f"data.eval_files=[{setup['files']['test']}]", "--set", "eval.at_end=true",
            "--set", "eval.batch_size=2", "--set", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def straight(setup):
    # (also traces updates 1-2 with jax.profiler: the trace changes nothing the tests compare)
    code, log = sft(setup, "straight", extra=[a for a in eval_at_end_args(setup) if a != "--set"]
                    + ["train.profile_start=1", "train.profile_steps=2"], report=True)
    assert code == 0, log[-3000:]
    report = setup["root"] / "straight" / "report.png"
    assert f"wrote the report {report}" in log and report.stat().st_size > 20_000
    assert "profile: tracing updates 1-2 (0-based)" in log and "profile: trace written under" in log
    events = traced_events(setup["root"] / "straight")
    # the two traced updates' train steps, and no Python tracer events (a two-step trace was 1M of them)
    assert traced_step_calls(events) == 2 and not any(e.get("name", "").startswith("$") for e in events)
    return adapter_tensors(setup["root"] / "straight" / "adapter")


@pytest.fixture(scope="module")
def interrupted(setup):
    """4 steps, SIGKILL while saving 4; resume, SIGTERM after 3; resume to the end. (A SIGKILL at the
    `after_step` pause, after a committed checkpoint, is the two-process test's.)"""
    ckpt = setup["root"] / "chain" / "ckpt"
    out = {}
    code, log = sft(setup, "chain", env={"FXJAX_FAULT": "save@4"},
                    until="fxjax-fault: paused at save@4", then=signal.SIGKILL)
    out["killed_in_save"] = (code, committed_steps(ckpt), sorted(p.name for p in ckpt.iterdir()))
    # (resumed from step 2 and tracing from there: the SIGTERM ends the run inside the trace, which is
    # written all the same)
    code, log = sft(setup, "chain", env={"FXJAX_FAULT": "after_step@3"},
                    until="fxjax-fault: paused at after_step@3", then=signal.SIGTERM,
                    extra=["train.profile_start=2", "train.profile_steps=5"])
    out["sigterm"] = (code, log, committed_steps(ckpt))
    out["sigterm_trace"] = traced_events(setup["root"] / "chain") if code == 0 else None
    code, log = sft(setup, "chain")
    out["final"] = (code, log)
    out["adapter"] = adapter_tensors(setup["root"] / "chain" / "adapter") if code == 0 else None
    return out


def test_sigkill_then_resume_continues_from_the_last_checkpoint(interrupted):
    code, steps, _ = interrupted["killed_in_save"]
    assert code == -signal.SIGKILL and steps == [2]
    code, log, _ = interrupted["sigterm"]
    assert "resumed from step 2" in log, log[-3000:]


def test_sigterm_saves_and_exits_cleanly(interrupted):
    code, log, steps = interrupted["sigterm"]
    assert code == 0, log[-3000:]
    assert "resumed from step 2" in log and "received SIGTERM; saved step 3" in log and "preempted at step 3/4" in log
    assert steps == [2, 3]
    # the trace it had started (updates 2-6 asked, cut to the run's 2-3; the signal came after 2) was
    # written on the way out
    assert "profile: updates 2-6 asked, the run ends at update 3: tracing updates 2-3" in log
    assert "profile: tracing updates 2-3 (0-based)" in log and "profile: trace written under" in log
    assert traced_step_calls(interrupted["sigterm_trace"]) == 1  # update 2, then the signal
    code, log = interrupted["final"]
    assert code == 0, log[-3000:]
    assert "resumed from step 3" in log


def test_a_stop_signal_while_the_model_loads_stops_after_the_first_step_with_its_checkpoint(setup):
    """One process: a SIGTERM before the loop took the signals (loading the model, compiling: minutes on a real
    model) killed the run, status 143, without a word. Now it is held for the loop, as a multi-process run's
    is: it stops after its first step with a checkpoint, exits 0 and says why."""
    code, log = sft(setup, "held", env={"FXJAX_FAULT": "joined@0"}, until="fxjax-fault: paused at joined@0",
                    then=signal.SIGTERM)
    assert code == 0, log[-3000:]
    assert "received SIGTERM; saved step 1" in log and "preempted at step 1/4" in log, log[-3000:]
    assert committed_steps(setup["root"] / "held" / "ckpt") == [1]
    records = read_metrics(setup["root"] / "held")
    assert records[-1]["kind"] == "end" and (records[-1]["step"], records[-1]["status"]) == (1, "preempted")
    from fxjax.commands.report import build_report

    assert ("the run was stopped by a signal at step 1 (its checkpoint saved; the same command resumes it)"
            in build_report(records).get_suptitle().replace("\n", " "))


def test_a_save_killed_midway_leaves_the_last_good_checkpoint(interrupted):
    code, steps, names = interrupted["killed_in_save"]
    assert code == -signal.SIGKILL
    assert steps == [2]  # step 4 never committed ...
    assert any(n.startswith("4") and not n.isdigit() for n in names), names  # ... only its temporary directory


def test_resumed_run_is_bitwise_equal_to_the_straight_run(setup, straight, interrupted):
    resumed = interrupted["adapter"]
    assert resumed is not None and resumed.keys() == straight.keys() and len(straight) > 0
    for key in straight:
        assert np.array_equal(resumed[key], straight[key]), key
    assert any(np.abs(v).max() > 0 for k, v in straight.items() if "lora_B" in k)  # it did train
    # and its train records are the straight run's (the interval a checkpoint splits is logged at it)
    keys = ("loss", "grad_norm", "learning_rate", "target_tokens", "skipped")
    records = {name: [(r["step"], *(r[k] for k in keys)) for r in read_metrics(setup["root"] / name)
                      if r["kind"] == "train"] for name in ("straight", "chain")}
    assert records["chain"] == records["straight"] and [r[0] for r in records["straight"]] == [2, 3, 4]
    # a finished and a preempted run both exit 0: their last "end" record tells them apart
    ends = {name: [(r["step"], r["status"]) for r in read_metrics(setup["root"] / name) if r["kind"] == "end"]
            for name in ("straight", "chain")}
    assert ends == {"straight": [(4, "finished")], "chain": [(3, "preempted"), (4, "finished")]}


def test_resuming_another_runs_checkpoints_is_refused_naming_why(setup, straight):
    """The straight run's checkpoints resumed with another LoRA rank (arrays of other shapes), or by `fxjax
    grpo` (the same state layout would restore and continue the SFT step count): exit 2 before any step,
    with a message that says what differs, and the checkpoints untouched."""
    root = setup["root"]
    shutil.copytree(root / "straight" / "ckpt", root / "rank8" / "ckpt")
    code, log = sft(setup, "rank8", extra=["lora.rank=8"])
    assert code == 2, log[-3000:]
    assert "was written with other model or LoRA settings than this run's (its lora: rank 4," in log
    assert "lora_a.value (" in log and "Traceback" not in log
    assert committed_steps(root / "rank8" / "ckpt") == committed_steps(root / "straight" / "ckpt")
    config = yaml.safe_load(setup["config"].read_text())
    config["train"].pop("steps")
    config["train"].pop("log_every")  # (SFT's interval: GRPO logs every step)
    config.update(grpo={"num_generations": 2, "max_completion_length": 4}, stages=[{"name": "alpha", "steps": 1}])
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "fxjax.cli", "grpo", "--config", str(path), "--set",
                           f"checkpoint.dir={root / 'rank8' / 'ckpt'}", "--set", f"train.output_dir={root / 'g'}",
                           # a start it would keep a copy of: refused before writing it into the SFT run's folder
                           "--set", f"model.from_run={root / 'straight' / 'ckpt'}"],
                          env=setup["env"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{root / 'rank8' / 'ckpt'} holds the checkpoints of an sft run (newest: step 4)" in proc.stderr
    assert sorted(p.name for p in (root / "rank8" / "ckpt").iterdir()) == sorted(
        p.name for p in (root / "straight" / "ckpt").iterdir())


def test_an_eval_batch_the_mesh_would_replicate_is_refused_at_the_start(setup):
    """eval.batch_size is checked against the batch devices with data.batch_size, before the model loads
    (it was replicated on every device without a word)."""
    extra = [a for a in eval_at_end_args(setup) if a != "--set" and not a.startswith("eval.batch_size")]
    code, log = sft(setup, "eval_batch", extra=[*extra, "eval.batch_size=3"])
    assert code == 2, log[-3000:]
    assert "eval.batch_size = 3 does not divide over the 2 batch devices" in log and "Traceback" not in log


def test_an_invalid_held_out_file_is_refused_before_the_model_loads(setup):
    """The held-out records were read after the model loaded and the checkpoint restored (minutes on a pod)
    before a missing image in them stopped the run; now it stops before the load, naming file and line."""
    held_out = setup["files"]["test"].with_name("held_out_bad.jsonl")  # (its records' image paths resolve there)
    good = setup["files"]["test"].read_text(encoding="utf-8").splitlines()[0]
    held_out.write_text(good + "\n" + json.dumps({"image": "gone.png", "label": "real"}) + "\n", encoding="utf-8")
    extra = [a for a in eval_at_end_args(setup) if a != "--set" and not a.startswith("data.eval_files")]
    code, log = sft(setup, "held_out_bad", extra=[*extra, f"data.eval_files=[{held_out}]"])
    assert code == 2, log[-3000:]
    assert f"fxjax sft: error: {held_out}:2: missing image: image " in log and "Traceback" not in log, log[-3000:]
    assert "sft: model " not in log, log[-3000:]  # (the line that follows the model's load)
    assert not (setup["root"] / "held_out_bad" / "ckpt").exists()


DECODE_TRACE = str(Path(__file__).with_name("decode_trace.py"))


def _launch_two(setup, name: str, env=None):
    """Both processes record the examples they decode (tests/decode_trace.py) in <root>/<name>/decoded-<rank>.txt."""
    root = setup["root"]
    args = ["sft", "--config", str(setup["config"]), "--set", f"checkpoint.dir={root / name / 'ckpt'}",
            "--set", f"export.adapter_dir={root / name / 'adapter'}", "--set", f"train.output_dir={root / name}",
            *eval_at_end_args(setup), "--no-report"]
    env = {**setup["env"], "FXJAX_TEST_DECODE_LOG": str(root / name / "decoded"), **(env or {})}
    return launch_two(args, env, root / name, entry=(DECODE_TRACE,))


def global_stream(setup, n: int) -> list[tuple[int, str]]:
    """(epoch, record source) of the first `n` examples of the one-process training stream."""
    from fxjax.train.sft import data_config
    from fxjax.train_config import load_sft_config

    return stream_sources(data_config(load_sft_config(setup["config"])), n)


def decoded_train_examples(setup, name: str, rank: int) -> list[tuple[int, str]]:
    train = str(setup["files"]["train"])
    pairs = decoded_sources(setup["root"] / name / f"decoded-{rank}.txt")
    return [p for p in pairs if p[1].rsplit(":", 1)[0] == train]  # not the held-out evaluation's


def _wait_all(procs, logs, until: str | None = None) -> list[int]:
    return wait_all(procs, logs, timeout=TIMEOUT, until=until)


def test_two_processes_killed_and_resumed_equal_one_process(setup, straight, capsys):
    """2 processes x 1 device: SIGKILL both after the checkpoint of step 2, resume both, finish, evaluate:
    the LoRA parameters and the held-out evaluation equal the single-process straight run's, and `fxjax
    export --run` of its checkpoint, from one process, writes that adapter and its merge."""
    root = setup["root"]
    procs, logs = _launch_two(setup, "multi", env={"FXJAX_FAULT": "after_step@2"})
    assert _wait_all(procs, logs, until="fxjax-fault: paused at after_step@2") == [-signal.SIGKILL] * 2
    assert committed_steps(root / "multi" / "ckpt") == [2]
    procs, logs = _launch_two(setup, "multi")
    codes = _wait_all(procs, logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    text = logs[0].read_text()
    assert "2 process(es), 2 cpu device(s)" in text and "resumed from step 2" in text
    multi = adapter_tensors(root / "multi" / "adapter")
    assert multi.keys() == straight.keys()
    for key in straight:
        np.testing.assert_allclose(multi[key], straight[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert committed_steps(root / "multi" / "ckpt") == [2, 4]
    _check_export_of_the_two_process_run(root, multi, capsys)
    # the training loss of every step equals the one-process run's
    losses = {name: {r["step"]: r["loss"] for r in map(json.loads, (root / name / "metrics.jsonl").read_text()
                                                     .splitlines()) if r["kind"] == "train"}
              for name in ("straight", "multi")}
    assert sorted(losses["multi"]) == sorted(losses["straight"]) == [2, 3, 4]
    for step, loss in losses["straight"].items():
        np.testing.assert_allclose(losses["multi"][step], loss, rtol=1e-5, err_msg=f"step {step}")
    # Each process decoded only its own rows of the global batches: process r row r of each batch of 2, i.e.
    # elements 2g + r of the one-process stream (read-ahead may go past the 4 steps, never into the other's).
    stream = global_stream(setup, 32)
    decoded = [decoded_train_examples(setup, "multi", r) for r in range(2)]
    for r in range(2):
        mine = set(stream[r::2])
        assert set(decoded[r]) <= mine, (r, sorted(set(decoded[r]) - mine)[:3])
        assert set(stream[r:8:2]) <= set(decoded[r])  # the 4 steps' rows of this process
    assert not set(decoded[0]) & set(decoded[1])
    # every process's own iterator position is in the checkpoint, and restored exactly (the losses above)
    data_state = json.loads((root / "multi" / "ckpt" / "4" / "data" / "data_state.json").read_text())
    assert data_state["cwd"] == os.getcwd()  # (what the run's relative paths are relative to: run_files.with_run_paths)
    saved = data_state["iterator"]
    assert saved["process_count"] == 2 and [p["batches"] for p in saved["processes"]] == [4, 4]
    assert saved["rows_per_batch"] == [1, 1]  # each process's half of the 2-row batch
    evals = {name: [r for r in map(json.loads, (root / name / "metrics.jsonl").read_text().splitlines())
                    if r["kind"] == "eval"] for name in ("straight", "multi")}
    (one,), (two,) = evals["straight"], evals["multi"]
    assert one["examples"] == two["examples"] == 3 and one["step"] == two["step"] == 4
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for key in ("format_rate", "verdict_accuracy", "mean_iou"):
        assert two[key] == pytest.approx(one[key]), key
    # An untrained tiny model scores ~0 on both sides, so the greedy completions themselves must agree.
    assert one["samples"] and all(s["completion"] for s in one["samples"])
    assert two["samples"] == one["samples"]


def _check_export_of_the_two_process_run(root: Path, adapter: dict[str, np.ndarray], capsys) -> None:
    """`fxjax export --run` of the checkpoint the two processes wrote, from this one process: its adapter is
    the run's own at the last step, and merged/ holds the base weight + (alpha / rank) B A of every LoRA
    module (computed here in float64 from the exported adapter and the base checkpoint's tensors)."""
    from fxjax.cli import main
    from fxjax.hf_checkpoint import iter_tensors, weight_files

    out = root / "multi-export"
    # the run's output folder holds no checkpoints (its checkpoint.dir is multi/ckpt): the error names that folder
    capsys.readouterr()
    assert main(["export", "--run", str(root / "multi"), "--out", str(out)]) == 2 and not out.exists()
    assert f"in it, checkpoints in {root / 'multi' / 'ckpt'} (steps 2, 4)" in capsys.readouterr().err
    assert main(["export", "--run", str(root / "multi" / "ckpt"), "--out", str(out)]) == 0
    exported = adapter_tensors(out / "adapter")
    assert exported.keys() == adapter.keys()
    for key, value in adapter.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    base = {name: t for name, _, t in iter_tensors(weight_files(root / "model"))}
    merged = {name: t for name, _, t in iter_tensors(weight_files(out / "merged"))}
    modules = sorted(key[len("base_model.model."):-len(".lora_A.weight")] for key in exported if ".lora_A." in key)
    assert modules and set(merged) == set(base)
    # PEFT names transformers 5's modules (model.language_model..., model.visual...); the checkpoint keeps
    # the stored names (model.layers..., visual...), as transformers saves Qwen2.5-VL
    stored = {m: m.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
              for m in modules}
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scaling = written["lora_alpha"] / written["r"]
    assert scaling == 8 / 4  # (the run's lora.alpha / lora.rank)
    for module in modules:
        a, b = (exported[f"base_model.model.{module}.lora_{x}.weight"].astype(np.float64) for x in "AB")
        name = f"{stored[module]}.weight"
        want = base[name].astype(np.float64) + scaling * b @ a
        np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-6, err_msg=module)
    untouched = [n for n in base if not any(n.startswith(m + ".") for m in stored.values())]
    assert untouched and all(np.array_equal(merged[n], base[n]) for n in untouched)


def test_a_per_process_data_state_restores_only_with_its_process_count_and_rows():
    from fxjax.train.resume import restore_iterator
    from fxjax.config_mapping import ConfigError

    class Iterator:
        state = None

        def set_state(self, state):
            self.state = state

    it = Iterator()
    restore_iterator(it, {"process_count": 1, "processes": [{"batches": 3}]}, "ckpt/3")
    assert it.state == {"batches": 3}
    restore_iterator(it, {"batches": 5}, "ckpt/5")  # one state for every process (GRPO's prompts)
    assert it.state == {"batches": 5}
    with pytest.raises(ConfigError, match=r"ckpt/4: the data iterator state was saved by 2 process\(es\) but this "
                                          r"run has 1"):
        restore_iterator(it, {"process_count": 2, "processes": [{}, {}]}, "ckpt/4")
    # a process's position counts its own rows: another number of them a batch (another mesh split over the
    # processes) would replay or skip batches
    saved = {"process_count": 1, "processes": [{"batches": 6}], "rows_per_batch": [2]}
    with pytest.raises(ConfigError, match=r"ckpt/6: process 0 read 2 row\(s\) of each global batch when the "
                                          r"checkpoint was saved and reads 4 on this mesh"):
        restore_iterator(it, saved, "ckpt/6", rows_per_batch=4)
    restore_iterator(it, saved, "ckpt/6", rows_per_batch=2)
    assert it.state == {"batches": 6}


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(setup, mode):
    """NaN pixel patches (FXJAX_FAULT=nan_batch@N) make the real step's loss non-finite: the straight run's
    config, so its compiled programs are reused."""
    faults = "nan_batch@2" if mode == "stop" else "nan_batch@2,nan_batch@3"
    code, log = sft(setup, f"nan-{mode}", env={"FXJAX_FAULT": faults},
                    extra=["checkpoint.every=1", f"train.on_nonfinite={mode}"], report=mode == "stop")
    ckpt = setup["root"] / f"nan-{mode}" / "ckpt"
    assert "fxjax-fault: NaN patches at nan_batch@2" in log
    if mode == "stop":
        assert code == 3, log[-3000:]
        assert "non-finite loss at step 2" in log and "the last good checkpoint is step 1" in log
        assert committed_steps(ckpt) == [1]
        report = setup["root"] / "nan-stop" / "report.png"  # (drawn all the same: how the run got there)
        assert f"wrote the report {report}" in log and report.stat().st_size > 10_000
        # the stopping step is the last record, marked (metrics.jsonl ended at step 1, and the report read as a
        # run that trained cleanly to its end)
        records = [json.loads(line) for line in (setup["root"] / "nan-stop" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2] and train[-1]["loss"] == "nan" and "stopped" not in train[0]
        assert train[-1]["stopped"] == "non-finite" and train[-1]["skipped"] == 0
        assert records[-1] == {**records[-1], "step": 2, "kind": "end", "status": "non-finite"}
        from fxjax.commands.report import build_report

        assert ("the run stopped at step 2: non-finite loss or gradient (train.on_nonfinite: stop)"
                in build_report(records).get_suptitle().replace("\n", " "))
    else:
        assert code == 0, log[-3000:]
        assert "step 2: non-finite loss/gradient" in log and "update skipped (1 so far)" in log
        assert "step 3: non-finite loss/gradient" in log and "update skipped (2 so far)" in log
        assert committed_steps(ckpt) == [2, 3, 4]  # checkpoint.keep = 3
        records = [json.loads(line) for line in (setup["root"] / "nan-skip" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        assert [r["skipped"] for r in train] == [0, 1, 2, 2]
        assert np.isfinite(train[-1]["loss"])  # the skipped updates left the parameters usable: step 4 trains
        from fxjax.commands.report import build_report

        assert ("2 update(s) skipped as non-finite (train.on_nonfinite: skip; not in the logged means), in the "
                "records of step(s) 2, 3" in build_report(records).get_suptitle().replace("\n", " "))
        # The count lives in the checkpoint: resumed from step 3, step 4 again reports the two skipped updates.
        # Resumed on the other split of the two devices: allowed, and said (not bit for bit the same run).
        shutil.rmtree(ckpt / "4")
        code, log = sft(setup, "nan-skip", extra=["checkpoint.every=1", "train.on_nonfinite=skip", "mesh.data=1",
                                                  "mesh.fsdp=2"])
        assert code == 0 and "resumed from step 3" in log, log[-3000:]
        assert log.count("warning: resuming on mesh {'data': 1, 'fsdp': 2, 'tensor': 1}, but the checkpoint was "
                         "saved on mesh {'data': 2, 'fsdp': 1, 'tensor': 1}") == 1, log[-3000:]
        records = [json.loads(line) for line in (setup["root"] / "nan-skip" / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["skipped"]) for r in records if r["kind"] == "train"][-1] == (4, 2)


def test_a_failed_checkpoint_save_stops_the_run_at_the_next_step_naming_the_last_good_one(setup):
    """The write of step 2's checkpoint fails as on a full disk (FXJAX_FAULT=save_error@2): orbax raised it
    only at the next save, so the run trained on to step 4 (a whole checkpoint.every, lost) and died with a
    raw traceback. Now it stops after step 3 (the write fails at once; step 3 takes far longer) with one
    line naming the folder and what to do, which orbax's logged tracebacks (some 180 lines, one from each of
    its threads) no longer bury: each of its records is one line."""
    code, log = sft(setup, "savefail", env={"FXJAX_FAULT": "save_error@2"})  # (4 steps: the module's program)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log and len(log.splitlines()) < 14, log[-3000:]  # (of some 180)
    # (before the records' count, said: the images of a large dataset take minutes to check)
    assert "sft: reading the records of 1 file and checking each image file once (decoded whole: data.check_decode)" in log
    assert ("Save Finalize thread (save_finalize) failed. (OSError: [Errno 28] No space left on device (FXJAX_FAULT "
            "save_error))") in log, log[-3000:]
    ckpt = setup["root"] / "savefail" / "ckpt"
    assert (f"fxjax sft: error: the checkpoint of step 2 could not be saved to {ckpt} (OSError: [Errno 28] No "
            "space left on device (FXJAX_FAULT save_error)); stopped after step 3; the last good checkpoint is none "
            "yet: free space") in log, [line for line in log.splitlines() if "error:" in line]
    steps = [json.loads(line)["step"] for line in (setup["root"] / "savefail" / "metrics.jsonl").open()]
    assert max(steps) < 4 and committed_steps(ckpt) == []  # (the old run logged step 4 before it stopped)


def test_the_closing_line_of_a_resumed_run_counts_the_steps_it_ran(monkeypatch, capsys):
    """A run resumed at step 5 that reaches step 9 ran 4 steps: said so (it read "9 steps in 21s")."""
    import argparse
    from types import SimpleNamespace

    from fxjax.commands import sft as sft_command
    from fxjax.commands import training

    result = SimpleNamespace(steps=9, total_steps=9, preempted=False, resumed_from=5, seconds=21.0, final_loss=0.5,
                             checkpoint_dir="runs/sft/checkpoints")
    monkeypatch.setattr(training, "run_training", lambda *a: (None, result))
    monkeypatch.setattr(training, "report", lambda *a: None)
    assert sft_command.run(argparse.Namespace()) == 0
    assert capsys.readouterr().out.strip() == ("fxjax sft: step 9 reached, 4 steps run from step 5 in 21s, the last "
                                               "step's loss 0.5000; checkpoints in runs/sft/checkpoints")
    result.resumed_from = None
    assert sft_command.run(argparse.Namespace()) == 0
    assert capsys.readouterr().out.startswith("fxjax sft: 9 steps in 21s, the last step's loss 0.5000;")
    result.steps, result.resumed_from = 6, 5  # (one step: "1 step", not "1 steps"; a fresh 1-step run too)
    assert sft_command.run(argparse.Namespace()) == 0
    assert capsys.readouterr().out.startswith("fxjax sft: step 6 reached, 1 step run from step 5 in 21s,")
    result.steps, result.resumed_from = 1, None
    assert sft_command.run(argparse.Namespace()) == 0
    assert capsys.readouterr().out.startswith("fxjax sft: 1 step in 21s,")


def test_a_runs_result_echoed_in_a_notebook_leaves_out_its_arrays():
    """`r = run_sft(cfg); r` printed the dataclass with every LoRA array and the model (440k characters on the
    tiny model): the result's repr names its numbers, not the weights it carries."""
    import numpy as np

    from fxjax.train.grpo import GRPOResult
    from fxjax.train.sft import SFTResult

    for result in (SFTResult(steps=3, total_steps=3, final_loss=0.5, params={"lora": np.zeros(100_000)}, model=[0] * 100_000),
                   GRPOResult(steps=2, total_steps=2, params={"lora": np.zeros(100_000)}, model=[0] * 100_000)):
        text = repr(result)
        assert len(text) < 600 and "params" not in text and "model=" not in text and "steps=" in text, text
