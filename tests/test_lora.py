"""LoRA in the fxjax model: targets as PEFT resolves them, zero-init, reference policy, training state, dtypes.

Tiny conftest checkpoints, fp32 with "highest" matmul precision. PEFT-file interop is in test_peft.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import build_hf_model, image_prompt, rel_err
from flax import nnx

import fxjax
from fxjax.model.lora import (BASE_PARAMS, LORA_PARAMS, LoRAConfig, apply_lora, lora_disabled, lora_linears,
                        merged_kernel, remove_lora)


def _peft_targets(spec, exclude=None) -> set[str]:
    """The module names PEFT adapts on the HF model for a target_modules spec."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_hf_model(), LoraConfig(r=2, target_modules=spec, exclude_modules=exclude))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}


def _randomize(model, seed=0, scale=0.3) -> None:
    """Non-zero A and B in every adapter (a fresh adapter's B is zero)."""
    key = jax.random.key(seed)
    for _, linear in lora_linears(model):
        key, ka, kb = jax.random.split(key, 3)
        ad = linear.lora
        ad.lora_a.set_value(scale * jax.random.normal(ka, ad.lora_a.shape, jnp.float32))
        ad.lora_b.set_value(scale * jax.random.normal(kb, ad.lora_b.shape, jnp.float32))


def _logits(model, prompt):
    ids, pv, grid = prompt
    return np.asarray(model(ids, attention_mask=np.ones_like(ids), pixel_values=pv, image_grid_thw=grid))


@pytest.fixture(scope="module")
def prompt():
    ids, pv, grid = image_prompt([(1, 4, 4)], np.random.RandomState(0))
    return ids[None], pv, grid


@pytest.fixture(scope="module")
def text_ids():
    return np.array([[5, 6, 7, 8, 9, 10, 11, 12]], np.int64)


@pytest.fixture(scope="module")
def base_logits(tiny_checkpoint, prompt):
    return _logits(fxjax.from_pretrained(tiny_checkpoint), prompt)


def test_config_scaling_and_validation():
    cfg = LoRAConfig(rank=4, alpha=8)
    assert cfg.scaling == 2.0 and cfg.target_modules == "all-linear"
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)
    assert LoRAConfig(target_modules=["q_proj", "qkv"]).target_modules == ("q_proj", "qkv")
    hash(LoRAConfig(target_modules=["q_proj"], exclude_modules=["o_proj"]))  # a graph static: must hash
    for bad, error, says in ((dict(rank=0), ValueError, "rank must be a positive integer, got 0"),
                             (dict(rank=2.5), ValueError, "rank must be a positive integer, got 2.5"),
                             (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
                             (dict(target_modules=[]), ValueError, "target_modules is empty"),
                             (dict(target_modules=[3]), TypeError, "sequence of strings, got \\[3\\]")):
        with pytest.raises(error, match=says):
            LoRAConfig(**bad)


@pytest.mark.parametrize("spec, exclude", [
    ("all-linear", None),
    (["q_proj", "qkv", "mlp.0"], None),
    (r".*language_model.*\.(q|v)_proj", None),
    (r".*visual\.blocks\.\d+\.mlp\.\w+_proj", None),
    (["lm_head", "down_proj"], None),
    (["proj"], None),  # attn.proj and the patch embedding (a Conv3d LoRA in PEFT)
    ("all-linear", ["o_proj", "mlp.2"]),
    ("all-linear", ["proj"]),  # a name matches whole dotted parts: attn.proj only, no *_proj
], ids=["all-linear", "names", "regex-text", "regex-vision-mlp", "lm_head", "proj-suffix", "exclude",
        "exclude-suffix"])
def test_targets_match_peft(tiny_checkpoint, spec, exclude):
    model = fxjax.from_pretrained(tiny_checkpoint)
    names = apply_lora(model, LoRAConfig(rank=2, target_modules=spec, exclude_modules=exclude))
    assert set(names) == _peft_targets(spec, exclude) and len(names) == len(set(names))
    assert model.lora_config.target_modules == (spec if isinstance(spec, str) else tuple(spec))
    if spec == "all-linear" and exclude is None:
        # vision blocks (qkv, proj, gate/up/down) x 3, merger x 2, decoder (q/k/v/o, gate/up/down) x 2
        assert len(names) == 3 * 5 + 2 + 2 * 7
        assert not any(n in ("lm_head", "model.visual.patch_embed.proj") for n in names)


def test_apply_lora_errors(tiny_checkpoint):
    model = fxjax.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(model, LoRAConfig(target_modules=["nope_proj"]))
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))
    remove_lora(model)
    assert not list(lora_linears(model)) and model.lora_config is None


def test_fresh_adapter_changes_nothing(tiny_checkpoint, prompt, base_logits, text_ids):
    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=4, alpha=8))
    for _, linear in lora_linears(model):
        a, b = linear.lora.lora_a[...], linear.lora.lora_b[...]
        assert a.shape == (linear.in_features, 4) and b.shape == (4, linear.out_features)
        assert not np.any(np.asarray(b)) and np.abs(np.asarray(a)).max() <= 1 / np.sqrt(linear.in_features)
        assert np.any(np.asarray(a))
    # Jitted, XLA may fuse the layer before down_proj differently once its output feeds two dots
    # (a last-bit difference); the adapter itself adds exact zeros, so op by op the logits are bit-identical.
    assert rel_err(_logits(model, prompt), base_logits) <= 1e-6
    base = fxjax.from_pretrained(tiny_checkpoint)
    with jax.disable_jit():
        assert np.array_equal(np.asarray(model(text_ids)), np.asarray(base(text_ids)))


def test_reference_policy_is_the_base_model(tiny_checkpoint, prompt, base_logits):
    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=4, alpha=8))
    _randomize(model)
    policy = _logits(model, prompt)
    assert rel_err(policy, base_logits) > 1e-2  # the adapter matters ...
    with lora_disabled(model):
        reference = _logits(model, prompt)
    assert np.array_equal(reference, base_logits)  # ... and switched off, the base model computes
    assert np.array_equal(_logits(model, prompt), policy)  # switched back on afterwards

    @nnx.jit
    def both(model, inputs):
        policy = model.logits(model.hidden_states(inputs)[0])
        with lora_disabled(model):
            reference = model.logits(model.hidden_states(inputs)[0])
        return policy, reference

    ids, pv, grid = prompt
    jit_policy, jit_reference = both(model, model.prepare(ids, np.ones_like(ids), pv, grid))
    assert rel_err(jit_policy, policy) <= 1e-6 and rel_err(jit_reference, base_logits) <= 1e-6
    assert all(linear.lora.enabled for _, linear in lora_linears(model))


def test_only_lora_parameters_train(tiny_checkpoint, prompt):
    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2, alpha=4))
    n_adapters = len(list(lora_linears(model)))
    base_before = jax.tree.map(np.asarray, nnx.state(model, BASE_PARAMS))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, LORA_PARAMS))
    # nnx.LoRAParam subclasses nnx.Param: the base filter must exclude it explicitly
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == (
        len(jax.tree.leaves(base_before)) + 2 * n_adapters)
    ids, pv, grid = prompt
    inputs = model.prepare(ids, np.ones_like(ids), pv, grid)
    targets = jnp.asarray(np.roll(ids, -1, axis=1))

    def loss_fn(model, inputs):
        logits = model.logits(model.hidden_states(inputs)[0])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LORA_PARAMS)

    @nnx.jit
    def step(model, optimizer, inputs):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LORA_PARAMS))(model, inputs)
        optimizer.update(model, grads)
        return loss, grads

    losses = []
    for i in range(3):
        loss, grads = step(model, optimizer, inputs)
        losses.append(float(loss))
        flat = nnx.to_flat_state(grads)
        assert len(flat) == 2 * n_adapters and all(path[-2] == "lora" for path, _ in flat)
        if i == 0:  # B = 0: only B gets a gradient at first
            assert all(np.any(np.asarray(v[...])) == (path[-1] == "lora_b") for path, v in flat)
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, BASE_PARAMS)), base_before)
    after = dict(nnx.to_flat_state(nnx.state(model, LORA_PARAMS)))
    for path, before in nnx.to_flat_state(lora_before):
        assert not np.array_equal(np.asarray(after[path][...]), before[...]), path


def test_bf16_base_with_fp32_lora(tiny_checkpoint, text_ids):
    model = fxjax.from_pretrained(tiny_checkpoint, dtype="bfloat16", lora=LoRAConfig(rank=4))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, BASE_PARAMS))} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, LORA_PARAMS))} == {jnp.dtype(jnp.float32)}
    _randomize(model, scale=0.1)
    logits = model(text_ids, attention_mask=np.ones_like(text_ids))
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))
    # float32 compute over bf16-stored base weights keeps fp32 LoRA too
    mixed = fxjax.from_pretrained(tiny_checkpoint, dtype="float32", param_dtype="bfloat16", lora=LoRAConfig())
    assert {v.dtype for v in jax.tree.leaves(nnx.state(mixed, LORA_PARAMS))} == {jnp.dtype(jnp.float32)}
    assert all(linear.lora.dtype == jnp.float32 for _, linear in lora_linears(mixed))


def test_dropout_only_in_train_mode(tiny_checkpoint, text_ids):
    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=4, dropout=0.5))
    _randomize(model)
    mask = np.ones_like(text_ids)
    evaluated = np.asarray(model(text_ids, attention_mask=mask))
    assert np.array_equal(np.asarray(model(text_ids, attention_mask=mask)), evaluated)  # starts in eval mode
    model.train()
    first, second = (np.asarray(model(text_ids, attention_mask=mask)) for _ in range(2))
    assert rel_err(first, evaluated) > 1e-3 and rel_err(second, first) > 1e-3  # fresh masks each call
    model.eval()
    assert np.array_equal(np.asarray(model(text_ids, attention_mask=mask)), evaluated)


def test_train_mode_dropout_keeps_each_input_scaled_by_one_over_keep_rate():
    """PEFT's nn.Dropout: an input kept in train mode is scaled by 1 / (1 - rate), so the update's expected
    value is the eval-mode one. With A and B identities the update is scaling * dropout(x) itself."""
    from fxjax.model.lora import LoRAAdapter

    adapter = LoRAAdapter(6, 6, rank=6, alpha=12.0, dropout=0.25, rngs=nnx.Rngs(0, dropout=1))
    adapter.lora_a.set_value(jnp.eye(6))
    adapter.lora_b.set_value(jnp.eye(6))
    x = jnp.arange(1.0, 49.0).reshape(8, 6)
    np.testing.assert_allclose(np.asarray(adapter(x)), 2.0 * np.asarray(x), rtol=1e-6)  # eval: no dropout
    adapter.dropout.deterministic = False  # what model.train() sets
    dropped = np.asarray(adapter(x)) / 2.0
    kept = dropped != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(dropped[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)


def test_merged_kernel(tiny_checkpoint):
    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2, alpha=6, target_modules=["q_proj"]))
    _randomize(model)
    path, linear = next(lora_linears(model))
    a, b, w = (np.asarray(v[...]) for v in (linear.lora.lora_a, linear.lora.lora_b, linear.kernel))
    np.testing.assert_allclose(merged_kernel(linear), w + 3.0 * a @ b, rtol=1e-6, atol=1e-6)
    with lora_disabled(model):
        assert np.array_equal(merged_kernel(linear), w)
