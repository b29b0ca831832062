"""The GRPO loop: `run_grpo(cfg)` (what `fxjax grpo --config configs/grpo.yaml` runs).

    model (HF dir or preset) + LoRA (fresh, or the SFT result as a PEFT adapter) -> mesh -> prompts
      -> per step: sample G completions per prompt (the current policy), score them with the current
         stage's reward weights, group advantages, reference log-probs (LoRA off), one jitted update
      -> metrics.jsonl / TensorBoard / tqdm, tagged with the stage -> orbax checkpoints -> export

Stages: `stages` lists the reward stages in order (default alpha, beta, gamma), each for its number of
steps, with the weights of the reward config; `grpo.schedule=continuous` uses w_G(t) over train.steps.
The policy is the LoRA model; the reference policy is the same model with LoRA disabled (no copy).

Resume: as SFT. The sampling key of step k is folded from (grpo.seed, k), the stage follows from the
step, and the data iterator and shape floors are in the checkpoint, so a resumed run draws the same
completions and ends with the same parameters as an uninterrupted one. SIGTERM saves and exits; a
non-finite loss stops with the last good checkpoint kept (or skips, train.on_nonfinite=skip).

Also exported: `group_advantages` and `grpo_loss` (fxjax.train.grpo_loss), TRL's math.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fxjax import rewards
from fxjax.data.pipeline import DataConfig, DataPipeline
from fxjax.data.tokenizer import load_tokenizer, token_id
from fxjax.grpo_config import GRPOConfig
from fxjax.sharding import MeshConfig, batch_shards, gather, make_mesh, put, shard_inputs, use_mesh
from fxjax.train import faults
from fxjax.train.loop_control import LoopControl, RunEvaluation, handle_nonfinite
from fxjax.train.grpo_loss import group_advantages, grpo_loss
from fxjax.train.grpo_step import GroupBatch, LossOptions, make_grpo_step, make_logps_fn
from fxjax.train.metrics import MetricsLogger
from fxjax.train.rollout import build_group_batch, prompt_inputs, rollout_metrics, sample_and_score
from fxjax.train.resume_check import WATCHED
from fxjax.train.run_setup import batch_divides, build_model, join_run, start_run
from fxjax.train.evaluation import Evaluator
from fxjax.train.sft import data_config as sft_data_config
from fxjax.train.step import RNG_IMPL, split_model

logger = logging.getLogger(__name__)

__all__ = ["GRPOResult", "group_advantages", "grpo_loss", "run_grpo"]

# What a resumed GRPO run compares with its checkpoint's config: SFT's sections, the sampling and loss
# settings, and the stages (the step count; steps come from the stages, not train.steps).
GRPO_WATCHED = {**WATCHED, "grpo": (None, "the sampling or the loss"),
                "stages": (None, "the reward stages, so the step count and the schedule")}
PROMPT_LENGTH_QUANTUM = 32  # prompts are left-padded to a multiple of this: few update programs compile


@dataclass
class GRPOResult:
    steps: int
    total_steps: int
    resumed_from: int | None = None
    preempted: bool = False
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)  # per-step metrics (this process's run only)
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, held-out metrics)
    checkpoint_dir: str | None = None
    exported: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    params: Any = None
    model: Any = None


def data_config(cfg: GRPOConfig) -> DataConfig:
    """SFT's data config in mode "prompt": prompts only (left-padded), each record's label and boxes in the
    meta for the rewards."""
    return dataclasses.replace(sft_data_config(cfg), mode="prompt")


def stage_weights(cfg: GRPOConfig, step: int) -> tuple[str, rewards.RewardWeights]:
    """(stage name, reward weights) of the update numbered `step` (0-based)."""
    if cfg.grpo.schedule == "continuous":
        return "continuous", rewards.continuous_weights(step, cfg.total_steps, cfg.grpo.reward_config)
    _, stage = cfg.stage_at(step)
    return stage.name, rewards.load_stage(stage.name, cfg.grpo.reward_config)


def left_pad(batch: dict, length: int, pad_id: int) -> dict:
    """Left-pad a prompt batch's input_ids / attention_mask to `length` columns."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = length - ids.shape[1]
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = np.concatenate([np.full((ids.shape[0], extra), pad_id, ids.dtype), ids], axis=1)
    out["attention_mask"] = np.concatenate([np.zeros((ids.shape[0], extra), mask.dtype), mask], axis=1)
    return out


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return gather(x)
    return np.asarray(jax.device_get(x))


def _group_batch_shardings(batch: GroupBatch, mesh, shard_rows: bool) -> GroupBatch:
    """[A, R, ...] arrays shard R over (data, fsdp); position_ids [A, 3, R, L] too; vision packed per batch
    shard ([A, S, ...]) shards S the same way, one packed sequence is replicated."""
    def s(x, dim):
        if x is None:
            return None
        spec = [None] * np.ndim(x)
        if shard_rows and dim is not None:
            spec[dim] = ("data", "fsdp")
        return NamedSharding(mesh, P(*spec))

    i = batch.inputs
    vision_dim = 1 if i.vision is not None and np.ndim(i.vision.valid) == 3 else None
    if vision_dim is not None and not shard_rows:
        raise ValueError("vision packed per batch shard, but the batch is replicated: build it with batch_shards=1")
    vision = None if i.vision is None else type(i.vision)(*(s(v, vision_dim) for v in i.vision))
    inputs = type(i)(s(i.input_ids, 1), s(i.attention_mask, 1), s(i.position_ids, 2), s(i.rope_deltas, 1),
                     s(i.image_feature_index, 1), vision)
    return GroupBatch(inputs, s(batch.completion_ids, 1), s(batch.completion_mask, 1), s(batch.advantages, 1),
                      s(batch.old_logps, 1), s(batch.ref_logps, 1))


def _place(batch, shardings):
    return jax.tree.map(lambda x, sh: None if x is None else put(np.asarray(x), sh), batch, shardings,
                        is_leaf=lambda x: x is None)


def run_grpo(cfg: GRPOConfig, *, log: Callable[[str], None] | None = None) -> GRPOResult:
    """Run (or resume) GRPO as configured. See the module docstring."""
    started = time.perf_counter()
    main, say = join_run("grpo", cfg, log)
    g = cfg.grpo
    mesh = make_mesh(MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp))
    shard_rows = batch_divides("data.batch_size", cfg.data.batch_size // cfg.optim.grad_accum, mesh,
                               allow_replicated=cfg.mesh.allow_replicated_batch, log=say)
    vision_shards = batch_shards(mesh) if shard_rows else 1  # each device encodes only its rows' images
    pipeline = DataPipeline(data_config(cfg))
    tokenizer = load_tokenizer(cfg.tokenizer)
    eos_id = token_id(tokenizer, "<|im_end|>")
    steps_total = cfg.total_steps
    model = build_model(cfg, mesh)
    # Two graphs over the same variables: the update runs in train mode (LoRA dropout, reseeded per step as
    # in SFT); sampling and the old/reference log-probs in eval mode.
    model.train()
    train_graphdef = split_model(model)[0]
    model.eval()
    graphdef, params, base, rest = split_model(model)
    n_lora = sum(int(x.size) for x in jax.tree.leaves(params))
    stages = ("continuous" if g.schedule == "continuous"
              else " -> ".join(f"{s.name} x {s.steps}" for s in cfg.stages))
    say(f"grpo: {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {dict(mesh.shape)}; model {cfg.model.path or cfg.model.preset} ({cfg.model.dtype}), "
        f"{n_lora:,} LoRA parameters; {len(pipeline)} prompts; {steps_total} steps of {cfg.data.batch_size} "
        f"prompts x {g.num_generations} completions; stages {stages}; loss {g.loss_type}, beta {g.beta}")

    tx, schedule, state, shardings, checkpointer, iterator, floor, latest = start_run(
        "grpo", cfg, params, base, rest, mesh=mesh, pipeline=pipeline, steps_total=steps_total, log=say, watched=GRPO_WATCHED)
    result = GRPOResult(steps=0, total_steps=steps_total, checkpoint_dir=str(checkpointer.directory),
                       resumed_from=latest)
    step_now = int(jax.device_get(state.step))

    metrics = MetricsLogger(cfg.train.output_dir, enabled=main, tensorboard=cfg.train.tensorboard,
                            resume_step=latest)
    resolved = cfg.to_dict()
    evaluator = None
    if cfg.data.eval_files and (cfg.eval.every or cfg.eval.at_start or cfg.eval.at_end):
        evaluator = Evaluator(sft_data_config(cfg), cfg.data.eval_files, batch_size=cfg.eval.batch_size,
                              max_examples=cfg.eval.max_examples, max_new_tokens=cfg.eval.max_new_tokens,
                              loss_chunk=cfg.train.loss_chunk, mesh=mesh)

    run_eval = RunEvaluation("grpo", evaluator, metrics, result, cfg.eval.generate, say)

    def evaluate(tag: str) -> dict:
        return run_eval(tag, step_now, model, state.params, base, rest)
    opts = LossOptions(loss_type=g.loss_type, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high, delta=g.delta,
                       beta=g.beta, importance_sampling_level=g.importance_sampling_level,
                       max_completion_length=g.max_completion_length, temperature=g.temperature)
    need_old, need_ref = g.num_iterations > 1, g.beta != 0.0
    step_fn = logps_fn = batch_sh = None
    root = jax.random.key(g.seed, impl=RNG_IMPL)
    skipped = 0

    def save(step: int) -> None:
        stage = stage_weights(cfg, max(step - 1, 0))[0]  # the stage of update `step` (1-based)
        checkpointer.save(step, state, {"iterator": iterator.get_state(), "shape_floor": floor, "stage": stage},
                          resolved)

    with LoopControl("grpo", cfg, steps_total=steps_total, first=step_now, checkpointer=checkpointer, save=save,
                     say=say, show_progress=main, evaluate=evaluate if evaluator is not None else None,
                     metrics=metrics, iterator=iterator) as control:
        for step_now in control.updates(step_now):
            t0 = time.perf_counter()
            stage, weights = stage_weights(cfg, step_now)
            prompts = next(iterator)
            length = -(-prompts["input_ids"].shape[1] // PROMPT_LENGTH_QUANTUM) * PROMPT_LENGTH_QUANTUM
            length = max(length, int(floor.get("prompt_length", 0)))
            floor["prompt_length"] = length
            prompts = left_pad(prompts, length, pipeline.pad_id)
            inputs, floor = prompt_inputs(model.config, prompts, floor, vision_shards)
            placed_inputs = shard_inputs(inputs, mesh) if shard_rows else inputs
            nnx.update(model, state.params)
            rollout = sample_and_score(
                model, placed_inputs, prompts["meta"], tokenizer=tokenizer, eos_id=eos_id,
                pad_id=pipeline.pad_id, num_generations=g.num_generations,
                max_new_tokens=g.max_completion_length, temperature=g.temperature, top_k=g.top_k,
                top_p=g.top_p, rng=jax.random.fold_in(root, step_now), weights=weights,
                reward_config=g.reward_config, scale_rewards=g.scale_rewards,
                mask_truncated=g.mask_truncated_completions, host=_host, mesh=mesh)
            t_rollout = time.perf_counter() - t0
            faults.point("rollout", step_now + 1, control.signals.local_stop)

            t1 = time.perf_counter()
            batch, floor = build_group_batch(prompts, rollout, model.config, num_generations=g.num_generations,
                                             n_micro=cfg.optim.grad_accum, floor=floor, batch_shards=vision_shards)
            if batch_sh is None:
                batch_sh = _group_batch_shardings(batch, mesh, shard_rows)
                step_fn = make_grpo_step(train_graphdef, tx, schedule, opts=opts, loss_chunk=cfg.train.loss_chunk,
                                         remat=cfg.model.remat, remat_vision=cfg.model.remat_vision,
                                         state_shardings=shardings.state, base_shardings=shardings.base,
                                         rest_shardings=shardings.rest, batch_shardings=batch_sh)
                if need_old or need_ref:
                    logps_fn = make_logps_fn(graphdef, opts=opts, loss_chunk=cfg.train.loss_chunk,
                                             need_old=need_old, need_ref=need_ref)
            placed = _place(batch, batch_sh)
            values: dict[str, float] = {}
            with use_mesh(mesh):  # activations pinned to the batch axes (see fxjax.model's shard_batch)
                if logps_fn is not None:
                    old, ref = logps_fn(state.params, base, rest, placed)
                    placed = placed._replace(old_logps=old, ref_logps=ref)
                for _ in range(g.num_iterations):
                    state, out = step_fn(state, base, rest, placed)
                    out = {k: float(v) for k, v in jax.device_get(out).items()}
                    if not out["finite"]:
                        break
            faults.point("update", step_now + 1, control.signals.local_stop)
            t_update = time.perf_counter() - t1
            if not out["finite"]:
                skipped = handle_nonfinite("grpo", cfg, step_now + 1, out, checkpointer, skipped, say)
            step_now += 1  # from here on: the number of updates made (what the loop control counts too)
            new_tokens = float(rollout.attention.sum())
            values.update(rollout_metrics(rollout, g.num_generations))
            values.update({k: v for k, v in out.items() if k != "finite"})
            values.update(rollout_time=t_rollout, update_time=t_update, step_time=time.perf_counter() - t0,
                          rollout_tokens_per_s=new_tokens / max(t_rollout, 1e-9),
                          update_tokens_per_s=float(batch.inputs.attention_mask.sum()) / max(t_update, 1e-9),
                          skipped=skipped,
                          stage_index=float(cfg.stage_at(step_now - 1)[0]), **_weights_metrics(weights))
            metrics.log(step_now, "train", dict(values, stage=stage))
            result.history.append(dict(values, step=step_now, stage=stage))
            control.bar.update(1, dict(stage=stage, reward=round(values["reward/total_mean"], 3),
                                       fmt=round(values["format_rate"], 2), iou=round(values["reward/iou_mean"], 3)))
        control.wrap_up(result, model, state.params, skipped=skipped, cfg=cfg, started=started)
    return result


def _weights_metrics(w: rewards.RewardWeights) -> dict[str, float]:
    return {"weights/w_iou": w.w_iou, "weights/base": w.base}
