"""Sampling (model.sampling, the group sampler in model.generate) against HF's logits warpers and logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import scipy.stats as stats
from conftest import hf_logits, image_prompt, spread_logits_models

from fxjax.model.generate import generate, greedy_generate, sample_groups  # noqa: E402
from fxjax.model.sampling import filter_logits  # noqa: E402
from fxjax.model.vision import VisionEncoder  # noqa: E402

# As in test_generate.py: scaled decoder weights spread the tiny model's logits, so that temperature,
# top-k and top-p each change the first-token distribution by a measurable amount.
WEIGHT_SCALE = 5.0
MAX_NEW = 12
G = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return spread_logits_models(tmp_path_factory.mktemp("tiny_sampling"), WEIGHT_SCALE)


def hf_warp(logits: np.ndarray, temperature, top_k, top_p) -> np.ndarray:
    """HF's warpers, built as `GenerationMixin._get_logits_processor` builds them for do_sample=True."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs(None, torch.from_numpy(np.asarray(logits, np.float32))).numpy()


def hf_probs(logits: np.ndarray, temperature, top_k, top_p) -> np.ndarray:
    """softmax of HF's warped logits for one row [vocab], float64."""
    warped = torch.from_numpy(hf_warp(np.asarray(logits)[None], temperature, top_k, top_p))
    return torch.softmax(warped, -1)[0].numpy().astype(np.float64)


# (temperature, top_k, top_p)
WARPER_SETTINGS = [(1.0, None, None), (0.7, 10, None), (1.3, None, 0.9), (0.5, 5, 0.8), (1.0, 1, None),
                   (2.0, 50, 0.3), (1.0, None, 0.0), (0.9, 128, 0.95), (0.8, 300, 0.5)]


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
def test_filter_logits_equals_hf_warpers(decimals):
    rng = np.random.RandomState(0)
    logits = (rng.randn(16, 128) * rng.choice([0.5, 2.0, 5.0], size=(16, 1))).astype(np.float32)
    if decimals is not None:
        logits = np.round(logits, decimals).astype(np.float32)
    for temperature, top_k, top_p in WARPER_SETTINGS:
        setting = f"T={temperature} top_k={top_k} top_p={top_p}"
        ref = hf_warp(logits, temperature, top_k, top_p)
        out = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
        assert out.dtype == np.float32
        for r in range(len(logits)):
            kept_ref, kept = np.isfinite(ref[r]), np.isfinite(out[r])
            assert not np.isnan(out[r]).any() and kept.any()
            if not np.array_equal(kept, kept_ref):
                # torch.sort is unstable: HF splits a tie that straddles the top-p cut in an arbitrary
                # order, the stable sort here by index. Only tied logits may differ, in equal numbers.
                assert top_p is not None and decimals is not None, f"{setting} row {r}: kept set differs"
                differ = kept != kept_ref
                assert np.unique(logits[r][differ]).size == 1, f"{setting} row {r}: differs beyond one tie"
                assert kept.sum() == kept_ref.sum(), f"{setting} row {r}: kept count differs"
            np.testing.assert_allclose(np.sort(out[r][kept]), np.sort(ref[r][kept_ref]), rtol=1e-6, atol=0,
                                       err_msg=f"{setting} row {r}")
            np.testing.assert_array_equal(out[r][kept & kept_ref], ref[r][kept & kept_ref])

    # Top-k keeps every logit tied with the k-th largest, as HF (which thresholds on the k-th value).
    row = np.array([[3.0, 2.0, 1.0, 2.0, 0.5, 2.0]], np.float32)
    out = np.asarray(filter_logits(jnp.asarray(row), None, 2, None))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(hf_warp(row, None, 2, None)))
    assert np.isfinite(out).sum() == 4
    # Top-p where the cumulative probability lands exactly on the cut (equal logits): HF's kept set, whose
    # count does not depend on how the tie is ordered (one fewer or one more than HF's is a wrong boundary)
    for row, top_p in (([0.0, 0.0, -30.0, -30.0], 0.5), ([1.0, 1.0, 1.0, 1.0], 0.25), ([0.0, 0.0, 0.0, 0.0], 0.75)):
        edge = np.array([row], np.float32)
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(edge), None, None, top_p)))
        assert kept.sum() == np.isfinite(hf_warp(edge, None, None, top_p)).sum(), (row, top_p)
    # Off values leave the logits as they are; jit with static settings gives the same values.
    np.testing.assert_array_equal(np.asarray(filter_logits(jnp.asarray(logits), 1.0, 0, 1.0)), logits)
    jitted = jax.jit(filter_logits, static_argnums=(1, 2, 3))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(logits), 0.5, 5, 0.8)),
                                  np.asarray(filter_logits(jnp.asarray(logits), 0.5, 5, 0.8)))
    for bad in (dict(top_k=-1), dict(top_k=2.5), dict(top_p=1.5), dict(temperature=-1.0), dict(temperature=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            filter_logits(jnp.asarray(logits), **{"temperature": 1.0, **bad})


def test_sampling_arguments_out_of_range_are_refused():
    """The generate entry points' check (model.sampling.check_sampling_args): a NaN temperature passed it
    (NaN < 0 is false) and then sampled token 0 at every step."""
    from fxjax.model.sampling import check_sampling_args

    for temperature in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            check_sampling_args(temperature, None, None)
    with pytest.raises(ValueError, match="top_p must be a float in"):
        check_sampling_args(1.0, None, float("nan"))
    for fine in (0.0, 0.7, 2.0):
        check_sampling_args(fine, 5, 0.9)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of counts against probs; 0 when a token of probability 0 was drawn."""
    support = probs > 0
    if counts[~support].any():
        return 0.0
    expected = counts.sum() * probs[support]
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(statistic, support.sum() - 1))


def test_first_token_frequencies_match_hf_warped_softmax(models):
    """4000 samples of one image prompt in one jitted call (the group sampler with G = 4000, one new
    token): the first token's frequencies against softmax of HF's warpers on HF's own logits."""
    hf, model = models
    ids, pv, grid = image_prompt([(1, 4, 6)], np.random.RandomState(0))
    ids = ids[None]
    mask = np.ones_like(ids)
    temperature, top_k, top_p, n = 0.8, 20, 0.9, 4000
    hf_last = hf_logits(hf, ids, mask, pv, grid)[0, -1]
    probs = hf_probs(hf_last, temperature, top_k, top_p)
    assert 5 <= (probs > 0).sum() < top_k, "top-p must cut inside the top-k set for this test to see it"

    # rng as an int seed (the key jax.random.key(0))
    out = sample_groups(model, model.prepare(ids, mask, pv, grid), num_generations=n, max_new_tokens=1,
                        temperature=temperature, top_k=top_k, top_p=top_p, rng=0, eos_token_ids=())
    first = np.asarray(out.tokens)[:, 0]
    assert first.shape == (n,)
    counts = np.bincount(first, minlength=probs.size)
    assert not counts[probs == 0].any(), "a token outside HF's top-k/top-p set was drawn"
    p_value = chi_square_pvalue(counts, probs)
    assert p_value > 1e-3, f"first-token frequencies do not match HF's warped softmax (p = {p_value:.2e})"
    # The same bound rejects the same draws as samples of a wrongly set sampler. Measured with this key:
    # right setting p = 0.91 (total variation 0.013); T=1.0 p = 1e-70 (TV 0.10), top_p off 2e-78
    # (TV 0.095), top_k off 5e-64 (TV 0.079), T=0.6 p = 0 (a drawn token lies outside its top-p set).
    for wrong in [(1.0, top_k, top_p), (temperature, top_k, None), (temperature, None, top_p),
                  (0.6, top_k, top_p)]:
        wrong_p = chi_square_pvalue(counts, hf_probs(hf_last, *wrong))
        assert wrong_p < 1e-6, f"the test cannot tell the sampler from one with (T, top_k, top_p) = {wrong}"


def test_suppressed_tokens_are_never_sampled_and_keep_their_unsuppressed_log_probs(models):
    """suppress_token_ids (GRPO passes the image placeholder, as TRL's suppress_tokens does): the first
    token's frequencies against HF's SuppressTokensLogitsProcessor then its warpers, on HF's own logits; the
    suppressed tokens (here the two likeliest) never drawn; the log-probs returned are those of the raw
    logits, which TRL's loss also uses."""
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    hf, model = models
    ids, pv, grid = image_prompt([(1, 4, 6)], np.random.RandomState(0))
    ids = ids[None]
    mask = np.ones_like(ids)
    hf_last = hf_logits(hf, ids, mask, pv, grid)[0, -1]
    top = [int(t) for t in np.argsort(hf_last)[::-1][:2]]
    assert hf_probs(hf_last, 1.0, None, None)[top].sum() > 0.05  # drawn often without the suppression
    processor = SuppressTokensLogitsProcessor(top, device="cpu")
    suppressed = processor(torch.as_tensor(ids), torch.as_tensor(hf_last[None]))[0].numpy()
    probs = hf_probs(suppressed, 0.8, 20, None)
    out = sample_groups(model, model.prepare(ids, mask, pv, grid), num_generations=2000, max_new_tokens=1,
                        temperature=0.8, top_k=20, rng=0, eos_token_ids=(), suppress_token_ids=top)
    first = np.asarray(out.tokens)[:, 0]
    assert not np.isin(first, top).any() and not np.bincount(first, minlength=probs.size)[probs == 0].any()
    p_value = chi_square_pvalue(np.bincount(first, minlength=probs.size), probs)
    assert p_value > 1e-3, f"first-token frequencies do not match HF's suppressed, warped softmax (p = {p_value:.2e})"
    raw = torch.log_softmax(torch.as_tensor(hf_last, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], raw[first], atol=1e-4)


@pytest.mark.parametrize("block", [4, 128])
def test_top_k_threshold_equals_a_full_sort(monkeypatch, block):
    """apply_top_k (block maxima, then a bisection over the float order) keeps exactly what a full sort's
    k-th largest value keeps: ties, -inf, -0.0 vs 0.0, k = 1 and k = V; block 4 takes the block path."""
    from fxjax.model import sampling

    monkeypatch.setattr(sampling, "TOP_K_BLOCK", block)
    rng = np.random.RandomState(block)
    vocab = 257
    logits = np.round(2 * rng.randn(5, vocab), 1).astype(np.float32)  # rounding makes ties
    logits[rng.rand(5, vocab) < 0.2] = -np.inf
    logits[1] = np.where(rng.rand(vocab) < 0.5, -0.0, 0.0)
    logits[2, :] = -np.inf
    logits[2, ::7] = 1.0
    for k in (1, 5, 31, 64, vocab):
        got = np.asarray(sampling.apply_top_k(jnp.asarray(logits), k))
        kth = -np.sort(-logits, axis=-1)[:, k - 1:k]
        np.testing.assert_array_equal(got, np.where(logits < kth, -np.inf, logits), err_msg=f"k={k}")


def test_sample_categorical_draws_from_the_softmax():
    """The two-level inverse-CDF sampler against softmax, per row: a vocabulary that is not a multiple of
    the block (the padded tail is never drawn), removed (-inf) tokens never drawn, rows independent; a
    sampler off by a small change of the logits fails the same test."""
    from fxjax.model.sampling import sample_categorical

    rng = np.random.RandomState(3)
    vocab, n = 300, 20000
    logits = (1.5 * rng.randn(2, vocab)).astype(np.float32)
    logits[0, rng.choice(vocab, 200, replace=False)] = -np.inf
    logits[1, 5:] -= 4.0  # row 1: most mass in its first block of 5
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_categorical(k, jnp.asarray(logits), block=64)))(
        jax.random.split(jax.random.key(0), n)))
    assert draws.shape == (n, 2) and draws.min() >= 0 and draws.max() < vocab
    for row in range(2):
        softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
        probs = softmax(logits[row].astype(np.float64))
        counts = np.bincount(draws[:, row], minlength=vocab)
        assert chi_square_pvalue(counts, probs) > 1e-3, row
        shifted = softmax(1.1 * logits[row].astype(np.float64))
        assert chi_square_pvalue(counts, shifted) < 1e-6, row


def batch_of_two():
    """Two image prompts of different lengths (3 images in all), left padded."""
    rng = np.random.RandomState(1)
    ids0, pv0, grid0 = image_prompt([(1, 4, 6)], rng, suffix=(9, 10, 11))
    ids1, pv1, grid1 = image_prompt([(1, 2, 4), (1, 4, 2)], rng, prefix=(20, 21))
    length = max(len(ids0), len(ids1))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate([ids0, ids1]):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    assert (mask == 0).any(axis=1).sum() == 1
    return ids, mask, [pv0, pv1], [grid0, grid1]


def test_greedy_is_temperature_zero(models):
    """temperature 0 is greedy_generate's decoding (itself HF's, tests/test_generate.py) for every one
    of the G sequences of a prompt, whatever top_k / top_p say."""
    _, model = models
    ids, mask, pvs, grids = batch_of_two()
    pv, grid = np.concatenate(pvs), np.concatenate(grids)
    greedy = greedy_generate(model, ids, mask, pv, grid, max_new_tokens=MAX_NEW)
    grouped = generate(model, ids, mask, pv, grid, max_new_tokens=MAX_NEW, temperature=0.0, top_k=3, top_p=0.5,
                       num_return_sequences=G)
    assert len(set(greedy[0, ids.shape[1]:].tolist())) >= 3, "degenerate greedy output"
    np.testing.assert_array_equal(grouped, np.repeat(greedy, G, axis=0))


def test_group_layout_determinism_and_one_vision_pass(models, monkeypatch):
    _, model = models
    ids, mask, pvs, grids = batch_of_two()
    pv, grid = np.concatenate(pvs), np.concatenate(grids)
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=20, top_p=0.95)

    seen_patch_rows = []
    original = VisionEncoder.__call__

    def counting_call(self, vision, *args, **kw):
        seen_patch_rows.append(vision.patches.shape[0])
        return original(self, vision, *args, **kw)

    monkeypatch.setattr(VisionEncoder, "__call__", counting_call)
    out = generate(model, ids, mask, pv, grid, num_return_sequences=G, rng=jax.random.key(7), **kwargs)
    # The vision encoder is traced once, on the rows of the B prompts' images, not G times as many.
    rows_b = model.prepare(ids, mask, pv, grid).vision.patches.shape[0]
    assert seen_patch_rows == [rows_b], f"vision encoder saw {seen_patch_rows} patch rows, expected [{rows_b}]"

    assert out.shape[0] == 2 * G and out.shape[1] > ids.shape[1]
    np.testing.assert_array_equal(out[:, :ids.shape[1]], np.repeat(ids, G, axis=0))
    new = out[:, ids.shape[1]:]
    assert len({tuple(r) for r in new.tolist()}) == 2 * G, "the G samples of a prompt should differ"
    again = generate(model, ids, mask, pv, grid, num_return_sequences=G, rng=jax.random.key(7), **kwargs)
    np.testing.assert_array_equal(again, out)
    other = generate(model, ids, mask, pv, grid, num_return_sequences=G, rng=jax.random.key(8), **kwargs)
    assert not np.array_equal(other, out)

    # Each prompt written out G times (HF's repeat_interleave of the inputs), prefilled at batch B*G,
    # with the same key: the same draws, so row i*G + j is a sample of prompt i. The counter shows
    # that this reference path does run the encoder on G times as many rows.
    seen_patch_rows.clear()
    repeated = generate(model, np.repeat(ids, G, axis=0), np.repeat(mask, G, axis=0),
                        np.concatenate([p for p in pvs for _ in range(G)]),
                        np.concatenate([g for g in grids for _ in range(G)]), rng=jax.random.key(7), **kwargs)
    assert seen_patch_rows == [G * rows_b]
    np.testing.assert_array_equal(repeated, out)


def test_truncated_flags_and_completion_mask(models):
    """Same key with and without an EOS id: rows that reach the EOS stop there (pad after, not
    truncated, length up to and including it); the others are the EOS-free rows, flagged truncated."""
    _, model = models
    ids, mask, pvs, grids = batch_of_two()
    inputs = model.prepare(ids, mask, np.concatenate(pvs), np.concatenate(grids))
    kwargs = dict(num_generations=G, max_new_tokens=MAX_NEW, temperature=1.0, top_k=20, top_p=0.9,
                  rng=jax.random.key(7), pad_token_id=0)
    free = sample_groups(model, inputs, eos_token_ids=(), **kwargs)
    free_tokens = np.asarray(free.tokens)
    assert np.asarray(free.truncated).all() and int(free.num_steps) == MAX_NEW
    np.testing.assert_array_equal(np.asarray(free.lengths), np.full(2 * G, MAX_NEW))

    # An EOS id that some rows emit before their last step and others never emit.
    candidates = [t for t in np.unique(free_tokens[:, :-1]) if t != 0 and not (free_tokens == t).any(axis=1).all()]
    assert candidates, f"no token to use as EOS in {free_tokens.tolist()}"
    eos = int(candidates[0])
    out = sample_groups(model, inputs, eos_token_ids=(eos,), **kwargs)
    tokens, truncated = np.asarray(out.tokens), np.asarray(out.truncated)
    lengths, completion_mask = np.asarray(out.lengths), np.asarray(out.completion_mask)
    hits = (free_tokens == eos).any(axis=1)
    assert hits.any() and not hits.all()
    np.testing.assert_array_equal(truncated, ~hits)
    np.testing.assert_array_equal(np.asarray(out.finished), hits)
    for r in range(2 * G):
        if hits[r]:
            stop = int(np.argmax(free_tokens[r] == eos)) + 1
            np.testing.assert_array_equal(tokens[r, :stop], free_tokens[r, :stop])
            assert (tokens[r, stop:] == 0).all() and lengths[r] == stop
        else:
            np.testing.assert_array_equal(tokens[r], free_tokens[r])
            assert lengths[r] == MAX_NEW
        np.testing.assert_array_equal(completion_mask[r], np.arange(MAX_NEW) < lengths[r])
