"""Cached decoding (model.generate) against HF `generate(do_sample=False)` and the uncached forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import TINY_TOKENS, image_prompt, mm_token_type_ids, rel_err, spread_logits_models

from fxjax.model.generate import (
    decode_loop_jit,
    decode_step,
    generate,
    greedy_generate,
    next_positions,
    prefill_jit,
)

MAX_NEW = 20
PAD, EOS = 0, 2
# The HF random init (std 0.02) gives near-uniform logits and a greedy output of one token repeated or
# an immediate EOS; scaling the decoder's weights spreads the logits so the greedy path wanders.
WEIGHT_SCALE = 5.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return spread_logits_models(tmp_path_factory.mktemp("tiny_generate"), WEIGHT_SCALE)


def left_pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def hf_generate(hf, ids, mask, pixel_values=None, grid=None, **kwargs) -> np.ndarray:
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    if pixel_values is not None:
        kwargs.update(pixel_values=t(pixel_values), image_grid_thw=t(grid))
    hf.model.rope_deltas = None  # HF keeps rope deltas between calls; start each call clean
    with torch.no_grad():
        out = hf.generate(input_ids=t(ids), attention_mask=t(mask), mm_token_type_ids=t(mm_token_type_ids(ids)),
                          do_sample=False, max_new_tokens=MAX_NEW, **kwargs)
    return out.numpy()


def assert_nontrivial(new_tokens: np.ndarray, min_distinct: int = 5) -> None:
    for row in np.atleast_2d(new_tokens):
        assert len(set(row.tolist())) >= min_distinct, f"degenerate greedy output {row.tolist()}"


def batch_with_images():
    rng = np.random.RandomState(1)
    ids0, pv0, grid0 = image_prompt([(1, 4, 6)], rng, suffix=(9, 10, 11))
    ids1, pv1, grid1 = image_prompt([(1, 2, 4), (1, 4, 2)], rng, prefix=(20, 21))
    ids, mask = left_pad([ids0, ids1])
    return ids, mask, np.concatenate([pv0, pv1]), np.concatenate([grid0, grid1])


def test_greedy_matches_hf_single_image(models):
    hf, model = models
    ids, pv, grid = image_prompt([(1, 4, 6)], np.random.RandomState(0))
    ids = ids[None]
    mask = np.ones_like(ids)
    ref = hf_generate(hf, ids, mask, pv, grid)
    out = greedy_generate(model, ids, mask, pv, grid, max_new_tokens=MAX_NEW)
    assert ref.shape == (1, ids.shape[1] + MAX_NEW), "the reference stopped early; pick another prompt"
    assert_nontrivial(ref[:, ids.shape[1]:])
    np.testing.assert_array_equal(out, ref)


def test_greedy_matches_hf_batch_left_padded(models):
    hf, model = models
    ids, mask, pv, grid = batch_with_images()
    assert (mask == 0).any(axis=1).sum() == 1  # one row padded on the left
    ref = hf_generate(hf, ids, mask, pv, grid)
    out = greedy_generate(model, ids, mask, pv, grid, max_new_tokens=MAX_NEW)
    assert ref.shape == (2, ids.shape[1] + MAX_NEW)
    assert_nontrivial(ref[:, ids.shape[1]:])
    assert not np.array_equal(ref[0, ids.shape[1]:], ref[1, ids.shape[1]:])
    np.testing.assert_array_equal(out, ref)

    # An extra EOS that row 0 emits mid-way (and row 1 not before it): row 0 is padded afterwards,
    # row 1 runs on, as in HF.
    new = ref[:, ids.shape[1]:]
    candidates = [(k, tok) for k, tok in enumerate(new[0][2:-4].tolist(), start=2)
                  if tok not in new[1].tolist() and tok not in new[0][:k].tolist() and tok != PAD]
    assert candidates, f"no token to use as EOS in {new.tolist()}"
    k, eos = candidates[0]
    ref_eos = hf_generate(hf, ids, mask, pv, grid, eos_token_id=[EOS, eos])
    out_eos = greedy_generate(model, ids, mask, pv, grid, max_new_tokens=MAX_NEW, eos_token_ids=[EOS, eos])
    assert (ref_eos[0, ids.shape[1] + k + 1:] == PAD).all() and ref_eos.shape == ref.shape
    np.testing.assert_array_equal(out_eos, ref_eos)


def test_greedy_matches_hf_text_only(models):
    hf, model = models
    ids, mask = left_pad([np.array([1, 5, 6, 7, 8, 9], np.int64), np.array([1, 30, 31, 32], np.int64)])
    ref = hf_generate(hf, ids, mask)
    out = greedy_generate(model, ids, mask, max_new_tokens=MAX_NEW)
    assert_nontrivial(ref[:, ids.shape[1]:], min_distinct=3)
    np.testing.assert_array_equal(out, ref)

    # Every row finishes early: HF returns fewer than MAX_NEW new columns; so must we.
    new = ref[:, ids.shape[1]:]
    eos = sorted({int(new[0, 3]), int(new[1, 3])})
    ref_eos = hf_generate(hf, ids, mask, eos_token_id=eos)
    out_eos = greedy_generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_ids=eos)
    assert ref_eos.shape[1] < ids.shape[1] + MAX_NEW
    np.testing.assert_array_equal(out_eos, ref_eos)

    # Sampling: a vanishing temperature is greedy; a fixed key is reproducible.
    cold = generate(model, ids, mask, max_new_tokens=MAX_NEW, temperature=1e-4, rng=jax.random.key(3))
    np.testing.assert_array_equal(cold, ref)
    hot = [generate(model, ids, mask, max_new_tokens=MAX_NEW, temperature=1.5, rng=jax.random.key(4))
           for _ in range(2)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert ((hot[0] >= 0) & (hot[0] < model.config.text.vocab_size)).all()


def test_default_stop_and_pad_tokens_are_the_generation_configs(models, tmp_path):
    """Without eos_token_ids / pad_token_id, generation stops and pads as HF generate does on the same
    directory: with generation_config.json's tokens over config.json's (Qwen2.5-VL-Instruct's stops at
    <|im_end|> and <|endoftext|>, its config.json at <|im_end|> only); it ran on past the second before."""
    import json
    import shutil

    import fxjax
    from conftest import load_hf_model

    hf, model = models
    ids, mask = left_pad([np.array([1, 5, 6, 7, 8, 9], np.int64), np.array([1, 30, 31, 32], np.int64)])
    new = hf_generate(hf, ids, mask)[:, ids.shape[1]:]
    stop = next(int(t) for t in new[0, 1:6] if t not in new[1] and t not in (PAD, EOS))
    shutil.copytree(model.hf_source.directory, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": [EOS, stop], "pad_token_id": 7}))
    ref = hf_generate(load_hf_model(tmp_path / "ckpt"), ids, mask)
    out = greedy_generate(fxjax.from_pretrained(tmp_path / "ckpt"), ids, mask, max_new_tokens=MAX_NEW)
    row0 = ref[0, ids.shape[1]:].tolist()
    assert stop in row0 and set(row0[row0.index(stop) + 1:]) == {7}  # stopped there, then HF's pad
    np.testing.assert_array_equal(out, ref)


@nnx.jit
def _uncached_logits(model, prompt_inputs, full_inputs, tokens):
    x = jnp.concatenate([model.embed(prompt_inputs), model.embed_tokens(tokens)], axis=1)
    hidden, _ = model.decoder(x, full_inputs.position_ids, full_inputs.attention_mask)
    return model.logits(hidden)


@nnx.jit
def _decode_step_jit(model, tokens, positions, cache):
    return decode_step(model, tokens, positions, cache)


def test_cached_logits_match_uncached_forward(models):
    """Prefill + one decode_step per token, and the jitted decode loop's log-probs, against the
    uncached forward over prompt + generated tokens, at every step."""
    _, model = models
    ids, mask, pv, grid = batch_with_images()
    length = ids.shape[1]
    inputs = model.prepare(ids, mask, pv, grid)
    positions = jnp.asarray(next_positions(inputs))

    logits, cache = prefill_jit(model, inputs, cache_len=length + MAX_NEW)
    step_logits, tokens = [], []
    for k in range(MAX_NEW):
        step_logits.append(np.asarray(logits))
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(token))
        if k + 1 < MAX_NEW:
            logits, cache = _decode_step_jit(model, token, positions + k, cache)
    step_logits, tokens = np.stack(step_logits, 1), np.stack(tokens, 1)  # [B, N, V], [B, N]
    assert_nontrivial(tokens)
    assert int(cache.length) == length + MAX_NEW - 1

    # Uncached forward over prompt + generated tokens. The generated tokens are text even when one is
    # <image_pad> (as in HF's decode steps, which get no pixels): rope_index sees them as text and
    # they are embedded as tokens.
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    as_text = np.where(tokens == TINY_TOKENS["image_token_id"], 5, tokens)
    full_inputs = model.prepare(np.concatenate([ids, as_text], axis=1), full_mask, pv, grid)
    # The uncached rope index puts the generated tokens where the decode steps did.
    np.testing.assert_array_equal(full_inputs.position_ids[:, :, length:],
                                  np.broadcast_to(np.asarray(positions)[:, None] + np.arange(MAX_NEW), (3, 2, MAX_NEW)))
    full = np.asarray(_uncached_logits(model, inputs, full_inputs, jnp.asarray(tokens)))
    full = full[:, length - 1:-1]  # the logits that predict each generated token
    for k in range(MAX_NEW):
        err = rel_err(step_logits[:, k], full[:, k])
        assert err <= 1e-5, f"step {k}: cached vs uncached logits rel err {err:.2e}"

    # The single jitted while_loop: same tokens, and its log-probs are the uncached ones.
    first, cache = prefill_jit(model, inputs, cache_len=length + MAX_NEW)
    out = decode_loop_jit(model, first, cache, positions, np.zeros((0,), np.int32), np.int32(PAD),
                          np.float32(1.0), jax.random.key(0), max_new_tokens=MAX_NEW, greedy=True)
    assert int(out.num_steps) == MAX_NEW
    np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
    full_logp = np.asarray(jax.nn.log_softmax(jnp.asarray(full), axis=-1))
    expected = np.take_along_axis(full_logp, tokens[..., None], axis=-1)[..., 0]
    assert rel_err(out.logprobs, expected) <= 1e-5

    # A cache without room for the tokens is refused (its writes would be clamped onto the last slot);
    # one with exactly the room needed (max_new_tokens - 1 free slots) runs.
    def decode(filled: int):
        return decode_loop_jit(model, first, cache._replace(length=jnp.asarray(filled, jnp.int32)), positions,
                               np.zeros((0,), np.int32), np.int32(PAD), np.float32(1.0), jax.random.key(0),
                               max_new_tokens=MAX_NEW, greedy=True)

    with pytest.raises(ValueError, match=f"slots holding {length + 2}: {MAX_NEW} new tokens need {MAX_NEW - 1} more"):
        decode(length + 2)
    assert int(decode(length + 1).num_steps) == MAX_NEW


def test_bad_token_ids_and_grids_are_named_before_the_model_runs():
    """Ids out of the vocabulary (the embedding lookup would clamp them), float ids, an empty prompt and a
    grid that the 2 x 2 merge cannot split are refused by prepare_inputs with what is wrong."""
    from fxjax.model.inputs import prepare_inputs
    from fxjax.presets import load_preset

    cfg = load_preset("tiny")
    vocab = cfg.text.vocab_size
    ok = np.array([[1, 2, 3]])
    prepare_inputs(cfg, ok)
    for ids, message in [(ok + vocab, rf"must lie in \[0, {vocab}\)"), (-ok, "must lie in"),
                         (ok.astype(np.float32), "must be integer token ids"), (ok[:, :0], "both at least 1")]:
        with pytest.raises(ValueError, match=message):
            prepare_inputs(cfg, ids)
    ids, pv, grid = image_prompt([(1, 2, 3)], np.random.RandomState(0))
    with pytest.raises(ValueError, match="multiples of the spatial merge size 2"):
        prepare_inputs(cfg, np.asarray([ids]), None, pv, grid)


def test_decoding_refuses_a_model_whose_dropout_is_active():
    """A model in train mode with LoRA dropout crashed inside the decode loop ("Cannot mutate RngCount from
    a different trace level"); it is refused saying what to do, and decodes once in eval mode."""
    import fxjax
    from fxjax.model_init import init_model

    model = init_model("tiny", seed=0)
    fxjax.apply_lora(model, fxjax.LoRAConfig(rank=2, dropout=0.1))
    ids = np.arange(3, 11, dtype=np.int32)[None]
    model.train()
    with pytest.raises(ValueError, match=r"LoRA dropout active .*call model.eval\(\) first"):
        fxjax.greedy_generate(model, ids, max_new_tokens=2)
    model.eval()
    assert fxjax.greedy_generate(model, ids, max_new_tokens=2).shape == (1, 10)
