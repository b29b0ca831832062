"""The GRPO generation batch and the jitted update on the tiny HF-built model (no sampler involved):

* completion log-probs from the grouped batch (each image encoded once, G rows pointing at it) equal the
  log-softmax of the full forward of every (prompt + completion) sequence with its own copy of the image,
  over logits / temperature;
* the update's vision encoder sees each micro-batch's P images once, not P x G;
* the update's loss and LoRA gradient equal grpo_loss on log-probs from the plain forward (autodiff
  through the whole model), so batching, masks and the float32 lm_head add nothing; a non-finite update
  (a NaN pixel) is reported and leaves the LoRA parameters unchanged;
* with several batch shards and micro-batches, micro-batch a holds the a-th prompts of each shard's block
  (each device updates on the prompts it sampled), each shard's images packed on their own;
* the rollout metrics combined from parts' sums (one per process) equal the whole batch's, and
  scale_rewards "batch" advantages from each process's part equal the whole batch's.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import image_prompt, rel_err
from fxjax.hf_checkpoint import from_pretrained
from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora
from fxjax.model.vision import VisionEncoder
from fxjax.train.grpo_loss import grpo_loss
from fxjax.train.grpo_step import LossOptions, completion_logps, make_grpo_step
from fxjax.train.rollout import (Rollout, build_group_batch, combine_rollout_sums, completion_mask, rollout_metrics,
                                 rollout_sums, update_slot_count)
from fxjax.train.step import TrainState, split_model

G = 3
N = 5
EOS = 2
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = from_pretrained(tiny_checkpoint, dtype="float32")
    apply_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.0), rngs=nnx.Rngs(params=1, dropout=1))
    # Non-zero B so the LoRA branch matters in the forward.
    for _, v in nnx.to_flat_state(nnx.state(m, LORA_PARAMS)):
        v.set_value(v.get_value() + 0.05 * jax.random.normal(jax.random.key(3), v.get_value().shape))
    m.eval()
    return m


def _prompts(rng):
    """Two left-padded image prompts of different lengths and image sizes."""
    a_ids, a_px, a_grid = image_prompt([(1, 4, 4)], rng)
    b_ids, b_px, b_grid = image_prompt([(1, 4, 8)], rng, suffix=(9, 10, 11, 12, 13))
    length = max(len(a_ids), len(b_ids))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for row, seq in enumerate((a_ids, b_ids)):
        ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=np.concatenate([a_px, b_px]),
                image_grid_thw=np.concatenate([a_grid, b_grid]), meta=[{}, {}])


def _rollout(rng, prompts):
    rows = prompts["input_ids"].shape[0] * G
    tokens = rng.randint(3, 100, size=(rows, N)).astype(np.int32)
    tokens[0, 2] = EOS  # ends early: the rest is masked
    tokens[4, 0] = EOS
    tokens[0, 3:] = 0
    tokens[4, 1:] = 0
    attention, truncated = completion_mask(tokens, EOS)
    assert truncated.tolist() == [False, True, True, True, False, True]
    loss_mask = attention.astype(np.float32)
    advantages = rng.randn(rows).astype(np.float32)
    return Rollout(tokens, attention, loss_mask, truncated, [""] * rows, {}, advantages, [])


def _reference_logps(model, prompts, r):
    """Each of the P*G rows as its own sequence with its own copy of the image, the plain forward."""
    grid = prompts["image_grid_thw"]
    sizes = np.prod(grid, axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.repeat(prompts["input_ids"], G, axis=0)
    full_ids = np.concatenate([ids, r.tokens], axis=1)
    full_mask = np.concatenate([np.repeat(prompts["attention_mask"], G, axis=0), r.attention], axis=1)
    pixels = np.concatenate([prompts["pixel_values"][offsets[p]:offsets[p + 1]]
                             for p in range(len(grid)) for _ in range(G)])
    grids = np.repeat(grid, G, axis=0)
    logits = np.asarray(model(full_ids, full_mask, pixels, grids), np.float64)
    lp = logits[:, -N - 1:-1] / TEMPERATURE
    lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    return np.take_along_axis(lp, r.tokens[..., None].astype(np.int64), axis=-1)[..., 0]


@pytest.mark.parametrize("batch_shards, share_prompts", [(1, False), (2, True)])
def test_group_batch_logps_equal_the_full_forward_of_each_sequence(model, batch_shards, share_prompts):
    """batch_shards 2: each prompt's image packed in its own shard's block (vision [A, 2, ...]), the G rows
    of a prompt pointing into that block. The packed path (only the loss's tokens reach the lm_head, one
    block of slots per shard) gives the unpacked path's log-probs and entropies at every loss token, and
    0 elsewhere; a row out of the loss (a masked truncated completion) gets no slots. Shared prompts: each
    prompt runs through the decoder once and its G completions attend to its keys and values, with the
    same log-probs."""
    rng = np.random.RandomState(0)
    prompts = _prompts(rng)
    r = _rollout(rng, prompts)
    r.loss_mask[1] = 0.0  # as mask_truncated_completions leaves a truncated row
    batch, floor = build_group_batch(prompts, r, model.config, num_generations=G, n_micro=1, floor={},
                                     batch_shards=batch_shards, share_prompts=share_prompts)
    assert batch.inputs.vision.valid.ndim == (2 if batch_shards == 1 else 3)
    rows = prompts["input_ids"].shape[0] * (1 if share_prompts else G)
    assert batch.inputs.input_ids.shape[1] == rows and (batch.completions is not None) == share_prompts
    n_images = prompts["image_grid_thw"].shape[0]
    assert int(batch.inputs.vision.valid[0].sum()) == int(np.prod(prompts["image_grid_thw"], axis=1).sum())
    slots = batch.slots
    per_shard = r.loss_mask.reshape(batch_shards, -1).sum(axis=1)
    assert slots.grid.shape == (1, batch_shards, floor["update_slots"])
    assert floor["update_slots"] == update_slot_count(int(per_shard.max()))
    np.testing.assert_array_equal((slots.grid[0] < G * 2 // batch_shards * N).sum(axis=1), per_shard)
    inputs = jax.tree.map(lambda x: x[0], batch.inputs)
    completions = None if batch.completions is None else jax.tree.map(lambda x: x[0], batch.completions)
    run = jax.jit(lambda m, i, c, s: completion_logps(m, i, c, temperature=TEMPERATURE, chunk=4, slots=s,
                                                      completions=completions))
    logps, entropy = run(model, inputs, jnp.asarray(batch.completion_ids[0]), None)
    packed, packed_entropy = run(model, inputs, jnp.asarray(batch.completion_ids[0]), jax.tree.map(lambda x: x[0], slots))
    ref = _reference_logps(model, prompts, r)
    mask = r.attention.astype(bool)
    assert rel_err(np.asarray(logps)[mask], ref[mask]) < 1e-5
    assert np.all(np.asarray(entropy) > 0) and n_images == 2
    loss = r.loss_mask > 0
    assert loss.sum() < mask.sum()
    np.testing.assert_allclose(np.asarray(packed)[loss], np.asarray(logps)[loss], rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(packed_entropy)[loss], np.asarray(entropy)[loss], rtol=1e-6, atol=0)
    assert not np.asarray(packed)[~loss].any() and not np.asarray(packed_entropy)[~loss].any()


def test_a_sampled_image_pad_is_a_token_in_both_update_layouts(model):
    """A completion that samples <|image_pad|> (the sampler embeds it as a token) gets the same log-probs
    from the full-sequence update (share_prompts false) as from the shared-prompt one: the full sequence
    placed image feature 0 there, and every later token of the row differed."""
    rng = np.random.RandomState(0)
    prompts = _prompts(rng)
    r = _rollout(rng, prompts)
    r.tokens[1, 1] = model.config.image_token_id  # row 1 runs to the end: attended throughout
    logps = {}
    for share in (False, True):
        batch, _ = build_group_batch(prompts, r, model.config, num_generations=G, n_micro=1, floor={},
                                     share_prompts=share)
        completions = None if batch.completions is None else jax.tree.map(lambda x: x[0], batch.completions)
        logps[share], _ = completion_logps(model, jax.tree.map(lambda x: x[0], batch.inputs),
                                           jnp.asarray(batch.completion_ids[0]), temperature=TEMPERATURE, chunk=4,
                                           completions=completions)
    mask = r.attention.astype(bool)
    np.testing.assert_allclose(np.asarray(logps[False])[mask], np.asarray(logps[True])[mask], rtol=1e-5, atol=1e-6)


# The update is -SGD_RATE x the gradient: large, so that float32's rounding of `params - update` (about
# |param| x 6e-8) stays far below the gradients compared (down to 1e-5 here; at rate 1 it was 1e-3 of them).
SGD_RATE = 1e4


def _step_setup(model, prompts, r, n_micro, share_prompts=False):
    graphdef, params, base, rest = split_model(model)
    tx = optax.sgd(SGD_RATE)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state; keep the model's own arrays
    state = TrainState.fresh(params, tx, seed=0)
    batch, _ = build_group_batch(prompts, r, model.config, num_generations=G, n_micro=n_micro, floor={},
                                 share_prompts=share_prompts)
    return graphdef, tx, state, base, rest, batch


@pytest.mark.parametrize("share_prompts", [False, True])
def test_stored_logps_are_the_policy_with_lora_and_the_reference_without(model, share_prompts):
    """make_logps_fn (grpo.num_iterations > 1 and beta > 0): the old log-probs are the model's with its LoRA,
    the reference's the same model's with the LoRA off (the k3 KL's base), each against the plain forward."""
    from fxjax.model.lora import lora_disabled
    from fxjax.train.grpo_step import make_logps_fn

    rng = np.random.RandomState(2)
    prompts = _prompts(rng)
    r = _rollout(rng, prompts)
    opts = LossOptions(loss_type="grpo", beta=0.04, max_completion_length=N, temperature=TEMPERATURE)
    graphdef, _, _, base, rest, batch = _step_setup(model, prompts, r, 1, share_prompts)
    params = split_model(model)[1]
    old, ref = make_logps_fn(graphdef, opts=opts, loss_chunk=8, need_old=True, need_ref=True)(params, base, rest,
                                                                                             batch)
    mask = r.attention.astype(bool)
    policy = _reference_logps(model, prompts, r)
    with lora_disabled(model):
        reference = _reference_logps(model, prompts, r)
    assert np.abs(policy - reference)[mask].max() > 1e-2  # the LoRA moves the log-probs visibly
    assert rel_err(np.asarray(old[0])[mask], policy[mask]) < 1e-5
    assert rel_err(np.asarray(ref[0])[mask], reference[mask]) < 1e-5
    only_ref = make_logps_fn(graphdef, opts=opts, loss_chunk=8, need_old=False, need_ref=True)(params, base, rest,
                                                                                             batch)
    assert only_ref[0] is None and rel_err(np.asarray(only_ref[1][0])[mask], reference[mask]) < 1e-5


@pytest.mark.parametrize("scale_rewards, mask_truncated", [("group", True), ("none", False)])
def test_rollout_scores_each_group_against_its_own_record(monkeypatch, scale_rewards, mask_truncated):
    """sample_and_score's host side, with a stand-in sampler and a tokenizer whose every token is a whole
    answer: each completion is scored against its own prompt's record (label and boxes), its advantage is
    group_advantages of those rewards (the right answer's the highest in its group), and
    mask_truncated_completions takes exactly the truncated rows out of the loss."""
    from types import SimpleNamespace

    from fxjax import rewards
    from fxjax.rewards.output_format import BOX_END, BOX_START, REF_END, REF_START
    from fxjax.train import rollout as rollout_module
    from fxjax.train.grpo_loss import group_advantages

    pad = 0
    answers = {10: (f"<think>{REF_START}a seam{REF_END}{BOX_START}[4, 4, 20, 20]{BOX_END}<tag>texture quality</tag>"
                    "</think>\n<verdict>generated</verdict>"),
               11: "<think>looks natural</think>\n<verdict>real</verdict>", 12: "no answer"}
    tokens = np.array([[10, EOS, pad], [11, EOS, pad], [12, 12, 12]] * 2, np.int32)  # G = 3 for two prompts

    class Tokenizer:
        def decode(self, ids, skip_special_tokens):
            assert not skip_special_tokens and EOS not in ids
            return "".join(answers[i] for i in ids)

    asked = {}

    def sample_groups(model, inputs, **kwargs):
        asked.update(kwargs)
        return SimpleNamespace(tokens=tokens)

    monkeypatch.setattr(rollout_module.sampler, "sample_groups", sample_groups)
    metas = [{"label": "generated", "boxes": [[4, 4, 20, 20]]}, {"label": "real", "boxes": []}]
    r = rollout_module.sample_and_score(
        None, None, metas, tokenizer=Tokenizer(), eos_ids=[EOS], pad_id=pad, num_generations=3, max_new_tokens=3,
        temperature=1.0, top_k=0, top_p=1.0, rng=jax.random.key(0), weights=rewards.load_stage("alpha"),
        reward_config=None, scale_rewards=scale_rewards, mask_truncated=mask_truncated, host=np.asarray,
        suppress_token_ids=[7])
    assert asked["num_generations"] == 3 and asked["eos_token_ids"] == (EOS,) and asked["pad_token_id"] == pad
    assert asked["suppress_token_ids"] == (7,)  # (grpo passes the image placeholder, as TRL suppresses it)
    assert [t["label"] for t in r.targets] == ["generated", "real"]
    assert r.texts == [answers[10], answers[11], answers[12] * 3] * 2
    # the verdict is right where it names the prompt's own label; the first prompt's box matches its own
    assert r.scores["label"].tolist() == [1, 0, 0, 0, 1, 0] and r.scores["iou"][0] == 1.0
    # alpha: IoU term (a real image's counts 1) + verdict +1 / -1 + format +2 / -1; a box on a real image
    # is still the real format, only its verdict is wrong
    np.testing.assert_array_equal(r.scores["total"], [1 + 1 + 2, 0 - 1 - 1, 0 - 1 - 1, 1 - 1 + 2, 1 + 1 + 2, 1 - 1 - 1])
    totals = np.asarray(r.scores["total"], np.float32)
    np.testing.assert_array_equal(r.advantages, np.asarray(group_advantages(totals, 3, scale_rewards)))
    if scale_rewards == "none":  # only centred: by hand
        np.testing.assert_allclose(r.advantages, totals - np.repeat(totals.reshape(2, 3).mean(1), 3), atol=1e-6)
    assert np.sign(r.advantages).tolist() == [1, -1, -1, 1, 1, -1]  # above or below the group's mean
    assert r.advantages.reshape(2, 3).argmax(axis=1).tolist() == [0, 1]  # the right answer highest
    assert r.truncated.tolist() == [False, False, True] * 2
    np.testing.assert_array_equal(r.attention, [[1, 1, 0], [1, 1, 0], [1, 1, 1]] * 2)
    expected = r.attention.astype(np.float32)
    if mask_truncated:
        expected[r.truncated] = 0.0
    np.testing.assert_array_equal(r.loss_mask, expected)


@pytest.mark.parametrize("n_micro, share_prompts, loss_type", [(1, False, "grpo"), (2, True, "grpo"),
                                                                 (2, False, "dapo")])
def test_update_encodes_each_image_once_and_matches_autodiff(model, monkeypatch, n_micro, share_prompts, loss_type):
    """Shared prompts: the gradient through each prompt's keys and values sums over its G completions, and
    the loss and update are the plain forward's all the same. dapo over micro-batches: every micro-batch's
    loss is normalised by the whole step's token count (TRL's num_items_in_batch), not its own."""
    rng = np.random.RandomState(1)
    prompts = _prompts(rng)
    r = _rollout(rng, prompts)
    opts = LossOptions(loss_type=loss_type, beta=0.0, max_completion_length=N, temperature=TEMPERATURE)
    graphdef, tx, state, base, rest, batch = _step_setup(model, prompts, r, n_micro, share_prompts)

    seen = []
    original = VisionEncoder.__call__

    def recording(self, vision):
        seen.append(vision.valid.shape[0])
        return original(self, vision)

    monkeypatch.setattr(VisionEncoder, "__call__", recording)
    step = make_grpo_step(graphdef, tx, lambda s: 1.0, opts=opts, loss_chunk=8, remat=None, remat_vision=None)
    new_state, metrics = step(state, base, rest, batch)
    monkeypatch.setattr(VisionEncoder, "__call__", original)
    # One vision pass per micro-batch, over the packed patches of that micro-batch's own prompts only.
    assert len(seen) == n_micro
    assert all(slots == batch.inputs.vision.valid.shape[1] for slots in seen)
    assert int(np.asarray(batch.inputs.vision.valid).sum()) == int(np.prod(prompts["image_grid_thw"], 1).sum())

    # Oracle: grpo_loss on the plain per-sequence forward, differentiated through the whole model.
    params = split_model(model)[1]

    def oracle(p):
        m = nnx.merge(graphdef, p, base, rest)
        grid = prompts["image_grid_thw"]
        offsets = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
        ids = np.concatenate([np.repeat(prompts["input_ids"], G, 0), r.tokens], 1)
        mask = np.concatenate([np.repeat(prompts["attention_mask"], G, 0), r.attention], 1)
        pixels = np.concatenate([prompts["pixel_values"][offsets[i]:offsets[i + 1]] for i in range(2) for _ in range(G)])
        inputs = m.prepare(ids, mask, pixels, np.repeat(grid, G, 0))
        hidden, _ = m.hidden_states(inputs)
        logits = m.logits(hidden)[:, -N - 1:-1].astype(jnp.float32) / TEMPERATURE
        log_probs = jax.nn.log_softmax(logits, -1)
        lp = jnp.take_along_axis(log_probs, jnp.asarray(r.tokens)[..., None], -1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, -1)
        total, entropies = 0.0, []
        per = 2 // n_micro * G
        for a in range(n_micro):
            rows = slice(a * per, (a + 1) * per)
            loss, _ = grpo_loss(lp[rows], None, None, r.advantages[rows], r.loss_mask[rows], loss_type=loss_type,
                                max_completion_length=N, gradient_accumulation_steps=n_micro,
                                num_items=float(r.loss_mask.sum()) if loss_type == "dapo" else None)
            total = total + loss
            mask = jnp.asarray(r.loss_mask[rows], jnp.float32)
            entropies.append(jnp.sum(entropy[rows] * mask) / jnp.sum(mask))
        return total, jnp.mean(jnp.stack(entropies))  # a step's metric: the mean of its micro-batches' (as TRL)

    (loss, entropy), grads = jax.jit(jax.value_and_grad(oracle, has_aux=True))(params)  # (eager took a minute)
    assert abs(float(metrics["loss"]) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
    assert abs(float(metrics["entropy"]) - float(entropy)) <= 1e-5 * float(entropy)
    # sgd(SGD_RATE), no clipping: the update is minus SGD_RATE x the gradient, each tensor to 1e-4 of its own
    # largest entry (floor 0: the vision lora_a's gradients are all below 1e-4, an absolute bound passed anything)
    flat = lambda tree: dict((path, v.get_value()) for path, v in nnx.to_flat_state(tree))  # noqa: E731
    old, new, want = flat(params), flat(new_state.params), flat(grads)
    assert set(old) == set(new) == set(want)
    assert min(float(np.abs(g).max()) for g in want.values()) > 0  # (a tensor of zeros would compare as 0 / 0)
    for path in want:
        got = (np.asarray(old[path], np.float64) - np.asarray(new[path], np.float64)) / SGD_RATE
        assert rel_err(got, want[path], floor=0.0) < 1e-4, path

    # A non-finite update (one NaN pixel row: the same shapes, so the same compiled step) is reported and
    # leaves the parameters as they were; the update counter still advances (train.grpo counts updates).
    kept = {path: np.array(v) for path, v in new.items()}
    patches = np.array(batch.inputs.vision.patches)
    patches[(0,) * (patches.ndim - 1)] = np.nan
    nan_batch = batch._replace(inputs=batch.inputs._replace(vision=batch.inputs.vision._replace(patches=patches)))
    after_nan, bad = step(new_state, base, rest, nan_batch)
    assert not bool(bad["finite"]) and not np.isfinite(float(bad["loss"]))
    assert int(after_nan.step) == 2
    for path, value in flat(after_nan.params).items():
        np.testing.assert_array_equal(np.asarray(value), kept[path], err_msg=str(path))


def test_completion_mask_and_text_end_at_any_stop_token(tokenizer_dir):
    """Several stop tokens (<|im_end|> and the generation config's <|endoftext|>): a row ends at the first
    of them (in the loss through it, not truncated, its text without it); a row with none is truncated."""
    from fxjax.data.tokenizer import load_tokenizer
    from fxjax.train.rollout import decode_completions

    im_end, endoftext, a, b = 151645, 151643, 64, 65  # "a", "b"
    tokens = np.array([[a, endoftext, b, 0], [a, b, im_end, endoftext], [a, a, b, b]], np.int32)
    attention, truncated = completion_mask(tokens, (im_end, endoftext))
    np.testing.assert_array_equal(attention.sum(1), [2, 3, 4])
    np.testing.assert_array_equal(truncated, [False, False, True])
    texts = decode_completions(load_tokenizer(tokenizer_dir), tokens, attention, (im_end, endoftext))
    assert texts == ["a", "ab", "aabb"]
    assert completion_mask(tokens, im_end)[1].tolist() == [True, False, True]  # one id as before


def test_a_row_ending_in_the_pad_is_not_truncated_as_in_trl():
    """TRL 1.16 (GRPOTrainer, clipped_ratio and mask_truncated_completions) calls a completion truncated when
    `ids[-1] not in [*eos_token_ids, pad_token_id]`, `ids` the row cut after its first stop token: with the
    stop tokens leaving the pad out, a row that samples the pad last is not truncated (its whole length in
    the loss); a pad earlier in the row changes nothing. Random rows against that rule, then the cases."""
    im_end, pad, a, b = 151645, 151643, 64, 65
    rng = np.random.RandomState(0)
    tokens = rng.choice([im_end, pad, a, b], size=(400, 5), p=[0.05, 0.25, 0.35, 0.35]).astype(np.int32)
    attention, truncated = completion_mask(tokens, im_end, pad)
    rows = [row[:list(row).index(im_end) + 1] if im_end in row else row for row in tokens.tolist()]
    assert truncated.tolist() == [ids[-1] not in (im_end, pad) for ids in rows]
    assert attention.sum(1).tolist() == [len(ids) for ids in rows]
    assert ((tokens != im_end).all(1) & (tokens[:, -1] == pad)).sum() > 10  # rows the pad exception decides

    cases = np.array([[a, b, pad, pad], [a, pad, b, b], [a, im_end, pad, pad], [a, a, b, b]], np.int32)
    attention, truncated = completion_mask(cases, im_end, pad)
    assert truncated.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(attention.sum(1), [4, 4, 2, 4])
    assert completion_mask(cases, im_end)[1].tolist() == [True, True, False, True]  # without a pad id


def test_micro_batches_take_each_shards_slice(model):
    """4 prompts over 2 batch shards (prompts 0, 1 in shard 0's block, 2, 3 in shard 1's), 2 micro-batches:
    micro-batch a = prompts a and 2 + a, each in its shard's rows with its image packed in that shard."""
    rng = np.random.RandomState(2)
    one, two = _prompts(rng), _prompts(rng)
    prompts = {k: np.concatenate([one[k], two[k]]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                             "image_grid_thw")}
    rows = 4 * G
    tokens = rng.randint(3, 100, size=(rows, N)).astype(np.int32)
    attention, truncated = completion_mask(tokens, EOS)
    r = Rollout(tokens, attention, attention.astype(np.float32), truncated, [""] * rows, {},
                np.arange(rows, dtype=np.float32), [])
    batch, _ = build_group_batch(prompts, r, model.config, num_generations=G, n_micro=2, floor={}, batch_shards=2)
    offsets = np.concatenate([[0], np.cumsum(np.prod(prompts["image_grid_thw"], axis=1))])
    for a in range(2):
        want = [p * G + g for p in (a, 2 + a) for g in range(G)]
        np.testing.assert_array_equal(batch.advantages[a], want)
        np.testing.assert_array_equal(batch.completion_ids[a], tokens[want])
        for k, p in enumerate((a, 2 + a)):
            valid = np.asarray(batch.inputs.vision.valid[a, k]).astype(bool)
            assert valid.sum() == offsets[p + 1] - offsets[p]
            np.testing.assert_allclose(np.asarray(batch.inputs.vision.patches[a, k])[valid].sum(),
                                       prompts["pixel_values"][offsets[p]:offsets[p + 1]].sum(), rtol=1e-5)


def test_rollout_metrics_from_parts_equal_the_whole_batch():
    """Two processes' `rollout_sums` (through JSON, as allgather_json sends them) combine to the metrics of
    the whole batch; one part gives exactly numpy's mean / std of the whole batch."""
    rng = np.random.RandomState(3)
    p, g, n = 6, 6, 7
    scores = {"total": rng.rand(p * g) * 3, "format": rng.randint(0, 2, p * g).astype(np.float64),
              "label": rng.randint(0, 2, p * g).astype(np.float64), "iou": rng.rand(p * g),
              "iou_relaxed": rng.rand(p * g)}  # (rewards.score's terms, as a rollout holds them)
    # prompt 1's group all alike: a zero-std group, though numpy's std of six 0.1s is 1.4e-17, not 0
    scores["total"][g:2 * g] = 0.1
    tokens = rng.randint(3, 100, size=(p * g, n)).astype(np.int32)
    tokens[rng.rand(p * g) < 0.5, 3] = EOS
    attention, truncated = completion_mask(tokens, EOS)
    targets = [{"label": "generated" if i % 3 else "real", "boxes": np.zeros((i % 3, 4))} for i in range(p)]
    whole = Rollout(tokens, attention, attention.astype(np.float32), truncated, [""] * (p * g), scores,
                    np.zeros(p * g, np.float32), targets)

    def part(lo, hi):
        rows = slice(lo * g, hi * g)
        return Rollout(tokens[rows], attention[rows], attention[rows].astype(np.float32), truncated[rows], [],
                       {k: v[rows] for k, v in scores.items()}, np.zeros(0, np.float32), targets[lo:hi])

    want = rollout_metrics(whole, g)
    import torch
    from trl.trainer.utils import nanstd  # TRL's reward_std: Bessel-corrected (fxjax's was the population std)

    # (float32 sums: to 1e-6; the population std would be off by 1.4%)
    assert want["reward/total_std"] == pytest.approx(float(nanstd(torch.tensor(scores["total"]))), rel=1e-6)
    assert want["reward/iou_mean"] == float(scores["iou"].mean())
    assert want["zero_std_group_fraction"] == pytest.approx(1 / 6) and 0 < want["truncated_fraction"] < 1
    # TRL's completions/min_length and its terminated lengths (GRPOTrainer: the completions whose last id is
    # EOS or pad; none terminated: TRL logs 0, here NaN)
    lengths = torch.tensor(attention.sum(axis=1))
    ended = lengths[~torch.tensor(truncated)]
    assert 0 < len(ended) < len(lengths)
    assert want["completion_length_min"] == float(lengths.float().min())
    assert (want["terminated_length_mean"], want["terminated_length_min"], want["terminated_length_max"]) == \
        pytest.approx((float(ended.float().mean()), float(ended.float().min()), float(ended.float().max())), rel=1e-12)
    got = combine_rollout_sums([json.loads(json.dumps(rollout_sums(part(lo, hi), g))) for lo, hi in ((0, 2), (2, 6))])
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    every_cut = Rollout(tokens, np.ones_like(attention), np.ones_like(attention, np.float32), np.ones(p * g, bool),
                        [""] * (p * g), scores, np.zeros(p * g, np.float32), targets)
    nothing_ended = rollout_metrics(every_cut, g)
    assert np.isnan(nothing_ended["terminated_length_mean"]) and np.isnan(nothing_ended["terminated_length_max"])
    assert nothing_ended["completion_length_min"] == n and nothing_ended["truncated_fraction"] == 1


def test_batch_scaled_advantages_from_a_process_part(monkeypatch):
    """Process 0 holding batch shard 1 of 2 (process 1 holds shard 0): the exchanged totals are reassembled
    in the batch's order, not the processes', and its rows' advantages are the whole batch's."""
    from fxjax.train import grpo
    from fxjax.train.batching import ProcessRows
    from fxjax.train.grpo_loss import group_advantages

    totals = np.random.RandomState(4).rand(16).astype(np.float32)  # 4 prompts x G = 4, 2 per shard
    peer = {"shards": [0], "rows": totals[:8].tolist()}
    monkeypatch.setattr(grpo, "allgather_json", lambda name, value: [json.loads(json.dumps(value)), peer])
    mine = ProcessRows(shards=(1,), shard_ids=(1,), rows=(2, 3), batch_size=4)
    everything, positions = grpo._batch_rewards(mine)(totals[8:])
    np.testing.assert_array_equal(everything, totals)
    np.testing.assert_array_equal(positions, np.arange(8, 16))
    whole = np.asarray(group_advantages(totals, 4, "batch"))
    np.testing.assert_array_equal(np.asarray(group_advantages(everything, 4, "batch"))[positions], whole[8:])


def test_float32_logits_add_an_lm_head_lora_in_float32(tiny_checkpoint):
    """A LoRA a user puts on the lm_head (all-linear leaves it out) is added to the float32 logits unrounded,
    and only while enabled (the reference policy disables it): on a bf16 model the head's result equals
    float32 math on the same weights, not the bf16 module's rounded output."""
    from fxjax.model.lora import lora_disabled
    from fxjax.train.grpo_step import float32_logits

    m = from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert m.lm_head is not None  # the tiny checkpoint is untied
    apply_lora(m, LoRAConfig(rank=4, alpha=8, target_modules=["lm_head"]), rngs=nnx.Rngs(params=1))
    lora = m.lm_head.lora
    lora.lora_b.set_value(0.5 * jax.random.normal(jax.random.key(4), lora.lora_b.get_value().shape))
    hidden = jax.random.normal(jax.random.key(5), (6, m.config.text.hidden_size)).astype(jnp.bfloat16)

    h = np.asarray(hidden.astype(jnp.float32), np.float64)
    kernel = np.asarray(m.lm_head.kernel[...].astype(jnp.float32), np.float64)
    base = h @ kernel
    if m.lm_head.bias is not None:
        base = base + np.asarray(m.lm_head.bias[...].astype(jnp.float32), np.float64)
    update = (h @ np.asarray(lora.lora_a[...], np.float64)) @ np.asarray(lora.lora_b[...], np.float64) * lora.scaling
    assert np.abs(update).max() > 0.1  # the adapter moves the logits visibly

    with_lora = np.asarray(float32_logits(m, hidden))
    assert with_lora.dtype == np.float32
    np.testing.assert_allclose(with_lora, base + update, rtol=1e-5, atol=1e-5)
    rounded = np.asarray(m.lm_head(hidden).astype(jnp.float32))  # the bf16 module: visibly farther
    assert np.abs(rounded - (base + update)).max() > 10 * np.abs(with_lora - (base + update)).max()
    with lora_disabled(m):
        np.testing.assert_allclose(np.asarray(float32_logits(m, hidden)), base, rtol=1e-5, atol=1e-5)


def test_every_loss_option_comes_from_the_config():
    """Each LossOptions field is the grpo section's value of that name (epsilon_low: `epsilon`), every one set
    away from its default, so a setting the run drops on the way to the loss fails here."""
    import dataclasses

    from fxjax.grpo_config import GRPOSection
    from fxjax.train.grpo import loss_options

    g = GRPOSection(loss_type="dapo", epsilon=0.1, epsilon_high=0.28, delta=1.5, beta=0.5,
                    use_bias_correction_kl=False, importance_sampling_level="sequence", max_completion_length=77,
                    temperature=0.7, sapo_temperature_pos=2.0, sapo_temperature_neg=3.0)
    opts = loss_options(g)
    for f in dataclasses.fields(LossOptions):
        value = getattr(g, "epsilon" if f.name == "epsilon_low" else f.name)
        assert getattr(opts, f.name) == value != f.default, f.name


def test_the_update_grows_its_loss_slots_by_a_quarter_not_every_64_tokens():
    """The loss slots (the update's shape) grew to the next multiple of 64 above the largest batch so far: a
    run whose completions lengthen by a few tokens a step recompiled its update every 64 tokens (a review
    measured 29 recompiles over a simulated 1000-step run). Now a growth is by a quarter at least, and a
    batch the floor holds keeps it."""
    floor, sizes = 0, []
    for need in range(500, 1601, 10):  # the fullest shard's loss tokens, drifting up over a run
        floor = update_slot_count(need, floor)
        sizes.append(floor)
    assert sorted(set(sizes)) == [512, 640, 832, 1088, 1408, 1792]  # (64 at a time: 18 sizes)
    assert update_slot_count(1, 0) == 64 and update_slot_count(129, 0) == 192 and update_slot_count(100, 768) == 768
    assert update_slot_count(769, 768) == 960  # one token more than the floor: a quarter more, not 832
