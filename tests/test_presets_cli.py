"""Model presets, random init exported in HF layout, and the command line."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import rel_err
from fxjax.cli import main
from fxjax.model_init import abstract_parameter_counts, init_model
from fxjax.presets import PresetError, config_from_yaml_dict, load_preset, preset_names


def test_presets_match_published_sizes():
    assert {"tiny", "3b", "7b", "32b", "72b"} <= set(preset_names())
    # Totals of the published Qwen2.5-VL checkpoints (3B ties its embeddings).
    assert abstract_parameter_counts(load_preset("3b"))["total"] == 3_754_622_976
    assert abstract_parameter_counts(load_preset("7b"))["total"] == 8_292_166_656
    assert load_preset("32b").text.num_hidden_layers == 64
    assert load_preset("72b").text.hidden_size == 8192


def test_params_key_draws_what_flax_draws_and_advances_the_stream():
    """model.layers.params_key replaces rngs.params() in every init (flax's in-place count update asks a
    tracer for its sharding: seconds per model under eval_shape): same keys, same count, also under jit."""
    import jax
    from flax import nnx

    from fxjax.model.layers import params_key

    ours, theirs = nnx.Rngs(7), nnx.Rngs(7)
    for _ in range(3):
        assert np.array_equal(jax.random.key_data(params_key(ours)), jax.random.key_data(theirs.params()))
    assert int(ours.params.count[...]) == int(theirs.params.count[...]) == 3

    @jax.jit
    def two_draws():  # the stream is created, drawn from and advanced inside the trace, as under eval_shape
        rngs = nnx.Rngs(3)
        return jax.random.key_data(params_key(rngs)), jax.random.key_data(rngs.params())

    a, b = two_draws()
    reference = nnx.Rngs(3)
    assert np.array_equal(a, jax.random.key_data(reference.params()))
    assert np.array_equal(b, jax.random.key_data(reference.params()))


def test_preset_errors_name_the_key():
    with pytest.raises(PresetError, match=r"^x\.yaml: text\.hidden: unknown key; text takes \['vocab_size'"):
        config_from_yaml_dict({"text": {"hidden": 3}}, "x.yaml")
    # every value has its field's type: YAML reads 1e-6 (no dot) as a string, which went into the model (its
    # forward failed) and into config.json; a scalar eos_token_id failed in `fxjax info` with a TypeError
    assert config_from_yaml_dict({"text": {"rms_norm_eps": "1e-6"}}, "x.yaml").text.rms_norm_eps == 1e-6
    with pytest.raises(PresetError, match=r"^x\.yaml: eos_token_id: expected a list of integers, got 151645$"):
        config_from_yaml_dict({"eos_token_id": 151645}, "x.yaml")
    with pytest.raises(PresetError, match=r"^x\.yaml: vision\.depth: expected an integer, got '2'$"):
        config_from_yaml_dict({"vision": {"depth": "2"}}, "x.yaml")
    with pytest.raises(PresetError, match="not found"):
        load_preset("no-such-preset")


def test_an_empty_preset_file_is_refused_not_read_as_every_default(tmp_path):
    """(An empty preset YAML gave the model config's defaults: `fxjax info empty.yaml` described an 8.3B model
    and `--preset empty.yaml` would have built one.)"""
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(PresetError, match=r"empty.yaml: a model preset is a mapping .*, got an empty file"):
        load_preset(tmp_path / "empty.yaml")
    with pytest.raises(PresetError, match=r"list.yaml: a model preset is a mapping .*, got list"):
        load_preset(tmp_path / "list.yaml")


def test_random_init_exports_a_checkpoint_transformers_loads(tmp_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import fxjax

    model = init_model("tiny", seed=3)
    fxjax.save_pretrained(model, tmp_path / "hf")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = np.random.RandomState(0).randint(0, 151000, size=(1, 9))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(model(ids), ref) <= 1e-5


def test_cli_help_info_and_init(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "selfcheck" in capsys.readouterr().out
    assert main(["info", "7b"]) == 0
    assert "8,292,166,656" in capsys.readouterr().out
    assert main(["info"]) == 0  # (what `init --preset` and `--config NAME` take: only an error said them)
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "model presets (init --preset, model.preset):" and "  7b       8,292,166,656 parameters" in listing
    assert listing[-4:] == ["  grpo", "  recipes/paper_3b_grpo", "  recipes/paper_3b_sft", "  sft"], listing
    # a listed run config by its name: the file, as --config reads it (it said "does not exist and is not a
    # preset"); a dataset file given instead: pointed to data check (it said "invalid YAML")
    from fxjax.presets import CONFIG_DIR

    assert main(["info", "recipes/paper_3b_sft"]) == 0
    shown = capsys.readouterr().out
    assert shown == (f"run config recipes/paper_3b_sft: {CONFIG_DIR / 'recipes' / 'paper_3b_sft.yaml'}\n\n"
                     + (CONFIG_DIR / "recipes" / "paper_3b_sft.yaml").read_text())
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "label": "real"}\n')
    assert main(["info", str(tmp_path / "train.jsonl")]) == 2
    assert (f"{tmp_path / 'train.jsonl'} is a dataset file, not a model, preset or run: `fxjax data check "
            f"{tmp_path / 'train.jsonl'}` describes its records") in capsys.readouterr().err
    import json

    import yaml

    from fxjax.presets import PRESET_DIR

    (tmp_path / "tiny.json").write_text(json.dumps(yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())))
    assert main(["info", str(tmp_path / "tiny.json")]) == 0  # (a preset in JSON, which is YAML: not a dataset)
    assert "parameters" in capsys.readouterr().out
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["init", str(out), "--preset", "tiny"]) == 2  # refuses a non-empty directory
    assert f"fxjax init: error: {out} is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["init", str(out), "--preset", "tiny", "--overwrite"]) == 0
    assert (out / "model.safetensors.index.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert main(["info", str(out)]) == 0
    capsys.readouterr()
    # a preset too small for the tokenizer: refused before anything is written (it wrote the model, then
    # exited 1 without "error:", leaving a folder a retry needed --overwrite for)
    from fxjax.presets import PRESET_DIR

    small = tmp_path / "small.yaml"
    text = (PRESET_DIR / "tiny.yaml").read_text()
    small.write_text(re.sub(r"vocab_size: \d+", "vocab_size: 1000", text, count=1))
    assert main(["init", str(tmp_path / "sm"), "--preset", str(small)]) == 2
    assert capsys.readouterr().err == (f"fxjax init: error: --preset {small} has vocab_size 1000, fewer than the "
                                       f"Qwen2.5-VL tokenizer's 151671 ids; pass --no-tokenizer\n")
    assert not (tmp_path / "sm").exists()
    for missing in ("/nonexistent/path", "missing-preset", "./3b"):
        assert main(["info", missing]) == 2
        assert capsys.readouterr().err == (
            f"fxjax info: error: {missing} does not exist and is not a preset; give an HF checkpoint directory, "
            f"a preset YAML or a preset name (tiny, 3b, 7b, 32b, 72b)\n")


def test_preset_paths_that_do_not_exist_say_so():
    with pytest.raises(PresetError, match=r"^/nonexistent/tiny\.yaml does not exist; presets: tiny, 3b, 7b, 32b, "
                                          r"72b \(or the path of a preset YAML\)$"):
        load_preset("/nonexistent/tiny.yaml")
    with pytest.raises(PresetError, match=r"^model preset 'huge' not found; presets: tiny, 3b"):
        load_preset("huge")


def test_init_model_stores_weights_in_param_dtype():
    """param_dtype is the weights' storage dtype (the Python API's; default: dtype): bfloat16 storage under
    float32 compute halves the weights' memory, and was silently float32 if dropped."""
    import jax.numpy as jnp
    from flax import nnx

    from fxjax.model_init import init_model

    for dtype, param_dtype, want in (("float32", "bfloat16", jnp.bfloat16), ("bfloat16", None, jnp.bfloat16),
                                     ("float32", None, jnp.float32)):
        model = init_model("tiny", dtype=dtype, param_dtype=param_dtype)
        kinds = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert kinds == {jnp.dtype(want)}, (dtype, param_dtype, kinds)
