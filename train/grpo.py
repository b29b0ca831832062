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

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fxjax import distributed, rewards
from fxjax.data.pipeline import DataConfig, DataPipeline
from fxjax.data.tokenizer import load_tokenizer, token_id
from fxjax.grpo_config import GRPOConfig
from fxjax.sharding import MeshConfig, gather, make_mesh, put, shard_inputs, use_mesh
from fxjax.train import faults
from fxjax.train.checkpointing import TrainCheckpointer
from fxjax.train.export import save_adapter, save_merged
from fxjax.train.grpo_loss import group_advantages, grpo_loss
from fxjax.train.grpo_step import GroupBatch, LossOptions, make_grpo_step, make_logps_fn
from fxjax.train.metrics import MetricsLogger, ProgressBar
from fxjax.train.optimizer import make_optimizer
from fxjax.train.preemption import PreemptionSignals
from fxjax.train.rollout import build_group_batch, prompt_inputs, rollout_metrics, sample_and_score
from fxjax.train.resume_check import WATCHED, check_resume_config
from fxjax.train.run_setup import batch_divides, build_model, init_state, restore_latest
from fxjax.train.evaluation import Evaluator
from fxjax.train.sft import NonFiniteError
from fxjax.train.sft import data_config as sft_data_config
from fxjax.train.step import RNG_IMPL, split_model
from fxjax.train_config import ConfigError

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
    """Prompts only (left-padded), the record's label and boxes in the meta for the rewards."""
    d = cfg.data
    return DataConfig(data_files=d.train_files, tokenizer=cfg.tokenizer, root=d.root,
                      allow_absolute_paths=d.allow_absolute_paths, format=d.format,
                      on_error=d.on_error, check_decode=d.check_decode, min_pixels=d.min_pixels,
                      max_pixels=d.max_pixels, max_length=d.max_length, length_buckets=d.length_buckets,
                      long_samples=d.long_samples, mode="prompt", prompts=d.prompts, system_prompt=d.system_prompt,
                      batch_size=d.batch_size, drop_remainder=True, shuffle=d.shuffle, seed=d.seed, num_epochs=None,
                      worker_count=d.worker_count, read_threads=d.read_threads,
                      prefetch_buffer_size=d.prefetch_buffer_size, shard_index=0, shard_count=1)


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
    """[A, R, ...] arrays shard R over (data, fsdp); position_ids [A, 3, R, L] too; vision replicated."""
    def s(x, dim):
        if x is None:
            return None
        spec = [None] * np.ndim(x)
        if shard_rows and dim is not None:
            spec[dim] = ("data", "fsdp")
        return NamedSharding(mesh, P(*spec))

    i = batch.inputs
    vision = None if i.vision is None else type(i.vision)(*(s(v, None) for v in i.vision))
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
    distributed.initialize({k: v for k, v in vars(cfg.distributed).items() if v is not None})
    main = jax.process_index() == 0
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if not main:
        say = lambda text: None  # noqa: E731
    if not cfg.lora.enabled and cfg.model.adapter is None:
        raise ConfigError("lora.enabled: GRPO trains LoRA adapters only; set lora.enabled=true")
    g = cfg.grpo
    mesh = make_mesh(MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    shard_rows = batch_divides("data.batch_size", cfg.data.batch_size // cfg.optim.grad_accum, mesh,
                               allow_replicated=cfg.mesh.allow_replicated_batch, log=say)
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

    tx, schedule = make_optimizer(cfg.optim, steps_total)
    state, shardings = init_state(params, base, rest, tx, seed=cfg.train.seed, mesh=mesh)
    ckpt_dir = cfg.checkpoint_dir
    checkpointer = TrainCheckpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    iterator = iter(pipeline)
    result = GRPOResult(steps=0, total_steps=steps_total, checkpoint_dir=str(ckpt_dir))
    floor: dict[str, int] = {}
    restored = restore_latest(checkpointer, state, say) if cfg.checkpoint.resume else None
    latest = None
    if restored is not None:
        state, data_state, saved_cfg, latest = restored
        iterator.set_state(data_state["iterator"])
        floor = dict(data_state.get("shape_floor", {}))
        check_resume_config(saved_cfg, cfg.to_dict(), say, GRPO_WATCHED)
        result.resumed_from = latest
        say(f"grpo: resumed from step {latest} (stage {data_state.get('stage')}) in {ckpt_dir}")
    step_now = int(jax.device_get(state.step))

    metrics = MetricsLogger(cfg.train.output_dir, enabled=main, tensorboard=cfg.train.tensorboard,
                            resume_step=latest)
    resolved = cfg.to_dict()
    evaluator = None
    if cfg.data.eval_files and (cfg.eval.every or cfg.eval.at_start or cfg.eval.at_end):
        evaluator = Evaluator(sft_data_config(cfg), cfg.data.eval_files, batch_size=cfg.eval.batch_size,
                              max_examples=cfg.eval.max_examples, max_new_tokens=cfg.eval.max_new_tokens,
                              loss_chunk=cfg.train.loss_chunk, mesh=mesh)

    def evaluate(tag: str) -> None:
        nnx.update(model, state.params)
        res = evaluator.evaluate(model, state.params, base, rest, generate=cfg.eval.generate)
        values = res.metrics()
        metrics.log(step_now, "eval", values)
        result.evals.append((step_now, values))
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                          if isinstance(v, (int, float)))  # the sample completions go to metrics.jsonl only
        say(f"grpo: eval ({tag}, step {step_now}): {shown}")
    opts = LossOptions(loss_type=g.loss_type, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high, delta=g.delta,
                       beta=g.beta, importance_sampling_level=g.importance_sampling_level,
                       max_completion_length=g.max_completion_length, temperature=g.temperature)
    need_old, need_ref = g.num_iterations > 1, g.beta != 0.0
    step_fn = logps_fn = batch_sh = None
    root = jax.random.key(g.seed, impl=RNG_IMPL)
    skipped = 0
    last_saved = latest

    def save(step: int, stage: str) -> None:
        checkpointer.save(step, state, {"iterator": iterator.get_state(), "shape_floor": floor, "stage": stage},
                          resolved)

    bar = ProgressBar(steps_total, step_now, enabled=main and cfg.train.progress_bar)
    try:
        with PreemptionSignals() as signals:
            if evaluator is not None and cfg.eval.at_start and latest is None:
                evaluate("start")
            while step_now < steps_total:
                t0 = time.perf_counter()
                stage, weights = stage_weights(cfg, step_now)
                prompts = next(iterator)
                length = -(-prompts["input_ids"].shape[1] // PROMPT_LENGTH_QUANTUM) * PROMPT_LENGTH_QUANTUM
                length = max(length, int(floor.get("prompt_length", 0)))
                floor["prompt_length"] = length
                prompts = left_pad(prompts, length, pipeline.pad_id)
                inputs, floor = prompt_inputs(model.config, prompts, floor)
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
                faults.point("rollout", step_now + 1, signals.local_stop)

                t1 = time.perf_counter()
                batch, floor = build_group_batch(prompts, rollout, model.config, num_generations=g.num_generations,
                                                 n_micro=cfg.optim.grad_accum, floor=floor)
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
                faults.point("update", step_now + 1, signals.local_stop)
                t_update = time.perf_counter() - t1
                if not out["finite"]:
                    if cfg.train.on_nonfinite == "stop":
                        checkpointer.wait()
                        raise NonFiniteError(step_now + 1, out["loss"], out["grad_norm"], checkpointer.latest_step(),
                                             ckpt_dir)
                    skipped += 1
                    say(f"grpo: step {step_now + 1}: non-finite loss/gradient; update skipped ({skipped} so far)")
                step_now += 1
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
                bar.update(1, dict(stage=stage, reward=round(values["reward/total_mean"], 3),
                                   fmt=round(values["format_rate"], 2), iou=round(values["reward/iou_mean"], 3)))
                every = cfg.checkpoint.every
                if (every and step_now % every == 0) or step_now == steps_total:
                    save(step_now, stage)
                    last_saved = step_now
                if evaluator is not None and cfg.eval.every and step_now % cfg.eval.every == 0 \
                        and step_now != steps_total:
                    evaluate("periodic")
                if faults.armed("after_step", step_now):
                    checkpointer.wait()
                    faults.point("after_step", step_now, signals.local_stop)
                if signals.stop_requested():
                    if last_saved != step_now:
                        save(step_now, stage)
                        last_saved = step_now
                    checkpointer.wait()
                    bar.close()
                    say(f"grpo: received signal {signals.received}; saved step {step_now} to {ckpt_dir}; exiting "
                        f"(resume by running the same command)")
                    result.preempted = True
                    break
            else:
                if last_saved != step_now:
                    save(step_now, stage_weights(cfg, max(step_now - 1, 0))[0])
                    last_saved = step_now
            checkpointer.wait()
        bar.close()
        result.steps = step_now
        result.skipped_steps = skipped
        nnx.update(model, state.params)
        if not result.preempted:
            if evaluator is not None and cfg.eval.at_end:
                evaluate("end")
            if cfg.export.adapter_dir:
                result.exported["adapter"] = str(save_adapter(model, cfg.export.adapter_dir))
                say(f"grpo: wrote the PEFT adapter to {cfg.export.adapter_dir}")
            if cfg.export.merged_dir:
                result.exported["merged"] = str(save_merged(model, cfg.export.merged_dir, tokenizer_dir=cfg.tokenizer,
                                                            image_pixels=(cfg.data.min_pixels, cfg.data.max_pixels)))
                say(f"grpo: wrote the merged HF checkpoint to {cfg.export.merged_dir}")
    finally:
        bar.close()
        try:
            checkpointer.wait()
        finally:
            checkpointer.close()
            metrics.close()
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
    result.params = state.params
    result.model = model
    result.seconds = time.perf_counter() - started
    return result


def _weights_metrics(w: rewards.RewardWeights) -> dict[str, float]:
    return {"weights/w_iou": w.w_iou, "weights/base": w.base}
