"""`fxjax export`: checkpoints written by a two-process job, exported from one process, load in transformers
(merged) and in peft (adapter on the base) with fxjax's logits at that step (fp32 rel err <= 1e-5); missing and
corrupted steps are errors that name the step and list the steps that exist.

The checkpoints: 2 processes (gloo on localhost, one CPU device each) write steps 2 and 3 of an SFT run of the
tiny real-vocabulary model with LoRA on every linear layer (vision, merger, decoder) exactly as `fxjax sft`
saves them (tests/checkpoint_worker.py: same model, state, checkpointer and config), with random LoRA
parameters instead of trained ones: compiling the training step would cost a minute (test_sft.py covers it).
`fxjax export --run` of the checkpoint a real two-process `fxjax sft` run wrote (its adapter and its merge):
tests/test_sft.py::test_two_processes_killed_and_resumed_equal_one_process."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import QWEN_TOKENS, free_port, hf_logits, load_hf_model, rel_err
from launch import subprocess_env

from fxjax.cli import main

TIMEOUT = 300
WORKER = Path(__file__).with_name("checkpoint_worker.py")


@pytest.fixture(scope="module")
def two_process_run(tiny_vl_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_run")
    (root / "train.jsonl").write_text('{"image": "a.png", "label": "real"}\n')  # never read: no training
    config = {
        "model": {"path": str(tiny_vl_dir), "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train_files": [str(root / "train.jsonl")], "min_pixels": 3136, "max_pixels": 3136},
        "train": {"steps": 3, "output_dir": str(root / "run")},
    }
    (root / "sft.yaml").write_text(yaml.safe_dump(config))
    env = subprocess_env(PYTHONUNBUFFERED="1", FXJAX_NUM_PROCESSES="2", FXJAX_COORDINATOR=f"localhost:{free_port()}",
                         FXJAX_LOCAL_DEVICE_COUNT="1")
    procs, logs = [], []
    for rank in range(2):
        logs.append(root / f"worker-{rank}.log")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root / "sft.yaml")],
                                      env=dict(env, FXJAX_PROCESS_ID=str(rank)), stdout=open(logs[-1], "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd=root))
    deadline = time.time() + TIMEOUT
    try:
        # A process that fails leaves its peer blocked in a collective: stop at the first failure.
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    text = "\n".join(log.read_text()[-3000:] for log in logs)
    assert [p.returncode for p in procs] == [0, 0], text
    assert "2 process(es), 2 device(s)" in logs[0].read_text()
    return root / "run"


def prompt(n_image_tokens=4, grid=(1, 4, 4)):
    rng = np.random.default_rng(1)
    ids = [151644, 872, 198, QWEN_TOKENS["vision_start_token_id"]] + [QWEN_TOKENS["image_token_id"]] * n_image_tokens
    ids += [QWEN_TOKENS["vision_end_token_id"], 3838, 374, 419, 30, 151645, 198, 151644, 77091, 198]
    pixel_values = rng.standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)
    return np.array([ids]), np.ones((1, len(ids)), np.int64), pixel_values, np.array([grid])


def test_export_of_a_two_process_checkpoint_matches_fxjax_in_transformers_and_peft(two_process_run, tiny_vl_dir,
                                                                                    tmp_path, capsys):
    import torch
    from peft import PeftModel

    from fxjax.commands.export import export_loaded
    from fxjax.config_mapping import ConfigError
    from fxjax.train.run_loading import RunLoadError, load_run

    input_ids, mask, pixel_values, grid = prompt()
    base_logits = hf_logits(load_hf_model(tiny_vl_dir), input_ids, mask, pixel_values, grid)

    def fxjax_logits(run):
        return np.asarray(run.model(input_ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid))

    # the newest step (3) through the command; fxjax's logits from the run loaded on its own
    out = tmp_path / "export-3"
    assert main(["export", "--run", str(two_process_run), "--out", str(out), "--base-name", "Qwen/Qwen2.5-VL-3B"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["step"] == 3  # (a number, as in fxjax_export.json; it was the string "3")
    # `fxjax info OUT` (the export folder itself, as --help says it takes: it read "holds no checkpoints")
    assert main(["info", str(out)]) == 0
    described = capsys.readouterr().out.splitlines()
    assert described[0] == f"fxjax export folder {out}: merged/ and adapter/" and described[1] == "merged/:"
    assert "adapter/:" in described and sum("export of step 3 of the sft run" in line for line in described) == 2
    # what serving needs is said at the end: the folders, the prompts, the decoding that keeps the answer's
    # markers, and that vLLM would drop this adapter's vision part (all-linear: the encoder's layers too)
    for words in ("fxjax export: step 3 written; each folder's fxjax_export.json says which run and step",
                  f"fxjax export: {out.absolute() / 'merged'}: transformers' Qwen2_5_VLForConditionalGeneration",
                  "would drop this adapter's vision-encoder and merger parts: serve merged/ there",
                  "decode with skip_special_tokens=False (vLLM: SamplingParams(skip_special_tokens=False))",
                  "(the chat template's default system prompt is training's)"):
        assert words in said.err, said.err
    # each folder says what it is an export of; the merged one decodes as long as the run evaluated
    for part in ("merged", "adapter"):
        record = json.loads((out / part / "fxjax_export.json").read_text())
        assert {k: record[k] for k in ("checkpoints", "kind", "step", "stage", "max_new_tokens")} == {
            "checkpoints": str(two_process_run / "checkpoints"), "kind": "sft", "step": 3, "stage": None,
            "max_new_tokens": 512}
    assert json.loads((out / "merged" / "generation_config.json").read_text())["max_new_tokens"] == 512
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "Qwen/Qwen2.5-VL-3B"
    # the chat template's default system prompt is training's: a client that sends the image and the user
    # prompt alone (an OpenAI-style request) gets the prompt the model trained with, in the tokenizer's
    # template and the processor's (chat_template.jinja)
    from transformers import AutoTokenizer

    serve = json.loads((out / "merged" / "fxjax_prompt_settings.json").read_text())["serve"]
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": serve["user"]}]}
    for part in ("merged", "adapter"):
        tokenizer = AutoTokenizer.from_pretrained(str(out / part))
        trained = tokenizer.apply_chat_template([{"role": "system", "content": serve["system"]}, user],
                                                add_generation_prompt=True, tokenize=False)
        assert serve["system"] in trained and "helpful assistant" not in trained
        for template in (None, (out / part / "chat_template.jinja").read_text()):
            assert tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False,
                                                 chat_template=template) == trained
    with pytest.raises(ConfigError, match=r"^model\.dtype: unknown dtype 'bf16'; use one of"):  # (it read
        load_run(two_process_run, dtype="bf16")                                                # "model.unknown")
    run = load_run(two_process_run, dtype="float32")
    assert run.step == 3 and run.kind == "sft"
    ours = fxjax_logits(run)
    assert rel_err(base_logits, ours) > 1e-3  # the step's LoRA really changes the model
    merged = hf_logits(load_hf_model(out / "merged"), input_ids, mask, pixel_values, grid)
    assert rel_err(merged, ours) <= 1e-5
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_hf_model(tiny_vl_dir), str(out / "adapter")).eval()
    adapted = hf_logits(peft_model.base_model.model, input_ids, mask, pixel_values, grid)
    assert rel_err(adapted, ours) <= 1e-5
    # the merged export given as the run's base (--run RUN --model MERGED) would add the step's LoRA twice
    with pytest.raises(RunLoadError, match="the LoRA of step 3 .* already merged"):
        load_run(two_process_run, model_path=str(out / "merged"), dtype="float32")

    # an older step (2), merged only, exported from the model whose logits are compared
    run2 = load_run(two_process_run, 2, dtype="float32", param_dtype="float32")
    ours2 = fxjax_logits(run2)
    assert rel_err(ours2, ours) > 1e-3
    written = export_loaded(run2, tmp_path / "export-2", adapter=False)
    assert written["step"] == 2 and not (tmp_path / "export-2" / "adapter").exists()
    merged2 = hf_logits(load_hf_model(written["merged"]), input_ids, mask, pixel_values, grid)
    assert rel_err(merged2, ours2) <= 1e-5

    # the merged directory serves on its own: tokenizer and the run's pixel limits
    assert (out / "merged" / "tokenizer.json").is_file()
    assert json.loads((out / "merged" / "preprocessor_config.json").read_text())["max_pixels"] == 3136
    # ... and so does the adapter's image processor (a PEFT user read the base's, Qwen's limits or none)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(out / "adapter"), backend="pil")
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 3136)  # (transformers 5's names)
    # and both exports carry how the run built its prompts: eval / detect with --model [--adapter] use them as
    # with --run (the base model alone has the pipeline's defaults); a flag still wins
    from fxjax.cli import build_parser
    from fxjax.commands.model_args import resolve_detector

    def prompting(*flags):
        data = resolve_detector(build_parser().parse_args(["detect", "x.png", *flags])).data
        return {k: data[k] for k in ("min_pixels", "max_pixels", "prompts", "system_prompt", "user_prompt",
                                     "max_length")}

    trained = {k: getattr(run.config.data, k) for k in ("min_pixels", "max_pixels", "prompts", "system_prompt",
                                                         "user_prompt", "max_length")}
    assert trained["max_pixels"] == 3136  # not the default: without the file the test fails
    assert prompting("--model", str(tiny_vl_dir), "--adapter", str(out / "adapter")) == trained
    assert prompting("--model", str(out / "merged")) == trained
    assert prompting("--model", str(tiny_vl_dir))["max_pixels"] == 12845056
    assert prompting("--model", str(out / "merged"), "--max-pixels", "6272")["max_pixels"] == 6272
    # and the answer length the run evaluated with (512, its export's record), not detect's 1024 of a bare model
    lengths = {flags: resolve_detector(build_parser().parse_args(["detect", "x.png", *flags])).max_new_tokens
               for flags in (("--model", str(out / "merged")), ("--model", str(tiny_vl_dir), "--adapter",
                                                                  str(out / "adapter")), ("--model", str(tiny_vl_dir)))}
    assert list(lengths.values()) == [512, 512, 1024]
    # an adapter without the settings (fxjax.save_peft_adapter's, or peft's own): the defaults, said
    bare = tmp_path / "bare-adapter"
    shutil.copytree(out / "adapter", bare, ignore=shutil.ignore_patterns("fxjax_prompt_settings.json"))
    capsys.readouterr()
    assert prompting("--model", str(tiny_vl_dir), "--adapter", str(bare))["max_pixels"] == 12845056
    assert (f"note: {bare} has no fxjax_prompt_settings.json (`fxjax export` and fxjax.train.export.save_adapter write "
            "it): the prompts are built with fxjax's defaults (pixels 3136-12845056, max length 8192") in capsys.readouterr().err
    prompting("--model", str(tiny_vl_dir), "--adapter", str(out / "adapter"))  # (with them: no note)
    assert "note:" not in capsys.readouterr().err


def test_export_of_a_bfloat16_base_loads_it_in_bfloat16_and_writes_what_float32_would(two_process_run, tiny_vl_dir,
                                                                                       tmp_path, capsys):
    """The base weights load as stored (half float32's memory for a bfloat16 checkpoint, as Qwen2.5-VL's
    are); the merge upcasts each tensor, so the export is bit for bit the one from a float32 load."""
    from safetensors.numpy import load_file

    from fxjax.commands.export import export_loaded
    from fxjax.hf_checkpoint import exact_param_dtype
    from fxjax.train.run_loading import load_run

    base = tmp_path / "base-bf16"
    load_hf_model(tiny_vl_dir, "bfloat16").save_pretrained(str(base))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_vl_dir / name, base / name)
    reference = load_run(two_process_run, model_path=str(base), dtype="float32", param_dtype="float32")
    for dtype, flags in (("bfloat16", []), ("float32", ["--dtype", "float32"])):  # the base's own; exact floats
        out = tmp_path / dtype
        assert main(["export", "--run", str(two_process_run), "--model", str(base), "--out", str(out / "a"),
                     *flags]) == 0
        assert "(float32, weights stored in bfloat16)" in capsys.readouterr().err
        export_loaded(reference, out / "b", dtype=flags[-1] if flags else None)
        for part in ("merged/model-00001-of-00001.safetensors", "adapter/adapter_model.safetensors"):
            got, want = (load_file(str(out / d / part)) for d in "ab")
            assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want), part
        assert {str(x.dtype) for x in got.values()} == {"float32"}  # the adapter
        merged = load_file(str(out / "a" / "merged/model-00001-of-00001.safetensors"))
        assert {str(x.dtype) for x in merged.values()} == {dtype}
    # a run started from another run (model.from_run, no model.path): that run's base decides
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.run_loading import _exact_param_dtype

    on_bf16 = tmp_path / "sft-on-bf16" / "checkpoints"
    shutil.copytree(two_process_run / "checkpoints" / "3", on_bf16 / "3")
    record = on_bf16 / "3" / "config" / "config.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "model": {
        **json.loads(record.read_text())["model"], "path": str(base)}}))
    for run, expected in ((on_bf16.parent, "bfloat16"), (two_process_run, "float32")):
        cfg = grpo_from_dict({"model": {"from_run": str(run), "dtype": "float32"},
                              "data": {"train_files": [str(tmp_path / "train.jsonl")]}})
        assert _exact_param_dtype(cfg) == expected, run
    # float32 (the run's own base) and any tensor not in bfloat16 keep float32: nothing is rounded
    import ml_dtypes
    from safetensors.numpy import save_file

    assert exact_param_dtype(tiny_vl_dir) == "float32" and exact_param_dtype(base) == "bfloat16"
    for dtypes, expected in (((ml_dtypes.bfloat16, np.float32), "float32"), ((np.float16,), "float32"),
                             ((ml_dtypes.bfloat16, ml_dtypes.bfloat16), "bfloat16")):
        folder = tmp_path / f"mixed-{len(dtypes)}-{expected}-{np.dtype(dtypes[0]).name}"
        folder.mkdir()
        shutil.copy(tiny_vl_dir / "config.json", folder / "config.json")
        save_file({f"w{i}": np.zeros(2, d) for i, d in enumerate(dtypes)}, str(folder / "model.safetensors"))
        assert exact_param_dtype(folder) == expected, dtypes


def test_export_on_a_multi_device_host_places_the_run_on_every_device(two_process_run, tmp_path, capsys):
    """Without --mesh a run loads onto every device on the data axis (it used to ask for a 1-device mesh
    and stop on any host with more than one device), with --mesh fsdp=2 split over both, and a run that
    trained with mesh.fsdp=2 split so without --mesh (it loaded whole on every device: a model that needed
    fsdp to fit did not); where its split does not fit the devices, on the data axis, said. `fxjax export`
    with 2 devices writes the adapter and merged weights the 1-device export writes, every way."""
    from safetensors.numpy import load_file

    split_run = tmp_path / "split_run"  # the same checkpoints, recorded as trained on mesh data=1 x fsdp=2
    shutil.copytree(two_process_run / "checkpoints", split_run / "checkpoints")
    for config in (split_run / "checkpoints").glob("*/config/config.json"):
        saved = json.loads(config.read_text())
        config.write_text(json.dumps({**saved, "mesh": {**saved["mesh"], "data": 1, "fsdp": 2}}))
    assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "one")]) == 0
    assert main(["export", "--run", str(split_run), "--out", str(tmp_path / "fallback"), "--adapter-only"]) == 0
    err = capsys.readouterr().err
    assert ("note: the run split the model over mesh fsdp=2 x tensor=1, which 1 device(s) here cannot hold: every "
            "device on the data axis, the model whole on each (--mesh to choose)") in err
    assert "on mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in err
    env = subprocess_env("--xla_force_host_platform_device_count=2")
    script = ("import sys; from fxjax.cli import main; run, split_run, out = sys.argv[1:]; "
              "sys.exit(main(['export', '--run', run, '--out', out + '/two', '--adapter-only']) or "
              "main(['export', '--run', run, '--out', out + '/split', '--mesh', 'fsdp=2']) or "
              "main(['export', '--run', split_run, '--out', out + '/as_trained']) or "
              "main(['export', '--run', run, '--out', out + '/first_device', '--adapter-only', '--mesh', 'data=1']))")
    proc = subprocess.run([sys.executable, "-c", script, str(two_process_run), str(split_run), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loads = [line for line in proc.stderr.splitlines() if "loading the sft run" in line]
    assert [line.rpartition(", on mesh ")[2] for line in loads] == [
        "{'data': 2, 'fsdp': 1, 'tensor': 1}", "{'data': 1, 'fsdp': 2, 'tensor': 1}",
        "{'data': 1, 'fsdp': 2, 'tensor': 1}", "{'data': 1, 'fsdp': 1, 'tensor': 1}"], loads  # (data=1: one device of 2)
    weights = {"adapter": "adapter/adapter_model.safetensors", "merged": "merged/model-00001-of-00001.safetensors"}
    for other, parts in (("two", ["adapter"]), ("split", ["adapter", "merged"]), ("as_trained", ["adapter", "merged"]),
                         ("fallback", ["adapter"]), ("first_device", ["adapter"])):
        for part in parts:
            one, two = (load_file(str(tmp_path / d / weights[part])) for d in ("one", other))
            assert one.keys() == two.keys() and len(one) > 0
            for name in one:
                np.testing.assert_array_equal(two[name], one[name], err_msg=f"{other} {part} {name}")


def test_missing_and_corrupted_steps_are_named_with_the_steps_that_exist(two_process_run, tmp_path, capsys,
                                                                         monkeypatch):
    assert main(["export", "--run", str(two_process_run), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "step 7 has no checkpoint in" in err and "steps that exist: 2, 3" in err and "older" not in err
    # a step older than the newest: pruned, perhaps by the run still training there since eval chose it (said
    # as "no checkpoint" and nothing more)
    assert main(["export", "--run", str(two_process_run), "--step", "1", "--out", str(tmp_path / "x")]) == 2
    assert ("steps that exist: 2, 3 (older than the newest: a run keeps only its newest checkpoints, "
            "checkpoint.keep, and one still training there may have removed it") in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(two_process_run / "checkpoints", broken / "checkpoints")
    state = broken / "checkpoints" / "3" / "state"
    for f in state.rglob("*"):  # every data file of the saved arrays cut to half its length
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["export", "--run", str(broken), "--out", str(tmp_path / "y"), "--adapter-only"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint of step 3 in" in err and "cannot be restored" in err and "steps that exist: 2, 3" in err
    # the command as a user runs it: the reads orbax abandoned at the first bad array each printed a
    # traceback after the error ("Event loop is closed", or TensorStore's whole spec); pytest's own hook
    # catches them in this process
    cut = tmp_path / "cut"  # every array data file cut to 10 bytes (a copy interrupted early)
    shutil.copytree(two_process_run / "checkpoints", cut / "checkpoints")
    for f in (cut / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    proc = subprocess.run([sys.executable, "-m", "fxjax.cli", "export", "--run", str(cut), "--out",
                           str(tmp_path / "y"), "--adapter-only"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "cannot be restored" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    gone = tmp_path / "gone"  # the array data files deleted: TensorStore's error carries its whole spec
    shutil.copytree(two_process_run / "checkpoints", gone / "checkpoints")
    for f in (gone / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    assert main(["export", "--run", str(gone), "--out", str(tmp_path / "u"), "--adapter-only"]) == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if "cannot be restored" in x)
    assert line.endswith("steps that exist: 2, 3") and "TensorStore" not in line  # the error's first line only

    (broken / "checkpoints" / "2" / "config" / "config.json").unlink()
    assert main(["export", "--run", str(broken), "--step", "2", "--out", str(tmp_path / "z")]) == 2
    assert "step 2 in" in (err := capsys.readouterr().err) and "is incomplete or corrupted" in err

    # a step pruned while it is read (a run still training there, checkpoint.keep): not called corrupted
    import orbax.checkpoint as ocp

    live = tmp_path / "live"
    shutil.copytree(two_process_run / "checkpoints", live / "checkpoints")
    restore = ocp.Checkpointer.restore

    def pruned_meanwhile(self, *args, **kwargs):
        shutil.rmtree(live / "checkpoints" / "2")
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "restore", pruned_meanwhile)
    assert main(["export", "--run", str(live), "--step", "2", "--out", str(tmp_path / "t"), "--adapter-only"]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint of step 2 in {live / 'checkpoints'} was removed while it was read: a run still training " \
           "there keeps only its newest checkpoints (checkpoint.keep); give a step it keeps (steps now: 3)" in err

    assert main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
    step_dir = two_process_run / "checkpoints" / "2"
    assert main(["export", "--run", str(step_dir), "--out", str(tmp_path / "v")]) == 2
    assert f"is the checkpoint of step 2, not a run: name the run's folder and the step apart (eval, detect, " \
           f"export: --run {step_dir.parent} --step 2;" in capsys.readouterr().err


def test_export_refuses_a_users_folder_a_file_or_an_adapter_as_model_before_loading(two_process_run, tmp_path,
                                                                                     capsys):
    """--overwrite deleted a folder of the user's own files (OUT/adapter holding NOTES.md: gone, exit 0); a
    file at OUT/merged was a raw 'Not a directory'; an adapter or a data folder as --model asked for a
    tokenizer. Each is refused naming what is there, before anything loads."""
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "NOTES.md").write_text("important")
    assert main(["export", "--run", str(two_process_run), "--out", str(out), "--adapter-only", "--overwrite"]) == 2
    assert (f"--out: {out / 'adapter'} holds files that are not an fxjax export (NOTES.md); --overwrite replaces "
            f"only a former export: move them or give another --out") in capsys.readouterr().err
    assert (out / "adapter" / "NOTES.md").read_text() == "important"
    (out / "merged").write_text("a file")
    assert main(["export", "--run", str(two_process_run), "--out", str(out), "--merged-only", "--overwrite"]) == 2
    assert f"--out: {out / 'merged'} is a file; the export writes a folder there" in capsys.readouterr().err
    adapter = tmp_path / "an_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "x"), "--model", str(adapter)]) == 2
    assert f"--model: {adapter} is a PEFT adapter, not a model" in capsys.readouterr().err
    assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "x"), "--model", str(tmp_path)]) == 2
    assert f"--model: {tmp_path} holds no config.json; give the run's base model" in capsys.readouterr().err
    for model, said in ((tmp_path / "none", "does not exist"), (adapter / "adapter_config.json",
                                                               "is a file; give an HF model directory")):
        assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "x"), "--model", str(model)]) == 2
        assert f"--model: {model} {said}" in capsys.readouterr().err  # (as eval and detect word it)
    # an empty --out wrote merged/ and adapter/ into the working folder; a folder nothing can be created in
    # (root passes os.access there) failed only after the weights loaded
    assert main(["export", "--run", str(two_process_run), "--out", ""]) == 2
    assert "--out: give a folder (an empty text names none)" in capsys.readouterr().err
    assert main(["export", "--run", str(two_process_run), "--out", "/proc/fxjax-export"]) == 2
    assert "--out: /proc/fxjax-export/merged cannot be written" in capsys.readouterr().err
    assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "y"), "--merged-only",
                 "--base-name", "Qwen/Qwen2.5-VL-3B"]) == 2
    assert "--base-name: it names the adapter's base, and --merged-only writes no adapter" in capsys.readouterr().err


def test_an_export_that_fails_between_its_two_folders_says_they_now_hold_different_steps(two_process_run, tmp_path,
                                                                                        capsys, monkeypatch):
    """OUT/merged written for step 3, then OUT/adapter failing (a full disk) left it holding step 2's adapter,
    and nothing said the two folders no longer match."""
    import fxjax.peft_io

    out = tmp_path / "out"
    assert main(["export", "--run", str(two_process_run), "--step", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    step_2 = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fxjax.peft_io, "save_peft_adapter", full_disk)
    assert main(["export", "--run", str(two_process_run), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert (f"fxjax export: wrote the merged ({out / 'merged'}) of step 3, but writing the adapter failed (below): "
            f"{out / 'adapter'} still holds an earlier export, not step 3, so the folders no longer match") in err, err
    assert "fxjax export: error: [Errno 28] No space left on device" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == step_2  # (replaced whole or not at all)
    assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "fresh"), "--merged-only"]) == 0
    assert "no longer match" not in capsys.readouterr().err  # (one folder: nothing to match)


def test_a_run_trained_with_a_gpu_or_tpu_kernel_exports_and_detects_here(two_process_run, tmp_path, capsys):
    """A run trained with model.attention cudnn (or splash) names a kernel this CPU cannot run (nor float32,
    export's dtype): export and detect --run load it with the kernel that runs here, and export writes what
    it writes for the run as trained with auto."""
    from PIL import Image
    from safetensors.numpy import load_file

    assert main(["export", "--run", str(two_process_run), "--out", str(tmp_path / "auto"), "--adapter-only"]) == 0
    Image.new("RGB", (56, 56), (90, 120, 150)).save(tmp_path / "x.png")
    for kernel in ("cudnn", "splash"):
        run = tmp_path / kernel
        shutil.copytree(two_process_run / "checkpoints", run / "checkpoints")
        for config in (run / "checkpoints").glob("*/config/config.json"):
            saved = json.loads(config.read_text())
            saved["model"]["attention"] = kernel
            config.write_text(json.dumps(saved))
        assert main(["export", "--run", str(run), "--out", str(tmp_path / f"out-{kernel}"), "--adapter-only"]) == 0
        one, two = (load_file(str(tmp_path / d / "adapter/adapter_model.safetensors")) for d in ("auto", f"out-{kernel}"))
        assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    capsys.readouterr()  # detect loads through the same load_run call as eval (one kernel: it costs a compile)
    assert main(["detect", str(tmp_path / "x.png"), "--run", str(tmp_path / "cudnn"), "--no-overlay",
                 "--max-new-tokens", "2"]) == 0
    assert "x.png (56x56): NO VERDICT" in capsys.readouterr().out  # the untrained tiny model answered


def test_a_moved_tokenizer_follows_model_or_is_named_before_the_weights_load(two_process_run, tiny_vl_dir, tmp_path,
                                                                            capsys):
    """data.tokenizer given as the base model's folder follows --model when the base moved; a tokenizer of
    its own that moved is named before any weight loads, and --tokenizer points at it."""
    def moved_run(name, tokenizer):
        run = tmp_path / name
        shutil.copytree(two_process_run / "checkpoints" / "3", run / "checkpoints" / "3")
        record = run / "checkpoints" / "3" / "config" / "config.json"
        saved = json.loads(record.read_text())
        saved["model"]["path"], saved["data"]["tokenizer"] = str(tmp_path / "old-base"), str(tokenizer)
        record.write_text(json.dumps(saved))
        return run

    same = moved_run("same", tmp_path / "old-base")
    assert main(["export", "--run", str(same), "--model", str(tiny_vl_dir), "--out", str(tmp_path / "a"),
                 "--merged-only"]) == 0
    assert (tmp_path / "a" / "merged" / "tokenizer.json").is_file()
    from fxjax.cli import build_parser
    from fxjax.commands.model_args import resolve_detector

    for command in (["detect", "x.png"], ["eval", "--data", "d.jsonl"]):  # eval and detect follow it as export does
        args = build_parser().parse_args(command + ["--run", str(same), "--model", str(tiny_vl_dir)])
        assert resolve_detector(args).tokenizer == str(tiny_vl_dir), command
    own = moved_run("own", tmp_path / "gone-tokenizer")
    capsys.readouterr()
    assert main(["export", "--run", str(own), "--model", str(tiny_vl_dir), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"no tokenizer.json in {tmp_path / 'gone-tokenizer'}; the run's tokenizer" in err and "--tokenizer DIR" in err
    assert "loading" not in err and not (tmp_path / "b").exists()
    # (its tokenizer.json, as eval and detect take it, was refused: "no tokenizer.json in .../tokenizer.json")
    assert main(["export", "--run", str(own), "--model", str(tiny_vl_dir), "--tokenizer",
                 str(tiny_vl_dir / "tokenizer.json"), "--out", str(tmp_path / "b"), "--merged-only"]) == 0
    assert (tmp_path / "b" / "merged" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["export", "--run", str(own), "--model", str(tiny_vl_dir), "--tokenizer",
                 str(tiny_vl_dir / "config.json"), "--out", str(tmp_path / "c"), "--merged-only"]) == 2
    assert (f"--tokenizer: {tiny_vl_dir / 'config.json'} is a file; the export copies the tokenizer's folder (its "
            f"tokenizer.json and configs): give that folder") in capsys.readouterr().err


def test_eval_and_detect_read_a_runs_settings_without_loading_it(two_process_run, tiny_vl_dir, tmp_path):
    from fxjax.cli import build_parser
    from fxjax.commands.model_args import resolve_detector

    args = build_parser().parse_args(["detect", "x.png", "--run", str(two_process_run)])
    detector = resolve_detector(args)
    assert detector.model is None  # nothing loaded yet
    assert detector.source == {"run": str((two_process_run / "checkpoints").absolute()), "step": 3, "kind": "sft",
                               "base": str(tiny_vl_dir), "dtype": "float32"}
    assert detector.tokenizer == str(tiny_vl_dir)  # data.tokenizer null: the base model's
    assert (detector.data["min_pixels"], detector.data["max_pixels"]) == (3136, 3136)  # the run's, not the defaults
    assert detector.max_new_tokens == 512  # --max-new-tokens left out: the run's eval.max_new_tokens, not 1024
    args = build_parser().parse_args(["detect", "x.png", "--run", str(two_process_run), "--step", "2",
                                      "--max-pixels", "6272", "--dtype", "bfloat16"])
    detector = resolve_detector(args)
    assert detector.source["step"] == 2 and detector.source["dtype"] == "bfloat16"
    assert detector.data["max_pixels"] == 6272
    assert detector.data["user_prompt"] is None  # the run trained on the templates
    assert detector.data["train_files"] == (str(two_process_run.parent / "train.jsonl"),)
    args = build_parser().parse_args(["eval", "--data", "d.jsonl", "--run", str(two_process_run),
                                      "--user-prompt", "Box it."])
    assert resolve_detector(args).data["user_prompt"] == "Box it."
    args = build_parser().parse_args(["eval", "--data", "d.jsonl", "--run", str(two_process_run), "--max-new-tokens", "7"])
    assert resolve_detector(args).max_new_tokens == 7
    assert resolve_detector(build_parser().parse_args(["detect", "x.png", "--model", str(tiny_vl_dir)])).max_new_tokens \
        == 1024  # an HF folder records no evaluation length
    adapter = tmp_path / "adapter"  # an adapter directory given as --model is named as one
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"--model: {adapter} is a PEFT adapter, not a model: pass --model "
                                         f"BASE_MODEL_DIR --adapter {adapter}"):
        resolve_detector(build_parser().parse_args(["detect", "x.png", "--model", str(adapter)]))


def test_a_grpo_checkpoints_config_is_read_as_grpo(tiny_vl_dir, tmp_path):
    from fxjax.grpo_config import load_grpo_config
    from fxjax.train.run_loading import resolve_step

    cfg = load_grpo_config(None, overrides=[f"model.path={tiny_vl_dir}", f"data.train_files=[{tmp_path / 'a.jsonl'}]",
                                            "data.max_pixels=6272"])
    (tmp_path / "ckpt" / "5" / "config").mkdir(parents=True)
    (tmp_path / "ckpt" / "5" / "config" / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save in progress is not a step
    step, loaded, kind = resolve_step(tmp_path / "ckpt", None)
    assert (step, kind) == (5, "grpo") and loaded == cfg and [s.name for s in loaded.stages] == ["alpha", "beta", "gamma"]


def test_a_run_can_start_from_another_runs_checkpoint(two_process_run, tiny_vl_dir, tmp_path):
    """model.from_run (GRPO after SFT without exporting an adapter): the base model and the LoRA parameters
    of that run's step, the tokenizer of its base; conflicting keys are errors naming them."""
    import jax

    from fxjax.grpo_config import grpo_from_dict
    from fxjax.model.lora import LORA_PARAMS
    from flax import nnx
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.train.run_loading import load_run
    from fxjax.train.run_setup import build_model, keep_start_lora
    from fxjax.config_mapping import ConfigError

    data = {"train_files": [str(tmp_path / "train.jsonl")]}
    cfg = grpo_from_dict({"model": {"from_run": str(two_process_run), "from_run_step": 2, "dtype": "float32"},
                          "data": data})
    assert cfg.tokenizer == str(tiny_vl_dir)
    started = build_model(cfg, make_mesh(MeshConfig()))
    lora = lambda m: jax.tree.leaves(nnx.state(m, LORA_PARAMS))  # noqa: E731
    for step, same in ((2, True), (3, False)):
        ref = load_run(two_process_run, step).model
        equal = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lora(started), lora(ref))]
        assert len(equal) > 10 and (all(equal) if same else not any(equal)), step
    # The run keeps that LoRA's shape (run_setup.keep_start_lora, as fxjax grpo does at its start): with the SFT
    # run moved away, a step of the GRPO run (here step 3 of the SFT run's values under the GRPO run's config)
    # loads with the right base, tokenizer and LoRA.
    grpo_run = tmp_path / "grpo" / "checkpoints"
    cfg_here = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(grpo_run)))
    assert keep_start_lora(started, cfg_here) == grpo_run / "start_lora"
    shutil.copytree(two_process_run / "checkpoints" / "3", grpo_run / "3")
    saved = cfg_here.to_dict()
    saved["model"]["from_run"] = str(tmp_path / "gone")
    (grpo_run / "3" / "config" / "config.json").write_text(json.dumps(saved))
    messages = []
    moved = load_run(grpo_run.parent, log=messages.append)
    assert moved.kind == "grpo" and moved.config.model.path == str(tiny_vl_dir.resolve())
    assert moved.config.tokenizer == str(tiny_vl_dir.resolve()) and "gone is not here" in messages[0]
    equal = [np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(lora(moved.model), lora(load_run(two_process_run, 3).model))]
    assert len(equal) > 10 and all(equal)
    # export checks the tokenizer before loading: the run's own record of it too
    assert main(["export", "--run", str(grpo_run.parent), "--out", str(tmp_path / "export"), "--merged-only"]) == 0
    assert (tmp_path / "export" / "merged" / "tokenizer.json").is_file()
    # eval / detect --run of such a run (no weights loaded): the tokenizer and base it was trained with, from
    # the SFT run when it is there, else from the run's own record
    from fxjax.cli import build_parser
    from fxjax.commands.model_args import resolve_detector

    present = tmp_path / "grpo-present" / "checkpoints"
    shutil.copytree(grpo_run / "3", present / "3")
    (present / "3" / "config" / "config.json").write_text(json.dumps(cfg_here.to_dict()))
    messages = []
    load_run(present.parent, log=messages.append)  # the base named through the run it started from (was "None")
    assert f"loading the grpo run in {present} at step 3: base {tiny_vl_dir} (float32), on mesh {{'data': 1, 'fsdp': 1, " \
           f"'tensor': 1}}" in messages, messages
    for run, base in ((present.parent, tiny_vl_dir), (grpo_run.parent, tiny_vl_dir.resolve())):
        detector = resolve_detector(build_parser().parse_args(["detect", "x.png", "--run", str(run)]))
        assert (detector.tokenizer, detector.source["base"]) == (str(base), str(base)), run
    # GRPO from that GRPO run: the tokenizer followed two runs back
    again = grpo_from_dict({"model": {"from_run": str(present.parent), "dtype": "float32"}, "data": data})
    assert again.tokenizer == str(tiny_vl_dir)
    # ... and from the GRPO run whose SFT run is gone: the tokenizer and base from its kept record
    from fxjax.train_config import base_model_section

    beyond = grpo_from_dict({"model": {"from_run": str(grpo_run.parent), "dtype": "float32"}, "data": data})
    assert beyond.tokenizer == base_model_section(beyond).path == str(tiny_vl_dir.resolve())
    # The base model the SFT run recorded has moved: model.path says where it is now (the tokenizer follows)
    moved_sft = tmp_path / "moved_sft"
    shutil.copytree(two_process_run / "checkpoints" / "2", moved_sft / "checkpoints" / "2")
    record = moved_sft / "checkpoints" / "2" / "config" / "config.json"
    recorded = json.loads(record.read_text())
    recorded["model"]["path"] = str(tmp_path / "gone-base")
    record.write_text(json.dumps(recorded))
    from fxjax.run_files import RunLoadError

    lost = grpo_from_dict({"model": {"from_run": str(moved_sft), "dtype": "float32"}, "data": data})
    with pytest.raises(RunLoadError, match="gone-base, which does not exist here"):
        build_model(lost, make_mesh(MeshConfig()))
    found = grpo_from_dict({"model": {"from_run": str(moved_sft), "path": str(tiny_vl_dir), "dtype": "float32"},
                            "data": data})
    assert found.tokenizer == str(tiny_vl_dir)
    equal = [np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(lora(build_model(found, make_mesh(MeshConfig()))), lora(started))]
    assert len(equal) > 10 and all(equal)
    for bad, key in (({"preset": "tiny"}, "model.from_run"), ({"adapter": str(tmp_path)}, "model.from_run"),
                     ({"from_run": None, "path": str(tiny_vl_dir)}, "model.from_run_step")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            grpo_from_dict({"model": {"from_run": str(two_process_run), "from_run_step": 2, **bad}, "data": data})


def test_an_adapter_whose_lora_the_merged_export_holds_already_is_refused_on_it(two_process_run, tmp_path, capsys):
    """`detect --model SFT/merged --adapter GRPO/adapter` (a GRPO run started from that SFT LoRA: its adapter is
    that LoRA plus its updates) answered garbage without a word, as did an adapter of another step of the run
    merged there; `--run GRPO` with the same --model was refused. Both are now refused from the export
    records, before a weight loads; the export folder itself as --model names its merged/."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.train.run_setup import build_model, keep_start_lora

    sft = tmp_path / "sft-export"
    assert main(["export", "--run", str(two_process_run), "--step", "2", "--out", str(sft), "--merged-only"]) == 0
    # a GRPO run started from the SFT run's step 2 (its start kept as `fxjax grpo` keeps it), at its step 3
    cfg = grpo_from_dict({"model": {"from_run": str(two_process_run), "from_run_step": 2, "dtype": "float32"},
                          "data": {"train_files": [str(tmp_path / "train.jsonl")]},
                          "checkpoint": {"dir": str(tmp_path / "grpo" / "checkpoints")}})
    keep_start_lora(build_model(cfg, make_mesh(MeshConfig())), cfg)
    shutil.copytree(two_process_run / "checkpoints" / "3", tmp_path / "grpo" / "checkpoints" / "3")
    (tmp_path / "grpo" / "checkpoints" / "3" / "config" / "config.json").write_text(json.dumps(cfg.to_dict()))
    grpo = tmp_path / "grpo-export"
    assert main(["export", "--run", str(tmp_path / "grpo"), "--out", str(grpo), "--adapter-only"]) == 0
    record = json.loads((grpo / "adapter" / "fxjax_export.json").read_text())
    assert len(record["continues"]) >= 1  # (the start's fingerprints: as saved in float32 / bfloat16, float16)
    capsys.readouterr()
    assert main(["detect", "x.png", "--model", str(sft / "merged"), "--adapter", str(grpo / "adapter")]) == 2
    assert (f"--adapter: {grpo / 'adapter'} continues the LoRA merged into {sft / 'merged'} (its run started from "
            f"it: `continues` in its fxjax_export.json): on those weights that LoRA's update would count twice. Apply "
            f"it to the base model it was trained on ({record['base_model']}), or use {sft / 'merged'} alone"
            ) in capsys.readouterr().err
    # step 3's adapter beside step 2's merged weights: said (it was not), then refused on them
    assert main(["export", "--run", str(two_process_run), "--step", "3", "--out", str(sft), "--adapter-only"]) == 0
    run = (two_process_run / "checkpoints").absolute()
    assert (f"fxjax export: note: {sft / 'merged'} is left as it was: step 2 of {run} (its fxjax_export.json), so "
            f"the two folders of {sft} now hold different checkpoints") in capsys.readouterr().err
    assert main(["eval", "--model", str(sft / "merged"), "--adapter", str(sft / "adapter"), "--data", "t.jsonl"]) == 2
    assert (f"--adapter: {sft / 'adapter'} (step 3) and {sft / 'merged'} (merged, step 2) are exports of one run "
            f"({run}): its LoRA on those merged weights would count twice") in capsys.readouterr().err
    # the same two adapters loaded from Python (fxjax.from_pretrained(adapter=)): refused alike, by the records,
    # before a weight is read (they loaded, and answered garbage)
    import fxjax

    for adapter, words in ((grpo / "adapter", "continues the LoRA merged into"), (sft / "adapter", "are exports of "
                                                                                                 "one run")):
        with pytest.raises(fxjax.MergedLoRAError, match=f"^the adapter {adapter}.* {words}"):
            fxjax.from_pretrained(sft / "merged", adapter=adapter)
    assert main(["detect", "x.png", "--model", str(sft)]) == 2
    assert (f"--model: {sft} is the folder of an `fxjax export` (merged/ and adapter/ in it): pass --model "
            f"{sft / 'merged'}, or the base model with --adapter {sft / 'adapter'}") in capsys.readouterr().err
    # an adapter on a base model other than the one it trained on: a note; a copy of it is no other model (the
    # same config.json, weight files of the same sizes and sampled bytes): no note
    from fxjax.cli import build_parser
    from fxjax.commands.model_args import resolve_detector

    other, copy = tmp_path / "other-base", tmp_path / "copied-base"
    shutil.copytree(record["base_model"], other)
    shutil.copytree(record["base_model"], copy)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "note": "another model"}))
    for base, noted in ((record["base_model"], False), (copy, False), (other, True)):
        resolve_detector(build_parser().parse_args(["detect", "x.png", "--model", str(base), "--adapter",
                                                    str(sft / "adapter")]))
        note = (f"fxjax detect: note: {sft / 'adapter'} was trained on {record['base_model']} (its fxjax_export.json), "
                f"not {base}: if these weights differ, its answers mean nothing")
        assert (note in capsys.readouterr().err) == noted, base
    # from Python, a warning of its own category (it loaded without a word: shapes alike, another model), once
    # on the command line (its note, above; the load's warning left out)
    from fxjax.export_record import OtherBaseWarning

    with pytest.warns(OtherBaseWarning, match=f"^{re.escape(str(sft / 'adapter'))} was trained on .*, not {other}: "):
        fxjax.from_pretrained(other, adapter=sft / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherBaseWarning)
        fxjax.from_pretrained(record["base_model"], adapter=sft / "adapter")
        assert main(["detect", str(tmp_path / "none.png"), "--model", str(other), "--adapter", str(sft / "adapter"),
                     "--no-overlay"]) == 1
    assert capsys.readouterr().err.count(" was trained on ") == 1


def test_a_run_loads_with_the_lora_shape_it_started_from_when_its_adapter_folder_changed(two_process_run,
                                                                                         tmp_path):
    """model.adapter's folder later holding another adapter of the same rank and targets (another
    lora_alpha): the run loads with its own copy of the adapter it started from (start_lora), scaled as it
    trained, and says so (it loaded the folder's, LoRA scaled 4x, without a word)."""
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.model.lora import lora_linears
    from fxjax.peft_io import save_peft_adapter
    from fxjax.train.run_loading import load_run, run_config
    from fxjax.train.run_setup import keep_start_lora

    trained = load_run(two_process_run, 3)
    start = save_peft_adapter(trained.model, tmp_path / "start")
    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(two_process_run / "checkpoints" / "3", run / "3")
    record = run / "3" / "config" / "config.json"
    saved = json.loads(record.read_text())
    saved["model"]["adapter"], saved["checkpoint"]["dir"] = str(start), str(run)
    record.write_text(json.dumps(saved))
    cfg = run_config(run.parent)
    assert keep_start_lora(trained.model, cfg) == run / "start_lora"  # as fxjax sft/grpo do at their start
    adapter_config = json.loads((start / "adapter_config.json").read_text())
    alpha = adapter_config["lora_alpha"]
    adapter_config["lora_alpha"] = 4 * alpha
    (start / "adapter_config.json").write_text(json.dumps(adapter_config))
    messages = []
    loaded = load_run(run.parent, log=messages.append, mesh=make_mesh(MeshConfig()))
    scaling = lambda m: {float(layer.lora.scaling) for _, layer in lora_linears(m)}  # noqa: E731
    assert scaling(loaded.model) == scaling(trained.model) and len(scaling(trained.model)) == 1
    assert (f"model.adapter {start} now holds another adapter than the run started from (lora_alpha {4 * alpha} "
            f"there, {alpha} in the run's copy)") in messages[0]


def test_a_run_loaded_onto_another_base_model_is_refused_naming_the_shapes(two_process_run, tmp_path):
    """LoRA trained on one base loaded onto a wider one: said as such, naming --model (it was reported as an
    incomplete or corrupted checkpoint)."""
    from conftest import build_hf_model, save_hf_model

    from fxjax.run_files import RunLoadError
    from fxjax.train.run_loading import load_run

    wider = save_hf_model(build_hf_model(hidden=48, heads=6), tmp_path / "wider")
    with pytest.raises(RunLoadError, match=rf"step 3 in .* holds LoRA arrays of other shapes than this model's: "
                                           rf"\d+ differ, e.g. params\.\S+ \(.*\) there, \(.*\) here; "
                                           rf"--model {wider} is not the base model"):
        load_run(two_process_run, model_path=str(wider))
    # rebuilt with fewer LoRA targets than it trained (its start adapter replaced, here its recorded
    # targets narrowed): refused, where the partial restore left the other arrays out without a word
    narrowed = tmp_path / "narrowed"
    shutil.copytree(two_process_run / "checkpoints" / "3", narrowed / "checkpoints" / "3")
    record = narrowed / "checkpoints" / "3" / "config" / "config.json"
    saved = json.loads(record.read_text())
    saved["lora"]["target_modules"] = ["q_proj"]
    record.write_text(json.dumps(saved))
    with pytest.raises(RunLoadError, match=r"step 3 in .* holds \d+ LoRA arrays this model has no place for, e\.g\. "
                                           r"\S+ \(another base model or LoRA targets\?\); nothing was loaded"):
        load_run(narrowed)


def test_brief_error_keeps_the_first_line_without_tensorstores_spec():
    from fxjax.run_files import brief_error

    err = Exception("Encountered error while reading array index: (slice(0, 32, 1),). See full TensorStore "
                    "details: <bound method spec of TensorStore({\n  'base': {\n    'driver': 'zarr',")
    assert brief_error(err) == "Exception: Encountered error while reading array index: (slice(0, 32, 1),)."
    assert brief_error(ValueError("x" * 400), limit=10) == "ValueError: xxxxxxxxxx..."
    assert brief_error(OSError()) == "OSError: "


def test_another_step_loads_into_the_same_model_as_a_whole_load_of_it(two_process_run):
    """load_run_step: the LoRA of step 2 read into step 3's model equals load_run of step 2 (and differs from
    step 3's), on the same model object and base arrays; a step saved with other LoRA settings loads whole,
    after the model it replaces was let go."""
    from fxjax.train.checkpointing import flatten_tree
    from fxjax.train.run_loading import load_run, load_run_step
    from fxjax.train.step import split_model

    def lora(model):
        return {k: np.asarray(v) for k, v in flatten_tree(split_model(model)[1]).items()}

    three = load_run(two_process_run, 3)
    three_lora, base = lora(three.model), flatten_tree(split_model(three.model)[2])
    two = load_run_step(three, 2)
    assert two.model is three.model and two.step == 2 and two.mesh is three.mesh
    assert all(a is b for a, b in zip(flatten_tree(split_model(two.model)[2]).values(), base.values()))
    swapped, whole = lora(two.model), lora(load_run(two_process_run, 2).model)
    assert swapped.keys() == whole.keys() == three_lora.keys()
    assert all(np.array_equal(swapped[k], whole[k]) for k in whole)
    assert not any(np.array_equal(swapped[k], three_lora[k]) for k in whole if k.endswith("lora_b"))
    said = []
    relative = dataclasses.replace(three.config.model, path=os.path.relpath(three.config.model.path))
    three.config = dataclasses.replace(three.config, model=relative)  # (a step saved before the run's folder was
    load_run_step(three, 3, log=said.append)                          # recorded: `tiny`, not /project/tiny)
    assert said == ["step 3: only its LoRA read, into the model of step 3 (its base weights kept)"]
    said.clear()
    three.config = dataclasses.replace(three.config, lora=dataclasses.replace(three.config.lora, alpha=4))
    model = three.model
    other = load_run_step(three, 2, log=said.append)
    assert "other model or LoRA settings" in said[0], said
    assert other.model is not model and three.model is None  # (let go before the whole load: one model held)


def staged_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the two-step run whose newest checkpoint records GRPO stage ends, as fxjax grpo's do: alpha
    ended at step 2, beta at step 3 (so `--step alpha` / `from_run_step: alpha` name step 2)."""
    copy = tmp_path / "staged"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    state = copy / "checkpoints" / "3" / "data" / "data_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "stage_ends": [["alpha", 2], ["beta", 3]]}))
    return copy


def test_a_run_can_start_from_the_end_of_another_runs_stage(two_process_run, tmp_path):
    """model.from_run_step: alpha starts from the checkpoint where that run's stage alpha ended (step 2),
    said in the run's first line; an empty name is a config error."""
    from fxjax.config_mapping import ConfigError
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.checkpointing import flatten_tree
    from fxjax.train.run_loading import load_run
    from fxjax.train.run_setup import build_model, start_description
    from fxjax.train.step import split_model

    staged = staged_copy(two_process_run, tmp_path)
    data = {"train_files": [str(tmp_path / "train.jsonl")]}
    cfg = grpo_from_dict({"model": {"from_run": str(staged), "from_run_step": "alpha", "dtype": "float32"},
                          "data": data})
    assert start_description(cfg).startswith(f"the run {staged} at the end of stage alpha (step 2) ")
    lora = lambda m: flatten_tree(split_model(m)[1])  # noqa: E731
    started, two = lora(build_model(cfg, make_mesh(MeshConfig()))), lora(load_run(two_process_run, 2).model)
    assert started.keys() == two.keys() and all(np.array_equal(started[k], two[k]) for k in two)
    from fxjax.run_files import describe_run  # (fxjax info of such a run names the stage, not "step alpha")

    later = tmp_path / "later" / "checkpoints" / "3"
    shutil.copytree(staged / "checkpoints" / "3", later)
    saved = json.loads((later / "config" / "config.json").read_text())
    saved["model"].update(path=None, from_run=str(staged), from_run_step="alpha")
    (later / "config" / "config.json").write_text(json.dumps(saved))
    assert f"  model: the run {staged} at the end of stage alpha (step 2); compute float32" in describe_run(later.parent)
    with pytest.raises(ConfigError, match=r"model\.from_run_step: give a step number or a GRPO stage's name"):
        grpo_from_dict({"model": {"from_run": str(staged), "from_run_step": " ", "dtype": "float32"}, "data": data})


def test_eval_of_several_steps_reads_the_base_once_and_writes_what_one_eval_each_writes(two_process_run, tmp_path,
                                                                                       monkeypatch, capsys):
    """`fxjax eval --run RUN --step alpha --step 3` (a stage's end and a step number): one model build (no
    compilation for the second step either), each step's predictions and settings those of its own `fxjax
    eval --step`, in OUT/alpha and OUT/step-3, a table with a row per step and the comparison PNG; the same
    checkpoint named twice, and a step folder that holds other predictions, are refused before anything
    loads."""
    import jax
    from PIL import Image

    import fxjax.commands.eval_folder as eval_command
    import fxjax.train.run_setup as run_setup

    rng = np.random.default_rng(0)
    for name in ("g", "r"):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"image": "g.png", "label": "generated", "regions": [{"bbox": [0, 0, 28, 28], "caption": "hand"}]})
                    + "\n" + json.dumps({"image": "r.png", "label": "real"}) + "\n")
    common = ["--run", str(staged_copy(two_process_run, tmp_path)), "--data", str(data), "--batch-size", "2", "--max-new-tokens", "6",
              "--no-progress", "--group-by"]
    builds, events = [], []
    build = run_setup.build_model
    monkeypatch.setattr(run_setup, "build_model", lambda *a, **k: builds.append(1) or build(*a, **k))
    evaluate = eval_command.evaluate
    monkeypatch.setattr(eval_command, "evaluate", lambda *a, **k: events.append("eval") or evaluate(*a, **k))
    listen = lambda name, *_, **__: events.append("compile") if name.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        assert main(["eval", "--step", "alpha", "--step", "3", "--out", str(tmp_path / "both")] + common) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(builds) == 1
    assert events.count("eval") == 2 and "compile" not in events[events.index("eval", 1):], events
    out = capsys.readouterr()
    assert "step 3: only its LoRA read, into the model of step 2 (its base weights kept)" in out.err
    lines = out.out.splitlines()
    assert lines[0].split() == ["images", "accuracy", "precision", "recall", "F1", "format", "mean", "IoU", "IoU",
                                "images", "truncated"]
    assert [line.split()[:4] for line in lines[2:4]] == [["alpha", "(step", "2)", "2"], ["step", "3", "2", "0.000"]]
    assert (tmp_path / "both" / "eval_report.png").stat().st_size > 0
    texts = {}
    for step, folder in (("2", "alpha"), ("beta", "step-3")):
        assert main(["eval", "--step", step, "--out", str(tmp_path / step)] + common) == 0
        one, both = ([json.loads(r)["completion"] for r in (d / "predictions.jsonl").read_text().splitlines()]
                     for d in (tmp_path / step, tmp_path / "both" / folder))
        assert one == both
        settings = [json.loads((d / "settings.json").read_text()) for d in (tmp_path / step, tmp_path / "both" / folder)]
        assert settings[0] == settings[1] and settings[0]["model"]["step"] == int(folder == "step-3") + 2
        texts[step] = one
    assert texts["2"] != texts["beta"]  # (the steps' LoRA decode differently: the swap is seen)
    assert len(builds) == 3
    assert main(["eval", "--step", "beta", "--out", str(tmp_path / "both" / "step-3")] + common) == 0
    assert len(builds) == 3 and "resuming: 2 of 2 images already in" in capsys.readouterr().err  # (the same settings)
    capsys.readouterr()
    assert main(["eval", "--step", "3", "3", "--out", str(tmp_path / "twice")] + common) == 2
    assert "--step: 3 is given twice; give each step once" in capsys.readouterr().err
    assert main(["eval", "--step", "beta", "3", "--out", str(tmp_path / "twice")] + common) == 2
    assert "--step: beta and 3 name the same checkpoint (step 3)" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
    other = tmp_path / "other"  # step 3's folder holds predictions of another --max-new-tokens: refused before
    shutil.copytree(tmp_path / "both" / "step-3", other / "step-3")  # alpha is evaluated
    settings = json.loads((other / "step-3" / "settings.json").read_text())
    (other / "step-3" / "settings.json").write_text(json.dumps({**settings, "max_new_tokens": 5}))
    assert main(["eval", "--step", "alpha", "3", "--out", str(other)] + common) == 2
    assert f"{other / 'step-3'} holds predictions made with other settings (max_new_tokens: 5 then, 6 now)" in \
        capsys.readouterr().err
    assert len(builds) == 3 and not (other / "alpha").exists()
    # fxjax.evaluate.evaluate with several steps: each step's metrics.json, keyed by the step as given (a
    # number as a number), the same as the command's
    from fxjax.evaluate import evaluate as evaluate_from_python  # (evaluate: the patched one above)

    got = evaluate_from_python(data, out=tmp_path / "python", run=common[1], step=["alpha", "3"], batch_size=2,
                   max_new_tokens=6, progress=False, group_by=[])
    assert list(got) == ["alpha", 3]
    for key, folder in (("alpha", "alpha"), (3, "step-3")):
        want = json.loads((tmp_path / "both" / folder / "metrics.json").read_text())
        assert {k: v for k, v in got[key].items() if k != "decoding"} == \
            {k: v for k, v in want.items() if k != "decoding"}


def test_several_steps_each_get_a_folder_of_their_own():
    """Two --step values whose folders would be one (a stage named like a step's folder) or a stage name
    that is not a folder name are refused, naming the step number to give instead."""
    from fxjax.commands.eval_steps import check_distinct_steps, step_folder

    assert (step_folder("alpha"), step_folder(300)) == ("alpha", "step-300")
    with pytest.raises(ValueError, match=r"step-3 and 3 would both be evaluated into --out/step-3; give the step "
                                         r"number \(3\)"):
        check_distinct_steps(["step-3", 3], [2, 3])
    for name in ("..", "a/b", "."):
        with pytest.raises(ValueError, match=f"--step {re.escape(name)}: the stage's name is not a folder name"):
            check_distinct_steps([name, 5], [4, 5])
    check_distinct_steps(["alpha", "beta", 7], [2, 4, 7])


def test_a_run_given_relative_paths_loads_from_any_folder(two_process_run, tiny_vl_dir, tmp_path, monkeypatch, capsys):
    """A run trained with `model.path: tiny` (relative, as typed) records the folder it started from: eval,
    detect and export read from another folder find its base model and tokenizer there ("no tokenizer.json
    in tiny" before); a project moved with its runs (that folder gone) reads them relative to where it is."""
    from fxjax.cli import build_parser
    from fxjax.commands.model_args import resolve_detector
    from fxjax.train.run_loading import load_run

    project = tmp_path / "project"
    shutil.copytree(two_process_run / "checkpoints" / "3", project / "runs" / "sft" / "checkpoints" / "3")
    (project / "tiny").symlink_to(tiny_vl_dir, target_is_directory=True)
    (project / "train.jsonl").write_text("")
    step = project / "runs" / "sft" / "checkpoints" / "3"
    config = json.loads((step / "config" / "config.json").read_text())
    config["model"]["path"], config["data"]["train_files"] = "tiny", ["train.jsonl"]
    (step / "config" / "config.json").write_text(json.dumps(config))
    state = json.loads((step / "data" / "data_state.json").read_text())
    (step / "data" / "data_state.json").write_text(json.dumps({**state, "cwd": str(project)}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    detector = resolve_detector(build_parser().parse_args(["detect", "x.png", "--run", str(project / "runs" / "sft")]))
    assert detector.tokenizer == str(project / "tiny") and detector.source["base"] == str(project / "tiny")
    assert detector.data["train_files"] == (str(project / "train.jsonl"),)  # (detect reads them: ms-swift prompts?)
    assert load_run(project / "runs" / "sft").config.model.path == str(project / "tiny")
    from fxjax.run_files import with_run_paths

    adapter = {"model": {"path": "tiny", "adapter": "tiny", "from_run": "tiny"}, "data": {"tokenizer": None}}
    rebased = with_run_paths(adapter, str(project))  # (a start adapter or run: the run's kept copy, by its name)
    assert rebased["model"] == {"path": str(project / "tiny"), "adapter": "tiny", "from_run": "tiny"}
    moved = tmp_path / "moved"  # the project moved: the recorded folder is gone, the paths are the current one's
    project.rename(moved)
    monkeypatch.chdir(moved)
    assert resolve_detector(build_parser().parse_args(["detect", "x.png", "--run", "runs/sft"])).tokenizer == "tiny"
    monkeypatch.chdir(tmp_path)  # ... and from a folder without it: the base model is named, not its tokenizer
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.png", "label": "real"}) + "\n")
    from PIL import Image

    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    for command in (["detect", "x.png"], ["eval", "--data", "d.jsonl"], ["export", "--out", "x"]):
        assert main(command + ["--run", str(moved / "runs" / "sft")]) == 2
        err = capsys.readouterr().err
        assert f"the run in {moved / 'runs' / 'sft' / 'checkpoints'} was trained from model.path=tiny, which does " \
               f"not exist here; pass the base model's directory (--model" in err and "tokenizer" not in err, err


def test_loading_a_run_names_the_folder_a_relative_base_path_was_read_from(two_process_run, tiny_vl_dir, tmp_path,
                                                                           monkeypatch):
    """A run whose model.path is relative, loaded where its start folder is gone, reads the base from the
    current folder: the log said "base base", which folder unknown; now also the folder it read."""
    from fxjax.train.run_loading import load_run

    staged = staged_copy(two_process_run, tmp_path)
    for step in (2, 3):
        saved = staged / "checkpoints" / str(step) / "config" / "config.json"
        config = json.loads(saved.read_text())
        saved.write_text(json.dumps({**config, "model": {**config["model"], "path": "base"}}))
        state = staged / "checkpoints" / str(step) / "data" / "data_state.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), "cwd": str(tmp_path / "gone")}))
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "base").symlink_to(tiny_vl_dir)
    monkeypatch.chdir(tmp_path / "here")
    said: list[str] = []
    load_run(staged, dtype="float32", log=said.append)
    assert any(f"at step 3: base base ({tmp_path / 'here' / 'base'}) (float32)" in line for line in said), said


def test_info_of_a_run_lists_its_steps_stage_ends_and_start(two_process_run, tiny_vl_dir, tmp_path, capsys):
    """`fxjax info RUN_DIR`: what --step takes (the steps, a GRPO run's stage ends) and what the run's model
    started from, without loading weights; a folder that is neither a run nor a checkpoint is named."""
    assert main(["info", str(two_process_run)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"sft run in {two_process_run / 'checkpoints'}",
        "  checkpoints: steps 2, 3 (--step N; default the newest, 3)",
        f"  model: {tiny_vl_dir}; compute float32",
        "  LoRA: r=4 alpha=8 on all-linear",
        f"  tokenizer: {tiny_vl_dir}",
        f"  started from: {two_process_run.parent} (its relative paths are read from there)"]  # (the workers' cwd)
    staged = staged_copy(two_process_run, tmp_path)
    state = staged / "checkpoints" / "3" / "data" / "data_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "cwd": str(tmp_path)}))
    assert main(["info", str(staged)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "  stage ends: alpha at step 2, beta at step 3 (--step STAGE)"  # (its data state records them)
    assert out[-1] == f"  started from: {tmp_path} (its relative paths are read from there)"
    state.write_text(json.dumps({**json.loads(state.read_text()), "cwd": str(tmp_path / "gone")}))
    assert main(["info", str(staged)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"  started from: {tmp_path / 'gone'} (gone: its relative "
                                                         "paths are read from the current folder)")
    # how the run ended, from the last end record of its metrics.jsonl (a finished and a preempted run both
    # exit 0: nothing said which this one was)
    (staged / "metrics.jsonl").write_text('{"step": 2, "kind": "end", "status": "preempted"}\n'
                                          '{"step": 3, "kind": "train", "loss": 1.0}\n')
    assert main(["info", str(staged)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  ended: stopped by a signal (its checkpoint saved: the same command resumes it), at step 2")
    with (staged / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "kind": "end", "status": "finished"}\n')
    assert main(["info", str(staged)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  ended: finished (trained to its end, evaluated and exported), at step 3")
    (staged / "metrics.jsonl").unlink()
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: not an HF checkpoint directory (no config.json); as a fxjax run: " \
           f"{tmp_path / 'empty'} holds no checkpoints" in capsys.readouterr().err
    assert main(["info", str(staged / "checkpoints" / "3")]) == 2  # (a step's folder: said as such)
    assert "is the checkpoint of step 3, not a run: name the run's folder and the step apart" in \
        (err := capsys.readouterr().err) and f"info: fxjax info {staged / 'checkpoints'})" in err
    # a run training now (its lock held): said, with what the run wrote of itself
    from types import SimpleNamespace

    from fxjax.train.run_lock import locked_run_dirs

    held = SimpleNamespace(train=SimpleNamespace(output_dir=str(staged)), checkpoint_dir=staged / "checkpoints")
    with locked_run_dirs(held, True, print):
        assert main(["info", str(staged)]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"  training now: pid {os.getpid()} on ")
    assert main(["info", str(staged)]) == 0
    assert "training now" not in (plain := capsys.readouterr().out)
    # an eval written into the run's folder (--out runs/x/eval) leaves the run described as the run
    (staged / "eval").mkdir()
    (staged / "eval" / "settings.json").write_text("{}")
    assert main(["info", str(staged)]) == 0 and capsys.readouterr().out == plain
    shutil.rmtree(staged / "eval")
    # a stage that ends after the newest step (a run preempted in alpha): not reached yet, not "no checkpoint"
    state.write_text(json.dumps({**json.loads(state.read_text()), "stage_ends": [["alpha", 2], ["beta", 9]]}))
    assert main(["info", str(staged)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == ("  stage ends: alpha at step 2, beta at step 9 (not reached "
                                                       "yet) (--step STAGE)")
    # the newest step's config damaged: described from the step before, the damaged one named (it refused the run)
    (staged / "checkpoints" / "3" / "config" / "config.json").write_text("{not json")
    assert main(["info", str(staged)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  checkpoints: steps 2, 3 (--step N; default the newest, 3)"
    assert out[2].startswith(f"  unreadable: step 3: the checkpoint of step 3 in {staged / 'checkpoints'} is "
                             "corrupted") and out[2].endswith("(described from step 2; a resume sets it aside)"), out
    shutil.rmtree(staged / "checkpoints" / "3")
    assert main(["info", str(staged)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("  checkpoints: step 2 (--step N;")  # (one: "step")
