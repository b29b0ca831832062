"""Two processes on localhost (4 simulated CPU devices each, gloo collectives) load one checkpoint onto
one global 8-device mesh and compute the single-process logits; export gathers and process 0 writes.

fxjax.distributed.initialize() in each worker is driven by FXJAX_* environment variables only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

import sharding_worker as worker
from launch import launch_two, subprocess_env, wait_all

from fxjax.run_files import committed_steps

MESHES = ("1,8,1", "2,2,2")
TOL = 1e-5
TIMEOUT = 240  # seconds for both processes together (about 15 s normally)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return worker.build_checkpoint(tmp_path_factory.mktemp("multihost_ckpt"))


@pytest.fixture(scope="module")
def two_processes(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost_out")
    port = free_port()
    procs, logs = [], []
    start = time.time()
    for rank in range(2):
        env = subprocess_env(FXJAX_COORDINATOR=f"localhost:{port}", FXJAX_NUM_PROCESSES="2",
                             FXJAX_PROCESS_ID=str(rank), FXJAX_LOCAL_DEVICE_COUNT="4")
        log = open(out / f"log_{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), "multihost", str(checkpoint), str(out), "--meshes", *MESHES],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, TIMEOUT - (time.time() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:  # only the processes (and their groups) this fixture started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
    seconds = time.time() - start
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        tails = "\n".join(f"--- process {r} (exit {c}):\n" + (out / f"log_{r}.txt").read_text()[-3000:]
                          for r, c in enumerate(codes))
        pytest.fail(f"multi-process workers failed after {seconds:.0f}s:\n{tails}")
    infos = [json.loads((out / f"info_{r}.json").read_text()) for r in range(2)]
    return dict(out=out, infos=infos, seconds=seconds)


@pytest.fixture(scope="module")
def single_process_logits(checkpoint):
    import fxjax

    model = fxjax.from_pretrained(checkpoint, dtype="float32")
    data = worker.batch()
    return np.asarray(model(data["input_ids"], attention_mask=data["attention_mask"],
                            pixel_values=data["pixel_values"], image_grid_thw=data["image_grid_thw"]))


def test_two_processes_form_one_global_mesh(two_processes):
    for rank, info in enumerate(two_processes["infos"]):
        assert info["process_index"] == rank
        assert (info["process_count"], info["device_count"], info["local_device_count"]) == (2, 8, 4)
        assert info["config"]["num_processes"] == 2 and info["config"]["process_id"] == rank
        for key, mesh in info["meshes"].items():
            assert not mesh["logits_fully_addressable"], key  # the logits really span both processes
            assert mesh["local_devices"] == 4, key
            assert mesh["bad"] == [], (key, mesh["bad"][:5])
            assert mesh["split"] > 0, key
            # each process's devices hold a contiguous half of the batch shards (data major, then fsdp), and
            # the step batch assembled from each process's own rows equals the whole batch placed
            held = {"1,8,1": [[0, 1, 2, 3], [4, 5, 6, 7]], "2,2,2": [[0, 1], [2, 3]]}[key][rank]
            assert mesh["batch_shards_held"] == held, key
            assert mesh["local_part_equal"], key
        assert info["gathered"] == [[{"rank": 0, "call": c}, {"rank": 1, "call": c}] for c in range(3)]
        assert info["gathered_to_main"] == ([[{"rank": 0, "call": c}, {"rank": 1, "call": c}] for c in range(3)]
                                            if rank == 0 else [None] * 3)


@pytest.mark.parametrize("mesh", MESHES)
def test_multi_process_logits_equal_single_process(two_processes, single_process_logits, mesh):
    for rank in range(2):
        got = np.load(two_processes["out"] / f"logits_{mesh.replace(',', '')}_{rank}.npy")
        assert got.shape == single_process_logits.shape
        assert worker.rel(got, single_process_logits) <= TOL, (mesh, rank)


def test_fsdp_across_processes_halves_each_hosts_weights(two_processes, checkpoint):
    """(1, 8, 1): fsdp spans both processes, so each holds about half the base weights, not all, and reads
    about half of the checkpoint's bytes from disk (each host of a pod read every tensor whole before). The
    patch embedding is read whole by both: its kernel's rows are the Conv3d's flattened (C, T, P, P), no
    rectangle of the file (0.002% of a 7B; 28% of this tiny model)."""
    from fxjax.hf_checkpoint import iter_tensors, weight_files

    sizes = {name: t.nbytes for name, _, t in iter_tensors(weight_files(checkpoint))}
    total, conv = sum(sizes.values()), sizes["visual.patch_embed.proj.weight"]
    for info in two_processes["infos"]:
        local = info["meshes"]["1,8,1"]["local_base_bytes"]
        assert local < 0.6 * total, (local, total)
        read = info["meshes"]["1,8,1"]["checkpoint_read_bytes"] - conv
        assert 0.4 * (total - conv) < read < 0.6 * (total - conv), (read, total - conv)


def test_export_from_two_processes_is_bit_exact(two_processes, checkpoint):
    """Both processes join each tensor's gather; only process 0, which writes, converts (and merges) them."""
    converted = [info["export_tensors_converted"] for info in two_processes["infos"]]
    assert converted[0] > 0 and converted[1] == 0, converted
    export = two_processes["out"] / "export"
    assert worker._compare_checkpoints(checkpoint, export) == []
    assert (export / "config.json").exists() and (export / "model.safetensors.index.json").exists()


STOP_SCRIPT = """
import os, signal, sys
from fxjax import distributed
distributed.initialize()
import jax
from jax.experimental import multihost_utils
from fxjax.train.preemption import PreemptionSignals

def device_gather(*args, **kwargs):
    raise AssertionError("stop_requested used a device all-gather")

multihost_utils.process_allgather = device_gather
with PreemptionSignals() as signals:
    for step in range(1, 6):
        if step == 3 and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if signals.stop_requested():
            print(f"process {jax.process_index()}: stopped after step {step}", flush=True)
            sys.exit(0)
print(f"process {jax.process_index()}: ran to the end", flush=True)
"""


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """SIGTERM to process 1 during step 3: both processes see stop_requested after step 3 (so they save the
    same step and leave together), agreed host to host (no device all-gather: it would wait for the
    step just dispatched)."""
    env = subprocess_env()
    procs, logs = launch_two([], env, tmp_path / "stop", entry=("-c", STOP_SCRIPT))
    codes = wait_all(procs, logs, timeout=TIMEOUT)
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in text)
    for rank in range(2):
        assert f"process {rank}: stopped after step 3" in text[rank], text[rank][-2000:]


PER_RANK_CLI = """
import os, sys
rank = os.environ['FXJAX_PROCESS_ID']
if os.environ.get(f"FAULT_{rank}"):  # a fault armed in this process only (train/faults.py)
    os.environ["FXJAX_FAULT"] = os.environ[f"FAULT_{rank}"]
if os.environ.get(f"PROCESSES_{rank}"):  # this process told another process count
    os.environ["FXJAX_NUM_PROCESSES"] = os.environ[f"PROCESSES_{rank}"]
from fxjax.cli import main
if os.environ.get(f"FULL_DISK_{rank}"):  # this host's disk is full when the adapter is written
    import fxjax.peft_io
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    fxjax.peft_io.save_peft_adapter = full_disk
if os.environ.get(f"LATE_ERROR_{rank}"):  # this process fails after the run, when its peer has finished
    import fxjax.commands.report
    def late(*args, **kwargs):
        raise OSError(5, "Input/output error after the run")
    fxjax.commands.report.report_after_run = late
if os.environ.get(f"UNREADABLE_{rank}"):  # this host reads that step's checkpoint wrong (found after orbax's read)
    from fxjax.train.checkpointing import TrainCheckpointer
    restore, bad = TrainCheckpointer.restore, int(os.environ[f"UNREADABLE_{rank}"])
    def restore_here(self, template, step=None):
        restored = restore(self, template, step)
        if step == bad:
            raise OSError(5, f"Input/output error reading step {bad}")
        return restored
    TrainCheckpointer.restore = restore_here
args = sys.argv[1:]
extra = os.environ.get(f"EXTRA_{rank}")
sys.exit(main(args + (["--set", extra] if extra else [])))
"""


def _tiny_sft_run(tmp_path: Path, tokenizer_dir: Path, *, steps: int, checkpoint: dict) -> dict:
    """tmp_path/run.yaml: SFT of the tiny preset on train.jsonl (0.png, 1.png; 2.png and 3.png made too),
    batch 2, output in tmp_path/run; the config as a dict."""
    import yaml
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (56, 56), (40 * i, 90, 160)).save(tmp_path / f"{i}.png")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "label": "real"}) + "\n"
                                                  for i in range(2)))
    config = {"model": {"preset": "tiny"}, "train": {"output_dir": str(tmp_path / "run"), "steps": steps},
              "data": {"tokenizer": str(tokenizer_dir), "train_files": [str(tmp_path / "train.jsonl")],
                       "root": str(tmp_path), "batch_size": 2, "min_pixels": 3136, "max_pixels": 3136},
              "checkpoint": checkpoint}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return config


def test_an_error_on_one_process_stops_every_process_with_it_not_a_hang(tmp_path, tokenizer_dir):
    """One process's error (a start-up check that fails on one host, the run lock process 0 takes, different
    held-out records on two hosts) left the others waiting in a collective or in JAX's backend start-up for
    minutes, then every process died by SIGABRT (rc -6 after ~300 s) and only the failing one said why. Now
    every process exits with status 2 within seconds, and the others name the process that failed and its
    error."""
    from fxjax.train.run_lock import locked_run_dirs
    from fxjax.train_config import from_dict

    # (3 steps, as the tests below: one program for the module, compiled once into the suite's cache)
    config = _tiny_sft_run(tmp_path, tokenizer_dir, steps=3, checkpoint={"dir": str(tmp_path / "ckpt")})
    (tmp_path / "eval_b.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "label": "real"}) + "\n"
                                                   for i in (2, 3)))
    (tmp_path / "user_files").mkdir()
    (tmp_path / "user_files" / "notes.txt").write_text("mine")

    def run(tag: str, codes_wanted=(2, 2), **extra: str) -> list[str]:
        start = time.time()
        procs, logs = launch_two(["sft", "--config", str(tmp_path / "run.yaml")], subprocess_env(**extra),
                                 tmp_path / tag, entry=("-c", PER_RANK_CLI))
        try:  # (wait_all would kill the other process at the first one's exit: here both must exit by themselves)
            codes = [proc.wait(timeout=max(1.0, 150 - (time.time() - start))) for proc in procs]
        except subprocess.TimeoutExpired:
            codes = wait_all(procs, logs, timeout=0)
        text = [log.read_text() for log in logs]
        assert codes == list(codes_wanted) and time.time() - start < 120, (codes, "\n".join(t[-2500:] for t in text))
        return text

    # a start-up check that fails on process 1 only (its host sees a folder of the user's files)
    text = run("check", EXTRA_1=f"export.adapter_dir={tmp_path / 'user_files'}")
    assert "fxjax sft: error: export.adapter_dir: " in text[1] and "holds files that are not an fxjax export" in text[1]
    assert ("fxjax sft: error: process 1 of the run failed, so this process stopped too: export.adapter_dir: "
            in text[0]), text[0][-2500:]

    # a config that differs on one process (another --set): its devices trained their copies otherwise
    # (a learning rate: silently; a LoRA rank: an abort in gloo; a step count: a hang), none named
    text = run("config", EXTRA_1="optim.learning_rate=0.1")
    for rank in range(2):
        assert ("the processes of the run were given different configs (optim.learning_rate: 0.0001 on process 0, "
                "0.1 on process 1): start every process with the same --config and --set") in text[rank], text[rank][-2500:]

    # an input that is not there on one host: process 0 waited in the join for 300 s, then aborted naming nothing
    text = run("path", EXTRA_1=f"data.train_files=[{tmp_path / 'not-here.jsonl'}]")
    assert f"fxjax sft: error: data.train_files: {tmp_path / 'not-here.jsonl'} does not exist" in text[1]
    assert ("fxjax sft: error: process 1 of the run failed, so this process stopped too: data.train_files: "
            in text[0]), text[0][-2500:]

    # a process given another process count: it joined (the coordinator counts process 0's), said "process 1
    # of 3" and would wait in every exchange for a third process
    text = run("count", PROCESSES_1="3")
    assert ("fxjax sft: error: this process (process 1) was started as one of 3 processes and process 0 as one of 2"
            in text[1]) and "neither stopped nor finished" not in text[1], text[1][-2500:]
    assert "process 1 of the run failed, so this process stopped too: this process (process 1) was" in text[0]

    # the run lock, which process 0 takes, held by another run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, yaml\nfrom fxjax.train.run_lock import locked_run_dirs\n"
         "from fxjax.train_config import from_dict\n"
         "with locked_run_dirs(from_dict(yaml.safe_load(open(sys.argv[1]))), True, print):\n"
         "    print('holding', flush=True)\n    time.sleep(600)\n", str(tmp_path / "run.yaml")],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline() == "holding\n"
        text = run("lock")
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert "fxjax sft: error: train.output_dir: another fxjax run is training in" in text[0]
    assert ("fxjax sft: error: process 0 of the run failed, so this process stopped too: train.output_dir: another "
            "fxjax run is training in") in text[1], text[1][-2500:]
    with locked_run_dirs(from_dict(config), True, print):  # (released: the holder is gone)
        pass

    # held-out records that differ between the hosts (same count: the mix would have been logged silently)
    text = run("eval", EXTRA_0=f"data.eval_files=[{tmp_path / 'train.jsonl'}]",
               EXTRA_1=f"data.eval_files=[{tmp_path / 'eval_b.jsonl'}]")
    for rank in range(2):
        assert ("the processes loaded different records (process 0: 2 (" in text[rank] and ", process 1: 2 (" in
                text[rank]), text[rank][-2500:]

    # process 0 failing after the run, when process 1 has finished: process 1 is not waited for, nor killed
    # (not waited for: a wait for it would end after 60 s with "neither stopped nor finished"; no wall-clock
    # bound beyond run()'s, which a busy machine broke: 50.6 s for a bound of 50 with the CI run beside tests)
    text = run("late", codes_wanted=(2, 0), LATE_ERROR_0="1")
    assert "fxjax sft: error: [Errno 5] Input/output error after the run" in text[0]
    assert "neither stopped nor finished" not in text[0], text[0][-2500:]

    # the end-of-run export failing on process 0, which writes it (process 1 waited in a barrier)
    text = run("export", FULL_DISK_0="1", EXTRA_0=f"export.adapter_dir={tmp_path / 'adapter'}",
               EXTRA_1=f"export.adapter_dir={tmp_path / 'adapter'}")
    assert "fxjax sft: error: [Errno 28] No space left on device" in text[0], text[0][-2500:]
    assert ("fxjax sft: error: process 0 of the run failed, so this process stopped too: [Errno 28] No space left "
            "on device") in text[1], text[1][-2500:]


def test_a_stop_signal_while_a_run_loads_stops_it_after_its_first_step(tmp_path, tokenizer_dir):
    """Joining a multi-process run starts JAX's preemption service, whose SIGTERM handler dropped the signal:
    a preemption notice while the model loaded (minutes on a pod) was lost, and the run trained on. Now it is
    held for the loop: every process stops after the first step with its checkpoint, and says why."""
    _tiny_sft_run(tmp_path, tokenizer_dir, steps=3, checkpoint={"every": 100})
    procs, logs = launch_two(["sft", "--config", str(tmp_path / "run.yaml"), "--no-report"],
                             subprocess_env(FAULT_1="joined@0"),
                             tmp_path / "held", entry=("-c", PER_RANK_CLI))
    try:
        start = time.time()
        while "fxjax-fault: paused at joined@0" not in logs[1].read_text():
            assert time.time() - start < 120 and all(p.poll() is None for p in procs), logs[1].read_text()[-2000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=200) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = wait_all(procs, logs, timeout=0)
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-2500:] for t in text)
    assert committed_steps(tmp_path / "run" / "checkpoints") == [1]
    assert "sft: another process of the run received a stop signal; saved step 1 to" in text[0], text[0][-2500:]
    assert "preempted at step 1/3" in text[0], text[0][-2500:]


def test_the_processes_resume_from_one_checkpoint_they_all_restore(tmp_path, tokenizer_dir):
    """Each process chose its resume step alone: a host that could not read the newest checkpoint went on to an
    older one while the others resumed from the newest (then waited for it: hung), and hosts that saw different
    checkpoint folders started one fresh and one resumed (hung). Now a step counts only when every process
    restored it, and different folders are an error on every process (the start's shared-folder check). (A failure inside orbax's read on one
    host only still waits in orbax's own barrier; here the host's error comes after the read.)"""
    # (each process looks for process 0's file for 2 s, not the default 30, before calling the folder not shared)
    _tiny_sft_run(tmp_path, tokenizer_dir, steps=3, checkpoint={"every": 1, "shared_folder_wait": 2})

    def run(tag: str, **extra: str) -> tuple[list[int], list[str]]:
        # (the first run's 3 steps again: a resumed run retrains step 3, and the 3-step program, which the module's
        # other tests compile too, is read from the suite's compilation cache; another step count compiles another)
        procs, logs = launch_two(["sft", "--config", str(tmp_path / "run.yaml"), "--no-report"],
                                 subprocess_env(**extra), tmp_path / tag, entry=("-c", PER_RANK_CLI))
        try:
            codes = [proc.wait(timeout=200) for proc in procs]
        except subprocess.TimeoutExpired:
            codes = wait_all(procs, logs, timeout=0)
        return codes, [log.read_text() for log in logs]

    procs, logs = launch_two(["sft", "--config", str(tmp_path / "run.yaml"), "--no-report"], subprocess_env(),
                             tmp_path / "first")
    assert wait_all(procs, logs, timeout=200) == [0, 0], "\n".join(log.read_text()[-2500:] for log in logs)
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2", "3"]

    # each host its own checkpoint folder: refused on both at the start, before anything is restored (a
    # fresh start on disks of their own hung at the first checkpoint for orbax's 10 minutes, then failed;
    # restore_latest's own check of the steps each process sees stays behind it)
    codes, text = run("apart", EXTRA_1=f"checkpoint.dir={tmp_path / 'elsewhere'}")
    assert codes == [2, 2], (codes, "\n".join(t[-2500:] for t in text))
    for rank, folder in ((0, ckpt), (1, tmp_path / "elsewhere")):
        assert (f"fxjax sft: error: checkpoint.dir: process(es) 1 of 2 do not see the file process 0 wrote in "
                f"{folder}: ") in text[rank], text[rank][-2500:]
        assert "(they waited 2 s for it: checkpoint.shared_folder_wait)" in text[rank], text[rank][-2500:]
    assert not list(ckpt.glob(".fxjax-shared-check-*"))  # process 0 removed its file

    # process 1 cannot read step 3: both resume from step 2 (step 3 set aside) and train step 3 again
    codes, text = run("unreadable", UNREADABLE_1="3")
    assert codes == [0, 0], (codes, "\n".join(t[-2500:] for t in text))
    assert (f"warning: the checkpoint of step 3 in {ckpt} cannot be restored (process 1 could not restore it: "
            "OSError: [Errno 5] Input/output error reading step 3); trying step 2") in text[0], text[0][-2500:]
    assert "resumed from step 2" in text[0] and "step 3/3" in text[0] and (ckpt / "3.unreadable-0").is_dir()
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["1", "2", "3"]
