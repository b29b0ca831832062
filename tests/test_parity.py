"""Numerical parity of the fxjax Qwen2.5-VL with transformers' Qwen2_5_VLForConditionalGeneration.

Every checkpoint is a tiny random HF model saved with save_pretrained; both sides load the same files
(HF with from_pretrained, fxjax with fxjax.from_pretrained(dtype="float32")). fp32 with "highest"
matmul precision (conftest); metric rel_err = max|diff| / max(1, max|ref|) <= 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (TINY_TOKENS, build_hf_model, hf_logits, image_prompt, load_hf_model, rel_err,
                      save_hf_model)
from flax import nnx
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
from transformers.vision_utils import get_vision_window_index

import fxjax
from fxjax.model.rope import apply_rotary, mrope
from fxjax.model.vision import VisionInputs
from fxjax.model.vision_layout import vision_layout

TOL = 1e-5
PAD = 0  # pad_token_id of the tiny configs


ROPE_THETA = 100.0  # instead of 1e6 / 1e4: with head_dim 8 / 16 every M-RoPE and 2D-rotary axis then moves logits


def _pair(tmp_path_factory, name, seed, **overrides):
    """Build, save and load one tiny checkpoint: (HF oracle, fxjax model), both from the same files.

    The rotary bases are lowered in config.json (weights do not depend on them) so that a position
    mistake on any axis shows far above the tolerance instead of hiding in near-zero angles.
    """
    directory = save_hf_model(build_hf_model(seed=seed, **overrides), tmp_path_factory.mktemp(name))
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["rope_parameters"]["rope_theta"] = ROPE_THETA
    config["vision_config"]["rope_parameters"]["rope_theta"] = ROPE_THETA
    (directory / "config.json").write_text(json.dumps(config))
    hf, fx = load_hf_model(directory), fxjax.from_pretrained(directory, dtype="float32")
    assert fx.config.text.rope_theta == fx.config.vision.rope_theta == ROPE_THETA
    return hf, fx


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    """Untied, vision depth 3, full attention in block 1, window_size 56 (2x2 merged units)."""
    return _pair(tmp_path_factory, "default", 0)


@pytest.fixture(scope="module")
def small_window_pair(tmp_path_factory):
    """Vision depth 4, full attention in blocks 0 and 2, window_size 28: one merged unit per window."""
    return _pair(tmp_path_factory, "win28", 1, vision_depth=4, fullatt=(0, 2), window_size=28)


@pytest.fixture(scope="module")
def large_window_pair(tmp_path_factory):
    """Vision depth 4, full attention in blocks 0 and 2, window_size 112: 4x4 merged units per window."""
    return _pair(tmp_path_factory, "win112", 2, vision_depth=4, fullatt=(0, 2), window_size=112)


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    return _pair(tmp_path_factory, "tied", 3, tie=True)


def _check_image_logits(pair, grids, seed=0):
    hf, fx = pair
    ids, pv, grid = image_prompt(grids, np.random.RandomState(seed))
    ids = ids[None]
    ref = hf_logits(hf, ids, np.ones_like(ids), pv, grid)
    out = np.asarray(fx(ids, attention_mask=np.ones_like(ids), pixel_values=pv, image_grid_thw=grid))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) <= TOL, rel_err(out, ref)
    return ref


# ---- whole-model logits ----------------------------------------------------------------------------

def test_text_only_batch(default_pair):
    hf, fx = default_pair
    ids = np.random.RandomState(0).randint(0, TINY_TOKENS["image_token_id"], size=(2, 11))
    ref = hf_logits(hf, ids, np.ones_like(ids))
    out = np.asarray(fx(ids, attention_mask=np.ones_like(ids)))
    assert out.shape == (2, 11, 128)
    assert rel_err(out, ref) <= TOL
    # attention_mask omitted means "all real", as in HF
    assert rel_err(np.asarray(fx(ids)), ref) <= TOL


def test_one_image(default_pair):
    _check_image_logits(default_pair, [(1, 4, 6)])


def test_two_images_different_nonsquare_grids(default_pair):
    _check_image_logits(default_pair, [(1, 6, 10), (1, 14, 4)], seed=1)


def test_grids_not_divided_by_windows(default_pair):
    """window 56 px = 2x2 merged units; merged grids 3x5 and 7x2 leave partial windows on both axes."""
    hf, fx = default_pair
    assert fx.config.vision.window_merged_side == 2
    layout = vision_layout(np.array([(1, 6, 10), (1, 14, 4)]), fx.config.vision)
    per_window = layout.valid.reshape(-1, layout.window_slots).sum(axis=1)
    assert ((per_window > 0) & (per_window < layout.window_slots)).sum() >= 4  # partial windows on both axes
    _check_image_logits(default_pair, [(1, 6, 10)], seed=2)
    _check_image_logits(default_pair, [(1, 14, 4), (1, 6, 10)], seed=3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_images(default_pair, side):
    hf, fx = default_pair
    rng = np.random.RandomState(4)
    rows = [image_prompt([(1, 4, 6)], rng), image_prompt([(1, 6, 10), (1, 4, 4)], rng, suffix=(9,))]
    length = max(len(r[0]) for r in rows)
    ids = np.full((2, length), PAD, np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, (row_ids, _, _) in enumerate(rows):
        n = len(row_ids)
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = row_ids, 1
    assert (mask == 0).any(axis=1).tolist() == [True, False]
    pv = np.concatenate([r[1] for r in rows])
    grid = np.concatenate([r[2] for r in rows])
    ref = hf_logits(hf, ids, mask, pv, grid)
    out = np.asarray(fx(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid))
    real = mask.astype(bool)
    assert np.isfinite(out[real]).all()
    assert rel_err(out[real], ref[real]) <= TOL
    # each row alone gives the same logits as in the padded batch
    for b, (row_ids, row_pv, row_grid) in enumerate(rows):
        alone = np.asarray(fx(row_ids[None], pixel_values=row_pv, image_grid_thw=row_grid))[0]
        assert rel_err(out[b][real[b]], alone) <= TOL


def test_small_windows_and_several_full_attention_blocks(small_window_pair):
    hf, fx = small_window_pair
    assert fx.config.vision.window_merged_side == 1
    assert fx.config.vision.fullatt_block_indexes == (0, 2)
    _check_image_logits(small_window_pair, [(1, 6, 10), (1, 4, 6)], seed=5)


def test_large_window_grid_bigger_than_one_window(large_window_pair):
    hf, fx = large_window_pair
    assert fx.config.vision.window_merged_side == 4
    # merged 5x6 -> 2x2 windows (partial), merged 9x2 -> 3x1 windows (partial), merged 2x3 -> 1 window
    _check_image_logits(large_window_pair, [(1, 10, 12), (1, 18, 4), (1, 4, 6)], seed=6)


def test_tied_embeddings_small_vocab(tied_pair):
    hf, fx = tied_pair
    assert fx.config.tie_word_embeddings and fx.lm_head is None
    assert fx.config.text.vocab_size == 128
    assert (fx.config.image_token_id, fx.config.vision_start_token_id, fx.config.vision_end_token_id) == (
        TINY_TOKENS["image_token_id"], TINY_TOKENS["vision_start_token_id"], TINY_TOKENS["vision_end_token_id"])
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    _check_image_logits(tied_pair, [(1, 4, 6), (1, 6, 4)], seed=7)


# ---- per-module parity -----------------------------------------------------------------------------

@nnx.jit
def _vision_encode_and_merge(model, vision):
    hidden = model.visual.encode(vision)
    return hidden, model.visual.merger(hidden)


@pytest.mark.parametrize("which", ["default_pair", "small_window_pair"])
def test_vision_encoder_and_merger(which, request):
    hf, fx = request.getfixturevalue(which)
    cfg = fx.config
    grids = [(1, 6, 10), (1, 4, 6)]
    _, pv, grid = image_prompt(grids, np.random.RandomState(8))
    rows = pv.shape[0]

    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grid))
    ref_hidden = ref.last_hidden_state.numpy()  # window-permuted order
    ref_merged = ref.pooler_output.numpy()  # un-permuted (HF token order)

    layout = vision_layout(grid, cfg.vision)
    vision = VisionInputs(pv[layout.patch_source] * layout.valid[:, None], layout.valid, layout.segment_ids,
                          layout.pos_hw)
    hidden, merged = (np.asarray(a) for a in _vision_encode_and_merge(fx, vision))

    # Pre-merger hidden states: HF row r holds pixel row window_index[r // 4] * 4 + r % 4.
    window_index, _ = get_vision_window_index(torch.as_tensor(grid), spatial_merge_size=cfg.vision.spatial_merge_size,
                                              window_size=cfg.vision.window_size,
                                              patch_size=cfg.vision.patch_size)
    unit = cfg.vision.merge_unit
    hf_pixel_row = (window_index.numpy()[:, None] * unit + np.arange(unit)).ravel()
    ref_by_pixel = np.empty_like(ref_hidden)
    ref_by_pixel[hf_pixel_row] = ref_hidden
    src = layout.patch_source[layout.valid]
    assert sorted(src.tolist()) == list(range(rows))  # every patch in exactly one slot
    assert rel_err(hidden[layout.valid], ref_by_pixel[src]) <= TOL

    # Merger output, mapped back to HF token order by merged_index.
    assert merged.shape[0] == layout.num_slots // unit
    assert rel_err(merged[layout.merged_index], ref_merged) <= TOL


def test_decoder_layer(default_pair):
    hf, fx = default_pair
    cfg = fx.config.text
    rng = np.random.RandomState(9)
    b, length = 2, 9
    x = rng.randn(b, length, cfg.hidden_size).astype(np.float32)
    # distinct t/h/w positions so that a mis-assigned M-RoPE section shows
    pos = np.stack([np.arange(length) + 3, (np.arange(length) * 2) % 7, (np.arange(length) * 5) % 11])
    pos = np.broadcast_to(pos[:, None], (3, b, length)).copy()
    pos[:, 1] += 1
    mask = np.ones((b, length), bool)
    mask[1, :2] = False  # left padding in row 1

    lm = hf.model.language_model
    xt, pt = torch.as_tensor(x), torch.as_tensor(pos)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    hf_mask = (causal[None] & torch.as_tensor(mask)[:, None, :])[:, None]  # [B, 1, L, L] bool, True = attend
    with torch.no_grad():
        cos_ref, sin_ref = lm.rotary_emb(xt, pt)
        ref = lm.layers[0](xt, attention_mask=hf_mask, position_embeddings=(cos_ref, sin_ref)).numpy()

    cos, sin = mrope(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    assert rel_err(cos, cos_ref.numpy()) <= 1e-6 and rel_err(sin, sin_ref.numpy()) <= 1e-6
    our_mask = np.tril(np.ones((length, length), bool))[None] & mask[:, None, :]
    out, _ = fx.decoder.layers[0](x, cos, sin, our_mask)
    out = np.asarray(out)
    assert rel_err(out[mask], ref[mask]) <= TOL

    # the rotary application alone, vs HF's apply_rotary_pos_emb ([B, H, L, D] layout there)
    q = rng.randn(b, length, cfg.num_attention_heads, cfg.head_dim).astype(np.float32)
    q_ref, _ = apply_rotary_pos_emb(torch.as_tensor(q).transpose(1, 2), torch.as_tensor(q).transpose(1, 2),
                                    cos_ref, sin_ref)
    assert rel_err(apply_rotary(q, cos, sin, upcast=False), q_ref.transpose(1, 2).numpy()) <= 1e-6
