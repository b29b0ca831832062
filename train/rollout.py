"""One GRPO generation batch on the host side: sample G completions per prompt, score them, and lay the
result out as the `GroupBatch` the jitted update consumes.

    rollout = sample_and_score(model, inputs, metas, tokenizer=..., ...)   # completions, rewards, advantages
    batch, floor = build_group_batch(prompt_batch, rollout, model.config, ...)

Completion masks follow TRL: a completion's tokens count up to and including its first EOS; a completion
without EOS within max_completion_length is truncated (and, with mask_truncated_completions, its whole
row leaves the loss).

Multi-process (train.grpo): each process passes only its own prompts and fetches only their completions'
rows, so everything here runs on that process's part; `rollout_sums` / `combine_rollout_sums` give the
metrics of the whole batch from every part's sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from fxjax import rewards
from fxjax.rewards.scoring import KEYS as SCORE_KEYS
from fxjax.model import generate as sampler
from fxjax.model.generate import next_positions
from fxjax.model.inputs import ModelInputs, prepare_inputs, stack_vision
from fxjax.model.vision import VisionInputs
from fxjax.device_mesh import use_mesh
from fxjax.train.batching import pad_vision_inputs, vision_floor
from fxjax.train.grpo_loss import group_advantages
from fxjax.train.grpo_step import CompletionSlots, GroupBatch
from fxjax.train.reward_funcs import RewardFunc, add_reward_funcs

__all__ = ["Rollout", "build_group_batch", "combine_rollout_sums", "completion_mask", "completion_slots",
           "prompt_inputs", "rollout_metrics", "rollout_sums", "sample_and_score", "update_slot_count"]

# Loss slots per batch shard: a multiple of this, and the count only grows over a run (the shape floor), so a
# run compiles a new update only when a batch has more loss tokens than the floor holds. When it grows, it
# grows by at least a quarter: plain multiples of 64 grew (and recompiled the update and the log-prob pass)
# every time the completions' lengths drifted up by 64 tokens, dozens of times in a long run, minutes each on
# a large model; SFT's coarser bucket progression (..., 512, 768, 1024) would pad the update's lm_head by up
# to half (the demo's GRPO update took 50% longer with it).
SLOT_QUANTUM = 64
SLOT_GROWTH = 1.25


def update_slot_count(need: int, floor: int = 0) -> int:
    """Loss slots per batch shard for a batch whose fullest shard has `need` loss tokens, given the run's
    current `floor`: the floor when it holds them, else the next multiple of SLOT_QUANTUM, at least
    SLOT_GROWTH times the floor."""
    size = -(-max(need, 1) // SLOT_QUANTUM) * SLOT_QUANTUM
    if size <= floor:
        return int(floor)
    return max(size, -(-int(floor * SLOT_GROWTH) // SLOT_QUANTUM) * SLOT_QUANTUM)


@dataclass
class Rollout:
    tokens: np.ndarray  # [P*G, N] int32 sampled tokens, pad after EOS
    attention: np.ndarray  # [P*G, N] int32: 1 through the first EOS (all N when truncated)
    loss_mask: np.ndarray  # [P*G, N] float32: attention, with truncated rows zeroed if so configured
    truncated: np.ndarray  # [P*G] bool
    texts: list[str]
    scores: dict[str, np.ndarray]  # rewards.score keys, [P*G] each
    advantages: np.ndarray  # [P*G] float32
    targets: list[dict] = field(default_factory=list)  # one per prompt


def completion_mask(tokens: np.ndarray, eos_ids: int | Sequence[int],
                    pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(attention [R, N] int32 through the first EOS (any of `eos_ids`), truncated [R] bool: no EOS in the
    row and, given `pad_id`, its last token not the pad either).

    The pad exception is TRL's (GRPOTrainer: truncated when `ids[-1] not in [*eos_token_ids, pad_token_id]`):
    it matters only for a model whose stop tokens leave out its pad token and that samples the pad as its
    last token; such a row keeps its whole length in the loss, as in TRL."""
    is_eos = np.isin(tokens, np.atleast_1d(eos_ids))
    has_eos = is_eos.any(axis=1)
    first = np.where(has_eos, is_eos.argmax(axis=1), tokens.shape[1])
    attention = (np.arange(tokens.shape[1])[None, :] <= first[:, None]).astype(np.int32)
    attention[~has_eos] = 1
    truncated = ~has_eos if pad_id is None else ~has_eos & (tokens[:, -1] != pad_id)
    return attention, truncated


def completion_ids(tokens: np.ndarray, attention: np.ndarray) -> list[list[int]]:
    """Each completion's token ids through its EOS (all of them when cut at the length limit), as TRL's."""
    return [row[keep.astype(bool)].tolist() for row, keep in zip(tokens, attention)]


def decode_completions(tokenizer, tokens: np.ndarray, attention: np.ndarray,
                       eos_ids: int | Sequence[int], ids_of_rows: list[list[int]] | None = None) -> list[str]:
    """The text of each completion up to (not including) its EOS; special tokens kept (the format uses them).
    `ids_of_rows`: `completion_ids` of these rows, when the caller has them already."""
    texts = []
    for ids in ids_of_rows if ids_of_rows is not None else completion_ids(tokens, attention):
        if ids and ids[-1] in np.atleast_1d(eos_ids):
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def targets_of(metas: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The rewards' targets from the pipeline's meta (boxes already in the model's resized frame)."""
    return [{"label": m["label"], "boxes": np.asarray(m["boxes"], np.float64).reshape(-1, 4)} for m in metas]


def prompt_inputs(model_cfg, prompt_batch: Mapping[str, Any], floor: dict[str, int], batch_shards: int = 1, *,
                  per_shard: bool | None = None) -> tuple[ModelInputs, dict]:
    """The P prompts prepared once for sampling, vision padded up to the running floor (few compiles);
    `per_shard` (default: `batch_shards` > 1): images packed per batch shard (model.inputs.prepare_inputs),
    also for a process's single shard of several."""
    per_shard = batch_shards > 1 if per_shard is None else per_shard
    inputs = prepare_inputs(model_cfg, prompt_batch["input_ids"], prompt_batch["attention_mask"],
                            prompt_batch.get("pixel_values"), prompt_batch.get("image_grid_thw"),
                            batch_shards=batch_shards if per_shard else None)
    return pad_vision_inputs(inputs, model_cfg, floor)


def sample_and_score(model, inputs, metas, *, tokenizer, eos_ids: Sequence[int], pad_id: int,
                     num_generations: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float, rng: jax.Array,
                     weights: rewards.RewardWeights, reward_config, scale_rewards: str,
                     mask_truncated: bool, host, mesh=None, batch_rewards=None,
                     suppress_token_ids: Sequence[int] = (), reward_funcs: Sequence[RewardFunc] = (),
                     progress: Mapping[str, Any] | None = None) -> Rollout:
    """Sample G completions per prompt with the model as it is (the current policy), decode and score them.

    `inputs` are the prepared (and placed) prompts, `metas` the meta of the prompts whose completions
    `host` fetches: `host` maps the sampled [P*G, N] device array to the numpy rows scored here (all of
    them; or, multi-process, this process's rows: its prompts' completions, whole groups, since prompt i's
    G samples are rows i*G .. i*G+G-1). Sampling runs under `mesh` (activations pinned to the batch axes);
    the rewards run on this host's CPU device, outside it. Group advantages need only a group's own
    rewards, except under scale_rewards "batch": `batch_rewards` (when the rows here are not the whole
    batch) maps these rows' total rewards to (every row's, the positions of these rows in them).
    `suppress_token_ids` are never sampled (the image placeholder, as TRL's GRPO suppresses it);
    `reward_funcs` (grpo.reward_funcs, train.reward_funcs) add terms of the user's own to the total, given
    `progress` (the step and its stage, train.reward_funcs.PROGRESS) if they take it."""
    with use_mesh(mesh):
        out = sampler.sample_groups(model, inputs, num_generations=num_generations, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k or None,
                                    top_p=None if top_p >= 1.0 else top_p, rng=rng, eos_token_ids=tuple(eos_ids),
                                    pad_token_id=pad_id, suppress_token_ids=tuple(suppress_token_ids))
    tokens = host(out.tokens).astype(np.int32)
    if tokens.shape[0] != len(metas) * num_generations:  # whole groups of exactly these prompts
        raise ValueError(f"{tokens.shape[0]} sampled rows fetched for {len(metas)} prompts x {num_generations}")
    attention, truncated = completion_mask(tokens, eos_ids, pad_id)
    ids = completion_ids(tokens, attention)
    texts = decode_completions(tokenizer, tokens, attention, eos_ids, ids)
    targets = targets_of(metas)
    scores = rewards.score(texts, targets, weights=weights, config=reward_config, group_size=num_generations)
    scores = add_reward_funcs(scores, reward_funcs, texts, targets, metas, num_generations, progress,
                              completion_ids=ids)
    totals, mine = np.asarray(scores["total"], np.float32), slice(None)
    if scale_rewards == "batch" and batch_rewards is not None:
        totals, mine = batch_rewards(totals)
    advantages = np.asarray(jax.device_get(group_advantages(totals, num_generations, scale_rewards)),
                            np.float32)[mine]
    loss_mask = attention.astype(np.float32)
    if mask_truncated:
        loss_mask[truncated] = 0.0
    return Rollout(tokens, attention, loss_mask, truncated, texts, scores, advantages, targets)


def completion_records(r: Rollout, metas: Sequence[Mapping[str, Any]], num_generations: int,
                       stage: str) -> list[dict[str, Any]]:
    """One plain record per completion of these rows (grpo.log_completions): the record it answers (file:line, and
    its id: what eval's predictions.jsonl names it by),
    its label and true boxes (in the model's resized frame, as the completion's), the sample's index in
    its group, the text, its token count and truncation, every reward term and its advantage."""
    out = []
    for i, text in enumerate(r.texts):
        prompt = i // num_generations
        out.append({"stage": stage, "record": metas[prompt]["source"], "id": metas[prompt]["record_id"],
                    "label": r.targets[prompt]["label"],
                    "true_boxes": np.asarray(r.targets[prompt]["boxes"]).tolist(), "sample": i % num_generations,
                    "completion": text, "completion_tokens": int(r.attention[i].sum()),
                    "truncated": bool(r.truncated[i]),
                    **{f"reward/{k}": float(v[i]) for k, v in r.scores.items()},
                    "advantage": float(r.advantages[i])})
    return out


def rollout_sums(r: Rollout, num_generations: int) -> dict[str, Any]:
    """The sums and counts behind `rollout_metrics` for these rows (JSON-serialisable): processes exchange
    them (`fxjax.host_exchange.allgather_json`) and `combine_rollout_sums` gives the whole batch's metrics.
    Per reward component: count, sum and the sum of squared deviations from this part's own mean (so the
    combined std is Chan et al.'s pairwise update, as stable as a two-pass std)."""
    out: dict[str, Any] = {"count": int(r.truncated.shape[0])}
    for key in REWARD_TERMS:
        out[key] = _sum_and_m2(r.scores[key])
    # the user's own terms (grpo.reward_funcs): every score that rewards.score does not give
    out["extra"] = {key: _sum_and_m2(v) for key, v in r.scores.items() if key not in SCORE_KEYS}
    generated = np.repeat([len(t["boxes"]) > 0 for t in r.targets], num_generations)
    out["iou_generated"] = [float(np.asarray(r.scores["iou"], np.float64)[generated].sum()), int(generated.sum())]
    lengths = r.attention.sum(axis=1)
    out["length"] = [int(lengths.sum()), int(lengths.max(initial=0)), int(lengths.min(initial=r.attention.shape[1]))]
    out["truncated"] = int(r.truncated.sum())
    ended = lengths[~r.truncated]  # the completions not cut at the length limit (TRL's terminated lengths)
    out["terminated"] = [int(ended.sum()), int(ended.size), int(ended.min(initial=r.attention.shape[1])),
                         int(ended.max(initial=0))]
    grouped = np.asarray(r.scores["total"], np.float64).reshape(-1, num_generations)
    # all alike, as group_advantages decides it (a float std of equal values need not be exactly 0)
    out["groups"] = [int((grouped.max(axis=1) == grouped.min(axis=1)).sum()), int(grouped.shape[0])]
    return out


# The step metrics of rewards.score's terms: with the weights/* of the step, their means give the total's
# (total = base + w_iou x iou_relaxed + label_minus + (label_plus - label_minus) x label + the same for format,
# + each grpo.reward_funcs term's weight x its mean); iou is the raw matched IoU, which R_G relaxes.
REWARD_TERMS = SCORE_KEYS  # (every term rewards.score returns: one added there is logged here too)


def _sum_and_m2(values) -> list[float]:
    values = np.asarray(values, np.float64)
    return [float(values.sum()), float(((values - values.mean()) ** 2).sum()) if values.size else 0.0]


def _mean_and_std(parts: Sequence[Mapping[str, Any]], sums: Sequence[list[float]]) -> tuple[float, float]:
    """A component's mean and Bessel-corrected std over the parts from their (sum, m2): the sum of squares
    about the whole mean is each part's own + count * (its mean - the whole mean)^2."""
    n = sum(p["count"] for p in parts)
    mean = sum(s[0] for s in sums) / n
    m2 = sum(s[1] + p["count"] * (s[0] / p["count"] - mean) ** 2 for p, s in zip(parts, sums) if p["count"])
    return float(mean), float(np.sqrt(m2 / (n - 1))) if n > 1 else float("nan")


def combine_rollout_sums(parts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The metrics of a generation batch from its parts' `rollout_sums` (one part: exactly as computed on
    the whole batch; several: the same up to the rounding of the sums): each reward component's mean and
    std over the batch (Bessel-corrected, as TRL's `reward_std` and `rewards/*/std`: trl's nanstd), format rate, verdict accuracy, mean IoU on generated images, completion lengths
    (mean, min, max; and of the completions that ended at EOS, TRL's terminated lengths), truncated and
    zero-std-group fractions."""
    n = sum(p["count"] for p in parts)
    out: dict[str, float] = {}
    for key in REWARD_TERMS:
        out[f"reward/{key}_mean"], out[f"reward/{key}_std"] = _mean_and_std(parts, [p[key] for p in parts])
    for key in parts[0].get("extra", {}):
        out[f"reward/{key}_mean"], out[f"reward/{key}_std"] = _mean_and_std(parts, [p["extra"][key] for p in parts])
    out["format_rate"] = out["reward/format_mean"]
    out["verdict_accuracy"] = out["reward/label_mean"]
    generated = sum(p["iou_generated"][1] for p in parts)
    out["mean_iou_generated"] = (sum(p["iou_generated"][0] for p in parts) / generated if generated
                                 else float("nan"))
    out["completion_length_mean"] = sum(p["length"][0] for p in parts) / n
    out["completion_length_max"] = float(max(p["length"][1] for p in parts))
    out["completion_length_min"] = float(min(p["length"][2] for p in parts))
    out["truncated_fraction"] = sum(p["truncated"] for p in parts) / n
    # (none terminated: NaN, said "n/a"; TRL logs 0 for all three)
    ended = [p["terminated"] for p in parts if p["terminated"][1]]
    count = sum(e[1] for e in ended)
    out["terminated_length_mean"] = sum(e[0] for e in ended) / count if count else float("nan")
    out["terminated_length_min"] = float(min(e[2] for e in ended)) if count else float("nan")
    out["terminated_length_max"] = float(max(e[3] for e in ended)) if count else float("nan")
    out["zero_std_group_fraction"] = sum(p["groups"][0] for p in parts) / sum(p["groups"][1] for p in parts)
    return out


def rollout_metrics(r: Rollout, num_generations: int) -> dict[str, float]:
    """Host metrics of a generation batch (all its rows here): see `combine_rollout_sums`."""
    return combine_rollout_sums([rollout_sums(r, num_generations)])


def build_group_batch(prompt_batch: Mapping[str, Any], r: Rollout, model_cfg, *, num_generations: int,
                      n_micro: int, floor: dict[str, int], old_logps=None, ref_logps=None, batch_shards: int = 1,
                      per_shard: bool | None = None, share_prompts: bool = False) -> tuple[GroupBatch, dict[str, int]]:
    """Host GroupBatch [A, R, ...] of whole groups (A = n_micro micro-batches of P / A prompts each).

    Each micro-batch prepares its own prompts once (their images only) and repeats every prompt row G
    times; completion columns follow at positions next_position + k on all three M-RoPE axes, exactly
    where sampling put them. `batch_shards` S: the prompts are S contiguous blocks, one per batch shard
    (as sampling laid them out over the mesh's data x fsdp), and micro-batch a takes the a-th slice of
    every block, so each device updates on the prompts it sampled; with `per_shard` (default S > 1) each
    block's images are packed on their own (vision [A, S, ...]; also for a process's single shard of
    several), the G repeats of a prompt in its block's rows, so each device encodes only its own prompts.
    (S = 1, or A = 1: micro-batch a is prompts a * P / A .. (a + 1) * P / A.)

    `share_prompts`: the inputs are each micro-batch's prompts once ([A, P / A, Lp], left-padded) and the
    completions a separate [A, R, N] ModelInputs (GroupBatch.completions), so that the update runs every
    prompt through the decoder once (grpo_step.predicting_states)."""
    per_shard = batch_shards > 1 if per_shard is None else per_shard
    ids_all = np.asarray(prompt_batch["input_ids"])
    p = ids_all.shape[0]
    g = num_generations
    if p % n_micro:
        raise ValueError(f"{p} prompts do not split into {n_micro} micro-batches of whole groups")
    per = p // n_micro
    if per % batch_shards:
        raise ValueError(f"{per} prompts per micro-batch do not split into {batch_shards} batch shards")
    block, chunk = p // batch_shards, per // batch_shards  # prompts per shard; per shard and micro-batch
    order = np.asarray([k * block + a * chunk + j
                        for a in range(n_micro) for k in range(batch_shards) for j in range(chunk)])
    row_order = (order[:, None] * g + np.arange(g)).reshape(-1)  # each prompt's G completion rows
    grid = prompt_batch.get("image_grid_thw")
    offsets = None
    if grid is not None:
        grid = np.asarray(grid).reshape(-1, 3)
        offsets = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
    n = r.tokens.shape[1]
    if share_prompts and not np.asarray(prompt_batch["attention_mask"])[:, -1].all():
        raise ValueError("share_prompts needs left-padded prompts (a real token in every prompt's last column)")
    micro, completions = [], []
    for a in range(n_micro):
        sl = order[a * per:(a + 1) * per]
        pixels = None if grid is None else np.concatenate(
            [np.asarray(prompt_batch["pixel_values"])[offsets[i]:offsets[i + 1]] for i in sl])
        pin = prepare_inputs(model_cfg, ids_all[sl], np.asarray(prompt_batch["attention_mask"])[sl], pixels,
                             None if grid is None else grid[sl], batch_shards=batch_shards if per_shard else None)
        rows = row_order[a * per * g:(a + 1) * per * g]
        rep = lambda x, axis=0: np.repeat(np.asarray(x), g, axis=axis)  # noqa: E731
        comp_pos = rep(next_positions(pin))[:, None] + np.arange(n, dtype=np.int32)[None, :]
        if share_prompts:
            micro.append(pin)
            completions.append(ModelInputs(
                input_ids=r.tokens[rows].astype(np.int32), attention_mask=r.attention[rows].astype(np.int32),
                position_ids=np.broadcast_to(comp_pos[None], (3, per * g, n)).astype(np.int32),
                rope_deltas=np.zeros((per * g,), np.int32), image_feature_index=np.zeros((per * g, n), np.int32),
                vision=None))
            continue
        position_ids = np.concatenate([rep(pin.position_ids, axis=1),
                                       np.broadcast_to(comp_pos[None], (3, per * g, n))], axis=2)
        micro.append(ModelInputs(
            input_ids=np.concatenate([rep(pin.input_ids), r.tokens[rows]], axis=1).astype(np.int32),
            attention_mask=np.concatenate([rep(pin.attention_mask), r.attention[rows]], axis=1).astype(np.int32),
            position_ids=position_ids.astype(np.int32),
            rope_deltas=rep(pin.rope_deltas).astype(np.int32),
            # -1: no image feature (a sampled <|image_pad|> stays a token, as when it was sampled)
            image_feature_index=np.concatenate([rep(pin.image_feature_index), np.full((per * g, n), -1, np.int32)],
                                               axis=1).astype(np.int32),
            vision=pin.vision))
    vision, floor = _stack_vision([m.vision for m in micro], model_cfg, floor)
    masks = np.asarray(r.loss_mask)[row_order].reshape(n_micro, per * g, n)
    shards = batch_shards  # the rows' blocks, one per batch shard (1: all rows in one block)
    need = max(int(block.sum()) for m in masks for block in m.reshape(shards, -1, n))
    size = update_slot_count(need, floor.get("update_slots", 0))
    floor = dict(floor, update_slots=size)
    tokens = np.asarray(r.tokens)[row_order].reshape(n_micro, per * g, n)
    per_micro = [completion_slots(t, m, shards, size) for t, m in zip(tokens, masks)]
    slots = CompletionSlots(*(np.stack(parts) for parts in zip(*per_micro)))
    stack = lambda name: np.stack([getattr(m, name) for m in micro]).astype(np.int32)  # noqa: E731
    inputs = ModelInputs(stack("input_ids"), stack("attention_mask"), stack("position_ids"), stack("rope_deltas"),
                         stack("image_feature_index"), vision)
    shape = lambda x: None if x is None else np.asarray(x)[row_order].reshape(n_micro, per * g, n)  # noqa: E731
    comps = None
    if share_prompts:
        comps = ModelInputs(*(None if parts[0] is None else np.stack(parts) for parts in zip(*completions)))
    batch = GroupBatch(inputs, shape(r.tokens).astype(np.int32), shape(r.loss_mask).astype(np.float32),
                       r.advantages[row_order].reshape(n_micro, per * g).astype(np.float32), shape(old_logps),
                       shape(ref_logps), slots, comps)
    return batch, floor


def completion_slots(tokens: np.ndarray, mask: np.ndarray, shards: int, size: int) -> CompletionSlots:
    """The loss's completion tokens of one micro-batch (tokens [R, N] where mask [R, N] > 0), packed into
    `size` slots per batch shard (the R rows split into `shards` contiguous blocks); see
    grpo_step.CompletionSlots."""
    rows, n = mask.shape
    per = rows // shards
    grid = np.full((shards, size), per * n, np.int32)  # past the shard's grid: dropped
    target = np.zeros((shards, size), np.int32)
    ids = np.asarray(tokens).reshape(shards, per * n)
    for s, block in enumerate(np.asarray(mask).reshape(shards, per, n)):
        flat = np.flatnonzero(block.reshape(-1) > 0)
        if flat.size > size:
            raise ValueError(f"{flat.size} loss tokens do not fit {size} slots")
        grid[s, :flat.size] = flat
        target[s, :flat.size] = ids[s, flat]
    return CompletionSlots(grid, target)


def _stack_vision(visions: list[VisionInputs | None], model_cfg, floor: dict[str, int]):
    """Pad every micro-batch's packed vision to one shape (at least the floor; per shard when packed per
    shard) and stack them."""
    if visions[0] is None:
        return None, floor
    windows, segments, floor = vision_floor(visions, model_cfg, floor, prefix="update_")
    return stack_vision(visions, windows * model_cfg.vision.window_slots, segments), floor
