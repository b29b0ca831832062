"""The SFT config: YAML -> typed frozen dataclasses; unknown keys and wrong types name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fxjax.config_mapping import ConfigError
from fxjax.train_config import SFTConfig, apply_overrides, from_dict, load_sft_config

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"},
           "train": {"steps": 10}}


def test_the_shipped_configs_load_and_are_frozen():
    base = ["model.path=m", "data.train_files=[t.jsonl]", "train.steps=3"]
    cfg = load_sft_config(REPO / "configs" / "sft.yaml", base)
    assert isinstance(cfg, SFTConfig)
    # configs/sft.yaml holds the defaults (tests/test_config_docs.py checks every key)
    assert dataclasses.replace(cfg, model=SFTConfig().model, data=SFTConfig().data, train=SFTConfig().train) \
        == SFTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0  # type: ignore[misc]
    assert from_dict(cfg.to_dict()) == cfg  # the resolved dict (what checkpoints record) round-trips

    # The authors' 3B SFT recipe (paper arXiv 2506.07045).
    paper = load_sft_config(REPO / "configs" / "recipes" / "paper_3b_sft.yaml")
    assert (paper.lora.rank, paper.lora.alpha, paper.lora.target_modules) == (8, 32.0, "all-linear")
    assert (paper.optim.learning_rate, paper.optim.warmup_ratio, paper.optim.grad_accum) == (1e-4, 0.05, 16)
    assert (paper.train.epochs, paper.train.steps, paper.data.batch_size) == (3, None, 1)
    assert (paper.data.max_length, paper.model.dtype) == (8192, "bfloat16")
    assert paper.data.train_files == ("data/train.jsonl",) and paper.data.eval_files == ("data/test.jsonl",)

    # ... and its GRPO phase: one epoch a stage, G 4 at temperature 1, group-scaled advantages, plain k3 KL,
    # from the SFT recipe's run folder.
    from fxjax.grpo_config import load_grpo_config
    grpo = load_grpo_config(REPO / "configs" / "recipes" / "paper_3b_grpo.yaml")
    assert [(s.name, s.epochs, s.steps) for s in grpo.stages] == [("alpha", 1, None), ("beta", 1, None),
                                                                  ("gamma", 1, None)]
    assert (grpo.grpo.schedule, grpo.grpo.num_generations, grpo.grpo.temperature) == ("stages", 4, 1.0)
    assert (grpo.grpo.scale_rewards, grpo.grpo.use_bias_correction_kl) == ("group", False)
    assert (grpo.grpo.top_k, grpo.grpo.top_p) == (0, 1.0)  # temperature 1 sampling over the whole vocabulary
    assert (grpo.data.min_pixels, grpo.data.max_pixels) == (3136, 12845056)  # the paper's image limits
    recipe = yaml.safe_load((REPO / "configs" / "recipes" / "paper_3b_grpo.yaml").read_text())
    assert {"top_k", "top_p", "temperature", "num_generations"} <= set(recipe["grpo"])  # written out, not defaults
    assert grpo.model.from_run == paper.train.output_dir and grpo.data.train_files == paper.data.train_files
    # their own folders: run after configs/sft.yaml or grpo.yaml, a recipe resumed that run (or failed on it)
    assert (paper.train.output_dir, grpo.train.output_dir) == ("runs/paper_3b_sft", "runs/paper_3b_grpo")
    assert grpo.with_stage_steps(records=1000).total_steps == 3000  # data.batch_size 1: a step a record


@pytest.mark.parametrize("patch, message", [
    ({"optim": {"learnin_rate": 1e-4}}, "optim.learnin_rate: unknown key (did you mean optim.learning_rate?); optim "
                                         "takes ['learning_rate',"),
    ({"trainer": {}}, "trainer: unknown key (did you mean train?); the config takes ['model',"),
    # a flat Hugging Face-style file: every unknown key at once (one a run), each with where it is here
    ({"learning_rate": 1e-5, "save_steps": 5, "seed": 1},
     "unknown keys: learning_rate (did you mean optim.learning_rate?); save_steps (here checkpoint.every); seed (did "
     "you mean data.seed or train.seed?); the config takes ['model',"),
    ({"optim": {"lora_alpha": 16}}, "optim.lora_alpha: unknown key (here lora.alpha); optim takes"),
    ({"optim": {"learning_rate": "fast"}}, "optim.learning_rate: expected a number, got 'fast'"),
    ({"train": {"steps": 2.5}}, "train.steps: expected an integer"),
    ({"lora": {"use_rslora": "yes"}}, "lora.use_rslora: expected true or false"),
    ({"data": {"train_files": "a.jsonl"}}, "data.train_files: expected a list of strings, got 'a.jsonl' (a list of "
                                           "one: [a.jsonl])"),
    ({"data": {"length_buckets": [64, "x"]}}, "data.length_buckets[1]: expected an integer"),
    ({"train": {"on_nonfinite": "ignore"}}, "train.on_nonfinite: must be one of 'stop', 'skip'"),
    ({"model": {"remat": "sometimes"}}, "model.remat: must be one of"),
    ({"model": {"preset": "tiny", "path": "x"}}, "set exactly one of model.path"),
    ({"train": {"steps": 5, "epochs": 1}}, "set exactly one of train.steps and train.epochs"),
    # an infinite epoch count was an OverflowError after jax had started; at_start without files did nothing
    ({"train": {"steps": None, "epochs": float("inf")}}, "train.epochs: must be positive and finite, got inf"),
    ({"eval": {"at_start": True}}, "eval.at_start: an evaluation before training needs data.eval_files"),
    ({"optim": {"learning_rate": -1}}, "optim.learning_rate: must be a positive number"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout: must be in [0, 1)"),
    ({"mesh": 4}, "mesh: expected a mapping"),
    ({"data": {"min_pixels": 100000, "max_pixels": 3136}}, "data.min_pixels (100000) is above data.max_pixels (3136)"),
    # seeds: 2**63 was an OverflowError from nnx.Rngs / jax after the model loaded, -1 numpy's error without a key
    ({"train": {"steps": 5, "seed": -1}}, "train.seed: a seed must be in [0, 2**32), got -1"),
    ({"data": {"seed": 2**63}}, "data.seed: a seed must be in [0, 2**32)"),
    ({"lora": {"init_seed": 2**32}}, "lora.init_seed: a seed must be in [0, 2**32)"),
    ({"model": {"init_seed": -5}}, "model.init_seed: a seed must be in [0, 2**32)"),
    # accepted before, then misbehaving: a negative min_lr_ratio ended the decay in gradient ascent, alpha 0
    # trained nothing, max_examples -1 dropped the last held-out example
    ({"optim": {"min_lr_ratio": -1.0}}, "optim.min_lr_ratio: must be in [0, 1], got -1.0"),
    ({"optim": {"min_lr_ratio": 3.0}}, "optim.min_lr_ratio: must be in [0, 1], got 3.0"),
    ({"optim": {"b1": 1.0}}, "optim.b1: must be in [0, 1), got 1.0"),
    ({"optim": {"b2": 1.5}}, "optim.b2: must be in [0, 1), got 1.5"),
    ({"optim": {"eps": 0.0}}, "optim.eps: must be a positive number, got 0.0"),
    ({"optim": {"weight_decay": -1.0}}, "optim.weight_decay: must be >= 0, got -1.0"),
    ({"lora": {"alpha": 0.0}}, "lora.alpha: must be a positive number, got 0.0"),
    ({"eval": {"max_examples": -1}}, "eval.max_examples: must be positive, got -1"),
    ({"checkpoint": {"shared_folder_wait": -1}}, "checkpoint.shared_folder_wait: must be >= 0 seconds, got -1"),
    # YAML 1.1 reads an unquoted no / on as a boolean: said where a text was meant
    ({"data": {"user_prompt": False}}, "data.user_prompt: expected a string or null, got False (YAML reads an "
                                       "unquoted yes, no, on, off, true or false as a boolean: quote the text"),
    ({"model": {"dtype": True}}, "model.dtype: must be one of 'float32', 'bfloat16', got True (YAML reads"),
])
def test_bad_values_name_their_key(patch, message):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in patch.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
            if section == "train" and "epochs" in values:
                data[section] = dict(values)
        else:
            data[section] = values
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert message in str(err.value)


def test_set_takes_a_string_keys_text_as_written_and_integers_in_decimal(tmp_path):
    """YAML 1.1 (PyYAML) read --set train.steps=010 as 8 and 20:30 as 1230, cut a prompt at " #" and made
    2025-01-01 a date; a string key now takes the text as written (quoted: read as YAML), and an integer
    is decimal (0x / 0o as YAML 1.2), in --set and in config files alike."""
    cfg = load_sft_config(overrides=["model.path=/m", "data.train_files=[a.jsonl]", "train.steps=010",
                                     "data.system_prompt=Answer in JSON #strict", "train.output_dir=2025-01-01",
                                     "data.user_prompt='quoted: # kept'", "data.tokenizer=null"])
    assert cfg.train.steps == 10 and cfg.data.system_prompt == "Answer in JSON #strict"
    assert cfg.train.output_dir == "2025-01-01" and cfg.data.user_prompt == "quoted: # kept"
    assert cfg.data.tokenizer is None
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer or null, got '20:30'"):
        load_sft_config(overrides=["model.path=/m", "data.train_files=[a.jsonl]", "train.steps=20:30"])
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: /m}\ndata: {train_files: [a.jsonl], max_length: 0x200}\ntrain: {steps: 010}\n")
    cfg = load_sft_config(path)
    assert (cfg.train.steps, cfg.data.max_length) == (10, 512)


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_sft_config(path, ["optim.learning_rate=2e-4", "train.steps=20", "data.length_buckets=[128, 256]",
                                 "lora.target_modules=[q_proj, v_proj]", "model.param_dtype=null",
                                 "eval.max_examples=5"])
    assert cfg.optim.learning_rate == 2e-4 and cfg.train.steps == 20
    assert cfg.data.length_buckets == (128, 256) and cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.eval.max_examples == 5 and cfg.model.param_dtype is None
    with pytest.raises(ConfigError, match=r"optim\.lr: unknown key"):
        load_sft_config(path, ["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"optim\.learning_rate\.x: unknown key|is not a section"):
        load_sft_config(path, ["optim.learning_rate.x=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.steps"])


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    from fxjax.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("model: {preset: tiny}\ndata: {train_files: [a.jsonl], tokenizer: t}\ntrain: {stepz: 3}\n")
    assert main(["sft", "--config", str(path)]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err


# ---- --set overrides replace what the file chose ----------------------------------------------------

def write_config(tmp_path, data) -> Path:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load_with_notes(path, overrides):
    notes: list[str] = []
    return load_sft_config(path, overrides, log=notes.append), notes


def test_set_steps_replaces_epochs_and_back(tmp_path):
    path = write_config(tmp_path, {**MINIMAL, "train": {"epochs": 3}})
    cfg, notes = load_with_notes(path, ["train.steps=1000"])
    assert (cfg.train.steps, cfg.train.epochs) == (1000, None)
    assert notes == ["note: train.epochs: 3 -> null (--set train.steps replaces it)"]
    path = write_config(tmp_path, MINIMAL)  # steps: 10
    cfg, notes = load_with_notes(path, ["train.epochs=2.5"])
    assert (cfg.train.steps, cfg.train.epochs) == (None, 2.5) and "train.steps: 10 -> null" in notes[0]
    with pytest.raises(ConfigError, match="set exactly one of train.steps and train.epochs"):
        load_sft_config(path, ["train.epochs=2", "train.steps=5"])  # both given: a real clash
    cfg, notes = load_with_notes(path, ["train.steps=null", "train.epochs=1"])
    assert (cfg.train.steps, cfg.train.epochs) == (None, 1.0) and notes == []


def test_set_reaches_one_grpo_stage_by_its_index(tmp_path):
    """`--set stages[1].steps=20` changes one stage (it was 'stages[1]: unknown key'; the whole list had to be
    written out); a stage's steps replace its epochs and back, as train.steps and train.epochs; an index
    past the list, or on a key that is not a list of sections, is named."""
    from fxjax.grpo_config import load_grpo_config

    base = ["model.preset=tiny", "data.tokenizer=tok", "data.train_files=[t.jsonl]"]
    notes: list[str] = []
    cfg = load_grpo_config("configs/grpo.yaml", base + ["stages[0].steps=5", "stages[2].epochs=0.5"], log=notes.append)
    assert [(s.name, s.steps, s.epochs) for s in cfg.stages] == [("alpha", 5, None), ("beta", 100, None),
                                                                  ("gamma", None, 0.5)]
    assert notes == ["note: stages[2].steps: 100 -> null (--set stages[2].epochs replaces it)"]
    cfg = load_grpo_config("configs/grpo.yaml", base + ["stages[1]={name: delta, steps: 2}", "stages[1].steps=3"])
    assert (cfg.stages[1].name, cfg.stages[1].steps) == ("delta", 3)
    with pytest.raises(ConfigError, match=r"stages\[3\]: the config's stages list has 3 item\(s\) \(stages\[0\] to "
                                          r"stages\[2\]\); to set the whole list: --set 'stages=\[...\]'"):
        load_grpo_config("configs/grpo.yaml", base + ["stages[3].steps=5"])
    with pytest.raises(ConfigError, match=r"stages\[0\].nme: unknown key \(in --set stages\[0\].nme=...; did you mean stages\[0\].name\?\); "
                                          r"stages\[0\] takes \['name', 'steps', 'epochs'\]"):
        load_grpo_config("configs/grpo.yaml", base + ["stages[0].nme=x"])
    with pytest.raises(ConfigError, match=r"grpo\[0\]: grpo is not a list of sections"):
        load_grpo_config("configs/grpo.yaml", base + ["grpo[0].top_k=1"])
    # a config that leaves `stages` out has the default three: an index reaches them (it said "0 item(s)")
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {preset: tiny}\n")
    cfg = load_grpo_config(bare, base + ["stages[1].steps=20"])
    assert [(s.name, s.steps) for s in cfg.stages] == [("alpha", 100), ("beta", 20), ("gamma", 100)]


def test_set_model_path_replaces_preset_and_the_tokenizer_follows(tmp_path):
    # preset + explicit tokenizer -> path: the preset goes; an explicit other tokenizer stays as given
    path = write_config(tmp_path, MINIMAL)
    cfg, notes = load_with_notes(path, ["model.path=/models/qwen"])
    assert (cfg.model.path, cfg.model.preset, cfg.data.tokenizer) == ("/models/qwen", None, "tok")
    assert notes == ["note: model.preset: tiny -> null (--set model.path replaces it)"]
    assert cfg.tokenizer == "tok"
    # a tokenizer that named the old model follows the new one
    path = write_config(tmp_path, {**MINIMAL, "model": {"path": "/old"}, "data": {"train_files": ["t"],
                                                                                "tokenizer": "/old"}})
    cfg, notes = load_with_notes(path, ["model.path=/new"])
    assert cfg.data.tokenizer is None and cfg.tokenizer == "/new"
    assert notes == ["note: data.tokenizer: /old -> null (it named the old model.path; null follows the new "
                     "model.path)"]
    # path -> preset: the tokenizer the file used (model.path's) is kept, so one --set does it
    path = write_config(tmp_path, {**MINIMAL, "model": {"path": "/old"}, "data": {"train_files": ["t"]}})
    cfg, notes = load_with_notes(path, ["model.preset=tiny"])
    assert (cfg.model.path, cfg.model.preset, cfg.tokenizer) == (None, "tiny", "/old")
    assert notes[0].startswith("note: model.path: /old -> null") and "data.tokenizer: null -> /old" in notes[1]
    # ... and so is one that named it explicitly (it was cleared to follow a model.path the preset removed)
    path = write_config(tmp_path, {**MINIMAL, "model": {"path": "/old"}, "data": {"train_files": ["t"],
                                                                                "tokenizer": "/old"}})
    cfg, notes = load_with_notes(path, ["model.preset=tiny"])
    assert (cfg.model.path, cfg.model.preset, cfg.tokenizer) == (None, "tiny", "/old")
    assert notes == ["note: model.path: /old -> null (--set model.preset replaces it)"]
    # unless the tokenizer is given too
    cfg, notes = load_with_notes(path, ["model.preset=tiny", "data.tokenizer=tok2"])
    assert cfg.tokenizer == "tok2" and len(notes) == 1
    # path -> from_run: a null tokenizer means that run's, and stays null (it was pinned to the cleared
    # model.path, and a GRPO run from an SFT run looked for its tokenizer in a base folder not there)
    path = write_config(tmp_path, {**MINIMAL, "model": {"path": "/old"}, "data": {"train_files": ["t"]}})
    cfg, notes = load_with_notes(path, ["model.from_run=runs/sft", "model.path=null"])
    assert (cfg.model.path, cfg.model.from_run, cfg.data.tokenizer) == (None, "runs/sft", None) and notes == []


def test_a_preset_without_a_tokenizer_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.tokenizer: a preset model \(model.preset=tiny\) has no tokenizer"):
        from_dict({**MINIMAL, "data": {"train_files": ["t.jsonl"]}})


@pytest.mark.parametrize("value", ["[]", "null", ""])
def test_dropping_eval_files_turns_periodic_evaluation_off(tmp_path, value):
    path = write_config(tmp_path, {**MINIMAL, "data": {**MINIMAL["data"], "eval_files": ["e.jsonl"]},
                                   "eval": {"every": 500, "at_start": True}})
    assert load_sft_config(path).eval.every == 500
    cfg, notes = load_with_notes(path, [f"data.eval_files={value}"])
    assert cfg.data.eval_files == () and cfg.eval.every == 0 and not cfg.eval.at_start
    shown = "[]" if value == "[]" else "null"
    assert notes == [f"note: eval.every: 500 -> 0 (--set data.eval_files={shown} leaves nothing for it; --set "
                     f"eval.every to choose)", f"note: eval.at_start: true -> false (--set data.eval_files={shown} "
                     f"leaves nothing for it; --set eval.at_start to choose)"]
    with pytest.raises(ConfigError) as err:  # asked for explicitly: an error that says what to do
        load_sft_config(path, [f"data.eval_files={value}", "eval.every=100"])
    assert str(err.value) == ("eval.every: periodic evaluation (every 100 steps) needs data.eval_files; give them, "
                              "or set eval.every=0")


def test_unknown_keys_through_set_list_the_valid_keys(tmp_path):
    path = write_config(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_sft_config(path, ["optim.lr=1"])
    names = [f.name for f in dataclasses.fields(SFTConfig().optim)]
    assert str(err.value) == f"optim.lr: unknown key (in --set optim.lr=...); optim takes {names}"
    with pytest.raises(ConfigError, match=r"^trainer: unknown key \(in --set trainer.steps=...; did you mean train\?\); the config "
                                          r"takes \['model', 'lora'"):
        load_sft_config(path, ["trainer.steps=1"])
    # a key of another tool's is told where it is here, as in a config file (it got the bare error)
    with pytest.raises(ConfigError, match=r"^optim.warmup_ratio_typo: unknown key \(in --set optim.warmup_ratio_typo=...; "
                                          r"did you mean optim.warmup_ratio\?\); optim takes"):
        load_sft_config(path, ["optim.warmup_ratio_typo=0.1"])
    with pytest.raises(ConfigError, match=r"^optim.warmup_steps: expected an integer or null, got 0.1 \(a share of "
                                          r"the run is optim.warmup_ratio\)$"):
        load_sft_config(path, ["optim.warmup_steps=0.1"])  # (transformers' meaning of a warmup_steps below 1)
    with pytest.raises(ConfigError, match=r"^optim.save_steps: unknown key \(in --set optim.save_steps=...; (did "
                                          r"you mean checkpoint.every\?|here checkpoint.every)\)"):
        load_sft_config(path, ["optim.save_steps=10"])


def test_cli_set_errors_and_notes(tmp_path, capsys):
    from fxjax.cli import main

    path = write_config(tmp_path, MINIMAL)
    assert main(["sft", "--config", str(path), "--set", "optim.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "fxjax sft: error: optim.lr: unknown key" in err and "'learning_rate'" in err
    # a model directory that does not exist: said before anything starts, naming the key
    assert main(["sft", "--config", str(path), "--set", "model.path=/nonexistent/qwen"]) == 2
    err = capsys.readouterr().err
    assert "fxjax sft: note: model.preset: tiny -> null" in err
    assert "fxjax sft: error: model.path: /nonexistent/qwen does not exist" in err


def test_grpo_needs_two_completions_per_prompt():
    from fxjax.grpo_config import grpo_from_dict

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    assert grpo_from_dict({**data, "grpo": {"num_generations": 2}}).grpo.num_generations == 2
    with pytest.raises(ConfigError, match=r"grpo.num_generations: must be >= 2 .* got 1"):
        grpo_from_dict({**data, "grpo": {"num_generations": 1}})
    with pytest.raises(ConfigError, match=r"grpo.seed: a seed must be in \[0, 2\*\*32\), got 4294967296"):
        grpo_from_dict({**data, "grpo": {"seed": 2**32}})
    with pytest.raises(ConfigError, match=r"grpo.epsilon_high: must be >= 0 or null, got -0.5"):
        grpo_from_dict({**data, "grpo": {"epsilon_high": -0.5}})  # (a clip range turned over)
    for key, value in (("beta", float("nan")), ("temperature", float("inf")), ("delta", float("inf")),
                       ("epsilon_high", float("inf"))):  # (they passed, and failed a step later, or never)
        with pytest.raises(ConfigError, match=rf"grpo.{key}: must be a finite number, got {value}"):
            grpo_from_dict({**data, "grpo": {key: value}})
    with pytest.raises(ConfigError, match=r"train.seed: a seed must be in \[0, 2\*\*32\), got -1"):
        grpo_from_dict({**data, "train": {"seed": -1}})  # (GRPO checks its train section itself)


def test_a_trl_grpo_configs_names_are_pointed_to_their_keys_here():
    """A TRL GRPOConfig written as a flat file was refused one key at a time, naming none of the places its
    keys have here (`beta: unknown key`); the keys TRL names otherwise (per_device_train_batch_size, whose
    batch counts completions) now say what they are here, and a list of sections is described, not named by
    its class (StageSection)."""
    from fxjax.grpo_config import grpo_from_dict

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    with pytest.raises(ConfigError) as err:
        grpo_from_dict({**data, "beta": 0.0, "num_generations": 4, "per_device_train_batch_size": 8, "max_steps": 9})
    assert str(err.value).startswith(
        "unknown keys: beta (did you mean grpo.beta?); max_steps (here each stage's stages[i].steps, or train.steps "
        "with grpo.schedule=continuous: sampling steps, each grpo.num_iterations updates, where TRL's max_steps "
        "counts updates: divide it by num_iterations); num_generations (did you mean grpo.num_generations?); "
        "per_device_train_batch_size (here data.batch_size, in prompts: each is sampled grpo.num_generations times; "
        "TRL's counts completions per device: data.batch_size = per_device_train_batch_size x devices x "
        "gradient_accumulation_steps / num_generations); the config takes ['model',"), str(err.value)
    # an HF Trainer config's batch keys, in an SFT config: grad_accum multiplies the batch here as there (the
    # message said it split data.batch_size, which GRPO's does: a port would have set a batch 16x too large)
    with pytest.raises(ConfigError) as err:
        from_dict({**MINIMAL, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 16})
    assert str(err.value).startswith(
        "unknown keys: gradient_accumulation_steps (here optim.grad_accum: micro-batches of data.batch_size per "
        "update, as Hugging Face's); per_device_train_batch_size (here data.batch_size: a micro-batch's examples "
        "over all devices (per device x devices)); the config takes"), str(err.value)
    with pytest.raises(ConfigError, match=r"^grpo.learning_rate: unknown key \(did you mean optim.learning_rate\?\); "
                                          r"grpo takes \['num_generations',"):
        grpo_from_dict({**data, "grpo": {"learning_rate": 1e-5}})
    with pytest.raises(ConfigError, match=r"^stages: expected a list of mappings, each with the keys name, steps, "
                                          r"epochs, got \{'alpha': \{'steps': 2\}\}$"):
        grpo_from_dict({**data, "stages": {"alpha": {"steps": 2}}})


def test_a_grpo_train_section_without_output_dir_writes_to_runs_grpo():
    """The default output folder is GRPO's also when a train section is given (it was SFT's runs/sft: the
    run then wrote into, or was refused by, the SFT run's folder)."""
    from fxjax.grpo_config import grpo_from_dict, load_grpo_config

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    assert grpo_from_dict(data).train.output_dir == "runs/grpo"
    assert grpo_from_dict({**data, "train": {"seed": 3}}).train.output_dir == "runs/grpo"
    assert load_grpo_config(overrides=["model.path=/m", "data.train_files=[a.jsonl]", "train=null"]
                            ).checkpoint_dir == Path("runs/grpo/checkpoints")
    assert from_dict({**MINIMAL, "train": {"steps": 3}}).train.output_dir == "runs/sft"



@pytest.mark.parametrize("train, message", [
    ({"loss_chunk": 0}, "train.loss_chunk: must be"),
    ({"log_every": -3}, "train.log_every: must be"),
    ({"steps": 5}, r"train.steps: with grpo.schedule=stages the steps are the stages' \(a stage takes steps or epochs"),
    ({"epochs": 1}, r"train.epochs: with grpo.schedule=stages .*; set train.epochs=null"),  # (it named train.steps)
    ({"steps": -5, "schedule": "continuous"}, "train.steps: must be"),
    ({"steps": 100, "epochs": 3, "schedule": "continuous"}, "train.epochs: grpo.schedule=continuous runs train.steps"),
])
def test_grpo_checks_the_train_section_naming_the_key(train, message):
    """The GRPO config's train section (whose steps come from the stages) is checked as SFT's is: a zero
    loss_chunk or a negative T was accepted and failed later without a key, epochs was silently ignored."""
    from fxjax.grpo_config import grpo_from_dict

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    schedule = train.pop("schedule", "stages")
    with pytest.raises(ConfigError, match=message):
        grpo_from_dict({**data, "train": train, "grpo": {"schedule": schedule}})
    assert grpo_from_dict({**data, "train": {"steps": 7}, "grpo": {"schedule": "continuous"}}).total_steps == 7


@pytest.mark.parametrize("stage, message", [
    ({"name": "alpha"}, r"stages\[0\]: give exactly one of steps .* and epochs"),
    ({"name": "alpha", "steps": 3, "epochs": 1}, r"stages\[0\]: give exactly one of steps"),
    ({"name": "alpha", "epochs": 0}, r"stages\[0\].epochs: must be positive"),
    ({"name": "alpha", "epochs": float("inf")}, r"stages\[0\].epochs: must be positive and finite"),
    ({"name": "alpha", "steps": 0}, r"stages\[0\].steps: must be"),
])
def test_a_grpo_stage_gives_steps_or_epochs(stage, message):
    """A stage runs for `steps` sampling steps or `epochs` passes over the training records (the paper: one
    epoch a stage), never both; a stage with neither was given 100 steps silently."""
    from fxjax.grpo_config import grpo_from_dict

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    with pytest.raises(ConfigError, match=message):
        grpo_from_dict({**data, "stages": [stage]})


def test_grpo_stages_in_epochs_become_whole_steps_over_the_records():
    """Epochs round up to whole steps of data.batch_size prompts (as SFT's train.epochs); stages given in
    steps keep them; nothing counts steps before the epochs are resolved."""
    from fxjax.grpo_config import grpo_from_dict

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    cfg = grpo_from_dict({**data, "data": {**data["data"], "batch_size": 4},
                          "stages": [{"name": "alpha", "epochs": 1}, {"name": "beta", "steps": 5},
                                     {"name": "gamma", "epochs": 0.5}]})
    with pytest.raises(ValueError, match=r"stages \['alpha', 'gamma'\] are given in epochs"):
        cfg.total_steps
    resolved = cfg.with_stage_steps(records=10)  # 10 / 4 -> 3 steps; 5 / 4 -> 2
    assert [(s.name, s.steps, s.epochs) for s in resolved.stages] == [("alpha", 3, None), ("beta", 5, None),
                                                                      ("gamma", 2, None)]
    assert resolved.total_steps == 10 and resolved.stage_at(2)[1].name == "alpha"
    assert resolved.stage_at(3)[1].name == "beta" and resolved.stage_at(8)[1].name == "gamma"
    assert cfg.stages[0].epochs == 1  # the config as given is unchanged (what a checkpoint records)
    steps_only = grpo_from_dict({**data, "stages": [{"name": "alpha", "steps": 7}]})
    assert steps_only.with_stage_steps(records=10) is steps_only and steps_only.total_steps == 7


def test_epochs_round_up_to_whole_steps_exactly_for_sft_and_grpo():
    """1.1 epochs of 100 records at 1 a step are 110 steps (the float product 110.00000000000001 rounded up
    to 111), 0.07 of 100 are 7 (not 8); SFT counts data.batch_size x grad_accum a step, a GRPO stage
    data.batch_size prompts."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.sft import total_steps

    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    grpo = grpo_from_dict({**data, "data": {**data["data"], "batch_size": 1},
                           "stages": [{"name": "alpha", "epochs": 1.1}, {"name": "beta", "epochs": 0.07}]})
    assert [s.steps for s in grpo.with_stage_steps(100).stages] == [110, 7]
    sft = from_dict({**data, "data": {**data["data"], "batch_size": 2}, "optim": {"grad_accum": 5},
                     "train": {"epochs": 1.1}})
    assert total_steps(sft, 1000) == 110 and total_steps(dataclasses.replace(
        sft, train=dataclasses.replace(sft.train, epochs=0.0001)), 1000) == 1


def test_the_image_size_limit_reaches_the_data_pipeline():
    """data.max_image_pixels (the decompression-bomb limit) is a config key, passed to SFT's and GRPO's
    DataConfig (it was fixed at PIL's 89.5M pixels), and must be positive."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.grpo import data_config as grpo_data_config
    from fxjax.train.sft import data_config

    from fxjax.config_sections import DataSection
    from fxjax.data.images import DEFAULT_MAX_IMAGE_PIXELS

    assert DataSection().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS  # the config's default is the pipeline's
    cfg = from_dict({**MINIMAL, "data": {**MINIMAL["data"], "max_image_pixels": 200_000_000}})
    assert data_config(cfg).max_image_pixels == 200_000_000
    grpo = grpo_from_dict({**MINIMAL, "data": {**MINIMAL["data"], "max_image_pixels": 1000},
                           "train": {"steps": None}})
    assert grpo_data_config(grpo).max_image_pixels == 1000
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        from_dict({**MINIMAL, "data": {**MINIMAL["data"], "max_image_pixels": 0}})


def test_every_data_setting_reaches_the_pipeline_with_the_pipelines_default():
    """The run config's data section and the pipeline's DataConfig were two hand-kept copies (19 fields,
    copied one by one into the pipeline): each setting of the section is a DataConfig field of the same
    name and default, and a changed value arrives."""
    import dataclasses

    from fxjax.config_sections import DataSection
    from fxjax.data.config import DataConfig
    from fxjax.train.sft import data_config

    pipeline = {f.name: f for f in dataclasses.fields(DataConfig)}
    for f in dataclasses.fields(DataSection):
        if f.name in DataSection.RUN_ONLY:
            continue
        assert f.name in pipeline, f"data.{f.name} is not a DataConfig field"
        assert f.default == pipeline[f.name].default, (f.name, f.default, pipeline[f.name].default)
    changed = {"root": "/imgs", "long_samples": "drop", "prompts": "templates", "user_prompt": "Real?",
               "read_threads": 5, "max_length": 128, "length_buckets": [64, 128], "min_pixels": 4000,
               "max_pixels": 5000}
    cfg = from_dict({**MINIMAL, "data": {**MINIMAL["data"], **changed}})
    built = data_config(cfg)
    assert {k: getattr(built, k) for k in changed} == {**changed, "length_buckets": (64, 128)}


def test_the_mesh_section_is_the_mesh_config_it_names():
    """sft and grpo built the mesh from the section's sizes by position: every size of the section, by
    name, and nothing else (allow_replicated_batch and gather_for_decoding are the run's, not the mesh's)."""
    import dataclasses

    from fxjax.config_sections import MeshSection
    from fxjax.device_mesh import MeshConfig

    section = MeshSection(data=2, fsdp=-1, tensor=2, dcn_data=2, dcn_fsdp=1)
    assert MeshConfig(**section.axes()) == MeshConfig(data=2, fsdp=-1, tensor=2, dcn_data=2, dcn_fsdp=1)
    assert set(section.axes()) == {f.name for f in dataclasses.fields(MeshConfig)}
    assert set(section.axes()) | {"allow_replicated_batch", "gather_for_decoding"} == \
        {f.name for f in dataclasses.fields(MeshSection)}
    assert MeshConfig.data_takes_rest(fsdp=4).resolve(8).shape == (2, 4, 1)
    assert MeshConfig.data_takes_rest(fsdp=-1, tensor=2).resolve(8).shape == (1, 4, 2)


def test_a_section_or_key_given_twice_is_an_error_naming_the_file_and_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a `data:` section appended to a copied config replaced the
    first one whole, silently."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\ndata:\n  train_files: [t.jsonl]\n  tokenizer: tok\n"
                    "train: {steps: 3}\ndata:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid YAML .*'data' is given twice in one mapping "
                                          r"\(lines 2 and 6\)"):
        load_sft_config(path)
    path.write_text("model: {preset: tiny}\ndata: {train_files: [t.jsonl], tokenizer: tok, tokenizer: tok2}\n"
                    "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="'tokenizer' is given twice"):
        load_sft_config(path)


def test_an_export_folder_that_is_the_start_is_refused(tmp_path, monkeypatch):
    """The end-of-run export replaces its folder: one that is the adapter (or model) the run starts from is
    an error naming the key (a GRPO run exporting over its SFT adapter lost it), however the path is spelled."""
    monkeypatch.chdir(tmp_path)
    start = {**MINIMAL, "model": {"path": "base", "adapter": "runs/sft/adapter"}}
    with pytest.raises(ConfigError, match=r"export\.adapter_dir: runs/sft/\./adapter is model\.adapter"):
        from_dict({**start, "export": {"adapter_dir": "runs/sft/./adapter"}})
    with pytest.raises(ConfigError, match=r"export\.merged_dir: .*base is model\.path"):
        from_dict({**start, "export": {"merged_dir": str(tmp_path / "base")}})
    other = from_dict({**start, "export": {"adapter_dir": "runs/grpo/adapter"}})
    assert other.export.adapter_dir == "runs/grpo/adapter"
    # the run's own output folder, its checkpoints or a folder above them (it deleted every checkpoint)
    run = {**start, "train": {**MINIMAL.get("train", {}), "output_dir": "runs/grpo"}}
    with pytest.raises(ConfigError, match=r"export\.adapter_dir: runs/grpo is train\.output_dir \(runs/grpo\)"):
        from_dict({**run, "export": {"adapter_dir": "runs/grpo"}})
    with pytest.raises(ConfigError, match=r"export\.merged_dir: runs holds train\.output_dir"):
        from_dict({**run, "model": {"path": "base"}, "export": {"merged_dir": "runs"}})
    with pytest.raises(ConfigError, match=r"export\.adapter_dir: ckpt is checkpoint\.dir"):
        from_dict({**run, "checkpoint": {"dir": "ckpt"}, "export": {"adapter_dir": "ckpt"}})
    with pytest.raises(ConfigError, match=r"export\.adapter_dir: data holds data\.train_files"):
        from_dict({**run, "data": {**MINIMAL["data"], "train_files": ["data/train.jsonl"]},
                   "export": {"adapter_dir": "data"}})
    # the merged export replaces its folder after the adapter is written: the adapter was lost
    for adapter in ("out", "out/adapter"):
        with pytest.raises(ConfigError, match=r"export\.adapter_dir: out.* is, or is inside, export\.merged_dir"):
            from_dict({**run, "export": {"adapter_dir": adapter, "merged_dir": "out"}})
    both = from_dict({**run, "export": {"adapter_dir": "out/adapter", "merged_dir": "out/merged"}})
    assert both.export.merged_dir == "out/merged"


@pytest.mark.parametrize("key", ["train.output_dir", "checkpoint.dir", "data.train_files", "model.path"])
def test_a_bucket_url_is_refused_naming_the_key(key):
    """gs:// would become a local folder named "gs:" (metrics, exports and checkpoint bookkeeping are local)."""
    section, name = key.split(".")
    value = ["gs://b/t.jsonl"] if name == "train_files" else "gs://b/run"
    data = {**MINIMAL, section: {**(MINIMAL.get(section, {}) if section != "model" else {}), name: value}}
    with pytest.raises(ConfigError, match=rf"{key}: gs://b/\S* is a URL; fxjax reads and writes local paths only"):
        from_dict(data)


def test_cli_reports_a_distributed_setting_that_cannot_work_as_an_error(tmp_path, capsys, monkeypatch):
    """A process id without a process count (every process would run alone): exit 2 and one line naming the
    keys, before any model or data is read (DistributedError is a ValueError for the CLI)."""
    from fxjax.cli import main

    for key in ("FXJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "FXJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES",
                "FXJAX_PROCESS_ID", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")  # (a tokenizer folder holds one: checked first)
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, MINIMAL)
    assert main(["sft", "--config", str(path), "--set", "distributed.process_id=1"]) == 2
    err = capsys.readouterr().err
    assert "fxjax sft: error: process_id (FXJAX_PROCESS_ID) set without num_processes (FXJAX_NUM_PROCESSES)" in err


def test_every_key_of_trls_grpo_config_is_pointed_to_its_place_here_or_said_unsupported():
    """A TRL 1.16 GRPOConfig key of its own (not the Trainer's) in a GRPO config: each is refused saying where it
    goes here or that it is not supported (reward_weights, steps_per_generation, min_p, vllm_*, ... said only
    "unknown key" and listed the sections); read from the installed TRL, so a key a new TRL adds fails here."""
    import transformers
    import trl

    from fxjax.grpo_config import grpo_from_dict

    trainer = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    own = [f.name for f in dataclasses.fields(trl.GRPOConfig) if f.name not in trainer]
    data = {k: dict(v) for k, v in MINIMAL.items() if k != "train"}
    assert len(own) > 50
    bare = []
    for key in own:
        with pytest.raises(ConfigError) as err:
            grpo_from_dict({**data, key: 1})
        if not str(err.value).startswith(f"{key}: unknown key ("):
            bare.append(key)
    assert bare == []
    for key, says in (("reward_weights", "grpo.reward_funcs[i].weight"), ("vllm_mode", "not supported: sampling runs"),
                      ("steps_per_generation", "without off-policy mini-batches"), ("shuffle_dataset", "data.shuffle"),
                      ("save_steps", "here checkpoint.every, in sampling steps")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            grpo_from_dict({**data, key: 1})
    # TRL's reward_funcs are callables or names: a list of names says what a term is here
    with pytest.raises(ConfigError, match=r"grpo.reward_funcs\[0\]: expected a mapping, got 'accuracy_reward': a term "
                                          r"of your own is \{name: ..., function: \"package.module:function\""):
        grpo_from_dict({**data, "grpo": {"reward_funcs": ["accuracy_reward"]}})
    # GRPO logs every step: train.log_every (SFT's interval) was taken and did nothing
    from fxjax.grpo_config import load_grpo_config

    with pytest.raises(ConfigError, match=r"^train.log_every: 10, but GRPO logs every step"):
        load_grpo_config(None, ["train.log_every=10"], base=data)
    assert load_grpo_config(None, ["train.log_every=1"], base=data).train.log_every == 1
    # a run saved with another value (before this check) still loads: its export, eval, detect and resume
    assert grpo_from_dict({**data, "train": {"log_every": 10}}).train.log_every == 10


def test_scale_rewards_takes_trls_booleans_and_nothing_else_that_is_not_a_mode():
    """TRL 1.16's scale_rewards also takes true / false (its "group" / "none"): a TRL config or override loads as
    it means there (it was refused); 1 and 0 stay errors (true is not 1), as does an unknown mode."""
    from fxjax.grpo_config import load_grpo_config

    base = ["model.path=/m", "data.train_files=[a.jsonl]"]
    for given, meant in (("true", "group"), ("false", "none"), ("batch", "batch")):
        assert load_grpo_config(overrides=[*base, f"grpo.scale_rewards={given}"]).grpo.scale_rewards == meant
    for wrong in ("1", "0", "std"):
        with pytest.raises(ConfigError, match="grpo.scale_rewards: must be one of 'group', 'batch', 'none'"):
            load_grpo_config(overrides=[*base, f"grpo.scale_rewards={wrong}"])


def test_grpo_evaluates_at_stage_ends_unless_told_and_sft_has_no_stages():
    """eval.at_stage_ends is GRPO's (on by default, false turns it off; an SFT config refuses the key as
    unknown), a run evaluates for it only with eval files and staged rewards, and a stage named by a number
    is refused (`--step 2` is a step), as is a name two stages share."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.run_setup import evaluates
    from fxjax.train_config import from_dict

    data = {"model": {"preset": "tiny"}, "data": {"tokenizer": "tok", "train_files": ["t.jsonl"]}}
    only_stage_ends = {**data, "data": {**data["data"], "eval_files": ["e.jsonl"]}, "eval": {"at_end": False}}
    assert grpo_from_dict(data).eval.at_stage_ends is True
    assert evaluates(grpo_from_dict(only_stage_ends)) is True
    assert evaluates(grpo_from_dict({**only_stage_ends, "eval": {"at_end": False, "at_stage_ends": False}})) is False
    continuous = {**only_stage_ends, "grpo": {"schedule": "continuous"}, "train": {"steps": 4}}
    assert evaluates(grpo_from_dict(continuous)) is False
    assert evaluates(grpo_from_dict({**data, "eval": {"at_end": False}})) is False  # no eval files
    with pytest.raises(ConfigError, match=r"at_stage_ends"):
        from_dict({**data, "train": {"steps": 1}, "eval": {"at_stage_ends": True}})
    with pytest.raises(ConfigError, match=r"stages\[0\].name: '2' is a number; a stage is named"):
        grpo_from_dict({**data, "stages": [{"name": "2", "steps": 1}]})
    with pytest.raises(ConfigError, match=r"stages\[2\].name: 'alpha' is stages\[0\]'s name too; each stage needs "):
        grpo_from_dict({**data, "stages": [{"name": "alpha", "steps": 1}, {"name": "beta", "steps": 1},
                                           {"name": "alpha", "steps": 1}]})


def test_config_names_a_file_or_a_config_fxjax_ships(tmp_path, monkeypatch):
    """--config sft (or recipes/paper_3b_sft) reads the run config fxjax ships, from any folder (a pip
    install has no configs/ beside the user); a file of that name here wins; a missing file lists the
    shipped names."""
    from fxjax.presets import CONFIG_DIR
    from fxjax.train_config import config_file, shipped_run_configs

    assert set(shipped_run_configs()) == {"sft", "grpo", "recipes/paper_3b_sft", "recipes/paper_3b_grpo"}
    monkeypatch.chdir(tmp_path)
    assert config_file("sft") == config_file("sft.yaml") == CONFIG_DIR / "sft.yaml"
    said = []
    cfg = load_sft_config("recipes/paper_3b_sft", overrides=["data.train_files=[t.jsonl]"], log=said.append)
    assert cfg.lora.rank == load_sft_config(CONFIG_DIR / "recipes" / "paper_3b_sft.yaml",
                                            overrides=["data.train_files=[t.jsonl]"]).lora.rank
    assert said[0] == f"note: --config recipes/paper_3b_sft: the config fxjax ships, {CONFIG_DIR / 'recipes' / 'paper_3b_sft.yaml'}"
    (tmp_path / "sft").write_text("train: {steps: 7}\n")  # a file of that name here: the user's
    assert config_file("sft") == Path("sft")
    (tmp_path / "grpo").mkdir()  # a folder of that name is not a config: the shipped one
    assert config_file("grpo") == CONFIG_DIR / "grpo.yaml"
    (tmp_path / "grpo.yaml").write_text("grpo: {}\n")  # the user's own copy, edited: before fxjax's
    assert config_file("grpo") == Path("grpo.yaml")
    # the repository's path of a shipped config, as the README writes it, where no configs/ folder is (pip install)
    assert config_file("configs/recipes/paper_3b_sft.yaml") == CONFIG_DIR / "recipes" / "paper_3b_sft.yaml"
    with pytest.raises(ConfigError, match=rf"config file configs/sfft.yaml not found \(from {tmp_path}\); or name one "
                                          r"that fxjax ships: --config grpo, --config recipes/paper_3b_grpo, "):
        config_file("configs/sfft.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft.yaml").write_text("train: {steps: 3}\n")  # a configs/ of the user's: theirs
    assert config_file("configs/sft.yaml") == Path("configs/sft.yaml")


def test_a_config_built_in_code_is_checked_as_a_yaml_one_is(tmp_path):
    """run_sft / run_grpo take configs built in code (`checked_config`): a negative learning rate trained as
    gradient ascent, a list of stages reached the checkpoint's JSON only after training (not serialisable,
    blamed on the disk), a Path where a text belongs was refused by nothing; now each is converted or named
    before the run starts, as from a YAML file."""
    from fxjax.config_mapping import checked_config
    from fxjax.config_sections import DataSection, ModelSection, OptimSection, TrainSection
    from fxjax.grpo_config import GRPOConfig, StageSection
    from fxjax.train.sft import run_sft
    from fxjax.train_config import SFTConfig

    data = DataSection(train_files=("t.jsonl",), tokenizer="tok")
    good = SFTConfig(model=ModelSection(preset="tiny"), data=data, train=TrainSection(steps=3, output_dir=tmp_path))
    checked = checked_config(good, SFTConfig, "run_sft", "from_dict")
    assert checked.train.output_dir == str(tmp_path) and checked.data == data
    staged = checked_config(GRPOConfig(model=ModelSection(preset="tiny"), data=data,
                                       stages=[StageSection("alpha", 2), StageSection("beta", 1)]),
                            GRPOConfig, "run_grpo", "grpo_from_dict")
    assert staged.stages == (StageSection("alpha", 2), StageSection("beta", 1))
    bad = SFTConfig(model=ModelSection(preset="tiny"), data=data, optim=OptimSection(learning_rate=-1.0),
                    train=TrainSection(steps=3, output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"optim.learning_rate: must be a positive number, got -1.0"):
        run_sft(bad)
    assert not (tmp_path / "run").exists()  # (refused before the run made its folders)
    with pytest.raises(ConfigError, match=r"model.dtype"):
        checked_config(SFTConfig(model=ModelSection(preset="tiny", dtype="fp32"), data=data,
                                 train=TrainSection(steps=1)), SFTConfig, "run_sft", "from_dict")
    with pytest.raises(ConfigError, match=r"data.train_files"):
        checked_config(SFTConfig(model=ModelSection(preset="tiny"), data=DataSection(train_files="t.jsonl"),
                                 train=TrainSection(steps=1)), SFTConfig, "run_sft", "from_dict")


def test_run_sft_and_run_grpo_refuse_a_config_of_the_other_phase_and_code_built_ones_are_checked_as_files(
        monkeypatch, tmp_path):
    """run_sft trained SFT on a GRPOConfig (and recorded the run as GRPO's), run_grpo failed late with an
    AttributeError on an SFTConfig and a TypeError on a dict; a config built in code kept `~/runs` as a folder
    named "~", and run_grpo took a train.log_every GRPO ignores. Each is refused (or expanded) first."""
    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.grpo import run_grpo
    from fxjax.train.sft import run_sft
    from fxjax.train_config import from_dict

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plain = {"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"},
             "train": {"output_dir": "~/runs/x", "steps": 1}}
    sft = from_dict(plain)
    grpo = grpo_from_dict({**plain, "train": {"output_dir": "~/runs/x"}})  # (GRPO's steps: its stages')
    assert sft.train.output_dir == grpo.train.output_dir == str(tmp_path / "home" / "runs" / "x")
    with pytest.raises(TypeError, match=r"run_sft takes an SFTConfig, got a GRPOConfig: build one with "
                                        r"fxjax.train_config.from_dict"):
        run_sft(grpo)
    with pytest.raises(TypeError, match=r"run_grpo takes a GRPOConfig, got an? SFTConfig: build one with "
                                        r"fxjax.grpo_config.grpo_from_dict"):
        run_grpo(sft)
    with pytest.raises(TypeError, match=r"run_grpo takes a GRPOConfig, got a dict"):
        run_grpo(plain)
    with pytest.raises(ConfigError, match=r"train.log_every: 5, but GRPO logs every step"):
        run_grpo(dataclasses.replace(grpo, train=dataclasses.replace(grpo.train, log_every=5)))
    # a config built from dataclasses: its ~ expanded by run_sft's check too (refused later, for its data)
    from fxjax.config_mapping import checked_config
    from fxjax.train_config import SFTConfig

    built = dataclasses.replace(sft, train=dataclasses.replace(sft.train, output_dir="~/y"))
    assert checked_config(built, SFTConfig, "run_sft", "from_dict").train.output_dir == str(tmp_path / "home" / "y")
    assert not (tmp_path / "~").exists() and not list(tmp_path.glob("**/~"))


def test_a_leading_tilde_of_a_path_is_the_home_folder(monkeypatch, tmp_path):
    """`output_dir: ~/runs` (or `--set train.output_dir=~/x`, which the shell leaves as it is) made a folder
    named "~" in the working folder; every key that names a file or folder now expands it, as a shell would."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_sft_config(overrides=["model.preset=tiny", "data.train_files=[~/t.jsonl, b.jsonl]", "data.tokenizer=~/tok",
                                     "train.output_dir=~/runs/x", "train.steps=1", "export.adapter_dir=~user-x/a",
                                     "data.system_prompt=~/not a path"])
    assert (cfg.train.output_dir, cfg.data.tokenizer) == (str(tmp_path / "runs" / "x"), str(tmp_path / "tok"))
    assert cfg.data.train_files == (str(tmp_path / "t.jsonl"), "b.jsonl")
    assert cfg.export.adapter_dir == "~user-x/a"  # (no such user: left as written, as a shell leaves it)
    assert cfg.data.system_prompt == "~/not a path"  # (a text, not a path: as written)


def test_replace_merges_a_mapping_into_its_section():
    """`cfg.replace(train={"steps": 5})` changes train.steps and keeps train's other keys (it replaced the whole
    section with the dict: run_sft then ran with every other train key at its default, output_dir too)."""
    import dataclasses

    from fxjax.train_config import from_dict

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"},
                     "train": {"output_dir": "runs/mine", "steps": 3}})
    new = cfg.replace(train={"steps": 5}, optim={"learning_rate": 1e-3})
    assert (new.train.steps, new.train.output_dir, new.optim.learning_rate) == (5, "runs/mine", 1e-3)
    assert new.optim.warmup_ratio == cfg.optim.warmup_ratio and cfg.train.steps == 3
    assert cfg.replace(train=dataclasses.replace(cfg.train, steps=7)).train.steps == 7  # (a section, as before)
    with pytest.raises(TypeError, match="stepz"):
        cfg.replace(train={"stepz": 5})
