"""The traceable path: `model.prepare(...)` on the host, then the pure `fxjax.model.forward(model, inputs)`
inside the caller's own jax.jit / nnx.jit and jax.grad / nnx.grad (tiny conftest checkpoint, fp32)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from conftest import image_prompt, rel_err
from flax import nnx

import fxjax
from fxjax.model import forward
from fxjax.model.lora import LORA_PARAMS, LoRAConfig, lora_linears


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """LoRA on every linear with non-zero A and B, so every adapter gets a gradient."""
    model = fxjax.from_pretrained(tiny_checkpoint, dtype="float32", lora=LoRAConfig(rank=2, alpha=4))
    rng = np.random.RandomState(0)  # numpy: no compile per adapter shape
    for _, linear in lora_linears(model):
        for weight in (linear.lora.lora_a, linear.lora.lora_b):
            weight.set_value(np.float32(0.3) * rng.randn(*weight.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def prompt():
    ids, pv, grid = image_prompt([(1, 4, 6)], np.random.RandomState(0))
    return ids[None], pv, grid


def _loss(model, inputs):
    logits = forward(model, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], inputs.input_ids[:, 1:]).mean()


def test_forward_under_jax_jit_with_split_and_merge(model, prompt):
    ids, pv, grid = prompt
    inputs = model.prepare(ids, pixel_values=pv, image_grid_thw=grid)
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, inputs):
        return nnx.merge(graphdef, state).forward(inputs)  # the method; the grad test uses the function

    out = np.asarray(logits(state, inputs))
    assert rel_err(out, np.asarray(model(ids, pixel_values=pv, image_grid_thw=grid))) <= 1e-6


def test_lora_gradient_under_jit_equals_eager(model):
    # Text only: the eager (op by op) reference compiles every primitive separately, and the vision tower
    # would double that; the image path under jit is the test above's (and test_lora's under nnx.grad).
    inputs = model.prepare(np.arange(5, 29)[None])
    graphdef, lora, rest = nnx.split(model, LORA_PARAMS, ...)

    def loss(lora, rest, inputs):
        return _loss(nnx.merge(graphdef, lora, rest), inputs)

    jit_loss, jit_grads = jax.jit(jax.value_and_grad(loss))(lora, rest, inputs)
    eager_loss, eager_grads = jax.value_and_grad(loss)(lora, rest, inputs)  # op by op: no trace of the model
    flat_jit, flat_eager = dict(nnx.to_flat_state(jit_grads)), dict(nnx.to_flat_state(eager_grads))
    assert flat_jit.keys() == flat_eager.keys() and len(flat_jit) == 2 * len(list(lora_linears(model)))
    assert abs(float(jit_loss) - float(eager_loss)) <= 1e-6 * abs(float(eager_loss))
    # Jitted, XLA fuses and reorders fp32 sums: the gradients (sums over tokens with cancellation) then differ
    # from op-by-op ones at ~1e-5 relative; a wrong gradient would be off by far more.
    for path, g in flat_jit.items():
        g, ref = np.asarray(g[...]), np.asarray(flat_eager[path][...])
        assert np.isfinite(g).all() and (np.abs(g).max() > 0) == (path[0] != "visual"), path
        assert rel_err(g, ref, floor=0.0) <= 1e-4, (path, rel_err(g, ref, floor=0.0))

    # the same with nnx's transforms on the model object itself
    @nnx.jit
    def nnx_grads(model, inputs):
        return nnx.grad(_loss, argnums=nnx.DiffState(0, LORA_PARAMS))(model, inputs)

    for path, g in nnx.to_flat_state(nnx_grads(model, inputs)):
        assert rel_err(np.asarray(g[...]), np.asarray(flat_jit[path][...]), floor=0.0) <= 1e-6, path
