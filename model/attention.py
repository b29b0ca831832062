"""The one attention function every block calls, and the choice of the kernel behind it.

Backends (`TextConfig.attention` / `VisionConfig.attention`; the run config's `model.attention`):

    xla     the einsum softmax below: HF-exact, runs everywhere (the reference, and the CPU choice)
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention, NVIDIA GPUs,
            bfloat16 / float16 only
    splash  the Pallas Splash kernel (jax.experimental.pallas.ops.tpu.splash_attention): TPUs
    auto    splash on a TPU, cudnn on an NVIDIA GPU computing in bfloat16/float16, xla otherwise

Callers describe who may attend to whom once per forward pass as an `AttentionMask`, in every form the
kernels take: a dense boolean mask (xla; cudnn, as its bias), whether it is causal (cudnn and splash then
skip the masked half) and segment ids (splash, whose masks are otherwise static). The constructors below
build the decoder's causal + padding mask, the KV-cache decode mask and the vision encoder's window and
segment masks; `select_backend` is the pure choice of the kernel, `dot_product_attention` the dispatch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .batch_axis import batch_parts, tensor_parts
from .config import ATTENTION_BACKENDS

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Splash tiles are multiples of 128 rows/columns (the TPU lane width); sequences are padded or packed to them.
SPLASH_BLOCK = 128
# Segment id of slots added only to fill a Splash tile: equal to no real or padding token's id.
_FILL_SEGMENT = -(2 ** 30)
# Float32 attention scores `xla_attention` holds at once (1 GiB); above it the queries run in chunks.
XLA_SCORE_LIMIT = 2 ** 28


# ----------------------------------------------------------------------------------------- selection

def select_backend(requested: str, platform: str, dtype) -> str:
    """The kernel that runs: `requested` (auto | xla | cudnn | splash) on `platform` (as
    `current_platform` names it: cpu, cuda, rocm, tpu) for inputs of `dtype`. Pure: no device is touched.

    Raises ValueError for an unknown name and for a kernel the platform or dtype cannot run, saying what
    was asked, what was found and what to use instead."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    half = jnp.dtype(dtype) in _HALF
    if requested == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if platform == "cuda" and half else "xla"
    instead = f"use attention='xla' (or 'auto', which picks {select_backend('auto', platform, dtype)!r} here)"
    if requested == "cudnn":
        if platform != "cuda":
            raise ValueError(f"attention='cudnn' asks for cuDNN flash attention, which runs on NVIDIA GPUs only, "
                             f"but JAX's platform here is {platform!r}; {instead}")
        if not half:
            raise ValueError(f"attention='cudnn': cuDNN flash attention takes bfloat16 or float16 inputs, but the "
                             f"model computes in {jnp.dtype(dtype).name}; compute in bfloat16 or {instead}")
    if requested == "splash" and platform != "tpu":
        raise ValueError(f"attention='splash' asks for the Pallas Splash kernel, which runs on TPUs only, but "
                         f"JAX's platform here is {platform!r}; {instead}")
    return requested


def current_platform() -> str:
    """JAX's default platform as select_backend names it: cpu, tpu, cuda (NVIDIA) or rocm (AMD)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = getattr(jax.devices()[0].client, "platform_version", "")
    return "rocm" if "rocm" in version.lower() else "cuda"


# ------------------------------------------------------------------------------------------- masks

@functools.partial(jax.tree_util.register_dataclass, data_fields=["allowed", "q_segments", "kv_segments"],
                   meta_fields=["causal", "backend"])
@dataclass(frozen=True)
class AttentionMask:
    """Who may attend to whom, in the forms the kernels take.

    allowed: bool, broadcastable to [..., Lq, Lk], True = may attend (the xla and cudnn form).
    q_segments / kv_segments: int32 [..., Lq] / [..., Lk] or None. When given (self-attention only),
      `allowed` equals (lower-triangular if causal) & (q_segments[:, None] == kv_segments[None, :]) on every
      row whose query segment is >= 0; rows with a negative query segment are padding, whose output every
      caller ignores (they attend other padding instead of xla's uniform average). This is splash's form.
    causal: `allowed` includes j <= i (top-left aligned); a hint that lets kernels skip the upper half.
    backend: the requested backend (ATTENTION_BACKENDS), resolved by select_backend at trace time.
    """

    allowed: jax.Array
    q_segments: jax.Array | None = None
    kv_segments: jax.Array | None = None
    causal: bool = False
    backend: str = "xla"


def _real_segments(valid: jax.Array) -> jax.Array:
    return jnp.where(valid, 0, -1).astype(jnp.int32)


def causal_padding_mask(real: jax.Array, backend: str = "xla") -> AttentionMask:
    """Decoder without a cache: real [B, L] (True = real token) -> causal attention to real tokens."""
    length = real.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    segments = _real_segments(real)
    return AttentionMask(causal[None] & real[:, None, :], segments, segments, causal=True, backend=backend)


def cache_mask(key_mask: jax.Array, start: jax.Array, length: int, backend: str = "xla") -> AttentionMask:
    """Decoder with a KV cache: `length` new tokens in slots [start, start + length) attend to every slot
    up to their own that holds a real token (key_mask [B, S]). Dense only: `start` is traced, and Splash
    takes its causal offset as a static mask (its tiles of >= 128 query rows do not fit a one-token decode
    step either), so cache steps (the sampler's prefill and decode) run on xla there; cudnn takes the dense
    mask as its bias."""
    slots = jnp.arange(key_mask.shape[-1])
    query_slot = start + jnp.arange(length)
    allowed = (slots[None, :] <= query_slot[:, None])[None] & key_mask[:, None, :]
    return AttentionMask(allowed, backend=backend)


def key_padding_mask(valid: jax.Array, backend: str = "xla") -> AttentionMask:
    """Vision windows ([windows, slots]) or gathered segments ([segments, slots]): every query of a row
    attends the valid slots of that row."""
    segments = _real_segments(valid)
    return AttentionMask(valid[..., None, :], segments, segments, backend=backend)


def segment_mask(segment_ids: jax.Array, valid: jax.Array, backend: str = "xla") -> AttentionMask:
    """Vision full attention over all P slots ([..., P]): each slot attends the valid slots of its own
    segment."""
    allowed = (segment_ids[..., :, None] == segment_ids[..., None, :]) & valid[..., None, :]
    segments = jnp.where(valid, segment_ids, -1).astype(jnp.int32)
    return AttentionMask(allowed, segments, segments, backend=backend)


# -------------------------------------------------------------------------------------- dispatch

def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: AttentionMask | jax.Array | None, *, rows_pinned: bool = False) -> jax.Array:
    """Softmax attention with grouped KV heads: q [..., Lq, H, D]; k, v [..., Lk, KVH, D] (H a multiple of
    KVH) -> [..., Lq, H, D]. A plain boolean mask (or None) runs xla; an AttentionMask runs the backend it
    names (select_backend, on the platform JAX runs on). `rows_pinned`: the caller pinned q's leading axis
    to the mesh's batch axes (model.batch_axis.shard_batch), so xla's score limit counts a device's rows."""
    if not isinstance(mask, AttentionMask):
        return xla_attention(q, k, v, mask, rows_pinned=rows_pinned)
    backend = select_backend(mask.backend, current_platform(), q.dtype)
    if backend == "cudnn":
        return fused_attention(q, k, v, mask, implementation="cudnn")
    if backend == "splash" and mask.q_segments is not None:
        return splash_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask.allowed, rows_pinned=rows_pinned)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  score_limit: int = XLA_SCORE_LIMIT, *, rows_pinned: bool = False) -> jax.Array:
    """The reference. mask: bool, broadcastable to [..., Lq, Lk] (True = may attend). Scores and softmax
    run in float32, as HF's eager/sdpa do for fp32 and as a bf16 run needs for stability. A fully masked
    row yields a uniform average instead of NaN (HF's min-value masking does the same); callers ignore such
    rows.

    Where the scores of all queries would exceed `score_limit` float32 elements, the queries run in chunks
    that stay under it, one after another, each rematerialised in the backward pass (a query's softmax
    reads only its own row of scores, so the rows are those of one pass): the vision encoder's full
    attention over a 12.8-megapixel image (31,724 patches, 16 heads) held 60 GiB of scores at once.
    The limit is per device: under a mesh (traced within `jax.sharding.set_mesh`) each device holds its
    share of the heads (over tensor) and, where the caller pinned the leading axis to the batch axes
    (`rows_pinned`: the decoder's rows), of the rows (over data x fsdp); a leading axis the caller does not
    say is pinned counts whole (the vision encoder's: the windows of one packed image sequence may be
    replicated; its per-shard axis is pinned but counted whole too, on the safe side).
    """
    *batch, lq, h, _ = q.shape
    split = batch_parts(batch[0]) if batch and rows_pinned else 1
    rows = math.prod(batch) // split  # this device's
    per_query = rows * (h // tensor_parts(h)) * k.shape[-3]  # (scores of one query row over its heads and keys)
    if lq <= 1 or per_query * lq <= score_limit:
        return _attend(q, k, v, mask)
    return _attend_in_chunks(q, k, v, mask, chunks=-(-lq // max(1, score_limit // per_query)))


def _attend_in_chunks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, chunks: int) -> jax.Array:
    """`_attend` over the queries in `chunks` equal chunks, one after another (as even as they go: the last
    padded, its padding rows attending every key)."""
    n, lq = q.ndim - 3, q.shape[-3]
    chunk = -(-lq // chunks)
    chunks = -(-lq // chunk)  # (fewer where the rounded-up chunk covers the queries sooner)
    pad = chunks * chunk - lq
    q = jnp.pad(q, [(0, 0)] * n + [(0, pad), (0, 0), (0, 0)])
    rows = mask is not None and mask.shape[-2] == lq  # (else one row broadcast to every query: a key mask)
    if rows:
        mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, pad), (0, 0)], constant_values=True)

    @jax.checkpoint
    def one(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=n)
        mask_i = jax.lax.dynamic_slice_in_dim(mask, i * chunk, chunk, axis=mask.ndim - 2) if rows else mask
        return _attend(q_i, k, v, mask_i)

    out = jax.lax.map(one, jnp.arange(chunks))  # [chunks, ..., chunk, H, D]
    out = jnp.moveaxis(out, 0, n).reshape(*q.shape[:n], chunks * chunk, *q.shape[n + 1:])
    return jax.lax.slice_in_dim(out, 0, lq, axis=n)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`xla_attention` of every query at once.

    Layout: the query groups of each KV head are folded into the query axis, so both matmuls are plain
    batched [kvh] matmuls with the score tensor as [..., kvh, groups * Lq, Lk]: XLA then fuses the
    softmax into the second matmul and never copies the score tensor (the grouped 5-D einsum did), and
    K/V are read once per KV head (no repeat to full heads, which would multiply decode traffic).
    """
    *batch, lq, h, d = q.shape
    kvh = k.shape[-2]
    groups = h // kvh
    n = len(batch)
    qf = jnp.moveaxis(q.reshape(*batch, lq, kvh, groups, d), n, n + 2)  # [..., kvh, groups, Lq, D]
    qf = qf.reshape(*batch, kvh, groups * lq, d)
    kt = jnp.moveaxis(k, n, n + 1)  # [..., kvh, Lk, D]
    vt = jnp.moveaxis(v, n, n + 1)
    scores = jnp.einsum("...kqd,...ksd->...kqs", qf, kt, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    if mask is not None:
        scores = scores.reshape(*batch, kvh, groups, lq, -1)
        scores = jnp.where(mask[..., None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        scores = scores.reshape(*batch, kvh, groups * lq, -1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("...kqs,...ksd->...kqd", probs, vt).reshape(*batch, kvh, groups, lq, d)
    return jnp.moveaxis(out, (n, n + 1), (n + 1, n + 2)).reshape(*batch, lq, h, d)


# ------------------------------------------------------------------------------------------ cudnn

def cudnn_mask(allowed: jax.Array, batch: tuple[int, ...], lq: int, lk: int, pad_q: int = 0,
               pad_k: int = 0) -> jax.Array:
    """The dense mask as jax.nn.dot_product_attention's cuDNN path takes it: bool [N, 1, Lq + pad_q,
    Lk + pad_k] with N the flattened batch, or 1 when one mask serves the whole batch (cuDNN requires the
    full Lq x Lk extent). Padding keys are masked; a query row with no key to attend (a padding row, a
    padding vision window, a padding query) attends every key instead: cuDNN's backward pass gives NaN in
    the query gradient of a fully masked row (measured on an H100, bench/attention_check.py), and the q
    projection's weight gradient sums over every row, padding included. Callers ignore such rows' outputs,
    so their cotangents are zero and what they attend does not matter."""
    allowed = jnp.asarray(allowed, bool)
    rows = jnp.broadcast_to(allowed, (*allowed.shape[:-2], lq, lk))
    if rows.size == lq * lk:
        rows = rows.reshape(1, 1, lq, lk)
    else:
        rows = jnp.broadcast_to(rows, (*batch, lq, lk)).reshape(-1, 1, lq, lk)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))
    return rows | ~rows.any(axis=-1, keepdims=True)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                    implementation: str = "cudnn") -> jax.Array:
    """jax.nn.dot_product_attention over the flattened batch, with the mask as `cudnn_mask` and the causal
    hint as is_causal. GQA goes in as is (K/V with fewer heads). A row with no key to attend averages
    something else than xla's uniform average (callers ignore such rows). `implementation="xla"` runs the
    same arguments through JAX's own XLA path (how the CPU tests check the conversion)."""
    *batch, lq, h, d = q.shape
    lk, kvh = k.shape[-3], k.shape[-2]
    n = math.prod(batch)
    # cuDNN's backward pass with a bias takes even lengths only: one masked key / dropped query row more.
    pad_q, pad_k = lq % 2, lk % 2
    allowed = cudnn_mask(mask.allowed, tuple(batch), lq, lk, pad_q, pad_k)
    q, k, v = q.reshape(n, lq, h, d), k.reshape(n, lk, kvh, d), v.reshape(n, lk, kvh, d)
    if pad_q or pad_k:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, pad_k), (0, 0), (0, 0))) for x in (k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, is_causal=mask.causal, implementation=implementation)
    return out[:, :lq].reshape(*batch, lq, h, d)


# ----------------------------------------------------------------------------------------- splash

@dataclass(frozen=True)
class SplashLayout:
    """How [N, L] sequences become the [chunks, chunk] rows Splash runs on (its tiles are SPLASH_BLOCK wide).

    Causal or long sequences: one per chunk, padded at the end to a multiple of the tile. Short non-causal
    ones (vision windows of 64 slots): padded to a power of two and packed `per_chunk` to a tile, their
    segment ids made distinct per packed sequence, so that one tile computes several windows."""

    num_seqs: int
    seq_len: int
    padded_len: int
    per_chunk: int

    @classmethod
    def plan(cls, num_seqs: int, seq_len: int, causal: bool) -> "SplashLayout":
        if causal or seq_len >= SPLASH_BLOCK:
            return cls(num_seqs, seq_len, -(-seq_len // SPLASH_BLOCK) * SPLASH_BLOCK, 1)
        padded = 1 << (seq_len - 1).bit_length()
        return cls(num_seqs, seq_len, padded, SPLASH_BLOCK // padded)

    @property
    def chunk(self) -> int:
        return self.padded_len * self.per_chunk

    @property
    def num_chunks(self) -> int:
        return -(-self.num_seqs // self.per_chunk)

    def pack(self, x: jax.Array, fill=0) -> jax.Array:
        """[N, L, ...] -> [chunks, chunk, ...], new slots set to `fill`."""
        pad = [(0, self.num_chunks * self.per_chunk - self.num_seqs), (0, self.padded_len - self.seq_len)]
        x = jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(self.num_chunks, self.chunk, *x.shape[2:])

    def unpack(self, x: jax.Array) -> jax.Array:
        """[chunks, chunk, ...] -> [N, L, ...]."""
        x = x.reshape(self.num_chunks * self.per_chunk, self.padded_len, *x.shape[2:])
        return x[:self.num_seqs, :self.seq_len]

    def pack_segments(self, segments: jax.Array) -> jax.Array:
        """[N, L] segment ids -> [chunks, chunk]: distinct per packed sequence (id * per_chunk + position;
        padding -1 - position), tile filler _FILL_SEGMENT."""
        j = (jnp.arange(segments.shape[0]) % self.per_chunk)[:, None]
        segments = jnp.where(segments >= 0, segments * self.per_chunk + j, -1 - j).astype(jnp.int32)
        return self.pack(segments, fill=_FILL_SEGMENT)


def splash_equivalent_mask(layout: SplashLayout, q_segments: jax.Array, kv_segments: jax.Array,
                           causal: bool) -> jax.Array:
    """The dense [N, L, L] mask Splash computes for these segments, unpacked (for checking the packing)."""
    q, kv = layout.pack_segments(q_segments), layout.pack_segments(kv_segments)
    allowed = q[:, :, None] == kv[:, None, :]
    if causal:
        allowed &= jnp.tril(jnp.ones((layout.chunk, layout.chunk), bool))
    # Back to per-sequence blocks: row i of sequence s against the columns of the same sequence.
    rows = layout.unpack(allowed)  # [N, L, chunk]
    start = (jnp.arange(layout.num_seqs) % layout.per_chunk) * layout.padded_len
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, layout.seq_len, axis=1))(rows, start)


@functools.lru_cache(maxsize=64)
def _splash_kernel(chunk: int, heads: int, causal: bool, interpret: bool):
    # Imported here: the module pulls in Pallas's TPU (Mosaic) lowering, which only a splash run needs.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    one = splash.CausalMask((chunk, chunk)) if causal else splash.FullMask((chunk, chunk))
    block = next(b for b in (512, 256, SPLASH_BLOCK) if chunk % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Concrete mask tables even when first built inside a trace: the kernel is cached across traces.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                     interpret: bool = False) -> jax.Array:
    """Self-attention through the Splash kernel: the leading dims flattened to sequences, packed by
    SplashLayout, the static mask causal or full, the rest from the segment ids; vmapped over the chunks.
    Under a mesh it runs per shard (`on_local_shards`). `interpret=True` runs the kernel in Pallas's
    interpreter (any platform: how the CPU tests check it)."""
    lead = q.shape[:-2]
    q_seg = jnp.broadcast_to(mask.q_segments, lead).astype(jnp.int32)
    kv_seg = jnp.broadcast_to(mask.kv_segments, lead).astype(jnp.int32)
    local = functools.partial(_splash_local, causal=mask.causal, interpret=interpret)
    return on_local_shards(local, q, k, v, q_seg, kv_seg)


def _splash_local(q, k, v, q_seg, kv_seg, *, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    *batch, length, h, d = q.shape
    kvh = k.shape[-2]
    n = math.prod(batch)
    layout = SplashLayout.plan(n, length, causal)

    def heads_first(x, heads):  # [..., L, heads, D] -> [chunks, heads, chunk, D]
        return jnp.swapaxes(layout.pack(x.reshape(n, length, heads, d)), 1, 2)

    kernel = _splash_kernel(layout.chunk, h, causal, interpret)
    segments = SegmentIds(q=layout.pack_segments(q_seg.reshape(n, length)),
                          kv=layout.pack_segments(kv_seg.reshape(n, length)))
    # Splash takes no scale: q is scaled first.
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(d ** -0.5, q.dtype), h), heads_first(k, kvh),
                           heads_first(v, kvh), segments)
    return layout.unpack(jnp.swapaxes(out, 1, 2)).reshape(q.shape)


def on_local_shards(fn, q, k, v, q_seg, kv_seg):
    """fn(q, k, v, q_seg, kv_seg) per shard under the ambient mesh (jax.sharding.set_mesh), as is without one.

    XLA cannot partition a Pallas TPU kernel (a multi-device program with one fails to lower), so it runs
    under shard_map: the first batch dim split over the mesh's data and fsdp axes when it divides (the
    decoder's batch, the vision windows), heads over tensor when both head counts divide, the rest whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, q_seg, kv_seg)

    def dividing(names: tuple[str, ...], size: int) -> tuple[str, ...] | None:
        axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
        return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None

    nbatch = q.ndim - 3
    lead = (dividing(("data", "fsdp"), q.shape[0]),) + (None,) * (nbatch - 1) if nbatch else ()
    heads = dividing(("tensor",), math.gcd(q.shape[-2], k.shape[-2]))
    x_spec = P(*lead, None, heads, None)
    seg_spec = P(*lead, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec), out_specs=x_spec,
                         check_vma=False)(q, k, v, q_seg, kv_seg)
