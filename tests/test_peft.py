"""PEFT interop: adapters made by peft load into fxjax with the PEFT model's logits, save back bit for bit,
fxjax-made adapters load into peft, and the merged export loads into transformers.

Adapter key naming: the installed peft (with transformers >= 4.52) writes
`base_model.model.model.language_model.layers.*` / `base_model.model.model.visual.*`; transformers < 4.52
wrote `base_model.model.model.layers.*` / `base_model.model.visual.*` (built here by renaming keys).
"""

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
from conftest import build_hf_model, hf_logits, image_prompt, load_hf_model, rel_err, save_hf_model
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import fxjax
from fxjax.hf_checkpoint import weight_files
from fxjax.peft_io import AdapterError, load_peft_adapter
from fxjax.model.lora import LORA_PARAMS, LoRAConfig, lora_linears

TOL = 1e-5
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _old_names(key: str) -> str:
    """transformers >= 4.52 adapter key -> the < 4.52 one."""
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.").replace(
        "base_model.model.model.visual.", "base_model.model.visual.")


def _peft_adapter(base_dir: Path, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    """An adapter made and saved by peft with non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | lora_kwargs
    get_peft_model(load_hf_model(base_dir), LoraConfig(**kwargs)).save_pretrained(str(out))
    return out


def _peft_logits(base_dir: Path, adapter_dir: Path, prompt) -> tuple[np.ndarray, int]:
    """Logits of peft.PeftModel.from_pretrained(base, adapter) and how many modules it adapted."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf_model(base_dir), str(adapter_dir)).eval()
    hf = model.base_model.model
    ids, pv, grid = prompt
    n = sum(1 for _, m in hf.named_modules() if hasattr(m, "lora_A"))
    return hf_logits(hf, ids, np.ones_like(ids), pv, grid), n


def _fx_logits(model, prompt) -> np.ndarray:
    ids, pv, grid = prompt
    return np.asarray(model(ids, attention_mask=np.ones_like(ids), pixel_values=pv, image_grid_thw=grid))


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_tensor(k).tobytes()) for k in f.keys()}


@pytest.fixture(scope="module")
def prompt():
    ids, pv, grid = image_prompt([(1, 4, 4)], np.random.RandomState(0))
    return ids[None], pv, grid


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory, prompt):
    """One peft adapter (all-linear, vision included, init_lora_weights=False) in both namings, and the
    PEFT model's logits."""
    root = tmp_path_factory.mktemp("peft")
    new = _peft_adapter(tiny_checkpoint, root / "new")
    old = root / "old"
    old.mkdir()
    shutil.copy(new / CONFIG, old / CONFIG)
    save_file({_old_names(k): v for k, v in load_file(str(new / WEIGHTS)).items()}, str(old / WEIGHTS),
              metadata={"format": "pt"})
    ref, n_adapted = _peft_logits(tiny_checkpoint, new, prompt)
    return {"transformers": new, "hub": old, "ref": ref, "n": n_adapted}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint, adapters):
    return {naming: fxjax.from_pretrained(tiny_checkpoint, dtype="float32", adapter=adapters[naming])
            for naming in ("transformers", "hub")}


def test_peft_writes_the_expected_keys(adapters):
    keys = set(load_file(str(adapters["transformers"] / WEIGHTS)))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight" in keys
    assert "base_model.model.model.visual.merger.mlp.2.lora_A.weight" in keys
    assert len(keys) == 2 * adapters["n"] == 2 * (3 * 5 + 2 + 2 * 7)


@pytest.mark.parametrize("naming", ["transformers", "hub"])
def test_peft_adapter_loads_with_peft_logits(loaded, adapters, prompt, naming):
    model = loaded[naming]
    assert len(list(lora_linears(model))) == adapters["n"]
    assert model.lora_config.rank == 4 and model.lora_config.scaling == 2.0
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, LORA_PARAMS))} == {jnp.dtype(jnp.float32)}
    out = _fx_logits(model, prompt)
    assert rel_err(out, adapters["ref"]) <= TOL, rel_err(out, adapters["ref"])


@pytest.mark.parametrize("naming", ["transformers", "hub"])
def test_adapter_saves_back_bit_identical(loaded, adapters, tmp_path, naming):
    out = fxjax.save_peft_adapter(loaded[naming], tmp_path / "back")
    assert _tensors(out / WEIGHTS) == _tensors(adapters[naming] / WEIGHTS)  # same keys, dtypes and bytes
    assert json.loads((out / CONFIG).read_text()) == json.loads((adapters[naming] / CONFIG).read_text())


def test_merged_export_matches_peft(loaded, adapters, tiny_checkpoint, prompt, tmp_path):
    model = loaded["hub"]
    before = {k: np.asarray(v) for k, v in jax.tree.leaves_with_path(nnx.state(model, LORA_PARAMS))}
    out = fxjax.save_pretrained(model, tmp_path / "merged")
    assert set(weight_files(out)) == set(weight_files(tiny_checkpoint))  # a plain HF checkpoint, no LoRA keys
    ids, pv, grid = prompt
    merged = hf_logits(load_hf_model(out), ids, np.ones_like(ids), pv, grid)
    assert rel_err(merged, adapters["ref"]) <= TOL, rel_err(merged, adapters["ref"])
    after = {k: np.asarray(v) for k, v in jax.tree.leaves_with_path(nnx.state(model, LORA_PARAMS))}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cfg", [
    LoRAConfig(rank=4, alpha=16),
    LoRAConfig(rank=4, alpha=16, use_rslora=True, target_modules=r".*\.(qkv|q_proj|v_proj|mlp\.0)"),
    LoRAConfig(rank=2, alpha=3, target_modules=["proj", "down_proj", "lm_head"]),
], ids=["all-linear", "rslora-regex", "names-patch-embed-lm-head"])
def test_fxjax_adapter_loads_in_peft(tiny_checkpoint, prompt, tmp_path, cfg):
    model = fxjax.from_pretrained(tiny_checkpoint, lora=cfg)
    key = jax.random.key(7)
    for _, linear in lora_linears(model):
        key, ka, kb = jax.random.split(key, 3)
        linear.lora.lora_a.set_value(0.3 * jax.random.normal(ka, linear.lora.lora_a.shape))
        linear.lora.lora_b.set_value(0.3 * jax.random.normal(kb, linear.lora.lora_b.shape))
    out = fxjax.save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((out / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == cfg.rank and config["use_rslora"] == cfg.use_rslora
    assert config["base_model_name_or_path"] == str(tiny_checkpoint)
    ref, n = _peft_logits(tiny_checkpoint, out, prompt)
    assert n == len(list(lora_linears(model)))
    got = _fx_logits(model, prompt)
    assert rel_err(got, ref) <= TOL, rel_err(got, ref)
    # and the same directory loads back into fxjax identically
    again = fxjax.from_pretrained(tiny_checkpoint, adapter=out)
    for (p1, l1), (p2, l2) in zip(lora_linears(model), lora_linears(again)):
        assert p1 == p2 and l1.lora.scaling == l2.lora.scaling
        assert np.array_equal(l1.lora.lora_a[...], l2.lora.lora_a[...])
        assert np.array_equal(l1.lora.lora_b[...], l2.lora.lora_b[...])


def test_peft_rslora_and_patterns_load(tiny_checkpoint, prompt, tmp_path):
    adapter = _peft_adapter(tiny_checkpoint, tmp_path / "patterns", seed=3, r=4, lora_alpha=6,
                            rank_pattern={"qkv": 2, "mlp.0": 3}, alpha_pattern={"o_proj": 5})
    model = fxjax.from_pretrained(tiny_checkpoint, adapter=adapter)
    ranks = {p: l.lora.rank for p, l in lora_linears(model)}
    assert ranks[("visual", "blocks", 0, "attn", "qkv")] == 2 and ranks[("visual", "merger", "fc1")] == 3
    assert ranks[("decoder", "layers", 0, "self_attn", "q_proj")] == 4
    ref, _ = _peft_logits(tiny_checkpoint, adapter, prompt)
    assert rel_err(_fx_logits(model, prompt), ref) <= TOL

    rslora = _peft_adapter(tiny_checkpoint, tmp_path / "rslora", seed=4, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "qkv"])
    model = fxjax.from_pretrained(tiny_checkpoint, adapter=rslora)
    assert all(l.lora.scaling == 4.0 for _, l in lora_linears(model))  # 8 / sqrt(4)
    ref, _ = _peft_logits(tiny_checkpoint, rslora, prompt)
    assert rel_err(_fx_logits(model, prompt), ref) <= TOL


def test_fan_in_fan_out_loads_as_peft_loads_it(adapters, tiny_checkpoint, prompt, tmp_path):
    """fan_in_fan_out (GPT-2's transposed Conv1D) on Linear targets: PEFT warns, sets it False and loads the
    tensors as they are, so fxjax does too (it refused such an adapter, which PEFT serves)."""
    adapter = tmp_path / "fan"
    shutil.copytree(adapters["transformers"], adapter)
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps(config | {"fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True"):
        ref, n = _peft_logits(tiny_checkpoint, adapter, prompt)
    assert n == adapters["n"] and rel_err(ref, adapters["ref"]) == 0  # the oracle: as if False
    with pytest.warns(UserWarning, match=r"fan/adapter_config\.json: fan_in_fan_out is set to True .* as PEFT does"):
        model = fxjax.from_pretrained(tiny_checkpoint, dtype="float32", adapter=adapter)
    assert rel_err(_fx_logits(model, prompt), ref) <= TOL


# ---- clear errors for bad adapters -----------------------------------------------------------------

@pytest.fixture(scope="module")
def bare(tiny_checkpoint):
    return fxjax.from_pretrained(tiny_checkpoint)


def _broken(adapters, tmp_path, *, config=None, tensors=None) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    raw = json.loads((adapters["transformers"] / CONFIG).read_text())
    weights = load_file(str(adapters["transformers"] / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config(raw) if config else raw))
    save_file(tensors(weights) if tensors else weights, str(out / WEIGHTS))
    return out


def _drop(weights, module):
    return {k: v for k, v in weights.items() if module not in k}


@pytest.mark.parametrize("config, tensors, message", [
    (lambda c: c | {"r": 8}, None,
     r"adapter_model\.safetensors: tensor '.*lora_A\.weight' has shape \(4, \d+\), expected \(8, \d+\) \(r = 8 in adapter_config\.json"),
    (None, lambda w: w | {"base_model.model.model.language_model.layers.7.self_attn.q_proj.lora_A.weight":
                          np.zeros((4, 32), np.float32)},
     r"adapter_model\.safetensors: tensor 'base_model\.model\.model\.language_model\.layers\.7\.self_attn\.q_proj\.lora_A\.weight' is for module .* not a Linear"),
    (None, lambda w: w | {"base_model.model.model.language_model.layers.0.mlp.up_proj.lora_magnitude_vector":
                          np.zeros((48,), np.float32)}, r"not a .*LoRA weight"),
    (None, lambda w: _drop(w, "layers.1.mlp.up_proj.lora_B"), r"module 'model\.language_model\.layers\.1\.mlp\.up_proj' has no lora_B"),
    (None, lambda w: _drop(w, "layers.1.mlp.up_proj"), r"lacks tensors for 1 module.*target_modules in adapter_config\.json selects"),
    (lambda c: c | {"target_modules": ["q_proj"]}, None, r"does not select"),
    # a stray factor of a module target_modules does not select: named as that (it was "has no lora_B")
    (lambda c: c | {"target_modules": ["q_proj"]}, lambda w: _drop(w, "mlp.up_proj.lora_B"), r"does not select"),
    (lambda c: c | {"use_dora": True}, None, r"adapter_config\.json: use_dora = True is not supported"),
    (lambda c: c | {"bias": "all"}, None, r"adapter_config\.json: bias 'all' is not supported"),
    (lambda c: c | {"peft_type": "IA3"}, None, r"adapter_config\.json: peft_type 'IA3'"),
    (lambda c: c | {"r": "4"}, None, r"adapter_config\.json: r must be a positive integer"),
    (None, lambda w: {_old_names(k) if "visual" in k else k: v for k, v in w.items()}, r"mixes"),
    (lambda c: c | {"target_modules": 5}, None, r"adapter_config\.json: target_modules must be a regex string or a list"),
    # PEFT rewrites the base weights for these when it loads them: fxjax loaded them onto the plain base
    (lambda c: c | {"init_lora_weights": "pissa_niter_4"}, None,
     r"adapter_config\.json: init_lora_weights = 'pissa_niter_4' is not supported: PEFT rewrites the base weights"),
    (lambda c: c | {"init_lora_weights": "olora"}, None, r"init_lora_weights = 'olora' is not supported"),
    # layer 0 only: falsy, and it was taken for "not set"
    (lambda c: c | {"layers_to_transform": 0}, None, r"adapter_config\.json: layers_to_transform = 0 is not supported by fxjax; a target_modules regex that "
     r"names the layers selects the same modules"),
    # a full copy of a module trained besides the LoRA: named as such (not as a stray tensor)
    (lambda c: c | {"modules_to_save": ["lm_head"]}, None, r"adapter_config\.json: modules_to_save"),
    # the tensors' dtypes, read from the file's header: one of fxjax's three, the same throughout
    (None, lambda w: {k: v.astype(np.float64) for k, v in w.items()},
     r"tensor dtypes \['float64'\]; expected one of \['bfloat16', 'float16', 'float32'\] throughout"),
    (None, lambda w: {k: v.astype(np.float16) if "lora_A" in k else v for k, v in w.items()},
     r"tensor dtypes \['float16', 'float32'\]; expected one of"),
], ids=["wrong-r", "unknown-module", "dora-key", "missing-B", "missing-module", "unselected", "unselected-half", "dora", "bias",
        "peft-type", "bad-r", "mixed-naming", "target-modules-type", "pissa", "olora", "layer-0", "modules-to-save",
        "float64", "mixed-dtypes"])
def test_bad_adapter_errors(bare, adapters, tmp_path, config, tensors, message):
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(bare, _broken(adapters, tmp_path, config=config, tensors=tensors))
    assert not list(lora_linears(bare))  # nothing attached on failure


def test_missing_files(bare, adapters, tiny_checkpoint, tmp_path):
    with pytest.raises(AdapterError, match=r"not a directory"):
        load_peft_adapter(bare, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"empty/adapter_config\.json: missing"):
        load_peft_adapter(bare, tmp_path / "empty")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(adapters["transformers"] / CONFIG, only_config / CONFIG)
    with pytest.raises(AdapterError, match=r"only_config/adapter_model\.safetensors: missing"):
        load_peft_adapter(bare, only_config)
    with pytest.raises(ValueError, match="not both"):
        fxjax.from_pretrained(tiny_checkpoint, adapter=only_config, lora=LoRAConfig())
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        fxjax.save_peft_adapter(bare, tmp_path / "out")
    # a truncated adapter, or base checkpoint, is an error naming the file (safetensors' own names none)
    cut = tmp_path / "cut"
    shutil.copytree(adapters["transformers"], cut)
    data = (cut / WEIGHTS).read_bytes()
    for size in (20, len(data) // 2):
        (cut / WEIGHTS).write_bytes(data[:size])
        with pytest.raises(AdapterError, match=f"{re.escape(str(cut / WEIGHTS))}: not a readable safetensors file"):
            load_peft_adapter(bare, cut)
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    shard = next(base.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}: not a readable safetensors file"):
        fxjax.from_pretrained(base)


def test_tied_model_has_no_lm_head_adapter(tmp_path):
    directory = save_hf_model(build_hf_model(seed=3, tie=True), tmp_path / "tied")
    model = fxjax.from_pretrained(directory, lora=LoRAConfig(target_modules=["lm_head", "q_proj"]))
    assert all(p[-1] == "q_proj" for p, _ in lora_linears(model))


def test_bf16_adapter_round_trip(adapters, tiny_checkpoint, tmp_path):
    """A bf16 adapter loads into float32 LoRA params and saves back in bf16, bit for bit."""
    model = fxjax.from_pretrained(tiny_checkpoint, adapter=adapters["transformers"])
    first = fxjax.save_peft_adapter(model, tmp_path / "bf16", dtype="bfloat16")
    again = fxjax.from_pretrained(tiny_checkpoint, dtype="bfloat16", adapter=first)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(again, LORA_PARAMS))} == {jnp.dtype(jnp.float32)}
    second = fxjax.save_peft_adapter(again, tmp_path / "bf16_again")
    assert _tensors(second / WEIGHTS) == _tensors(first / WEIGHTS)
    assert {dtype for dtype, _ in _tensors(second / WEIGHTS).values()} == {"BF16"}


def test_a_trained_bf16_adapter_saves_in_float32_for_the_base_it_is_on(adapters, tiny_checkpoint, tmp_path):
    """An adapter loaded from bfloat16 and trained since (GRPO from a bf16 SFT adapter) is written in float32,
    not rounded back to bfloat16 (which would lose a small update); its adapter_config.json names the base it
    was loaded onto (PEFT's AutoPeftModel loads that), not the one the loaded adapter named."""
    model = fxjax.from_pretrained(tiny_checkpoint, adapter=adapters["transformers"])
    bf16 = fxjax.save_peft_adapter(model, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((bf16 / CONFIG).read_text())
    (bf16 / CONFIG).write_text(json.dumps(dict(config, base_model_name_or_path="/moved/away")))
    model = fxjax.from_pretrained(tiny_checkpoint, adapter=bf16)
    (path, lora_b), *_ = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, LORA_PARAMS)) if p[-1] == "lora_b"]
    lora_b.set_value(lora_b.get_value() * (1 + 1e-4))  # a step too small for bfloat16 to hold
    out = fxjax.save_peft_adapter(model, tmp_path / "trained")
    saved = load_file(str(out / WEIGHTS))
    assert {v.dtype for v in saved.values()} == {np.dtype(np.float32)}
    moved = [k for k, v in saved.items() if not np.array_equal(v, v.astype(jnp.bfloat16).astype(np.float32))]
    assert moved and all(k.endswith("lora_B.weight") for k in moved)
    assert json.loads((out / CONFIG).read_text())["base_model_name_or_path"] == str(Path(tiny_checkpoint).resolve())
    # a Hub id the adapter named stays (portable; this machine's copy of it is not)
    (bf16 / CONFIG).write_text(json.dumps(dict(config, base_model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct")))
    hub = fxjax.save_peft_adapter(fxjax.from_pretrained(tiny_checkpoint, adapter=bf16), tmp_path / "hub")
    assert json.loads((hub / CONFIG).read_text())["base_model_name_or_path"] == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_rank_and_alpha_pattern_keys_match_as_peft_matches_them():
    """pattern_key against PEFT's own get_pattern_key: a key matches a whole dotted suffix of the module
    name, so alpha_pattern {"proj": ...} is the vision attention's `proj`, not every q_proj / o_proj / up_proj."""
    from peft.utils.other import get_pattern_key

    from fxjax.model.lora import pattern_key

    names = ["visual.blocks.0.attn.proj", "visual.blocks.0.attn.qkv", "model.language_model.layers.0.self_attn.q_proj",
             "model.language_model.layers.1.self_attn.o_proj", "model.language_model.layers.11.mlp.up_proj",
             "model.language_model.layers.1.mlp.down_proj", "visual.merger.mlp.0"]
    for keys in (["proj"], ["q_proj"], ["1.self_attn.q_proj", "o_proj"], ["layers.1.mlp.*"], ["mlp.0"], ["attn.proj"]):
        for name in names:
            peft = get_pattern_key(keys, name)  # the name itself when no key matches
            assert pattern_key(keys, name) == (peft if peft in keys else None), (keys, name)
    assert pattern_key(["proj"], "model.language_model.layers.0.self_attn.q_proj") is None


def test_a_bfloat16_run_of_a_float32_checkpoint_exports_peft_merge_of_the_stored_weights(adapters, tiny_checkpoint,
                                                                                           tmp_path):
    """A model run in bfloat16 (the config's default) of a float32 checkpoint holds its base weights rounded;
    its merged export (what export.merged_dir writes at the end of a run) was written in float32 from those
    rounded weights: every tensor off PEFT's merge_and_unload of the stored checkpoint (by up to 2.5e-3
    relative), and off what `fxjax export` writes. Now the rounded tensors are read from the checkpoint as
    stored: the untouched ones bit for bit, the merged ones as PEFT merges them (float32 rounding apart)."""
    from peft import PeftModel

    model = fxjax.from_pretrained(tiny_checkpoint, dtype="bfloat16", adapter=adapters["transformers"])
    assert model.embed_tokens.embedding.dtype == jnp.bfloat16
    out = fxjax.save_pretrained(model, tmp_path / "merged")
    peft_merged = PeftModel.from_pretrained(load_hf_model(tiny_checkpoint), str(adapters["transformers"]))
    reference = {k: v.detach().numpy() for k, v in peft_merged.merge_and_unload().state_dict().items()}
    stored = {}
    for file in set(weight_files(tiny_checkpoint).values()):
        stored.update(load_file(str(file)))
    written = {}
    for file in set(weight_files(out).values()):
        written.update(load_file(str(file)))
    assert written.keys() == stored.keys()
    changed = 0
    for name, array in written.items():
        assert array.dtype == np.float32, name
        if np.array_equal(array, stored[name]):
            continue
        changed += 1
        # the checkpoint's Hub names -> transformers >= 4.52's module names (the merged PEFT model's)
        hf = reference[re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", name))]
        assert np.abs(array - hf).max() <= 1e-6 * max(1.0, np.abs(hf).max()), name
    assert changed == adapters["n"]  # only the adapted kernels differ from the checkpoint
