"""The SFT loss: chunked = unchunked, no loss on prompt or padding, the step's accumulation and remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TINY_TOKENS, image_prompt, rel_err
from fxjax.model import Qwen25VL
from fxjax.model.config import Qwen25VLConfig, TextConfig, VisionConfig
from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora
from fxjax.train.batching import build_step_batch
from fxjax.train.losses import IGNORE_INDEX, chunked_cross_entropy, cross_entropy_sum, loss_targets
from fxjax.train.optimizer import make_optimizer
from fxjax.train.step import TrainState, make_train_step, micro_loss, split_model
from fxjax.config_sections import OptimSection


def small_model(seed=0, dropout=0.0) -> Qwen25VL:
    cfg = Qwen25VLConfig(
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=32,
                            window_size=56, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 1, 1)),
        eos_token_id=(2,), **TINY_TOKENS)
    model = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout), rngs=nnx.Rngs(seed + 1, dropout=seed + 3))
    key = jax.random.key(seed + 2)
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, LORA_PARAMS))):  # B = 0 would hide A's grads
        var.set_value(0.1 * jax.random.normal(jax.random.fold_in(key, i), var.shape))
    return model


def hf_causal_lm_loss(logits, labels) -> float:
    """The oracle: transformers' own causal-LM loss (what a Qwen2.5-VL forward with labels= returns): the
    mean NLL of labels shifted by one, -100 ignored (in float32: it upcasts the logits to float, as fxjax)."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.from_numpy(np.asarray(logits, np.float64))
    return float(ForCausalLMLoss(logits, torch.from_numpy(np.asarray(labels, np.int64)), logits.shape[-1]))


def labelled_batch(rng, grids, prompt_len=(4, 7), completion=(5, 9), length=None):
    """HF-style dict batch: image prompts, completions labelled, right padding with pad id 0."""
    rows = []
    for grid in grids:
        ids, pv, g = image_prompt([grid], rng, prefix=tuple(rng.randint(10, 90, size=rng.randint(*prompt_len))))
        comp = rng.randint(10, 90, size=rng.randint(*completion))
        rows.append((np.concatenate([ids, comp]), len(ids), pv, g))
    length = length or max(len(r[0]) for r in rows)
    b = len(rows)
    input_ids = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    for i, (ids, n_prompt, _, _) in enumerate(rows):
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = ids[n_prompt:]
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                pixel_values=np.concatenate([r[2] for r in rows]), image_grid_thw=np.concatenate([r[3] for r in rows]))


def test_chunked_cross_entropy_equals_the_unchunked_one_with_gradients():
    rng = np.random.RandomState(0)
    b, length, d, v = 3, 21, 16, 97
    hidden = jnp.asarray(rng.randn(b, length, d), jnp.float32)
    w = jnp.asarray(rng.randn(d, v), jnp.float32)
    labels = rng.randint(0, v, size=(b, length)).astype(np.int32)
    labels[0, :8] = IGNORE_INDEX  # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, 15:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # a row with nothing to learn

    def full(hidden, w):
        total, count = cross_entropy_sum(hidden @ w, labels)
        return total / count

    want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, w)
    np.testing.assert_allclose(float(want), hf_causal_lm_loss(hidden @ w, labels), rtol=1e-6)
    for chunk in (1, 7, 16, 64, 1000):
        targets = loss_targets(labels, multiple=16)

        def chunked(hidden, w):
            total, count = chunked_cross_entropy(hidden, targets, lambda h: h @ w, chunk)
            return total / count

        got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, w)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for g, e in zip(got_grads, want_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shards", [2, 4])
def test_the_loss_of_slots_laid_out_per_batch_shard_is_the_same(shards):
    """build_step_batch lays the slots out per batch shard (shard s's in block s, pointing into its own
    rows); scored shard by shard (each device its own rows' targets) the loss and its gradient are those of
    the whole batch at once, for chunks smaller and larger than a shard's block."""
    from fxjax.train.batching import _shard_targets

    rng = np.random.RandomState(1)
    b, length, d, v = 4, 13, 8, 37
    hidden = jnp.asarray(rng.randn(b, length, d), jnp.float32)
    w = jnp.asarray(rng.randn(d, v), jnp.float32)
    labels = rng.randint(0, v, size=(b, length)).astype(np.int32)
    labels[:, :4] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    labels[3, :] = IGNORE_INDEX  # shard 1 of 2 (or 3 of 4) is half (or all) padding

    def loss(hidden, w, targets, chunk, shards):
        total, count = chunked_cross_entropy(hidden, targets, lambda h: h @ w, chunk, shards=shards)
        return total / count

    want = jax.value_and_grad(loss, argnums=(0, 1))(hidden, w, loss_targets(labels), 1000, 1)
    (per_shard,) = _shard_targets([labels], shards, None, 1)
    for chunk in (1, 8, 1000):
        got = jax.value_and_grad(loss, argnums=(0, 1))(hidden, w, per_shard, chunk, shards)
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
        for g, e in zip(got[1], want[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)


def test_loss_targets_take_exactly_the_assistant_span():
    labels = np.full((2, 8), IGNORE_INDEX, np.int32)
    labels[0, 3:6] = [11, 12, 13]  # prompt 0..2, padding 6..7
    labels[1, 5:8] = [21, 22, 23]
    t = loss_targets(labels, size=8)
    n = int(t.weight.sum())
    assert n == 6
    # hidden state at flat position p predicts the label at p + 1 of the same row
    assert t.index[:n].tolist() == [2, 3, 4, 8 + 4, 8 + 5, 8 + 6]
    assert t.target[:n].tolist() == [11, 12, 13, 21, 22, 23]
    assert not t.weight[n:].any() and not t.target[n:].any()
    with pytest.raises(ValueError, match="do not fit"):
        loss_targets(labels, size=4)


def test_no_loss_and_no_gradient_on_prompt_or_padding_tokens():
    model = small_model()
    graphdef, params, base, rest = split_model(model)
    rng = np.random.RandomState(1)
    batch = labelled_batch(rng, [(1, 4, 4), (1, 4, 8)])
    batch["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, 5)))  # extra padding columns
    batch["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (0, 5)))
    batch["labels"] = np.pad(batch["labels"], ((0, 0), (0, 5)), constant_values=IGNORE_INDEX)
    inputs = model.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    targets = loss_targets(batch["labels"], multiple=8)

    def loss_of_hidden(hidden):
        total, count = chunked_cross_entropy(hidden, targets, model.logits, 8)
        return total / count

    hidden, _ = jax.jit(lambda: model.hidden_states(inputs))()
    grad = np.asarray(jax.jit(jax.grad(loss_of_hidden))(hidden))
    predicts = np.zeros(batch["labels"].shape, bool)
    predicts[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert np.abs(grad[predicts]).sum(axis=-1).min() > 0
    assert not grad[~predicts].any()  # prompt, image, padding and final positions get no gradient at all
    # and the model-level loss equals the reference on full logits over the labelled tokens only
    total, count, _ = jax.jit(lambda p, b, r: micro_loss(graphdef, p, b, r, inputs, targets,
                                                         jax.random.key(0, impl="rbg"), loss_chunk=5, remat=None,
                                                         remat_vision=None, grad=False))(params, base, rest)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    np.testing.assert_allclose(float(total / count), hf_causal_lm_loss(logits, batch["labels"]), rtol=1e-5)
    assert int(count) == int(predicts.sum())


def test_a_skipped_update_keeps_the_moments_and_still_advances_the_schedule():
    """A non-finite update is not applied (the Adam moments and count stay), but the learning-rate
    schedule counts it, as a torch scheduler steps on a skipped update: the next update runs at the rate
    logged for its step (schedule(1)), as a first Adam step, not at schedule(0)."""
    from fxjax.train.optimizer import keep_if_finite

    cfg = OptimSection(learning_rate=1e-2, warmup_steps=0, max_grad_norm=None)
    tx, schedule = make_optimizer(cfg, 4)
    assert float(schedule(1)) < 0.9 * float(schedule(0))
    params, grads = {"w": jnp.array([1.0, -2.0, 3.0])}, {"w": jnp.array([0.5, -0.25, 2.0])}
    start = tx.init(params)
    _, tried = tx.update(grads, start, params)  # the update of a step found non-finite: dropped
    state = keep_if_finite(jnp.bool_(False), tried, start)
    updates, _ = tx.update(grads, state, params)
    first_adam_step = optax.adamw(float(schedule(1)), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    want, _ = first_adam_step.update(grads, first_adam_step.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(want["w"]), rtol=1e-6)
    # a finite update keeps everything new
    kept = keep_if_finite(jnp.bool_(True), tried, start)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(tried)))


def _step(model, micro_batches, remat=None, floor=None, with_grads=False):
    graphdef, params, base, rest = split_model(model)
    tx, schedule = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=0), 10)
    state = TrainState.fresh(params, tx, seed=0)
    step = make_train_step(graphdef, tx, schedule, loss_chunk=16, remat=remat, remat_vision=remat,
                           with_grads=with_grads)
    batch = build_step_batch(micro_batches, model.config, 0, floor=floor)
    new_state, metrics = step(state, base, rest, batch)
    metrics = jax.device_get(metrics)
    grads = metrics.pop("grads", None)
    out = {k: float(v) for k, v in metrics.items()}
    return jax.device_get(new_state.params), (dict(out, grads=grads) if with_grads else out)


def test_the_steps_gradient_is_the_mean_token_gradient_of_the_plain_forward():
    """Two micro-batches padded to a longer floor (as the loop pads to its running shapes): the step's loss,
    gradient and its norm are those of the mean token cross-entropy of the plain forward on the unpadded
    rows (a sum instead of the mean, or the padding columns labelled, passed the comparison with one batch)."""
    rng = np.random.RandomState(5)
    rows = [labelled_batch(rng, [g]) for g in [(1, 4, 4), (1, 4, 8)]]
    model = small_model()
    graphdef, params, base, rest = split_model(model)

    def mean_loss(p):
        m = nnx.merge(graphdef, p, base, rest)
        total = count = 0.0
        for r in rows:
            hidden, _ = m.hidden_states(m.prepare(r["input_ids"], r["attention_mask"], r["pixel_values"],
                                                  r["image_grid_thw"]))
            t, c = cross_entropy_sum(m.logits(hidden), r["labels"])
            total, count = total + t, count + c
        return total / count

    want_loss, want_grads = jax.device_get(jax.jit(jax.value_and_grad(mean_loss))(params))
    longest = max(r["input_ids"].shape[1] for r in rows)
    _, got = _step(model, rows, floor={"length": longest + 8}, with_grads=True)
    np.testing.assert_allclose(got["loss"], float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], float(optax.tree.norm(want_grads)), rtol=1e-4)
    got_flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(got["grads"])])
    want_flat = np.concatenate([np.ravel(b) for b in jax.tree.leaves(want_grads)])
    assert np.abs(got_flat - want_flat).max() <= 1e-5 * np.abs(want_flat).max()
    assert got["target_tokens"] == sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in rows)


def test_each_micro_batch_draws_its_own_lora_dropout():
    """LoRA dropout: the same row twice in one step (two micro-batches) gives another gradient than once
    (each micro-batch its own masks, as separate batches would have; one shared key made them equal)."""
    rng = np.random.RandomState(6)
    row = labelled_batch(rng, [(1, 4, 4)])

    def dropping_model():  # a fresh one per step: the step donates the model's parameters
        model = small_model(dropout=0.5)
        model.train()
        return model

    _, once = _step(dropping_model(), [row], with_grads=True)
    _, twice = _step(dropping_model(), [row, row], with_grads=True)
    assert once["target_tokens"] * 2 == twice["target_tokens"]
    assert abs(once["grad_norm"] - twice["grad_norm"]) > 1e-4 * once["grad_norm"]


def test_a_non_finite_step_leaves_the_parameters_and_moments_unchanged():
    """A NaN pixel: the step reports finite False and keeps the LoRA parameters (the update skipped)."""
    rng = np.random.RandomState(7)
    row = labelled_batch(rng, [(1, 4, 4)])
    row["pixel_values"] = row["pixel_values"].copy()
    row["pixel_values"][0, 0] = np.nan
    model = small_model()
    before = jax.device_get(split_model(model)[1])
    after, metrics = _step(model, [row])
    assert metrics["finite"] == 0.0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_equals_one_big_batch_and_remat_changes_nothing():
    rng = np.random.RandomState(2)
    grids = [(1, 4, 4), (1, 4, 8)]
    rows = [labelled_batch(rng, [g], length=40) for g in grids]
    both = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    _, big = _step(small_model(), [both], with_grads=True)  # one batch of two rows, no remat
    # two micro-batches of one row each scanned into one update, decoder layers and vision blocks rematerialised
    _, acc = _step(small_model(), rows, remat="full", with_grads=True)
    assert big["target_tokens"] == acc["target_tokens"] > 0
    np.testing.assert_allclose(acc["loss"], big["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc["grad_norm"], big["grad_norm"], rtol=1e-4)
    # the gradients themselves, each tensor to 1e-4 of its largest entry (Adam's first update is +/- the
    # learning rate whatever the gradient's size: comparing the updated parameters saw only its signs)
    acc_grads, big_grads = jax.tree.leaves(acc["grads"]), jax.tree.leaves(big["grads"])
    assert len(acc_grads) == len(big_grads) > 0
    for a, b in zip(acc_grads, big_grads):
        assert np.abs(np.asarray(b)).max() > 0
        assert rel_err(a, b, floor=0.0) < 1e-4


def test_rows_added_to_fill_the_last_eval_batch_add_no_loss():
    """pad_rows: an incomplete last eval batch is filled with copies of its last example (image and all),
    labelled nowhere, so the held-out loss counts each example once."""
    from fxjax.train.batching import pad_rows

    rng = np.random.RandomState(8)
    batch = labelled_batch(rng, [(1, 4, 4), (1, 4, 8)])
    batch["meta"] = [{"i": 0}, {"i": 1}]
    full = pad_rows(batch, 4)
    assert full["input_ids"].shape[0] == 4 and full["meta"][2:] == [None, None]
    np.testing.assert_array_equal(full["labels"][:2], batch["labels"])
    assert (full["labels"][2:] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(full["input_ids"][2:], np.repeat(batch["input_ids"][1:], 2, axis=0))
    np.testing.assert_array_equal(full["image_grid_thw"][2:], np.repeat(batch["image_grid_thw"][1:], 2, axis=0))
    last = int(np.prod(batch["image_grid_thw"][1]))
    np.testing.assert_array_equal(full["pixel_values"][-last:], batch["pixel_values"][-last:])
    assert full["pixel_values"].shape[0] == batch["pixel_values"].shape[0] + 2 * last
    assert pad_rows(batch, 2) is batch
