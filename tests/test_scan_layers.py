"""Decoder layers and vision blocks under scan (scan_layers) against the looped ones, from the same HF
checkpoint.

The scanned layer runs the very ops of the looped one on its slice of the stacked parameters, so logits,
generated tokens and every exported tensor are compared for equality, not within a tolerance. LoRA
gradients (with and without rematerialisation of the scan body) agree to float32 rounding only: XLA
compiles the backward pass of a while-loop body with other fusions and operand layouts than the unrolled
layers' (the transposed matmuls sum in another order), which moves gradients by a few ulp (measured: max
relative error ~1e-6); GRAD_TOL leaves room for that and nothing more (a mis-sliced layer is off by O(1)).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import image_prompt, rel_err, spread_logits_models
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

import fxjax
from fxjax.hf_checkpoint import weight_files
from fxjax.hf_save import save_pretrained
from fxjax.model.generate import generate
from fxjax.model.hf_names import is_stacked, layer_path
from fxjax.model.kv_cache import KVCache, repeat_rows
from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS, LoRAConfig, apply_lora, lora_linears
from fxjax.peft_io import AdapterError, load_peft_adapter, save_peft_adapter
from fxjax.partition_rules import param_spec, partition_specs, replicated_dims
from fxjax.train.remat import with_remat

LAYERS = 2  # the tiny checkpoint's decoder depth
VISION_BLOCKS = 3  # ... and vision depth (block 1 full attention, 0 and 2 windowed)
GRAD_TOL = 1e-5  # max |scan - loop| / max |loop| per LoRA factor (float32: a few ulp of reordered sums)


def per_layer(flat) -> dict[tuple, np.ndarray]:
    """Flat (path, value) pairs with every stacked value split into its layers' paths (the looped model's)."""
    out = {}
    for path, value in flat:
        value = np.asarray(value[...] if isinstance(value, nnx.Variable) else value)
        if is_stacked(path):
            for i in range(value.shape[0]):
                out[layer_path(path, i)] = value[i]
        else:
            out[tuple(path)] = value
    return out


def assert_same_params(scan_model, loop_model, filter=nnx.Param):
    scan = per_layer(nnx.to_flat_state(nnx.state(scan_model, filter)))
    loop = per_layer(nnx.to_flat_state(nnx.state(loop_model, filter)))
    assert scan.keys() == loop.keys()
    for path in loop:
        np.testing.assert_array_equal(scan[path], loop[path], err_msg=str(path))


def file_tensors(directory) -> dict[str, tuple[str, bytes]]:
    out = {}
    for name, file in weight_files(directory).items():
        with safe_open(str(file), framework="numpy") as f:
            out[name] = (f.get_slice(name).get_dtype(), f.get_tensor(name).tobytes())
    return out


@pytest.fixture(scope="module")
def prompt():
    """Two rows: one with an image, one left-padded text row."""
    ids, pv, grid = image_prompt([(1, 4, 4)], np.random.RandomState(0))
    text = np.concatenate([np.zeros(3, ids.dtype), np.arange(20, 20 + len(ids) - 3)])
    mask = np.stack([np.ones_like(ids), (text > 0).astype(ids.dtype)])
    return np.stack([ids, text]), mask, pv, grid


@pytest.fixture(scope="module")
def peft_adapter(tiny_checkpoint, tmp_path_factory):
    """An all-linear adapter with non-zero A and B, written by fxjax in PEFT's format from the looped model."""
    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2, alpha=4))
    rng = np.random.RandomState(3)
    for path, variable in nnx.to_flat_state(nnx.state(model, LORA_PARAMS)):
        variable.set_value(jnp.asarray(0.2 * rng.randn(*variable.shape), jnp.float32))
    return save_peft_adapter(model, tmp_path_factory.mktemp("adapter"))


def test_scan_logits_equal_loop(tiny_checkpoint, prompt):
    loop = fxjax.from_pretrained(tiny_checkpoint)
    scan = fxjax.from_pretrained(tiny_checkpoint, scan_layers=True)
    assert scan.config.text.scan_layers and scan.config.vision.scan_layers and not loop.config.text.scan_layers
    assert scan.visual.blocks.mlp.up_proj.kernel.shape == (VISION_BLOCKS, 32, 40)
    kernel = scan.decoder.layers.self_attn.q_proj.kernel
    assert kernel.shape == (LAYERS, *loop.decoder.layers[0].self_attn.q_proj.kernel.shape)
    assert_same_params(scan, loop)
    np.testing.assert_array_equal(np.asarray(scan(*prompt)), np.asarray(loop(*prompt)))


def _lora_grads(model, inputs, targets, remat=None):
    """Gradients of a next-token loss with respect to the LoRA factors, under jit (with_remat as the train
    step applies it: inside the trace, on a merged copy)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)

        def loss_fn(model):
            with_remat(model, remat)
            logits = model.logits(model.hidden_states(inputs)[0])
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
            return -jnp.sum(logp[..., 0] * inputs.attention_mask)

        return nnx.grad(loss_fn, argnums=nnx.DiffState(0, LORA_PARAMS))(model)

    return per_layer(nnx.to_flat_state(run(state)))


def test_lora_gradients_and_remat_equal_loop(tiny_checkpoint, peft_adapter, prompt):
    loop = fxjax.from_pretrained(tiny_checkpoint, adapter=peft_adapter)
    scan = fxjax.from_pretrained(tiny_checkpoint, adapter=peft_adapter, scan_layers=True)
    assert scan.decoder.layers.mlp.down_proj.lora.lora_a.shape == (LAYERS, 48, 2)
    assert_same_params(scan, loop, LORA_PARAMS)
    assert scan.visual.blocks.attn.qkv.lora.lora_b.shape == (VISION_BLOCKS, 2, 96)
    inputs = scan.prepare(*prompt)
    targets = jnp.asarray(np.roll(prompt[0], -1, axis=1))
    want = _lora_grads(loop, inputs, targets)
    assert len(want) == 2 * len(list(lora_linears(loop))) and all(np.any(g) for g in want.values())
    # remat "full" (the run config's default) checkpoints each scan body; the logits test covers the plain
    # scan, and "dots" is the same code path with another jax.checkpoint policy (a compile each is the cost)
    got = _lora_grads(scan, inputs, targets, "full")
    assert got.keys() == want.keys()
    worst = max((rel_err(got[p], want[p], floor=0), p) for p in want)
    assert worst[0] < GRAD_TOL, worst
    for remat, checkpoints in ((None, 0), ("dots", 2)):  # traced only: one checkpoint per scan body
        copy = nnx.merge(*nnx.split(scan))
        with_remat(copy, remat)
        jaxpr = str(jax.make_jaxpr(lambda: copy.hidden_states(inputs)[0])())
        assert jaxpr.count("remat2[") == checkpoints, remat  # jax.checkpoint's primitive
    assert scan.decoder.layer_remat is None and scan.visual.block_remat is None  # with_remat: trace-local copy


def test_hf_round_trip(tiny_checkpoint, peft_adapter, tmp_path):
    scan = fxjax.from_pretrained(tiny_checkpoint, scan_layers=True)
    out = save_pretrained(scan, tmp_path / "plain")
    assert file_tensors(out) == file_tensors(tiny_checkpoint)  # every tensor bit for bit, the same names
    assert_same_params(fxjax.from_pretrained(out), fxjax.from_pretrained(tiny_checkpoint))
    # merged LoRA export: the same tensors as the looped model's merged export
    merged_scan = save_pretrained(fxjax.from_pretrained(tiny_checkpoint, adapter=peft_adapter, scan_layers=True),
                                  tmp_path / "merged_scan")
    merged_loop = save_pretrained(fxjax.from_pretrained(tiny_checkpoint, adapter=peft_adapter),
                                  tmp_path / "merged_loop")
    assert file_tensors(merged_scan) == file_tensors(merged_loop)
    assert file_tensors(merged_scan) != file_tensors(tiny_checkpoint)


def test_peft_round_trip(tiny_checkpoint, peft_adapter, tmp_path):
    scan = fxjax.from_pretrained(tiny_checkpoint, adapter=peft_adapter, scan_layers=True)
    out = save_peft_adapter(scan, tmp_path / "again")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (peft_adapter / name).read_bytes(), name
    # fxjax-made adapters on the scanned model load into the looped one, layer for layer
    fresh = fxjax.from_pretrained(tiny_checkpoint, scan_layers=True)
    apply_lora(fresh, LoRAConfig(rank=3, alpha=6, target_modules=("q_proj", "down_proj")), rngs=nnx.Rngs(5))
    rng = np.random.RandomState(4)
    for _, linear in lora_linears(fresh):  # non-zero B: a zero one would hide a mis-stacked layer
        linear.lora.lora_b.set_value(jnp.asarray(rng.randn(*linear.lora.lora_b.shape), jnp.float32))
    saved = save_peft_adapter(fresh, tmp_path / "fresh")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["target_modules"] == ["q_proj", "down_proj"]
    loop = fxjax.from_pretrained(tiny_checkpoint, adapter=saved)
    assert_same_params(fresh, loop, LORA_PARAMS)


def test_fresh_adapters_equal_loop(tiny_checkpoint):
    """Fresh LoRA A (B = 0) is drawn layer by layer in the looped model's order: the same start in both
    layouts, also with dropout modules drawing from the same (default) stream in between."""
    lora = LoRAConfig(rank=2, alpha=4, dropout=0.1)
    scan = fxjax.from_pretrained(tiny_checkpoint, lora=lora, lora_seed=3, scan_layers=True)
    loop = fxjax.from_pretrained(tiny_checkpoint, lora=lora, lora_seed=3)
    assert_same_params(scan, loop, LORA_PARAMS)
    assert scan.decoder.layers.self_attn.v_proj.lora.lora_a.shape == (LAYERS, 32, 2)


def test_partial_layer_adapters_are_refused(tiny_checkpoint, tmp_path):
    scan = fxjax.from_pretrained(tiny_checkpoint, scan_layers=True)
    only_first = LoRAConfig(rank=2, target_modules=r".*layers\.0\.self_attn\.q_proj")
    with pytest.raises(ValueError, match=r"layers \[0\] of model\.language_model\.layers\.<i>\.self_attn\.q_proj.*"
                                         r"scan_layers=False"):
        apply_lora(scan, only_first)
    assert not list(lora_linears(scan))
    loop = fxjax.from_pretrained(tiny_checkpoint, lora=only_first)
    adapter = save_peft_adapter(loop, tmp_path / "first_layer")
    with pytest.raises(AdapterError, match=r"adapts layers \[0\] of .*scan_layers=False"):
        load_peft_adapter(scan, adapter)
    assert not list(lora_linears(scan))


def test_eleven_layers_stack_in_layer_order_not_name_order(tmp_path):
    """Checkpoint and adapter files list their tensors by name, where layers.10 sorts before layers.2: with 11
    decoder layers and 11 vision blocks (2 and 3 elsewhere here, where both orders agree), each stacked
    weight and LoRA factor is its layer's (the looped model reads each by its name: the oracle), and the
    stacked model's export writes them back under their own names."""
    from conftest import build_hf_model, save_hf_model

    hf_dir = save_hf_model(build_hf_model(layers=11, vision_depth=11, fullatt=(3, 7)), tmp_path / "deep")
    loop = fxjax.from_pretrained(hf_dir, lora=LoRAConfig(rank=2, alpha=4))
    rng = np.random.RandomState(5)
    for _, variable in nnx.to_flat_state(nnx.state(loop, LORA_PARAMS)):
        variable.set_value(jnp.asarray(rng.randn(*variable.shape), jnp.float32))
    adapter = save_peft_adapter(loop, tmp_path / "adapter")
    scan = fxjax.from_pretrained(hf_dir, adapter=adapter, scan_layers=True)
    assert scan.decoder.layers.self_attn.q_proj.kernel.shape[0] == 11 == scan.visual.blocks.attn.qkv.kernel.shape[0]
    assert_same_params(scan, loop)
    assert_same_params(scan, loop, LORA_PARAMS)
    again = save_peft_adapter(scan, tmp_path / "again")
    assert file_tensors_of(again / "adapter_model.safetensors") == file_tensors_of(adapter / "adapter_model.safetensors")
    assert file_tensors(save_pretrained(scan, tmp_path / "merged")) == \
        file_tensors(save_pretrained(loop, tmp_path / "merged_loop"))


def file_tensors_of(path) -> dict[str, bytes]:
    with safe_open(str(path), framework="numpy") as f:
        return {name: f.get_tensor(name).tobytes() for name in f.keys()}


def test_generation_equals_loop(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("spread")
    _, loop = spread_logits_models(hf_dir)
    scan = fxjax.from_pretrained(hf_dir, scan_layers=True)
    ids = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids > 0).astype(np.int64)
    # greedy, two sequences per prompt: the prompt's stacked cache is repeated per sequence (repeat_rows)
    greedy = generate(scan, ids, mask, max_new_tokens=10, num_return_sequences=2)
    np.testing.assert_array_equal(greedy, generate(loop, ids, mask, max_new_tokens=10, num_return_sequences=2))
    assert len(set(greedy[:, 6:].ravel().tolist())) > 3  # a wandering path, not one token repeated


def test_generation_with_lora_dropout_equals_loop(tiny_checkpoint, peft_adapter, prompt, tmp_path):
    """A scanned model with LoRA dropout (the recipes' 0.05; eval mode while decoding) generates as the looped
    one: the scan wrote the dropout streams back from inside the decode loop and failed ("Cannot mutate
    RngCount from a different trace level"), so GRPO's first rollout and SFT's closing eval died with
    scan_layers. In train mode the streams still advance (test_lora_dropout_streams_advance_per_layer)."""
    with_dropout = tmp_path / "with_dropout"  # (a copy: the module's adapter stays as the other tests load it)
    with_dropout.mkdir()
    for f in Path(peft_adapter).iterdir():
        if f.is_file():
            (with_dropout / f.name).write_bytes(f.read_bytes())
    config = json.loads((with_dropout / "adapter_config.json").read_text())
    (with_dropout / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.05}))
    scan, loop = (fxjax.from_pretrained(tiny_checkpoint, adapter=with_dropout, scan_layers=stacked)
                  for stacked in (True, False))
    assert scan.decoder.layers.self_attn.q_proj.lora.dropout.rate == 0.05
    # (an image row and a left-padded text row: the vision blocks' scan, under its cond, inside the decode too)
    tokens = generate(scan, *prompt, max_new_tokens=6, num_return_sequences=2)
    np.testing.assert_array_equal(tokens, generate(loop, *prompt, max_new_tokens=6, num_return_sequences=2))
    assert int(scan.decoder.layers.self_attn.q_proj.lora.dropout.rngs.count[...]) == 0  # (no draw in eval mode)


def test_stacked_cache_layout():
    looped = KVCache.init(3, 2, 5, 1, 4, jnp.float32)
    stacked = KVCache.init(3, 2, 5, 1, 4, jnp.float32, stacked=True)
    assert stacked.stacked and not looped.stacked and stacked.keys.shape == (3, 2, 5, 1, 4)
    rows = jnp.arange(2.0)[:, None, None, None]
    looped = looped._replace(keys=tuple(k + rows + 10 * i for i, k in enumerate(looped.keys)))
    stacked = stacked._replace(keys=jnp.stack(looped.keys))
    np.testing.assert_array_equal(repeat_rows(stacked, 3).keys, jnp.stack(repeat_rows(looped, 3).keys))


def test_stacked_partition_specs(tiny_checkpoint):
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    assert param_spec("decoder/layers/self_attn/q_proj/kernel", (2, 32, 32), mesh) == P(None, "fsdp", "tensor")
    assert param_spec("decoder/layers/mlp/down_proj/lora/lora_b", (2, 4, 32), mesh) == P(None, None, "fsdp")
    # optimizer moments follow their parameter
    from fxjax.partition_rules import state_spec
    assert state_spec(("opt_state", 0, "mu", "decoder", "layers", "mlp", "up_proj", "kernel"), (2, 32, 48),
                      mesh) == P(None, "fsdp", "tensor")
    scan = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2), scan_layers=True)
    loop = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2))
    loop_specs = dict(nnx.to_flat_state(partition_specs(loop, mesh)))
    for path, spec in nnx.to_flat_state(partition_specs(scan, mesh)):
        want = loop_specs[layer_path(path, 0)] if is_stacked(path) else loop_specs[path]
        assert spec == (P(None, *want) if is_stacked(path) and len(want) else want), path
    dropped = {(d.path, d.dim) for d in replicated_dims(scan, {"data": 1, "fsdp": 1, "tensor": 32})}
    assert ("decoder/layers/self_attn/k_proj/kernel", 2) in dropped  # 16 kv columns over 32: replicated


def _train_state(stacked: bool, rng: np.random.RandomState):
    """A train-state-shaped pytree (LoRA factors and Adam-like moments) in either layout, and its layers."""
    layers = [{"q_proj": {"lora": {"lora_a": rng.randn(4, 2).astype(np.float32)}}} for _ in range(LAYERS)]

    def tree(per_layer):
        if stacked:
            return {"decoder": {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}}
        return {"decoder": {"layers": {i: jax.tree.map(jnp.asarray, layer) for i, layer in enumerate(per_layer)}}}

    return {"params": tree(layers), "opt_state": {"mu": tree([jax.tree.map(lambda x: 2 * x, l) for l in layers])},
            "step": jnp.int32(5)}


@pytest.mark.parametrize("saved_stacked", [False, True])
def test_train_checkpoint_restores_into_the_other_layout(tmp_path, saved_stacked):
    from fxjax.config_mapping import ConfigError
    from fxjax.train.checkpointing import TrainCheckpointer, flatten_tree

    saved = _train_state(saved_stacked, np.random.RandomState(0))
    checkpointer = TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(5, saved, {"position": 1}, {"model": {"scan_layers": saved_stacked}})
    checkpointer.wait()
    template = _train_state(not saved_stacked, np.random.RandomState(1))  # other values, other layout
    state, data, config, step = checkpointer.restore(template, 5)
    assert step == 5 and data == {"position": 1}
    assert config == {"model": {"scan_layers": saved_stacked}}  # what the resume check compares against
    want = _train_state(not saved_stacked, np.random.RandomState(0))
    got_flat, want_flat = flatten_tree(state), flatten_tree(want)
    assert got_flat.keys() == want_flat.keys()
    for name in want_flat:
        np.testing.assert_array_equal(np.asarray(got_flat[name]), np.asarray(want_flat[name]), err_msg=name)
    other = {"params": {"decoder": {"norm": jnp.zeros(3)}}, "step": jnp.int32(0)}
    # names that differ beyond the layout: another run's settings (not a damaged checkpoint), naming them
    with pytest.raises(ConfigError, match=r"step 5 in .*ckpt was written with other model or LoRA settings than "
                                          r"this run's: it lacks "
                                          r"\['params.decoder.norm'\]"):
        checkpointer.restore(other, 5)
    checkpointer.close()


def test_lora_dropout_streams_advance_per_layer(tiny_checkpoint):
    """In train mode each scanned layer draws its own dropout mask from its stacked Linear's one stream: the
    stream advances once per layer and call (the scan writes the RNG state back)."""
    scan = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2, dropout=0.5, target_modules=("q_proj",)),
                                 scan_layers=True)
    rng = np.random.RandomState(0)
    for _, linear in lora_linears(scan):
        linear.lora.lora_b.set_value(jnp.asarray(rng.randn(*linear.lora.lora_b.shape), jnp.float32))
    stream = scan.decoder.layers.self_attn.q_proj.lora.dropout.rngs
    ids = np.arange(1, 9)[None]
    inputs = scan.prepare(ids)  # host-side: outside the jit
    forward = nnx.jit(lambda model, inputs: model.logits(model.hidden_states(inputs)[0]))
    eval_logits = np.asarray(forward(scan, inputs))
    assert int(stream.count[...]) == 0  # eval mode: no draws
    scan.train()
    first, second = np.asarray(forward(scan, inputs)), np.asarray(forward(scan, inputs))
    assert int(stream.count[...]) == 2 * LAYERS
    assert not np.array_equal(first, second) and not np.array_equal(first, eval_logits)


def test_mesh_load_puts_stacked_layers_on_their_shardings(tiny_checkpoint):
    """from_pretrained(mesh=...) writes each layer into its slice of a stacked array that has the layer
    axis unsharded and the per-layer rule behind it (a one-device mesh here: the specs, not the split)."""
    from fxjax.device_mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    scan = fxjax.from_pretrained(tiny_checkpoint, scan_layers=True, mesh=mesh, lora=LoRAConfig(rank=2))
    q = scan.decoder.layers.self_attn.q_proj
    assert q.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert scan.visual.blocks.attn.proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    assert q.lora.lora_b[...].sharding.spec == P(None, None, "tensor")
    # every parameter exactly as the partition rules place it (a replicated stacked norm was P(None), not
    # the rules' P(): unequal to JAX, so sharding the model moved it again)
    from fxjax.partition_rules import param_shardings

    plain = fxjax.from_pretrained(tiny_checkpoint, scan_layers=True, mesh=mesh)  # (LoRA's placing re-shards)
    wanted = dict(nnx.to_flat_state(param_shardings(plain, mesh)))
    placed = {path: v.get_value().sharding for path, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    assert {path: s.spec for path, s in placed.items() if s != wanted[path]} == {}
    assert_same_params(scan, fxjax.from_pretrained(tiny_checkpoint), BASE_PARAMS)
