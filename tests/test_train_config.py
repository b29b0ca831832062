"""The SFT config: YAML -> typed frozen dataclasses; unknown keys and wrong types name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fxjax.train_config import ConfigError, SFTConfig, apply_overrides, from_dict, load_sft_config

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"},
           "train": {"steps": 10}}


def test_the_shipped_config_loads_and_is_frozen():
    cfg = load_sft_config(REPO / "configs" / "sft.yaml")
    assert isinstance(cfg, SFTConfig)
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 32.0 and cfg.lora.target_modules == "all-linear"
    assert cfg.optim.grad_accum == 16 and cfg.optim.warmup_ratio == 0.05 and cfg.train.epochs == 3
    assert cfg.data.train_files == ("data/train.jsonl",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0  # type: ignore[misc]
    assert from_dict(cfg.to_dict()) == cfg  # the resolved dict (what checkpoints record) round-trips


@pytest.mark.parametrize("patch, message", [
    ({"optim": {"learnin_rate": 1e-4}}, "optim.learnin_rate: unknown key"),
    ({"trainer": {}}, "trainer: unknown key"),
    ({"optim": {"learning_rate": "fast"}}, "optim.learning_rate: expected a number, got 'fast'"),
    ({"train": {"steps": 2.5}}, "train.steps: expected an integer"),
    ({"lora": {"use_rslora": "yes"}}, "lora.use_rslora: expected true or false"),
    ({"data": {"train_files": "a.jsonl"}}, "data.train_files: expected a list of strings"),
    ({"data": {"length_buckets": [64, "x"]}}, "data.length_buckets[1]: expected an integer"),
    ({"train": {"on_nonfinite": "ignore"}}, "train.on_nonfinite: must be one of 'stop', 'skip'"),
    ({"model": {"remat": "sometimes"}}, "model.remat: must be one of"),
    ({"model": {"preset": "tiny", "path": "x"}}, "set exactly one of model.path"),
    ({"train": {"steps": 5, "epochs": 1}}, "set exactly one of train.steps and train.epochs"),
    ({"optim": {"learning_rate": -1}}, "optim.learning_rate: must be a positive number"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout: must be in [0, 1)"),
    ({"mesh": 4}, "mesh: expected a mapping"),
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
