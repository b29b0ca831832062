"""Attention backends (fxjax.model.attention): which kernel runs where, the clear errors when one cannot,
and that the cudnn and splash forms of every mask the model builds say the same as the dense mask.

The kernels themselves need their hardware; here the cuDNN path's arguments run through JAX's own XLA
implementation of jax.nn.dot_product_attention, and the Splash kernel runs in Pallas's interpreter.
"""

from __future__ import annotations

import contextlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import image_prompt

from fxjax.model.attention import (AttentionMask, SplashLayout, cache_mask, causal_padding_mask, cudnn_mask,
                                   fused_attention, key_padding_mask, segment_mask, select_backend,
                                   _splash_kernel, splash_attention, splash_equivalent_mask, xla_attention)
from fxjax.model.config import TextConfig, VisionConfig
from fxjax.config_mapping import ConfigError
from fxjax.config_sections import LoRASection, ModelSection
from fxjax.train_config import from_dict

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("requested, platform, dtype, expected", [
    ("auto", "cpu", F32, "xla"),
    ("auto", "cpu", BF16, "xla"),
    ("auto", "cuda", BF16, "cudnn"),
    ("auto", "cuda", F16, "cudnn"),
    ("auto", "cuda", F32, "xla"),  # cuDNN flash attention is half precision only
    ("auto", "rocm", BF16, "xla"),
    ("auto", "tpu", BF16, "splash"),
    ("auto", "tpu", F32, "splash"),
    ("xla", "tpu", BF16, "xla"),
    ("xla", "cuda", BF16, "xla"),
    ("cudnn", "cuda", BF16, "cudnn"),
    ("splash", "tpu", F32, "splash"),
])
def test_selection_table(requested, platform, dtype, expected):
    assert select_backend(requested, platform, dtype) == expected


@pytest.mark.parametrize("requested, platform, dtype, pattern", [
    ("cudnn", "cpu", BF16, r"attention='cudnn' asks for cuDNN .* NVIDIA GPUs only, but JAX's platform here is "
                           r"'cpu'; use attention='xla' \(or 'auto', which picks 'xla' here\)"),
    ("cudnn", "tpu", BF16, r"platform here is 'tpu'; use attention='xla' \(or 'auto', which picks 'splash'"),
    ("cudnn", "cuda", F32, r"takes bfloat16 or float16 inputs, but the model computes in float32; compute in "
                           r"bfloat16 or use attention='xla'"),
    ("splash", "cpu", F32, r"attention='splash' asks for the Pallas Splash kernel, which runs on TPUs only, "
                           r"but JAX's platform here is 'cpu'; use attention='xla'"),
    ("splash", "cuda", BF16, r"platform here is 'cuda'; use attention='xla' \(or 'auto', which picks 'cudnn'"),
    ("flash", "cpu", F32, r"attention 'flash' is not one of auto, xla, cudnn, splash"),
])
def test_a_kernel_the_platform_cannot_run_is_a_clear_error(requested, platform, dtype, pattern):
    with pytest.raises(ValueError, match=pattern):
        select_backend(requested, platform, dtype)


def test_unknown_names_are_refused_by_the_configs():
    with pytest.raises(ValueError, match="text attention 'flash' is not one of"):
        TextConfig(attention="flash")
    with pytest.raises(ValueError, match="vision attention 'fast' is not one of"):
        VisionConfig(attention="fast")
    with pytest.raises(ConfigError, match="model.attention"):
        from_dict({"model": {"preset": "tiny", "attention": "flash"}})


# ---- the choice reaching the model -------------------------------------------------------------------

SMALL_PRESET = """\
text: {vocab_size: 128, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 1, num_attention_heads: 4,
       num_key_value_heads: 2, mrope_section: [2, 1, 1]}
vision: {depth: 2, hidden_size: 32, intermediate_size: 40, num_heads: 2, window_size: 56,
         fullatt_block_indexes: [1], out_hidden_size: 32}
image_token_id: 100
video_token_id: 101
vision_start_token_id: 102
vision_end_token_id: 103
"""


def _run_config(preset, **model):
    return types.SimpleNamespace(model=ModelSection(preset=str(preset), **model), lora=LoRASection())


@pytest.fixture(scope="module")
def run_model(tmp_path_factory):
    """A small random model built the way a run builds it, from a run config with model.attention=xla."""
    from fxjax.device_mesh import MeshConfig, make_mesh
    from fxjax.train.run_setup import build_model

    preset = tmp_path_factory.mktemp("preset") / "small.yaml"
    preset.write_text(SMALL_PRESET)
    with pytest.raises(ConfigError, match=r"^model.attention='cudnn' asks for cuDNN .* platform here is 'cpu'"):
        build_model(_run_config(preset, dtype="bfloat16", attention="cudnn"), None)  # before any weight or mesh
    return build_model(_run_config(preset, dtype="float32", attention="xla"), make_mesh(MeshConfig()))


def test_the_run_config_reaches_the_model(run_model):
    assert run_model.config.text.attention == run_model.config.vision.attention == "xla"
    assert run_model.decoder.cfg.attention == run_model.visual.cfg.attention == "xla"
    assert TextConfig().attention == VisionConfig().attention == "xla"  # the library default: HF-exact


def test_xla_through_the_config_gives_the_default_logits_bit_for_bit(run_model):
    """auto on a CPU is xla: the same logits, bit for bit, with images (window and full-attention blocks)
    and a left-padded row; cudnn on a CPU is refused while tracing."""
    ids, pixels, grids = image_prompt([(1, 4, 8)], np.random.RandomState(0))
    ids = np.stack([ids, np.concatenate([[0, 0], ids[:-2]])])
    mask = (np.arange(ids.shape[1]) >= np.array([[0], [2]])).astype(np.int32)
    images = dict(pixel_values=np.concatenate([pixels, pixels]), image_grid_thw=np.concatenate([grids, grids]))
    default = np.asarray(run_model(ids, attention_mask=mask, **images))
    try:
        run_model.use_attention("auto")
        assert run_model.decoder.cfg.attention == run_model.visual.cfg.attention == "auto"
        chosen = np.asarray(run_model(ids, attention_mask=mask, **images))
        run_model.use_attention("cudnn", vision="xla")
        assert (run_model.config.text.attention, run_model.config.vision.attention) == ("cudnn", "xla")
        with pytest.raises(ValueError, match="attention='cudnn' asks for cuDNN .* platform here is 'cpu'"):
            run_model(ids[:, :2], attention_mask=mask[:, :2])  # raised while tracing: nothing compiles
    finally:
        run_model.use_attention("xla")
    np.testing.assert_array_equal(chosen, default)


# ---- the masks in the kernels' forms -----------------------------------------------------------------

def _model_masks():
    """Every mask the model builds, on small shapes with padding: (name, AttentionMask, Lq, Lk)."""
    real = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], bool)  # left- and right-padded rows
    key_mask = jnp.array([[0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]], bool)  # 3 slots written
    valid = jnp.arange(3 * 12).reshape(3, 12) % 7 < 5  # 3 windows of 12 slots, some invalid
    valid = valid.at[2].set(False)  # a padding window: all slots invalid
    segments = jnp.array([0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1])
    return [("decoder", causal_padding_mask(real), 5, 5),
            ("decode step", cache_mask(key_mask, jnp.int32(3), 2), 2, 7),
            ("vision windows", key_padding_mask(valid), 12, 12),
            ("vision segments", segment_mask(segments, segments >= 0), 11, 11)]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _model_masks()])
def test_the_cudnn_mask_says_what_the_dense_mask_says(case):
    _, mask, lq, lk = _model_masks()[case]
    batch = mask.allowed.shape[:-2]
    dense = np.broadcast_to(np.asarray(mask.allowed), (*batch, lq, lk)).reshape(-1, lq, lk)
    form = np.asarray(cudnn_mask(mask.allowed, batch, lq, lk))
    assert form.shape[1:] == (1, lq, lk) and form.shape[0] in (1, dense.shape[0])
    said = np.broadcast_to(form[:, 0] & (np.tril(np.ones((lq, lk), bool)) if mask.causal else True), dense.shape)
    attends = dense.any(axis=-1)
    np.testing.assert_array_equal(said[attends], dense[attends])
    # cuDNN's backward gives NaN query gradients on a fully masked row: padding rows attend every key
    assert said.any(axis=-1).all()


def test_the_cudnn_mask_pads_odd_lengths_with_a_masked_key_and_a_query_row_that_attends():
    allowed = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]], bool)
    form = np.asarray(cudnn_mask(allowed, (), 3, 3, pad_q=1, pad_k=1))[0, 0]
    np.testing.assert_array_equal(form[:3], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])  # padding key masked
    assert form[3].all()  # the padding query row


@pytest.mark.parametrize("case", [0, 2, 3], ids=["decoder", "vision windows", "vision segments"])
def test_the_splash_segments_say_what_the_dense_mask_says_on_every_real_row(case):
    _, mask, length, _ = _model_masks()[case]
    batch = mask.q_segments.shape[:-1]
    n = int(np.prod(batch))
    layout = SplashLayout.plan(n, length, mask.causal)
    assert layout.chunk % 128 == 0
    q_seg = mask.q_segments.reshape(n, length)
    said = np.asarray(splash_equivalent_mask(layout, q_seg, mask.kv_segments.reshape(n, length), mask.causal))
    dense = np.broadcast_to(np.asarray(mask.allowed), (*batch, length, length)).reshape(n, length, length)
    real = np.asarray(q_seg) >= 0
    np.testing.assert_array_equal(said[real], dense[real])
    assert said.any(axis=-1).all()  # no row of the kernel is fully masked: padding attends padding


def test_short_windows_are_packed_into_one_tile():
    layout = SplashLayout.plan(num_seqs=5, seq_len=64, causal=False)
    assert (layout.per_chunk, layout.chunk, layout.num_chunks) == (2, 128, 3)
    assert SplashLayout.plan(num_seqs=2, seq_len=300, causal=True).chunk == 384
    x = jnp.arange(5 * 64).reshape(5, 64)
    np.testing.assert_array_equal(layout.unpack(layout.pack(x)), x)


# ---- the kernels' arguments, numerically ---------------------------------------------------------------

def _qkv(lead, length, heads, kv_heads, dim=16):
    rng = np.random.RandomState(0)
    shapes = [(*lead, length, heads, dim), (*lead, length, kv_heads, dim), (*lead, length, kv_heads, dim)]
    return [jnp.asarray(rng.randn(*shape).astype(np.float32)) for shape in shapes]


def _real_rows(mask: AttentionMask, shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(mask.q_segments) >= 0, shape)


def test_the_cudnn_arguments_compute_the_reference():
    """fused_attention's reshapes, mask and is_causal through JAX's XLA implementation (GQA: 4 heads on 2)."""
    cases = []
    for name, mask, lq, lk in _model_masks():
        lead = mask.allowed.shape[:-2] if name != "decode step" else (2,)
        q, k, v = _qkv(lead, lk, 4, 2)
        cases.append((name, (q[..., :lq, :, :], k, v, mask)))

    @jax.jit  # one compilation for all the cases
    def both(args):
        return [(xla_attention(q, k, v, m.allowed), fused_attention(q, k, v, m, implementation="xla"))
                for q, k, v, m in args]

    for (name, (q, k, _, mask)), (ref, out) in zip(cases, both([args for _, args in cases])):
        # Rows with no key to attend are padding every caller ignores (each path averages something else).
        attends = np.broadcast_to(np.asarray(mask.allowed), (*q.shape[:-2], k.shape[-3])).any(-1)
        np.testing.assert_allclose(np.asarray(out)[attends], np.asarray(ref)[attends], atol=2e-6, err_msg=name)


@pytest.mark.parametrize("case", [0, 2], ids=["decoder, GQA, under a mesh", "vision windows, packed"])
def test_the_splash_kernel_computes_the_reference_on_real_rows(case):
    """The Splash kernel itself, in Pallas's interpreter, against the reference; the decoder's under a
    (one-device) mesh, which runs it through shard_map as a TPU mesh must."""
    from fxjax.device_mesh import MeshConfig, make_mesh, use_mesh

    _, mask, length, _ = _model_masks()[case]
    lead = mask.q_segments.shape[:-1]
    q, k, v = _qkv(lead, length, 4, 2 if case == 0 else 4)
    _splash_kernel.cache_clear()
    with use_mesh(make_mesh(MeshConfig())) if case == 0 else contextlib.nullcontext():
        out = np.asarray(jax.jit(lambda q, k, v, m: splash_attention(q, k, v, m, interpret=True))(q, k, v, mask))
    ref = np.asarray(xla_attention(q, k, v, mask.allowed))
    real = _real_rows(mask, lead + (length,))
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)
    if case == 2:  # the kernel, built while tracing, is cached: another program reuses it (no leaked tracer)
        again = jax.jit(lambda q, k, v, m: 2 * splash_attention(q, k, v, m, interpret=True))(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(again)[real], 2 * out[real], atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["rows", "keys", "none"])
def test_xla_attention_over_its_score_limit_runs_the_queries_in_chunks_to_the_same_values(mask_kind):
    """Over `score_limit` float32 scores the queries run in chunks (the last one padded): the same outputs
    and gradients as every query at once, for a per-row mask (causal with padding), a key mask broadcast to
    every row, and none; grouped KV heads and a leading batch axis; 13 queries in chunks of 4."""
    from fxjax.model.attention import _attend

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=shape), F32) for shape in ((2, 13, 4, 8), (2, 11, 2, 8), (2, 11, 2, 8)))
    causal = np.tril(np.ones((13, 11), bool), 2) & (np.arange(11) >= 1)  # (row 0 attends key 1 onward)
    mask = {"rows": jnp.asarray(np.broadcast_to(causal, (2, 13, 11))),
            "keys": jnp.asarray(np.arange(11) < 9)[None, None, :], "none": None}[mask_kind]
    limit = 4 * 2 * 4 * 11  # (4 query rows over both batch rows, every head and key)

    def loss(attend, q, k, v):
        return (attend(q, k, v) * jnp.arange(8.0)).sum()

    chunked = lambda q, k, v: xla_attention(q, k, v, mask, score_limit=limit)  # noqa: E731
    whole = lambda q, k, v: _attend(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(chunked(q, k, v), whole(q, k, v), rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.grad(lambda *a: loss(chunked, *a), (0, 1, 2))(q, k, v),
                         jax.grad(lambda *a: loss(whole, *a), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "scan" in str(jax.make_jaxpr(chunked)(q, k, v)) and "scan" not in str(jax.make_jaxpr(whole)(q, k, v))


def test_xla_attention_score_limit_counts_one_devices_share_under_a_mesh():
    """Traced under a mesh, a device holds its share of the heads (over tensor) and, where the caller pinned
    the rows to the batch axes (the decoder's, `rows_pinned`), of the rows (over data x fsdp): the chunks
    are sized by that share (the whole batch's count made them 4x smaller than needed on data 2 x tensor 2,
    8 chunks of 2 queries where 2 of 8 stay under the limit). A leading axis nothing pins (the windows of
    one packed image sequence) counts whole: it may be replicated."""
    from jax.sharding import AbstractMesh, use_abstract_mesh

    q, k = jax.ShapeDtypeStruct((2, 16, 4, 8), F32), jax.ShapeDtypeStruct((2, 11, 2, 8), F32)
    limit = 2 * 2 * 4 * 11  # 2 query rows of both batch rows over every head and key

    def scan_length(mesh_sizes, rows_pinned=True):
        attend = lambda q, k: xla_attention(q, k, k, None, score_limit=limit, rows_pinned=rows_pinned)  # noqa: E731
        with use_abstract_mesh(AbstractMesh(mesh_sizes, ("data", "fsdp", "tensor"))):
            jaxpr = str(jax.make_jaxpr(attend)(q, k))
        return int(re.search(r"length=(\d+)", jaxpr).group(1)) if "scan" in jaxpr else 1

    assert scan_length((1, 1, 1)) == 8  # one device: 2 queries a chunk
    assert scan_length((2, 1, 1)) == 4 and scan_length((1, 2, 1)) == 4  # a batch row a device: 4 a chunk
    assert scan_length((2, 1, 2)) == 2  # and 2 of the 4 heads: 8 a chunk
    assert scan_length((1, 1, 3)) == 8  # (3 does not divide 4 heads: they are not split)
    assert scan_length((2, 1, 1), rows_pinned=False) == 8 and scan_length((2, 1, 2), rows_pinned=False) == 4


def test_xla_attention_holds_one_chunk_of_scores_not_all_of_them():
    """What the chunks are for: the compiled forward and backward of 4096 queries over 4096 keys and 4 heads
    (64 M float32 scores, 256 MiB) hold a chunk's scores in temporaries, not every query's."""
    q = jax.ShapeDtypeStruct((4096, 4, 64), F32)

    def temporaries(limit):
        grad = jax.jit(jax.grad(lambda q, k, v: xla_attention(q, k, v, None, score_limit=limit).sum(), (0, 1, 2)))
        return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temporaries(2 ** 30), temporaries(2 ** 22)  # (the second: 256 query rows a chunk)
    assert whole > 256 * 2 ** 20 and chunked < 64 * 2 ** 20, (whole, chunked)
