"""train.optimizer against hand-computed values: the warmup and decay of the learning rate, and the clip
on the gradient before AdamW (not on its update)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fxjax.config_sections import OptimSection
from fxjax.train.optimizer import make_optimizer, make_schedule


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_the_schedule_warms_up_from_the_first_update_and_ends_at_the_floor(kind):
    """warmup 4 of 10 updates, peak 1, floor 0.1: updates 0-3 at 1/4 .. 4/4 (the first update not at 0), then
    the decay over the 6 updates left, reaching the floor at update 10 (the end of the run)."""
    cfg = OptimSection(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule=kind)
    schedule = make_schedule(cfg, 10)
    got = [float(schedule(i)) for i in range(11)]
    after = [k / 6 for k in range(7)]  # the decay's progress at updates 4 .. 10
    decay = {"cosine": [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)) for t in after],
             "linear": [1.0 - 0.9 * t for t in after], "constant": [1.0] * 7}[kind]
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1.0, *decay], rtol=1e-6)
    # warmup_ratio 0.2 of 10 updates: 2 of warmup, then the decay from the peak
    ratio = make_schedule(OptimSection(learning_rate=1.0, warmup_ratio=0.2, min_lr_ratio=0.1, schedule=kind), 10)
    np.testing.assert_allclose([float(ratio(i)) for i in range(3)], [0.5, 1.0, 1.0], rtol=1e-6)


def test_the_gradient_is_clipped_before_adamw():
    """max_grad_norm clips the gradient (AdamW then sees a gradient of norm 1), as HF Trainer does; the
    update of a clipped gradient differs from AdamW's update of the raw one where the moments see the size
    (weight decay and the second step's moments)."""
    cfg = OptimSection(learning_rate=0.1, warmup_steps=0, schedule="constant", max_grad_norm=1.0, weight_decay=0.1)
    tx, _ = make_optimizer(cfg, 10)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1))
    state, ref_state = tx.init(params), reference.init(params)
    for grads in ({"w": jnp.array([0.6, 0.0, 0.8])}, {"w": jnp.array([600.0, 0.0, -800.0])}):  # norm 1, then 1000
        updates, state = tx.update(grads, state, params)
        want, ref_state = reference.update(grads, ref_state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(want["w"]), rtol=1e-6)
    unclipped = optax.adamw(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1)
    s = unclipped.init(params)
    _, s = unclipped.update({"w": jnp.array([0.6, 0.0, 0.8])}, s, params)
    raw, _ = unclipped.update({"w": jnp.array([600.0, 0.0, -800.0])}, s, params)
    assert np.abs(np.asarray(raw["w"]) - np.asarray(want["w"])).max() > 1e-3  # the comparison can tell


def test_three_updates_equal_torch_adamw_with_the_gradient_clipped_as_hf_trainer_does():
    """The oracle is torch's (what HF Trainer and TRL run): torch.nn.utils.clip_grad_norm_ over all the
    parameters, then torch.optim.AdamW (decoupled weight decay), at the learning rate this schedule gives
    each update; two parameters, so the clip's norm is the global one."""
    import torch

    cfg = OptimSection(learning_rate=0.05, warmup_steps=2, schedule="cosine", max_grad_norm=1.0, weight_decay=0.1,
                       b1=0.8, b2=0.95, eps=1e-6)
    tx, schedule = make_optimizer(cfg, 5)
    start = {"a": np.array([1.0, -2.0, 3.0], np.float32), "b": np.array([[0.5, -0.25]], np.float32)}
    grads = [{"a": np.array([0.3, 0.0, 0.4], np.float32), "b": np.array([[0.0, 0.1]], np.float32)},  # norm < 1
             {"a": np.array([60.0, 0.0, -80.0], np.float32), "b": np.array([[30.0, 0.0]], np.float32)},  # clipped
             {"a": np.array([-1.0, 2.0, 0.5], np.float32), "b": np.array([[-0.7, 0.2]], np.float32)}]
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    opt = torch.optim.AdamW(list(torch_params.values()), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2),
                            eps=cfg.eps, weight_decay=cfg.weight_decay)
    for i, g in enumerate(grads):
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), cfg.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = float(schedule(i))
        opt.step()
        for k in start:
            np.testing.assert_allclose(np.asarray(params[k]), torch_params[k].detach().numpy(), rtol=2e-6, atol=1e-7,
                                       err_msg=f"update {i}, {k}")
    assert max(np.abs(np.asarray(params[k]) - start[k]).max() for k in start) > 0.05  # they moved
