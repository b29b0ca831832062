"""Autoregressive decoding with the KV cache: a prefill, then a decode loop, in one jitted program.

Layers, from low to high:

* `prefill(model, inputs, cache_len)` and `decode_step(model, tokens, positions, cache)` are plain
  traceable functions on the module (no jit of their own), for callers that build their own jitted
  loop (e.g. a GRPO sampler).
* `decode_loop(model, first_logits, cache, positions, ...)` runs the whole decode as one
  `jax.lax.while_loop` (greedy, or sampling with HF's temperature / top-k / top-p, see
  model.sampling), stopping once every row has emitted EOS; no host round trip per token.
* `rollout(model, inputs, ...)` (traceable) and `sample_groups(model, inputs, ...)` (jitted, device
  arrays in and out, no host sync): G samples per prompt for GRPO. Each prompt is prefilled once (the
  vision encoder sees each image once), then its KV cache, first logits and next position are repeated
  G times, so rows i*G .. i*G+G-1 belong to prompt i (HF's num_return_sequences layout).
* `generate` / `greedy_generate` take HF-shaped inputs and return what HF `generate` returns: the
  prompt followed by the generated tokens, with `pad_token_id` after a row's EOS, and as many new
  columns as steps were run (fewer than `max_new_tokens` when every row finished early).

Randomness: the token of step k (k = 0 for the first generated token) is drawn with
`jax.random.fold_in(rng, k)` over all rows at once, so the same rng and the same inputs give the same
tokens, also in a resumed run that passes the same key. One jitted program over a global batch that
spans processes (GRPO's rollout) draws it whole from one key, which every process passes alike; only
processes that each run their own program on their own rows need keys that differ (fold the process
index in).

Positions: the k-th generated token (k = 0, 1, ...) of a row sits at position
`valid_prompt_length + k + rope_delta = max prompt position + 1 + k` on all three M-RoPE axes. HF
`generate` continues each axis from the prompt's last position (`position_ids[..., -1] + 1 + k`); for a
left-padded prompt that ends in a text token (always the case: an image is closed by
<vision_end>), all axes of the last position equal the maximum, so the two agree. The rope-delta form
also stays right for a right-padded prompt: logits are taken at each row's last real token and the
padding slots stay masked in the cache.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .inputs import ModelInputs
from .kv_cache import KVCache, repeat_rows
from .layers import dropout_active
from .sampling import check_sampling_args, choose_tokens, suppress_tokens


class GenerateOutput(NamedTuple):
    """Rows R = prompts x samples per prompt, N = max_new_tokens columns (fixed shape)."""

    tokens: jax.Array  # [R, N] int32 generated tokens, pad_token_id after a row's EOS (and past num_steps)
    # [R, N] float32 log-softmax of the model's raw logits (no temperature, no top-k/top-p) at the
    # chosen token; 0 at pads. Not the sampling distribution's log-prob: GRPO recomputes log-probs of
    # logits / temperature in its own pass, as TRL does.
    logprobs: jax.Array
    finished: jax.Array  # [R] bool: the row emitted EOS
    num_steps: jax.Array  # int32 scalar: tokens generated per row (columns of `tokens` filled), <= N
    lengths: jax.Array  # [R] int32: completion length, EOS included; N for a truncated row
    completion_mask: jax.Array  # [R, N] int32: 1 on the completion (up to and including EOS), as TRL's
    truncated: jax.Array  # [R] bool: no EOS within max_new_tokens (= ~finished)


# ----------------------------------------------------------------------------------------------------
# Traceable building blocks.


def init_cache(model, batch: int, cache_len: int) -> KVCache:
    t = model.config.text
    return KVCache.init(t.num_hidden_layers, batch, cache_len, t.num_key_value_heads, t.head_dim, model.dtype,
                        stacked=t.scan_layers)


def next_positions(inputs: ModelInputs):
    """Position (all three axes) of the first generated token per row: valid length + rope delta. [B] int32."""
    xp = np if isinstance(inputs.attention_mask, np.ndarray) else jnp
    valid = xp.sum(xp.asarray(inputs.attention_mask).astype(xp.int32), axis=-1)
    return (valid + xp.asarray(inputs.rope_deltas).astype(xp.int32)).astype(xp.int32)


def prefill(model, inputs: ModelInputs, cache_len: int) -> tuple[jax.Array, KVCache]:
    """Run the prompt through the model, writing slots [0, L) of a fresh cache of `cache_len` slots.

    Returns the logits at each row's last real token [B, vocab] and the cache.
    """
    b, length = inputs.input_ids.shape
    if cache_len < length:
        raise ValueError(f"cache_len {cache_len} is shorter than the prompt ({length})")
    cache = init_cache(model, b, cache_len)
    hidden, cache = model.hidden_states(inputs, cache)
    mask = jnp.asarray(inputs.attention_mask).astype(bool)
    # Last real token: the last column under left padding; the last 1 of the mask in general.
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    return model.logits(last_hidden)[:, 0], cache


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (tokens [B]) at `positions` [B] (same on the three M-RoPE axes) into the
    next cache slot. Returns logits [B, vocab] and the updated cache."""
    b = tokens.shape[0]
    ids = tokens.astype(jnp.int32)[:, None]
    pos = jnp.broadcast_to(positions.astype(jnp.int32)[None, :, None], (3, b, 1))
    inputs = ModelInputs(
        input_ids=ids,
        attention_mask=jnp.ones((b, 1), jnp.int32),
        position_ids=pos,
        rope_deltas=jnp.zeros((b,), jnp.int32),
        image_feature_index=jnp.zeros((b, 1), jnp.int32),
        vision=None,
    )
    hidden, cache = model.hidden_states(inputs, cache)
    return model.logits(hidden)[:, 0], cache


def _choose(logits: jax.Array, key, *, greedy: bool, temperature, top_k, top_p,
            suppress_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Pick a token per row (never one of `suppress_ids`); also return its log-prob under the raw
    (unsuppressed, untempered, unfiltered) logits."""
    logits = logits.astype(jnp.float32)
    token = choose_tokens(suppress_tokens(logits, suppress_ids), key, greedy=greedy, temperature=temperature,
                          top_k=top_k, top_p=top_p)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logp


def _is_eos(token: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(token[:, None] == eos_ids[None, :], axis=-1)


def _completion_extent(tokens: jax.Array, finished: jax.Array, eos_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lengths [R] (EOS included; N when truncated) and the completion mask [R, N] int32. The first EOS
    is the row's own (a pad id equal to an EOS id only follows it)."""
    n = tokens.shape[1]
    is_eos = jnp.any(tokens[..., None] == eos_ids, axis=-1)
    lengths = jnp.where(finished, jnp.argmax(is_eos, axis=-1) + 1, n).astype(jnp.int32)
    return lengths, (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.int32)


def check_cache_room(cache: KVCache, max_new_tokens: int) -> None:
    """ValueError when `cache` has fewer than max_new_tokens - 1 free slots (the first token comes from the
    prefill's logits; each later one is written into the cache first). Writes past the end would be clamped
    by dynamic_update_slice onto the last slot, silently corrupting the keys, so it is checked here: in full
    when the cache's length is concrete, and only its size when it is traced."""
    needed = max_new_tokens - 1
    try:
        length = int(cache.length)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):  # traced: the size only
        length = 0
    if length + needed > cache.max_len:
        raise ValueError(f"KV cache of {cache.max_len} slots holding {length}: {max_new_tokens} new tokens "
                         f"need {needed} more; size it prompt length + max_new_tokens")


def decode_loop(model, first_logits: jax.Array, cache: KVCache, positions: jax.Array, *, max_new_tokens: int,
                eos_ids: jax.Array, pad_id, greedy: bool = True, temperature=1.0,
                rng: jax.Array | None = None, top_k: int | None = None,
                top_p: float | None = None, suppress_ids: jax.Array | None = None) -> tuple[GenerateOutput, KVCache]:
    """Generate up to `max_new_tokens` tokens in one `lax.while_loop`.

    first_logits [B, vocab] come from `prefill`; positions [B] is the position of the first generated
    token (`next_positions`). Token k is fed back at position positions + k into cache slot
    cache.length. The loop stops when every row has emitted one of eos_ids [E] (int32), like HF; tokens
    after a row's EOS are pad_id. `cache` needs max_new_tokens - 1 free slots (`check_cache_room`).
    Sampling (greedy False) draws token k from softmax(filter_logits(logits, temperature, top_k, top_p)) with
    fold_in(rng, k); temperature may be traced, top_k / top_p are static Python values. suppress_ids [S]
    int32 (-1: none) are never chosen (HF's suppress_tokens).
    """
    check_cache_room(cache, max_new_tokens)
    b = first_logits.shape[0]
    n = max_new_tokens
    eos_ids = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    pad_id = jnp.asarray(pad_id, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if greedy:
        rng = jax.random.key(0)  # unused
    elif rng is None:
        raise ValueError("sampling (greedy=False) needs an rng key")
    choose = functools.partial(_choose, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                               suppress_ids=suppress_ids)

    token, logp = choose(first_logits, jax.random.fold_in(rng, 0))
    finished = _is_eos(token, eos_ids)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)

    def cond(carry):
        step, _, _, _, _, finished = carry
        return (step < n) & ~jnp.all(finished)

    def body(carry):
        step, cache, tokens, logprobs, previous, finished = carry
        logits, cache = decode_step(model, previous, positions + step - 1, cache)
        token, logp = choose(logits, jax.random.fold_in(rng, step))
        token = jnp.where(finished, pad_id, token)
        logp = jnp.where(finished, 0.0, logp)
        finished = finished | _is_eos(token, eos_ids)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (jnp.int32(0), step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logp[:, None], (jnp.int32(0), step))
        return step + 1, cache, tokens, logprobs, token, finished

    carry = (jnp.int32(1), cache, tokens, logprobs, token, finished)
    step, cache, tokens, logprobs, _, finished = jax.lax.while_loop(cond, body, carry)
    lengths, completion_mask = _completion_extent(tokens, finished, eos_ids)
    return GenerateOutput(tokens, logprobs, finished, step, lengths, completion_mask, ~finished), cache


def rollout(model, inputs: ModelInputs, rng: jax.Array, eos_ids: jax.Array, pad_id, temperature=1.0, *,
            num_generations: int, max_new_tokens: int, greedy: bool = False, top_k: int | None = None,
            top_p: float | None = None, suppress_ids: jax.Array | None = None) -> GenerateOutput:
    """Traceable group sampler (no jit of its own, for a caller's jitted step): B prompts ->
    B * num_generations rows, prompt i's samples in rows i*G .. i*G+G-1.

    The prompts are prefilled once, at batch B (one vision-encoder pass per image); the prefilled KV
    cache, the first logits and the next position are then repeated G times and one decode loop runs
    at batch B*G. eos_ids [E] int32 (-1 entries match nothing), pad_id int32.
    """
    g = num_generations
    length = inputs.input_ids.shape[1]
    first_logits, cache = prefill(model, inputs, length + max_new_tokens)
    positions = jnp.repeat(jnp.asarray(next_positions(inputs)), g, axis=0)
    out, _ = decode_loop(model, jnp.repeat(first_logits, g, axis=0), repeat_rows(cache, g), positions,
                         max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, greedy=greedy,
                         temperature=temperature, rng=rng, top_k=top_k, top_p=top_p, suppress_ids=suppress_ids)
    return out


# ----------------------------------------------------------------------------------------------------
# Jitted stages (the model goes through nnx.jit; it is only read, never updated).


@nnx.jit(static_argnames=("cache_len",))
def prefill_jit(model, inputs: ModelInputs, cache_len: int) -> tuple[jax.Array, KVCache]:
    return prefill(model, inputs, cache_len)


def decode_loop_jit(model, first_logits, cache, positions, eos_ids, pad_id, temperature, rng, *,
                    max_new_tokens: int, greedy: bool, top_k: int | None = None,
                    top_p: float | None = None) -> GenerateOutput:
    """`decode_loop` under jit, after checking (outside the trace, where the cache's length is known)
    that the cache has room for the tokens."""
    check_cache_room(cache, max_new_tokens)
    return _decode_loop_jit(model, first_logits, cache, positions, eos_ids, pad_id, temperature, rng,
                            max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, top_p=top_p)


@nnx.jit(static_argnames=("max_new_tokens", "greedy", "top_k", "top_p"))
def _decode_loop_jit(model, first_logits, cache, positions, eos_ids, pad_id, temperature, rng, *,
                     max_new_tokens: int, greedy: bool, top_k: int | None = None,
                     top_p: float | None = None) -> GenerateOutput:
    out, _ = decode_loop(model, first_logits, cache, positions, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                         pad_id=pad_id, greedy=greedy, temperature=temperature, rng=rng, top_k=top_k, top_p=top_p)
    return out


@nnx.jit(static_argnames=("num_generations", "max_new_tokens", "greedy", "top_k", "top_p"))
def rollout_jit(model, inputs: ModelInputs, rng, eos_ids, pad_id, temperature, suppress_ids=None, *,
                num_generations: int, max_new_tokens: int, greedy: bool, top_k: int | None,
                top_p: float | None) -> GenerateOutput:
    return rollout(model, inputs, rng, eos_ids, pad_id, temperature, num_generations=num_generations,
                   max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, top_p=top_p, suppress_ids=suppress_ids)


# ----------------------------------------------------------------------------------------------------
# HF-shaped entry points.


class GenerationDefaults(NamedTuple):
    """A checkpoint's generation_config.json stop and pad tokens (None: the file does not set it), which
    HF generate uses over config.json's; the loader keeps them as `model.generation_defaults`."""

    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None


def _special_tokens(model, eos_token_ids, pad_token_id) -> tuple[np.ndarray, int]:
    """EOS ids as an int32 array padded with -1 (matches no token) to a multiple of 4, so a different
    number of EOS ids rarely recompiles the loop. Defaults as HF generate's: the checkpoint's
    generation_config.json (`model.generation_defaults`, set by the loader), else config.json; the pad id
    else the first EOS."""
    cfg = model.config
    defaults = getattr(model, "generation_defaults", None) or GenerationDefaults()
    if eos_token_ids is None:
        eos_token_ids = cfg.eos_token_id if defaults.eos_token_ids is None else defaults.eos_token_ids
    if eos_token_ids is None:
        eos_token_ids = ()
    elif isinstance(eos_token_ids, (int, np.integer)):
        eos_token_ids = (int(eos_token_ids),)
    if isinstance(eos_token_ids, (str, bytes)) or not all(isinstance(e, (int, np.integer)) for e in eos_token_ids):
        raise TypeError(f"eos_token_ids are token ids (ints), got {eos_token_ids!r}: pass "
                        "tokenizer.convert_tokens_to_ids('<|im_end|>') for a token's id")
    eos = [int(e) for e in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if defaults.pad_token_id is None else defaults.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    size = max(4, -(-len(eos) // 4) * 4)
    return np.asarray(eos + [-1] * (size - len(eos)), np.int32), int(pad_token_id)


def sample_groups(model, inputs: ModelInputs, *, num_generations: int, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  rng: jax.Array | int | None = None, eos_token_ids: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None, suppress_token_ids: Sequence[int] = ()) -> GenerateOutput:
    """Prepared inputs (B prompts) -> GenerateOutput with B * num_generations rows (prompt i's samples
    in rows i*G .. i*G+G-1) and N = max_new_tokens columns, as device arrays; one jitted call, no host
    sync. temperature 0 is greedy (then every sample of a prompt is the same and rng may be None);
    top_k 0/None and top_p 1.0/None are off (HF semantics, model.sampling). The temperature is traced
    (changing it does not recompile); top_k, top_p, num_generations and max_new_tokens are static.
    suppress_token_ids: tokens never sampled (HF's suppress_tokens; GRPO passes the image placeholder, as
    TRL does); the returned log-probs are of the unsuppressed logits."""
    if not isinstance(num_generations, (int, np.integer)) or num_generations < 1:
        raise ValueError(f"num_generations (num_return_sequences) must be an int >= 1, got {num_generations!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    # (10**6 ran until killed; its cache alone is huge. The prompts' padded width, known from the shape: their
    # mask may be a global array of several processes, which this process cannot read)
    limit, width = model.config.text.max_position_embeddings, inputs.input_ids.shape[1]
    if width + max_new_tokens > limit:
        raise ValueError(f"prompts of {width} tokens (padded) + max_new_tokens {max_new_tokens} are beyond the model's "
                         f"max_position_embeddings, {limit}: give fewer max_new_tokens")
    check_sampling_args(temperature, top_k, top_p)
    if dropout_active(model):  # (its random stream cannot advance inside the jitted decode loop)
        raise ValueError("decoding with LoRA dropout active (the model is in train mode, model.train()): call "
                         "model.eval() first (decoding draws no dropout; model.train() switches it back)")
    eos, pad = _special_tokens(model, eos_token_ids, pad_token_id)
    greedy = not temperature
    if not greedy and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key (jax.random.key(seed), or an int seed)")
    if isinstance(rng, (int, np.integer)):  # a seed, as a user would pass it
        rng = jax.random.key(int(rng))
    if greedy:
        rng, top_k, top_p = jax.random.key(0), None, None  # unused: argmax is the same under top-k/top-p
    suppress = [int(t) for t in suppress_token_ids]
    suppress = np.asarray(suppress + [-1] * (-len(suppress) % 4), np.int32) if suppress else None
    return rollout_jit(model, inputs, rng, eos, np.int32(pad), np.float32(1.0 if greedy else temperature), suppress,
                       num_generations=int(num_generations), max_new_tokens=int(max_new_tokens), greedy=greedy,
                       top_k=int(top_k) if top_k else None,
                       top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None)


def generate_device(model, inputs: ModelInputs, *, max_new_tokens: int, eos_token_ids=None, pad_token_id=None,
                    temperature: float = 0.0, rng: jax.Array | int | None = None, top_k: int | None = None,
                    top_p: float | None = None, num_return_sequences: int = 1) -> GenerateOutput:
    """Prepared inputs -> GenerateOutput (device arrays, fixed [B * num_return_sequences, max_new_tokens]);
    no host sync. Greedy by default; see `sample_groups`."""
    return sample_groups(model, inputs, num_generations=num_return_sequences, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, eos_token_ids=eos_token_ids,
                         pad_token_id=pad_token_id)


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
             num_return_sequences: int = 1, rng: jax.Array | int | None = None,
             eos_token_ids: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """HF-style generate: [B, L] prompt -> [B * num_return_sequences, L + steps] (prompt then generated
    tokens), numpy int; prompt i's sequences are rows i*G .. i*G+G-1, as in HF.

    temperature 0 is greedy (argmax, exactly HF's do_sample=False; with num_return_sequences G it
    returns G copies, where HF refuses); > 0 samples with `rng` (a key or an int seed) from HF's warpers:
    logits / temperature,
    then top_k, then top_p (None means off; HF's own default is top_k=50). steps = max_new_tokens unless
    every row emitted EOS earlier (then it is the step at which the last row did, as in HF), so fewer than
    max_new_tokens columns can follow the prompt.
    """
    inputs = model.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
    out = generate_device(model, inputs, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                          pad_token_id=pad_token_id, temperature=temperature, rng=rng, top_k=top_k, top_p=top_p,
                          num_return_sequences=num_return_sequences)
    steps = int(out.num_steps)
    prompt = np.repeat(np.asarray(input_ids), num_return_sequences, axis=0)
    new = np.asarray(out.tokens)[:, :steps].astype(prompt.dtype)
    return np.concatenate([prompt, new], axis=1)


def greedy_generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                    max_new_tokens: int, eos_token_ids: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache; equals HF `generate(do_sample=False)` token for token."""
    return generate(model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens=max_new_tokens,
                    eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, temperature=0.0)
