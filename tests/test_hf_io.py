"""Import/export of HF Qwen2.5-VL checkpoints: config layouts, tensor namings, shards, dtypes, tied
embeddings, export back to transformers, and clear errors. The oracle is transformers itself."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (build_hf_model, hf_logits, image_prompt, load_hf_model, rel_err, save_hf_model)
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

import fxjax
from fxjax.hf_checkpoint import CheckpointError, abstract_model, load_weights, weight_files
from fxjax.hf_config import HFConfigError, config_from_dict, load_config

TOL = 1e-5


# ---- helpers ---------------------------------------------------------------------------------------

def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory by name (single file or sharded with index)."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for file in files:
        with safe_open(str(directory / file), framework="numpy") as f:
            for name in f.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = f.get_tensor(name)
    return out


def rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint directory, passing its tensors through edit(dict) -> dict; writes one file."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.suffix == ".json" and file.name != "model.safetensors.index.json":
            shutil.copy(file, dst / file.name)
    save_file(edit(read_tensors(src)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def transformers_452_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hub names -> transformers 4.52-4.x module names (model.visual.*, model.language_model.*)."""
    def rename(name: str) -> str:
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return name
    return {rename(k): v for k, v in tensors.items()}


def hub_flat_config(nested: dict) -> dict:
    """The transformers 5.x nested config.json rewritten in the flat layout of Hub releases."""
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    flat = {k: v for k, v in nested.items() if k not in ("text_config", "vision_config", "dtype", "transformers_version")}
    flat.update(text)
    flat.update(model_type="qwen2_5_vl", torch_dtype=nested.get("dtype", "float32"), transformers_version="4.41.2",
                rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    vision = {k: v for k, v in nested["vision_config"].items() if k not in ("rope_parameters", "initializer_range")}
    vision["model_type"] = "qwen2_5_vl"
    vision["in_chans"] = vision.pop("in_channels")
    vision["spatial_patch_size"] = vision["patch_size"]
    flat["vision_config"] = vision
    assert "text_config" not in flat and "rope_parameters" not in flat
    return flat


def fx_logits(model, prompt) -> np.ndarray:
    ids, pv, grid = prompt
    return np.asarray(model(ids, pixel_values=pv, image_grid_thw=grid))


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name  # bit for bit


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt():
    ids, pv, grid = image_prompt([(1, 6, 10), (1, 4, 6)], np.random.RandomState(0))
    return ids[None], pv, grid


@pytest.fixture(scope="module")
def hf_ref(tiny_checkpoint, prompt):
    """(HF model loaded from the tiny checkpoint, its logits on `prompt`)."""
    hf = load_hf_model(tiny_checkpoint)
    return hf, hf_logits(hf, prompt[0], None, prompt[1], prompt[2])


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint saved by HF in bfloat16, single file."""
    hf = load_hf_model(tiny_checkpoint).to(torch.bfloat16)
    return save_hf_model(hf, tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def transformers_named(tiny_checkpoint, tmp_path_factory) -> Path:
    return rewrite_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("tnames"), transformers_452_names)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory) -> Path:
    return save_hf_model(build_hf_model(seed=3, tie=True), tmp_path_factory.mktemp("tied"))


# ---- config.json layouts ---------------------------------------------------------------------------

def test_config_nested_and_flat_layouts(tiny_checkpoint, tmp_path, prompt):
    # text rope_theta lowered to 100 in both files so that the M-RoPE sections visibly move the logits
    nested = json.loads((tiny_checkpoint / "config.json").read_text())
    assert "text_config" in nested  # what transformers 5.x writes
    nested["text_config"]["rope_parameters"]["rope_theta"] = 100.0
    nested_dir, flat_dir = tmp_path / "nested", tmp_path / "flat"
    for directory, raw in ((nested_dir, nested), (flat_dir, hub_flat_config(nested))):
        shutil.copytree(tiny_checkpoint, directory)
        (directory / "config.json").write_text(json.dumps(raw, indent=2))
    assert json.loads((flat_dir / "config.json").read_text())["rope_scaling"] == {
        "type": "mrope", "mrope_section": [2, 1, 1]}

    cfg_nested, _ = load_config(nested_dir)
    cfg_flat, _ = load_config(flat_dir)
    assert cfg_nested == cfg_flat
    assert cfg_flat.text.mrope_section == (2, 1, 1) and cfg_flat.text.rope_theta == 100.0
    assert cfg_flat.vision.window_size == 56 and cfg_flat.vision.fullatt_block_indexes == (1,)
    assert (cfg_flat.image_token_id, cfg_flat.vision_start_token_id, cfg_flat.text.vocab_size) == (100, 102, 128)
    assert (cfg_flat.bos_token_id, cfg_flat.eos_token_id, cfg_flat.pad_token_id) == (1, (2,), 0)

    # HF reads the flat file as the nested one (so it is a faithful Hub layout) ...
    hf_nested, hf_flat = load_hf_model(nested_dir), load_hf_model(flat_dir)
    assert hf_flat.config.text_config.rope_parameters["mrope_section"] == [2, 1, 1]
    assert hf_flat.config.text_config.rope_parameters["rope_theta"] == 100.0
    ref = hf_logits(hf_nested, prompt[0], None, prompt[1], prompt[2])
    assert rel_err(hf_logits(hf_flat, prompt[0], None, prompt[1], prompt[2]), ref) <= 1e-6
    # ... and fxjax gives HF's logits from either file
    for directory in (nested_dir, flat_dir):
        assert rel_err(fx_logits(fxjax.from_pretrained(directory, dtype="float32"), prompt), ref) <= TOL


def test_real_hub_configs_parse():
    """Field values of the released flat configs (7B untied, 3B tied) come through."""
    common_vision = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                         in_chans=3, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2)
    common = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], attention_dropout=0.0,
                  bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
                  vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655, video_token_id=151656,
                  hidden_act="silu", initializer_range=0.02, max_position_embeddings=128000, model_type="qwen2_5_vl",
                  rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, torch_dtype="bfloat16",
                  transformers_version="4.41.2", use_cache=True, use_sliding_window=False,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    raw7 = dict(common, hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28,
                num_key_value_heads=4, max_window_layers=28, tie_word_embeddings=False, vocab_size=152064,
                vision_config=dict(common_vision, out_hidden_size=3584))
    cfg = config_from_dict(raw7)
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.num_attention_heads,
            cfg.text.num_key_value_heads, cfg.text.head_dim, cfg.text.vocab_size) == (3584, 28, 28, 4, 128, 152064)
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6
    assert cfg.vision.fullatt_block_indexes == (7, 15, 23, 31) and cfg.vision.window_merged_side == 4
    assert cfg.vision.out_hidden_size == 3584 and not cfg.tie_word_embeddings
    assert cfg.eos_token_id == (151645,) and cfg.image_token_id == 151655

    raw3 = dict(common, hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_hidden_layers=36,
                num_key_value_heads=2, max_window_layers=70, tie_word_embeddings=True, vocab_size=151936,
                vision_config=dict(common_vision, out_hidden_size=2048))
    cfg3 = config_from_dict(raw3)
    assert cfg3.tie_word_embeddings and cfg3.text.num_hidden_layers == 36 and cfg3.text.vocab_size == 151936
    # a config.json without rms_norm_eps: transformers' default (1e-5), not the released models' 1e-6
    from transformers import Qwen2_5_VLConfig

    bare = {k: v for k, v in raw7.items() if k != "rms_norm_eps"}
    assert config_from_dict(bare).text.rms_norm_eps == Qwen2_5_VLConfig.from_dict(bare).text_config.rms_norm_eps

    def as_hf(raw):
        text = Qwen2_5_VLConfig.from_dict(raw).text_config
        return tuple(text.rope_parameters["mrope_section"]), text.rope_parameters["rope_theta"], text.rms_norm_eps

    def as_fxjax(raw):
        text = config_from_dict(raw).text
        return text.mrope_section, text.rope_theta, text.rms_norm_eps

    # both rope keys, disagreeing: transformers takes rope_scaling (and the top-level theta)
    both = dict(raw7, rope_parameters={"rope_type": "default", "mrope_section": [24, 24, 16], "rope_theta": 5e5})
    # a text_config: transformers reads the text model from it alone, not from stale top-level keys
    nested = dict(raw7, text_config={k: raw7[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                          "num_hidden_layers", "num_key_value_heads", "vocab_size")}
                  | {"rope_parameters": {"rope_type": "default", "mrope_section": [24, 24, 16], "rope_theta": 5e5}},
                  rms_norm_eps=1e-3)
    for raw in (both, nested):
        assert as_fxjax(raw) == as_hf(raw)
    assert as_fxjax(both) == ((16, 24, 24), 1e6, 1e-6) and as_fxjax(nested) == ((24, 24, 16), 5e5, 1e-5)
    # tied in text_config only (transformers 5 may write it there alone): tied, as transformers reads it
    tied = dict(nested, text_config=dict(nested["text_config"], tie_word_embeddings=True))
    tied.pop("tie_word_embeddings")
    assert config_from_dict(tied).tie_word_embeddings and Qwen2_5_VLConfig.from_dict(tied).tie_word_embeddings


# ---- tensor naming, shards, dtypes on disk ---------------------------------------------------------

def test_hub_and_transformers_tensor_names(tiny_checkpoint, transformers_named, hf_ref, prompt):
    hub_names = set(read_tensors(tiny_checkpoint))
    assert "visual.patch_embed.proj.weight" in hub_names and "model.layers.0.self_attn.q_proj.bias" in hub_names
    old_names = set(read_tensors(transformers_named))
    assert "model.visual.patch_embed.proj.weight" in old_names and "lm_head.weight" in old_names
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in old_names
    assert not any(n.startswith("visual.") or n.startswith("model.layers.") for n in old_names)

    _, ref = hf_ref
    model = fxjax.from_pretrained(transformers_named, dtype="float32")
    assert model.hf_source.naming == "transformers"
    assert rel_err(fx_logits(model, prompt), ref) <= TOL
    # the renamed file is a valid checkpoint for transformers too
    assert rel_err(hf_logits(load_hf_model(transformers_named), prompt[0], None, prompt[1], prompt[2]), ref) <= 1e-6


@pytest.mark.parametrize("disk_dtype,shard", [("float32", "20KB"), ("bfloat16", None), ("bfloat16", "20KB")])
def test_sharded_and_bf16_checkpoints(tiny_checkpoint, tmp_path, prompt, hf_ref, disk_dtype, shard):
    hf = load_hf_model(tiny_checkpoint).to(getattr(torch, disk_dtype))
    directory = save_hf_model(hf, tmp_path / "ckpt", **({"max_shard_size": shard} if shard else {}))
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if shard:
        assert (directory / "model.safetensors.index.json").exists() and len(shards) > 1
    else:
        assert shards == ["model.safetensors"]
    tensors = read_tensors(directory)
    assert {str(t.dtype) for t in tensors.values()} == {disk_dtype}

    # reference: the HF model with these (possibly bf16-rounded) weights, upcast to float32
    ref_model = load_hf_model(directory, dtype="float32")
    ref = hf_logits(ref_model, prompt[0], None, prompt[1], prompt[2])
    model = fxjax.from_pretrained(directory, dtype="float32")
    assert model.hf_source.dtype == disk_dtype
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype("float32")}
    np.testing.assert_array_equal(np.asarray(model.decoder.norm.weight[...]),
                                  tensors["model.norm.weight"].astype(np.float32))
    assert rel_err(fx_logits(model, prompt), ref) <= TOL
    if disk_dtype == "bfloat16":
        assert rel_err(ref, hf_ref[1]) > TOL  # the bf16 rounding is visible, so the check above means something
    if disk_dtype == "bfloat16" and shard is None:  # one float32 tensor among bfloat16 ones: float32 holds both
        import safetensors.torch as st

        mixed = st.load_file(str(directory / "model.safetensors"))
        last = sorted(mixed)[-1]
        st.save_file(mixed | {last: mixed[last].float()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
        assert fxjax.from_pretrained(directory, dtype="float32").hf_source.dtype == "float32"


def test_tied_embeddings_checkpoint(tied_checkpoint, tmp_path, prompt):
    names = set(read_tensors(tied_checkpoint))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    hf = load_hf_model(tied_checkpoint)
    ref = hf_logits(hf, prompt[0], None, prompt[1], prompt[2])
    model = fxjax.from_pretrained(tied_checkpoint, dtype="float32")
    assert model.config.tie_word_embeddings and model.lm_head is None
    assert rel_err(fx_logits(model, prompt), ref) <= TOL

    out = fxjax.save_pretrained(model, tmp_path / "export")
    assert "lm_head.weight" not in read_tensors(out)
    assert_same_tensors(read_tensors(out), read_tensors(tied_checkpoint))
    back, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.config.tie_word_embeddings
    assert np.array_equal(hf_logits(back.eval(), prompt[0], None, prompt[1], prompt[2]), ref)


# ---- export ----------------------------------------------------------------------------------------

def _hf_load_clean(directory: Path):
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    return model.eval()


def test_export_loads_in_transformers(tiny_checkpoint, tmp_path, hf_ref, prompt):
    model = fxjax.from_pretrained(tiny_checkpoint, dtype="float32")
    out = fxjax.save_pretrained(model, tmp_path / "export")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    assert all((out / s).exists() for s in shards) and shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_tensors(out).values())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    back = _hf_load_clean(out)
    assert np.array_equal(hf_logits(back, prompt[0], None, prompt[1], prompt[2]), hf_ref[1])


def test_export_of_a_model_not_loaded_from_hf(tiny_checkpoint, tmp_path, hf_ref, prompt):
    """A model built in fxjax (no HF source config) exports the flat Hub layout from its own config,
    which transformers must read into the same architecture: same logits from the same weights."""
    cfg, _ = load_config(tiny_checkpoint)
    model = abstract_model(cfg, jnp.float32, jnp.float32)  # as init_model would build it, weights filled below
    load_weights(model, weight_files(tiny_checkpoint))
    assert not hasattr(model, "hf_source")
    out = fxjax.save_pretrained(model, tmp_path / "fresh", max_shard_bytes=30_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    raw = json.loads((out / "config.json").read_text())
    assert "text_config" not in raw and raw["rope_scaling"]["mrope_section"] == [2, 1, 1]
    assert raw["image_token_id"] == 100 and raw["torch_dtype"] == "float32"
    assert load_config(out)[0] == cfg
    assert_same_tensors(read_tensors(out), read_tensors(tiny_checkpoint))
    back = _hf_load_clean(out)
    assert np.array_equal(hf_logits(back, prompt[0], None, prompt[1], prompt[2]), hf_ref[1])
    assert rel_err(fx_logits(model, prompt), hf_ref[1]) <= TOL


@pytest.mark.parametrize("disk_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("naming", ["hub", "transformers"])
def test_round_trip_bit_exact(disk_dtype, naming, tiny_checkpoint, bf16_checkpoint, tmp_path):
    src = tiny_checkpoint if disk_dtype == "float32" else bf16_checkpoint
    if naming == "transformers":
        src = rewrite_checkpoint(src, tmp_path / "src", transformers_452_names)
    original = read_tensors(src)
    assert {str(t.dtype) for t in original.values()} == {disk_dtype}
    for param_dtype in sorted({"float32", disk_dtype}):  # bf16 weights survive fp32 and bf16 params alike
        model = fxjax.from_pretrained(src, dtype=param_dtype)
        assert model.hf_source.naming == naming
        out = fxjax.save_pretrained(model, tmp_path / f"out-{param_dtype}")
        assert_same_tensors(read_tensors(out), original)
        assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    _hf_load_clean(out)


def test_sharded_export_round_trip(tiny_checkpoint, tmp_path, hf_ref, prompt, monkeypatch):
    """Each shard is written once under its final name (the count planned from the sizes first): renaming
    model-00001.safetensors to model-00001-of-00015.safetensors after the count was known copied every file
    again on a bucket (gcsfuse renames by copy and delete)."""
    model = fxjax.from_pretrained(tiny_checkpoint, dtype="float32")

    def no_rename(self, target):
        raise AssertionError(f"renamed {self} to {target}")

    with monkeypatch.context() as patched:
        patched.setattr(Path, "rename", no_rename)
        out = fxjax.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    for shard in shards:  # no shard over the limit unless it holds one tensor that alone is
        with safe_open(str(out / shard), framework="numpy") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert_same_tensors(read_tensors(out), read_tensors(tiny_checkpoint))
    # a save killed while it writes its shards over an earlier save's (the same names for the same count)
    # leaves no index: the earlier index would load a mix of the two models
    from fxjax import hf_save

    written = hf_save.save_safetensors

    def killed_after_two(tensors, path, **kwargs):
        if len(list(out.glob("model-*.safetensors.killed"))) == 2:
            raise KeyboardInterrupt
        written(tensors, path, **kwargs)
        (out / f"{Path(path).name}.killed").write_text("")

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(hf_save, "save_safetensors", killed_after_two)
        fxjax.save_pretrained(model, out, max_shard_bytes=20_000)
    assert not (out / "model.safetensors.index.json").exists()
    for marker in out.glob("*.killed"):
        marker.unlink()
    out = fxjax.save_pretrained(model, out, max_shard_bytes=20_000)
    again = fxjax.save_pretrained(fxjax.from_pretrained(out, dtype="float32"), tmp_path / "again")
    assert_same_tensors(read_tensors(again), read_tensors(tiny_checkpoint))
    back = _hf_load_clean(out)
    assert np.array_equal(hf_logits(back, prompt[0], None, prompt[1], prompt[2]), hf_ref[1])
    # saved again into the same folder in fewer shards: the earlier ones went (they stayed beside the new, a
    # second model for whatever globs *.safetensors); a model.safetensors there, which transformers loads
    # before an index, too; files not of the weights stay
    (out / "model.safetensors").write_bytes(b"stale")
    (out / "model-00007.safetensors").write_bytes(b"stale")  # (an interrupted save's, before its renames)
    (out / "notes-model-00001.safetensors.txt").write_text("mine")
    fxjax.save_pretrained(model, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert (out / "notes-model-00001.safetensors.txt").read_text() == "mine"
    assert_same_tensors(read_tensors(out), read_tensors(tiny_checkpoint))


def test_loaded_model_graphdef_is_hashable(tiny_checkpoint):
    """Training code jits over nnx.split(model); the GraphDef (source info included) must hash."""
    model = fxjax.from_pretrained(tiny_checkpoint, dtype="float32")
    graphdef, state = nnx.split(model)
    hash(graphdef)
    total = jax.jit(lambda g, s: nnx.merge(g, s).decoder.norm.weight[...].sum(), static_argnums=0)(graphdef, state)
    assert np.isfinite(float(total))


# ---- errors ----------------------------------------------------------------------------------------

def test_error_missing_tensor(tiny_checkpoint, tmp_path):
    bad = rewrite_checkpoint(tiny_checkpoint, tmp_path / "bad",
                             lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight") as err:
        fxjax.from_pretrained(bad)
    assert str(bad) in str(err.value)


def test_error_unexpected_tensor(tiny_checkpoint, tmp_path):
    bad = rewrite_checkpoint(tiny_checkpoint, tmp_path / "bad",
                             lambda t: {**t, "visual.blocks.7.norm1.weight": np.ones(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'visual\.blocks\.7\.norm1\.weight' does not "
                       r"belong to this Qwen2\.5-VL config: it is for layer 7, but this config has 3 layers "
                       r"\(vision_config\.depth in config\.json\)"):
        fxjax.from_pretrained(bad)
    bad = rewrite_checkpoint(tiny_checkpoint, tmp_path / "deeper",
                             lambda t: {**t, "model.layers.2.input_layernorm.weight": np.ones(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.input_layernorm\.weight' does not belong to "
                       r"this Qwen2\.5-VL config: it is for layer 2, but this config has 2 layers "
                       r"\(num_hidden_layers in config\.json\)"):
        fxjax.from_pretrained(bad)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.input_layernorm\.weight' is for layer 2, but "
                       r"this config has 2 layers \(num_hidden_layers in config\.json\)"):
        fxjax.from_pretrained(bad, scan_layers=True)  # (stacked layers: the same words)


def test_error_a_weight_stored_under_both_namings(tiny_checkpoint, tmp_path):
    """The embeddings under the Hub's name and again under transformers' (zeros): one of the two was kept
    without a word (logits 32 away from transformers'); now an error naming both."""
    bad = rewrite_checkpoint(tiny_checkpoint, tmp_path / "bad", lambda t: {
        **t, "model.language_model.embed_tokens.weight": np.zeros_like(t["model.embed_tokens.weight"])})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.(language_model\.)?embed_tokens\."
                                              r"weight' is the weight 'model\.(language_model\.)?embed_tokens\.weight'"
                                              r" holds too"):
        fxjax.from_pretrained(bad)


def test_error_a_stale_index_is_named_as_the_index(tiny_checkpoint, tmp_path):
    """An index naming a tensor its shard does not hold was reported as a truncated or corrupted file."""
    bad = tmp_path / "bad"
    save_hf_model(load_hf_model(tiny_checkpoint), bad, max_shard_size="20KB")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.extra.weight"] = first
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{first}: .*model\.layers\.0\.extra\.weight.*the index is stale"):
        fxjax.from_pretrained(bad)


def test_a_config_without_mrope_section_takes_transformers_default_where_it_fits():
    """rope_scaling null (or without mrope_section) was refused; transformers' rotary takes [16, 24, 24], so
    such a config loads with that split where it fits the head size, and is refused naming it where not
    (transformers would fail inside its forward)."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    from fxjax.hf_config import text_config_from_dict

    base = dict(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2)  # (head_dim 128, as the released models')
    for rope in ({"rope_scaling": None}, {"rope_scaling": {"type": "mrope"}}, {}):
        raw = {**base, **rope}
        oracle = tuple(Qwen2_5_VLRotaryEmbedding(Qwen2_5_VLTextConfig(**raw)).mrope_section)
        assert text_config_from_dict(raw, "config.json").mrope_section == oracle == (16, 24, 24), rope
    with pytest.raises(HFConfigError, match=r"config\.json: no mrope_section in rope_parameters/rope_scaling, and "
                       r"transformers' default \[16, 24, 24\] does not fit head_dim 8 \(it must sum to 4\)"):
        text_config_from_dict({**base, "hidden_size": 16, "rope_scaling": None}, "config.json")


def test_a_sliding_window_flag_is_refused_only_where_a_layer_slides():
    """use_sliding_window=true was refused outright; transformers slides no layer when max_window_layers
    is at least the layer count (the 3B's 70 for 36 layers) or layer_types says full attention: such a
    config loads; one where a layer slides is refused (transformers' own layer_types as the oracle)."""
    from transformers import Qwen2_5_VLTextConfig

    from fxjax.hf_config import text_config_from_dict

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                use_sliding_window=True, sliding_window=16)
    for extra, slides in ((dict(max_window_layers=2), False), (dict(max_window_layers=1), True),
                          (dict(layer_types=["full_attention"] * 2, max_window_layers=0), False),
                          (dict(layer_types=["full_attention", "sliding_attention"]), True),
                          (dict(use_sliding_window=False, max_window_layers=0), False)):
        raw = {**base, **extra}
        assert ("sliding_attention" in Qwen2_5_VLTextConfig(**raw).layer_types) == slides, extra
        if slides:
            with pytest.raises(HFConfigError, match="use_sliding_window=true with layers that slide"):
                text_config_from_dict(raw, "config.json")
        else:
            assert text_config_from_dict(raw, "config.json").num_hidden_layers == 2


def test_error_wrong_shape(tiny_checkpoint, tmp_path):
    bad = rewrite_checkpoint(tiny_checkpoint, tmp_path / "bad",
                             lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.ones((32, 32), np.float32)})
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors.*'model\.layers\.0\.self_attn\.k_proj\.weight'.*\(32, 32\).*\(16, 32\)"):
        fxjax.from_pretrained(bad)


def test_error_missing_config(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "config.json").unlink()
    with pytest.raises(HFConfigError, match=r"config\.json.*not found"):
        fxjax.from_pretrained(bad)


def test_error_bad_model_type(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "llava"}))
    with pytest.raises(HFConfigError, match=r"config\.json.*model_type 'llava'"):
        fxjax.from_pretrained(bad)
    # one public error for every folder from_pretrained refuses: HFConfigError was a plain ValueError that
    # `except fxjax.CheckpointError` (what a missing weight file raises) let through
    with pytest.raises(fxjax.CheckpointError, match=r"model_type 'llava'"):
        fxjax.from_pretrained(bad)


def test_a_tied_config_with_a_distinct_stored_head_loads_untied_as_transformers(tiny_checkpoint, tmp_path, prompt):
    """config.json ties the head, the weights store an lm_head unequal to the embeddings: transformers 5
    leaves them untied (with a warning); fxjax dropped the stored head and ran the embeddings instead."""
    tied = tmp_path / "tied_config"
    shutil.copytree(tiny_checkpoint, tied)
    raw = json.loads((tied / "config.json").read_text())
    raw["tie_word_embeddings"] = raw["text_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(raw))
    ref = hf_logits(load_hf_model(tied), prompt[0], None, prompt[1], prompt[2])
    model = fxjax.from_pretrained(tied, dtype="float32")
    assert not model.config.tie_word_embeddings and model.lm_head is not None
    assert rel_err(fx_logits(model, prompt), ref) <= TOL
    # `fxjax info` says what loads (it read config.json alone: "tied True", and a count without the head)
    import contextlib
    import io

    from fxjax.cli import main

    for folder, tied_now in ((tied, False), (tiny_checkpoint, False)):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["info", str(folder)]) == 0
        text = printed.getvalue()
        assert f"tied {tied_now}" in text and "lm_head" in text, text
        assert ("stored lm_head.weight differs from the embeddings: loaded untied" in text) == (folder == tied)


def test_error_rope_scaling_is_refused(tiny_checkpoint, tmp_path):
    """A YaRN (or other scaled) rope config is refused by name: fxjax read only theta and the sections and
    ran plain M-RoPE where transformers scales the angles."""
    bad = tmp_path / "yarn"
    shutil.copytree(tiny_checkpoint, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFConfigError, match=r"config\.json: rope type 'yarn' in rope_parameters/rope_scaling is not "
                                          r"supported"):
        fxjax.from_pretrained(bad)


def test_error_index_names_missing_shard(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    save_hf_model(load_hf_model(tiny_checkpoint), bad, max_shard_size="20KB")
    lost = sorted(bad.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json.*{lost.name}"):
        fxjax.from_pretrained(bad)


def test_an_index_naming_a_shard_outside_its_folder_is_refused(tiny_checkpoint, tmp_path):
    """A downloaded checkpoint's index named /elsewhere/x.safetensors or ../x.safetensors, and that file (another
    user's, readable) loaded as the model's weights; a weight_map that is no mapping was an AttributeError."""
    bad = tmp_path / "bad"
    save_hf_model(load_hf_model(tiny_checkpoint), bad, max_shard_size="20KB")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / shard
    shutil.copy(bad / shard, outside)
    for named in (str(outside), f"../{shard}"):
        index_path.write_text(json.dumps({**index, "weight_map": {k: named if v == shard else v
                                                                   for k, v in index["weight_map"].items()}}))
        with pytest.raises(CheckpointError, match=rf"names shard '{re.escape(named)}', not a file name in"):
            fxjax.from_pretrained(bad)
    index_path.write_text(json.dumps({**index, "weight_map": ["a"]}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard files, got list"):
        fxjax.from_pretrained(bad)


def test_exported_side_files_get_the_usual_mode_not_the_sources(tiny_checkpoint, tmp_path):
    """generation_config.json (and the other files copied beside the weights) kept a world-writable source's
    0666 under umask 022 (shutil.copy copies the mode)."""
    import os

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source)
    os.chmod(source / "generation_config.json", 0o666)
    out = fxjax.save_pretrained(fxjax.from_pretrained(source, dtype="float32"), tmp_path / "export")
    old = os.umask(0o022)
    os.umask(old)
    assert (out / "generation_config.json").stat().st_mode & 0o777 == 0o666 & ~old


def test_merged_lora_saved_beside_a_tokenizer_without_the_format_markers_is_warned_about(tiny_checkpoint, tmp_path,
                                                                                         caplog):
    """save_pretrained of a trained model copies its base's tokenizer: a Hub base's lacks the six format
    markers, so the served detector's answers decoded without them and nothing said so. A warning names them
    and save_merged; a model without LoRA, or a tokenizer that has them, says nothing."""
    import logging

    from fxjax.rewards.output_format import FORMAT_MARKERS

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source)
    added = [{"id": 151643 + i, "content": t} for i, t in enumerate(("<|endoftext|>", "<|im_start|>"))]
    (source / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    model = fxjax.from_pretrained(source, dtype="float32")
    with caplog.at_level(logging.WARNING, logger="fxjax.hf_save"):
        fxjax.save_pretrained(model, tmp_path / "plain")
    assert "format markers" not in caplog.text  # (no LoRA: the base model as it was)
    fxjax.apply_lora(model, fxjax.LoRAConfig(rank=2, alpha=4, target_modules=("q_proj",)))
    with caplog.at_level(logging.WARNING, logger="fxjax.hf_save"):
        fxjax.save_pretrained(model, tmp_path / "merged")
    assert (f"the tokenizer copied beside the merged LoRA lacks the output-format markers "
            f"({', '.join(FORMAT_MARKERS)})") in caplog.text and "fxjax.train.export.save_merged" in caplog.text
    caplog.clear()
    marked = added + [{"id": 151665 + i, "content": m} for i, m in enumerate(FORMAT_MARKERS)]
    (source / "tokenizer.json").write_text(json.dumps({"added_tokens": marked}))
    with caplog.at_level(logging.WARNING, logger="fxjax.hf_save"):
        fxjax.save_pretrained(model, tmp_path / "merged2")
    assert "format markers" not in caplog.text


def test_error_no_weights_and_not_a_directory(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", bad / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        fxjax.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="not a directory"):
        fxjax.from_pretrained(tmp_path / "nowhere")


# ---- parameter and compute dtypes ------------------------------------------------------------------

@pytest.mark.parametrize("dtype,param_dtype", [("bfloat16", None), ("bfloat16", "float32"), ("float32", "bfloat16")])
def test_compute_and_param_dtypes(tiny_checkpoint, prompt, dtype, param_dtype):
    """Weights stored in param_dtype, logits in the compute dtype. How accurate each mix is, against HF
    running in the same precision, is tests/test_bf16_parity.py's."""
    model = fxjax.from_pretrained(tiny_checkpoint, dtype=dtype, param_dtype=param_dtype)
    want_param = jnp.dtype(param_dtype or dtype)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {want_param}
    logits = model(prompt[0], pixel_values=prompt[1], image_grid_thw=prompt[2])
    assert logits.dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(logits.astype(jnp.float32))).all()
    # parameters stay in their dtype after a forward
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {want_param}


def test_stop_token_ids_follow_the_generation_config(tiny_checkpoint, tmp_path):
    """A completion ends at <|im_end|> and at every eos_token_id of the model directory's
    generation_config.json (Qwen2.5-VL-Instruct's lists <|im_end|> and <|endoftext|>), as HF generate and
    TRL stop; a model not loaded from a directory stops at <|im_end|> only; a bad file is named."""
    import dataclasses

    from fxjax.hf_checkpoint import stop_token_ids

    directory = tmp_path / "instruct"
    shutil.copytree(tiny_checkpoint, directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    model = fxjax.from_pretrained(directory)
    assert stop_token_ids(model, 151645) == (151645, 151643)
    assert stop_token_ids(model, 7) == (7, 151645, 151643)
    (tmp_path / "plain").mkdir()
    model.hf_source = dataclasses.replace(model.hf_source, directory=str(tmp_path / "plain"))  # no such file
    assert stop_token_ids(model, 151645) == (151645,)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generation_config.json").write_text(json.dumps({"eos_token_id": "151643"}))
    model.hf_source = dataclasses.replace(model.hf_source, directory=str(tmp_path / "bad"))
    with pytest.raises(CheckpointError, match=r"bad/generation_config.json: eos_token_id must be a token id"):
        stop_token_ids(model, 151645)
    del model.hf_source
    assert stop_token_ids(model, 151645) == (151645,)


def test_python_api_mistakes_are_named(tiny_checkpoint, tmp_path, prompt):
    """What a user of the Python API gets wrong most easily gets an error that says so: a Hub id for a
    directory, saving over the directory the model came from, a bad dtype or naming (nothing written), a
    non-model for load_peft_adapter, a mesh size that is not a number, pixel limits the wrong way round."""
    from fxjax.device_mesh import MeshConfig, ShardingError
    from fxjax.peft_io import AdapterError

    with pytest.raises(CheckpointError, match="a Hub id\\? fxjax reads local directories only"):
        fxjax.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    model = fxjax.from_pretrained(copy, lora=fxjax.LoRAConfig(rank=2, alpha=4))
    with pytest.raises(CheckpointError, match="is the directory the model was loaded from"):
        fxjax.save_pretrained(model, copy)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in Path(tiny_checkpoint).iterdir())
    with pytest.raises(CheckpointError, match="cannot save in dtype 'bf16'"):
        fxjax.save_pretrained(model, tmp_path / "out", dtype="bf16")
    with pytest.raises(AdapterError, match="holds an HF model .*would be loaded with that model by transformers"):
        fxjax.save_peft_adapter(model, tiny_checkpoint)
    assert not (Path(tiny_checkpoint) / "adapter_config.json").exists()
    with pytest.raises(AdapterError, match="naming 'peft': use 'hub'"):
        fxjax.save_peft_adapter(model, tmp_path / "adapter", naming="peft")
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()
    with pytest.raises(AdapterError, match="needs a fxjax Qwen2.5-VL model .*got str"):
        fxjax.load_peft_adapter("model", tmp_path)
    with pytest.raises(ShardingError, match="mesh.fsdp: 'x' is not an integer"):
        MeshConfig.from_dict({"fsdp": "x"})
    with pytest.raises(ValueError, match="min_pixels 20000 is above max_pixels 10000"):
        fxjax.process_image(np.zeros((64, 64, 3), np.uint8), min_pixels=20000, max_pixels=10000)
    # a dtype that is not a float of the model's: np.int8 gave all-zero int8 logits, None float64 weights
    for dtype in (np.int8, None, "bf16"):
        with pytest.raises(ValueError, match=r"unknown dtype .*use one of \['bfloat16', 'float16', 'float32'\]"):
            fxjax.from_pretrained(tiny_checkpoint, dtype=dtype)
    assert fxjax.from_pretrained(tiny_checkpoint, dtype=np.float32).dtype == np.float32
    # arguments of the wrong kind, said as such (they failed deep in pathlib, placement or a comparison)
    with pytest.raises(TypeError, match=r"cfg is a LoRAConfig \(fxjax\.LoRAConfig\(rank=\.\.\., alpha=\.\.\.\)\), got dict"):
        fxjax.apply_lora(fxjax.from_pretrained(tiny_checkpoint), {"rank": 4})
    with pytest.raises(TypeError, match="path is a checkpoint directory .*got int"):
        fxjax.from_pretrained(123)
    with pytest.raises(TypeError, match=r"mesh is a jax Mesh: fxjax\.make_mesh\(fxjax\.MeshConfig\(\.\.\.\)\)"):
        fxjax.from_pretrained(tiny_checkpoint, mesh={"fsdp": 1})
    with pytest.raises(ValueError, match=r"mesh has the axes \('x',\); fxjax places weights on the axes"):
        fxjax.from_pretrained(tiny_checkpoint, mesh=jax.make_mesh((1,), ("x",)))
    with pytest.raises(ValueError, match="max_shard_bytes is a positive int .*got 0"):  # (a file per tensor)
        fxjax.save_pretrained(model, tmp_path / "swapped", max_shard_bytes=0)
    with pytest.raises(TypeError, match="the first argument is the model .*got PosixPath"):
        fxjax.save_pretrained(tmp_path / "swapped", model)
    with pytest.raises(ValueError, match="max_pixels is a pixel count .*got '12544'"):
        fxjax.process_image(np.zeros((64, 64, 3), np.uint8), max_pixels="12544")
    with pytest.raises(TypeError, match="eos_token_ids are token ids .*convert_tokens_to_ids"):
        fxjax.greedy_generate(model, prompt[0], None, prompt[1], prompt[2], max_new_tokens=1,
                              eos_token_ids="<|im_end|>")
    assert not (tmp_path / "swapped").exists()
    # an fxjax folder where an HF checkpoint or an adapter belongs: what it is, and how Python loads it
    step = tmp_path / "run" / "checkpoints" / "3"
    (step / "config").mkdir(parents=True)
    (step / "config" / "config.json").write_text("{}")
    (tmp_path / "export" / "merged").mkdir(parents=True)
    (tmp_path / "export" / "merged" / "config.json").write_text("{}")
    for folder, said in ((tmp_path / "run", r"is an fxjax run: fxjax\.train\.run_loading\.load_run\("),
                         (step, r"is the checkpoint of step 3 of a run: fxjax\.train\.run_loading\.load_run\("),
                         (tmp_path / "export", r"is the folder of an `fxjax export`: load .*merged")):
        with pytest.raises(ValueError, match=f"config.json: not found .*{said}"):
            fxjax.from_pretrained(folder)
        with pytest.raises(AdapterError, match=f"adapter_config.json: missing; .*{said}"):
            fxjax.from_pretrained(tiny_checkpoint, adapter=folder)
    # a PEFT adapter given as the model; a config.json or adapter_config.json that is not UTF-8 (a raw
    # UnicodeDecodeError)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a PEFT adapter: load its base model with adapter="):
        fxjax.from_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not valid JSON"):
        fxjax.from_pretrained(tiny_checkpoint, adapter=tmp_path / "peft")
    (tmp_path / "export" / "merged" / "config.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        fxjax.from_pretrained(tmp_path / "export" / "merged")
    with pytest.raises(ValueError, match=r"\+ max_new_tokens 10000000 are beyond the model's max_position_embeddings"):
        fxjax.greedy_generate(model, prompt[0], None, prompt[1], prompt[2], max_new_tokens=10**7)
