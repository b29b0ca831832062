"""The GRPO loop: `run_grpo(cfg)` (what `fxjax grpo --config configs/grpo.yaml` runs).

    model (HF dir or preset) + LoRA (fresh, or the SFT result as a PEFT adapter) -> mesh -> prompts
      -> per step: sample G completions per prompt (the current policy), score them with the current
         stage's reward weights, group advantages, reference log-probs (LoRA off), one jitted update
      -> metrics.jsonl / TensorBoard / tqdm, tagged with the stage -> orbax checkpoints -> export

Stages: `stages` lists the reward stages in order (default alpha, beta, gamma), each for its number of
steps or of epochs over the training records (turned into steps once the records are read), with the
weights of the reward config; `grpo.schedule=continuous` uses w_G(t) over train.steps. Each stage's end is
saved as a checkpoint kept from pruning (the newest checkpoint.keep, and every stage end), recorded in every checkpoint's
data state, so `fxjax eval / detect / export --step beta` take the model after beta; with data.eval_files
the held-out evaluation runs there too (eval.at_stage_ends).
The policy is the LoRA model; the reference policy is the same model with LoRA disabled (no copy).

Data per process (as SFT, train.sft): every process follows one global prompt stream but reads, decodes
and prepares only the prompts of its own batch shards (`DataConfig.batch_rows` from
`train.batching.process_rows`); the processes agree on the padded prompt length and vision sizes
(`train.batching.agree_sizes`, a host-only exchange), and the sampler's global inputs are assembled from
each process's part (`place_local_batch`; images packed per batch shard, patches in the compute dtype).
One sampling program runs over the mesh; prompt i's G completions are rows i*G .. i*G+G-1 and the rows
shard like the prompts, so each process's devices hold its prompts' whole groups: it fetches only those
rows (`local_rows`, no cross-process gather), decodes and scores them, computes their group advantages
(scale_rewards "batch" exchanges the total rewards for the batch std) and builds its part of the
GroupBatch (micro-batch a takes the a-th slice of each of its shards' prompts, so every device updates on
the prompts it sampled), padded to sizes agreed over the processes. The logged rollout metrics combine
every process's sums (`train.rollout.combine_rollout_sums`): the one-process values up to the rounding
of the sums.

Resume: as SFT (each process's own iterator position in the checkpoint). The sampling key of step k is folded from (grpo.seed, k), the stage follows from the
step, and the data iterator and shape floors are in the checkpoint, so a resumed run draws the same
completions and ends with the same parameters as an uninterrupted one. SIGTERM (or SIGINT, SIGHUP) saves
and exits; a non-finite loss stops with the last good checkpoint kept (or skips, train.on_nonfinite=skip).

Also exported: `group_advantages` and `grpo_loss` (fxjax.train.grpo_loss), TRL's math.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fxjax.config_mapping import ConfigError, checked_config
from fxjax.data.formats import IM_END
from fxjax.data.pipeline import DataConfig, DataPipeline, reading_note
from fxjax.data.tokenizer import load_tokenizer, token_id
from fxjax.host_exchange import allgather_json, gather_json_to_main
from fxjax.grpo_config import GRPOConfig, GRPOSection, refuse_grpo_log_every
from fxjax.host_allocator import say_cpu_memory_note
from fxjax.hf_checkpoint import stop_token_ids
from fxjax.run_files import REWARDS_KEY, RunLoadError, kept_stage_end_steps, recorded_stage_ends
from fxjax.model.qwen2_5_vl import as_dtype
from fxjax.decode_weights import decode_plan, weights_for_decoding
from fxjax.device_mesh import MeshConfig, along_batch, batch_spec, inputs_shardings, make_mesh, use_mesh
from fxjax.train import faults
from fxjax.train.batching import (ProcessRows, agree_sizes, check_same_records, inputs_with_patch_dtype,
                                  place_local_batch, process_image_share, process_rows, with_patch_dtype)
from fxjax.train.loop_control import LoopControl, RunEvaluation, handle_nonfinite, log_end
from fxjax.train.grpo_loss import group_advantages, grpo_loss
from fxjax.train.grpo_stages import (read_rewards, reward_record, say_stage_weights, stage_weights, stages_in_steps,
                                     trained_stage_ends, weights_metrics)
from fxjax.train.grpo_step import CompletionSlots, GroupBatch, LossOptions, make_grpo_step, make_logps_fn
from fxjax.train.metrics import CompletionLog, MetricsLogger
from fxjax.train.rollout import (build_group_batch, combine_rollout_sums, completion_records, prompt_inputs,
                                 rollout_sums, sample_and_score)
from fxjax.train.reward_funcs import attach_record_columns
from fxjax.train.resume import checkpoint_data_state, per_process_state, process_rows_per_batch
from fxjax.train.resume_check import WATCHED, Watched, different_config
from fxjax.train.run_lock import locked_run_dirs
from fxjax.train.run_joining import join_run
from fxjax.train.run_setup import (batch_divides, build_model, check_eval_batch, held_out_evaluator, keep_start_lora,
                                   resumed_start, start_description, start_run)
from fxjax.train.sft import data_config as sft_data_config
from fxjax.train.signal_watch import SignalWatch
from fxjax.train.step import RNG_IMPL, split_model


__all__ = ["GRPOResult", "group_advantages", "grpo_loss", "run_grpo"]

# What a resumed GRPO run compares with its checkpoint's config: SFT's sections, the sampling and loss
# settings, and the stages (their names and lengths: the step count comes from the stages, not train.steps;
# with stages in epochs also from the records, whose change the data position's fingerprint refuses).
GRPO_WATCHED = (*WATCHED,
                Watched("grpo", tuple(f.name for f in dataclasses.fields(GRPOSection) if f.name != "log_completions"),
                        different_config("grpo", "the sampling or the loss")),
                Watched("stages", None, different_config("stages", "the reward stages, so the step count and the "
                                                                   "schedule")),
                Watched(REWARDS_KEY, None, different_config("reward", "the reward weights or the IoU relaxation")))
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
    params: Any = field(default=None, repr=False)  # (as SFTResult's: not in the repr)
    model: Any = field(default=None, repr=False)


def data_config(cfg: GRPOConfig) -> DataConfig:
    """SFT's data config in mode "prompt": prompts only (left-padded), each record's label and boxes in the
    meta for the rewards."""
    return dataclasses.replace(sft_data_config(cfg), mode="prompt")


def loss_options(g: GRPOSection) -> LossOptions:
    """The loss's static options from the config's grpo section (TRL's `epsilon` is the lower clip)."""
    return LossOptions(loss_type=g.loss_type, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high, delta=g.delta,
                       beta=g.beta, use_bias_correction_kl=g.use_bias_correction_kl,
                       importance_sampling_level=g.importance_sampling_level,
                       max_completion_length=g.max_completion_length, temperature=g.temperature,
                       sapo_temperature_pos=g.sapo_temperature_pos, sapo_temperature_neg=g.sapo_temperature_neg)


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


def _inputs_shardings(inputs, mesh, shard_rows: bool, batch_dim: int):
    """ModelInputs' shardings (fxjax.device_mesh.inputs_shardings), with the batch replicated when
    `shard_rows` is False, where vision packed per batch shard cannot be."""
    if not shard_rows and inputs.vision is not None and np.ndim(inputs.vision.valid) == batch_dim + 2:
        raise ValueError("vision packed per batch shard, but the batch is replicated: build it with batch_shards=1")
    return inputs_shardings(inputs, mesh, batch_dim=batch_dim, split=shard_rows)


def _group_batch_shardings(batch: GroupBatch, mesh, shard_rows: bool) -> GroupBatch:
    """[A, R, ...] arrays shard R over (data, fsdp) (shared prompts [A, P, ...]: P); position_ids [A, 3, R, L]
    too; vision packed per batch shard ([A, S, ...]) and the loss slots [A, S, n] shard S the same way, one
    packed vision sequence is replicated."""
    inputs = _inputs_shardings(batch.inputs, mesh, shard_rows, 1)
    s = lambda x, dim: along_batch(mesh, x, dim, shard_rows)  # noqa: E731
    return GroupBatch(inputs, s(batch.completion_ids, 1), s(batch.completion_mask, 1), s(batch.advantages, 1),
                      s(batch.old_logps, 1), s(batch.ref_logps, 1),
                      None if batch.slots is None else CompletionSlots(*(s(x, 1) for x in batch.slots)),
                      None if batch.completions is None
                      else _inputs_shardings(batch.completions, mesh, shard_rows, 1))


def local_rows(x: jax.Array, sharding: NamedSharding) -> np.ndarray:
    """This process's rows of a global [R, ...] array laid out as `sharding` (rows over (data, fsdp), or
    replicated): the rows of its batch shards, in order, read from its own devices (no cross-process
    gather). The array is moved to that layout on the devices first unless it is laid out so already."""
    if not x.sharding.is_equivalent_to(sharding, x.ndim):
        x = jax.device_put(x, sharding)
    blocks = {shard.index[0].start or 0: shard for shard in x.addressable_shards}  # tensor-axis copies: once
    return np.concatenate([np.asarray(blocks[start].data) for start in sorted(blocks)])


def batch_order(name: str, mine: ProcessRows, rows: list, *, main_only: bool = False) -> list | None:
    """Every process's `rows` (JSON values, one per sampled row of this process's batch shards, shard by
    shard as `mine.shards`) -> the whole batch's, in its order, each shard once (processes that build the
    same shard, as with a replicated batch, send the same rows), through one host-only exchange. With
    `main_only`, at process 0 only (None elsewhere): for what only it writes."""
    per_shard = len(rows) // mine.built_shards
    gather = gather_json_to_main if main_only else allgather_json
    parts = gather(name, {"shards": list(mine.shards), "rows": rows})
    if parts is None:
        return None
    by_shard = {s: p["rows"][i * per_shard:(i + 1) * per_shard] for p in parts for i, s in enumerate(p["shards"])}
    return [row for s in sorted(by_shard) for row in by_shard[s]]


def _recorded_stage_ends(checkpoint_dir, step: int):
    """The stage ends the checkpoint of `step` records (None when it records none it can say)."""
    try:
        return recorded_stage_ends(checkpoint_dir, step)
    except RunLoadError:
        return None


def _batch_rewards(mine: ProcessRows):
    """For scale_rewards "batch" when each process scores only its rows: this process's total rewards ->
    (every process's, in the global batch's order; the positions of this process's rows in them), through
    one host-only exchange, so the std is over the whole batch as with one process."""
    def gather(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_shard = len(totals) // mine.built_shards
        everything = np.asarray(batch_order("grpo-reward-totals", mine, totals.tolist()), np.float32)
        return everything, np.concatenate([np.arange(s * per_shard, (s + 1) * per_shard) for s in mine.shards])

    return gather


def run_grpo(cfg: GRPOConfig, *, log: Callable[[str], None] | None = None) -> GRPOResult:
    """Run (or resume) GRPO as configured. See the module docstring."""
    started = time.perf_counter()
    # (a config built in code is checked as a YAML one is)
    cfg = checked_config(cfg, GRPOConfig, "run_grpo",
                         "fxjax.grpo_config.grpo_from_dict(...) or load_grpo_config(path)")
    refuse_grpo_log_every(cfg)
    main, say = join_run("grpo", cfg, log)
    with locked_run_dirs(cfg, main, say):  # (one run at a time in a run's folders)
        return _run_joined(cfg, main, say, started)


def _run_joined(cfg: GRPOConfig, main: bool, say: Callable[[str], None], started: float) -> GRPOResult:
    """run_grpo once its process has joined the run and holds the run's folders."""
    recorded, cfg = cfg, resumed_start(cfg, say)  # a resume: its start from the run's own copy (start_lora)
    g = cfg.grpo
    reward_values, funcs = read_rewards(cfg)
    mesh = make_mesh(MeshConfig(**cfg.mesh.axes()))
    shard_rows = batch_divides("data.batch_size", cfg.data.batch_size, mesh, micro_batches=cfg.optim.grad_accum,
                               allow_replicated=cfg.mesh.allow_replicated_batch, log=say,
                               accumulates=cfg.optim.grad_accum > 1)
    check_eval_batch(cfg, mesh, say)
    # Each process reads, decodes and samples only the prompts of its own batch shards (all of them when
    # the batch is replicated); images are packed per shard, so each device encodes only its rows' images.
    mine = process_rows(mesh, cfg.data.batch_size, shard_rows)
    per_shard, built = mine.shard_ids is not None, mine.built_shards
    say(f"grpo: {reading_note(data_config(cfg), jax.process_count())}")
    pipeline = DataPipeline(dataclasses.replace(data_config(cfg), batch_rows=mine.batch_rows),
                            image_share=process_image_share())
    check_same_records(pipeline)
    funcs = attach_record_columns(funcs, pipeline.records)  # (the columns they take, read once)
    evaluator = held_out_evaluator(cfg, sft_data_config(cfg), mesh, pipeline.records, say)  # (before the load)
    cfg = stages_in_steps(cfg, len(pipeline), say)
    rows_sharding = NamedSharding(mesh, batch_spec(2, 0) if shard_rows else P())  # sampled [P*G, N] tokens
    batch_rewards = _batch_rewards(mine) if jax.process_count() > 1 and mine.batch_rows is not None else None
    patch_dtype = as_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(cfg.tokenizer)
    steps_total = cfg.total_steps
    ends = cfg.stage_ends()  # each saved and kept from pruning: the model after alpha, after beta, ...
    model = build_model(cfg, mesh)
    keep_start_lora(model, recorded)  # (the run's own start: already kept when it resumes through the copy)
    eos_ids = stop_token_ids(model, token_id(tokenizer, IM_END))  # as TRL: the tokenizer's + generation config's
    # Two graphs over the same variables: the update runs in train mode (LoRA dropout, reseeded per step as
    # in SFT); sampling and the old/reference log-probs in eval mode.
    model.train()
    train_graphdef = split_model(model)[0]
    model.eval()
    graphdef, params, base, rest = split_model(model)
    say(_start_line(cfg, mesh, sum(int(x.size) for x in jax.tree.leaves(params)), len(pipeline)))
    if main:
        say_stage_weights(cfg, steps_total, say, reward_values)
    say_cpu_memory_note(jax.devices()[0].platform, say)  # (on a CPU: what the host allocator does)

    # A step samples once and makes num_iterations optimiser updates on what it sampled (TRL's num_iterations):
    # the learning-rate schedule runs over every update, and state.step counts updates.
    resolved = {**recorded.to_dict(), REWARDS_KEY: reward_record(reward_values)}  # what each checkpoint records
    tx, schedule, state, shardings, checkpointer, iterator, floor, latest, skipped = start_run(
        "grpo", cfg, params, base, rest, mesh=mesh, pipeline=pipeline, steps_total=steps_total * g.num_iterations,
        log=say, watched=GRPO_WATCHED, recorded=resolved,
        # this config's stage ends, and those the checkpoints record (a resume with changed stages keeps them)
        preserve=sorted({end for _, end in ends} | kept_stage_end_steps(cfg.checkpoint_dir)))
    if latest:
        ends = trained_stage_ends(_recorded_stage_ends(checkpointer.directory, latest), ends, latest, say)
    result = GRPOResult(steps=0, total_steps=steps_total, checkpoint_dir=str(checkpointer.directory),
                       resumed_from=latest)
    step_now = updates_done(int(jax.device_get(state.step)), g.num_iterations, latest)

    # (no checkpoint: a start from scratch, which drops what an attempt killed before its first one logged)
    metrics = MetricsLogger(cfg.train.output_dir, enabled=main, tensorboard=cfg.train.tensorboard,
                            resume_step=latest or 0)
    # (trimmed to the step this run starts from whether or not it logs: no record of a step it redoes stays)
    completions = CompletionLog(cfg.train.output_dir, enabled=main, resume_step=latest or 0)
    metrics.companions.append(completions)  # (synced at each checkpoint, closed with the run's metrics)
    run_eval = RunEvaluation("grpo", evaluator, metrics, result, cfg.eval.generate, say)

    def evaluate(tag: str) -> dict:
        return run_eval(tag, step_now, model, state.params, base, rest)
    opts = loss_options(g)
    need_old, need_ref = g.num_iterations > 1, g.beta != 0.0
    step_fn = logps_fn = batch_sh = None

    def save(step: int) -> None:
        stage = stage_weights(cfg, max(step - 1, 0), reward_values)[0]  # the stage of update `step` (1-based)
        iterator_states = per_process_state(iterator.get_state(), process_rows_per_batch(pipeline.cfg))  # each process's own
        metrics.sync()  # (the log on disk through the checkpoint's step: a bucket holds it once synced)
        checkpointer.save(step, state, checkpoint_data_state(iterator_states, floor, skipped, mesh, stage=stage,
                                                             stage_ends=[list(e) for e in ends]), resolved)

    def prompt_part(prompts: dict, floor: dict) -> tuple[dict, Any, dict]:
        """This process's prompts left-padded and prepared for sampling, padded to the sizes every process
        agreed (the global array has one shape), and placed: (prompts, global inputs, floor)."""
        def build(floor):
            length = -(-prompts["input_ids"].shape[1] // PROMPT_LENGTH_QUANTUM) * PROMPT_LENGTH_QUANTUM
            length = max(length, int(floor.get("prompt_length", 0)))
            padded = left_pad(prompts, length, pipeline.pad_id)
            inputs, grown = prompt_inputs(model.config, padded, floor, built, per_shard=per_shard)
            return padded, inputs, dict(grown, prompt_length=length)

        padded, inputs, local = build(floor)
        agreed, _ = agree_sizes("grpo-prompt-shape", local)
        if agreed != local:  # another process needs more room
            padded, inputs, _ = build(agreed)
        inputs = inputs_with_patch_dtype(inputs, patch_dtype)
        return padded, place_local_batch(inputs, _inputs_shardings(inputs, mesh, shard_rows, 0), built), agreed

    def group_part(prompts: dict, rollout, floor: dict) -> tuple[GroupBatch, dict, dict]:
        """This process's part of the GroupBatch (its prompts' groups), padded to the sizes every process
        agreed: (part, floor, {rollout_tokens, update_tokens} summed over the processes)."""
        def build(floor):
            return build_group_batch(prompts, rollout, model.config, num_generations=g.num_generations,
                                     n_micro=cfg.optim.grad_accum, floor=floor, batch_shards=built,
                                     per_shard=per_shard, share_prompts=g.share_prompts)

        batch, local = build(floor)
        share = mine.counted_share  # (a shard several processes build counts once)
        agreed, tokens = agree_sizes("grpo-update-shape", local, rollout_tokens=int(rollout.attention.sum()) * share,
                                     update_tokens=_sequence_tokens(batch, g.num_generations) * share)
        if agreed != local:
            batch, _ = build(agreed)
        return with_patch_dtype(batch, patch_dtype), agreed, tokens

    quiet = SignalWatch(say if main else lambda text: None)
    # TRL's num_tokens: prompt + completion tokens of every step so far (a resume carries on from its step's)
    num_tokens = int(metrics.value_at("train", latest, "num_tokens") or 0) if latest else 0
    decoding = decode_plan(model, cfg.mesh.gather_for_decoding)  # (after the state is placed: its free memory)
    if decoding.splits:
        say(f"rollouts: {decoding.reason}")
    with LoopControl("grpo", cfg, steps_total=steps_total, first=step_now, checkpointer=checkpointer, save=save,
                     say=say, show_progress=main, evaluate=evaluate if evaluator is not None else None,
                     metrics=metrics, iterator=iterator, stage_ends={end: name for name, end in ends}) as control:
        for step_now in control.updates(step_now):
            t0 = time.perf_counter()
            stage, weights = stage_weights(cfg, step_now, reward_values)
            prompts, placed_inputs, floor = prompt_part(next(iterator), floor)  # this process's prompts
            nnx.update(model, state.params)
            rollout = sample_and_score(
                weights_for_decoding(model, decoding), placed_inputs, prompts["meta"], tokenizer=tokenizer,
                eos_ids=eos_ids,
                pad_id=pipeline.pad_id, num_generations=g.num_generations,
                max_new_tokens=g.max_completion_length, temperature=g.temperature, top_k=g.top_k,
                top_p=g.top_p, rng=rollout_key(g.seed, step_now), weights=weights,
                reward_config=reward_values, scale_rewards=g.scale_rewards,
                mask_truncated=g.mask_truncated_completions, mesh=mesh, batch_rewards=batch_rewards,
                # never sample the image placeholder (TRL passes suppress_tokens=[image_token_id] for a VLM)
                suppress_token_ids=(model.config.image_token_id,), reward_funcs=funcs,
                progress={"step": step_now + 1, "stage": stage},  # (the step as metrics.jsonl numbers it)
                host=lambda x: local_rows(x, rows_sharding))  # this process's rows only
            t_rollout = time.perf_counter() - t0
            faults.point("rollout", step_now + 1, control.signals.local_stop)

            t1 = time.perf_counter()
            batch, floor, tokens = group_part(prompts, rollout, floor)
            if batch_sh is None:
                batch_sh = _group_batch_shardings(batch, mesh, shard_rows)
                step_fn = make_grpo_step(train_graphdef, tx, schedule, opts=opts, loss_chunk=cfg.train.loss_chunk,
                                         remat=cfg.model.remat, remat_vision=cfg.model.remat_vision,
                                         state_shardings=shardings.state, base_shardings=shardings.base,
                                         rest_shardings=shardings.rest, batch_shardings=batch_sh)
                if need_old or need_ref:
                    logps_fn = make_logps_fn(graphdef, opts=opts, loss_chunk=cfg.train.loss_chunk,
                                             need_old=need_old, need_ref=need_ref)
            batch = faults.nan_patches(batch, step_now + 1)  # test hook (FXJAX_FAULT=nan_batch@N); else a no-op
            placed = place_local_batch(batch, batch_sh, built)
            values: dict[str, float] = {}
            with use_mesh(mesh):  # activations pinned to the batch axes (see fxjax.model's shard_batch)
                state, updates = updates_on(step_fn, logps_fn, state, base, rest, placed, g.num_iterations)
                out = update_metrics(jax.device_get(updates))  # read once after the last update: no host sync
            faults.point("update", step_now + 1, control.signals.local_stop)
            t_update = time.perf_counter() - t1
            # means over every process's completions, from each process's sums (host-only exchange; before the
            # check below, so that the record of a step that stops the run has what it sampled and scored too)
            values.update(combine_rollout_sums(allgather_json("grpo-rollout-sums",
                                                              rollout_sums(rollout, g.num_generations))))
            if not out["finite"]:
                def record_stop() -> None:
                    metrics.log(step_now + 1, "train", dict(values, **{k: v for k, v in out.items() if k != "finite"},
                                                            skipped=skipped, stage=stage, stopped="non-finite"))
                    log_end(metrics, step_now + 1, "non-finite")

                skipped = handle_nonfinite("grpo", cfg, step_now + 1, out, checkpointer, skipped, say, record_stop)
            step_now += 1  # from here on: the number of updates made (what the loop control counts too)
            num_tokens += tokens["update_tokens"]
            values.update({k: v for k, v in out.items() if k != "finite"})
            values.update(rollout_time=t_rollout, update_time=t_update, step_time=time.perf_counter() - t0,
                          rollout_tokens_per_s=tokens["rollout_tokens"] / max(t_rollout, 1e-9),
                          update_tokens_per_s=tokens["update_tokens"] / max(t_update, 1e-9), num_tokens=num_tokens,
                          skipped=skipped,
                          stage_index=int(cfg.stage_at(step_now - 1)[0]), **weights_metrics(weights, funcs))
            metrics.log(step_now, "train", dict(values, stage=stage))
            quiet.after_step(step_now, values)  # (a run of steps that train on nothing: said in the log)
            if g.log_completions:
                records = completion_records(rollout, prompts["meta"], g.num_generations, stage)
                ordered = batch_order("grpo-completions", mine, records, main_only=True)  # process 0 writes
                if ordered is not None:
                    completions.log(step_now, ordered)
            result.history.append(dict(values, step=step_now, stage=stage))
            control.bar.update(1, progress_postfix(values, stage))
        control.wrap_up(result, model, state.params, skipped=skipped, cfg=cfg, started=started)
    return result


def progress_postfix(values: dict, stage: str) -> dict:
    """What the progress bar (or line) shows of a step: its stage, mean reward, format rate and mean IoU on
    generated images ("n/a" for a step that drew none, as the closing line says it, not "nan")."""
    iou = values["mean_iou_generated"]  # (over the generated images only: a real image scores 1 for no box)
    return dict(stage=stage, reward=round(values["reward/total_mean"], 3), fmt=round(values["format_rate"], 2),
                iou_gen=round(iou, 3) if math.isfinite(iou) else "n/a")


def _start_line(cfg: GRPOConfig, mesh, n_lora: int, prompts: int) -> str:
    """What the run says it is about to do: processes, devices, mesh, model, prompts, steps, stages, loss."""
    g = cfg.grpo
    stages = ("continuous" if g.schedule == "continuous"
              else " -> ".join(f"{s.name} x {s.steps}" for s in cfg.stages))
    return (f"grpo: {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"mesh {dict(mesh.shape)}; model {start_description(cfg)} ({cfg.model.dtype}), "
            f"{n_lora:,} LoRA parameters; {_count(prompts, 'prompt')}; {_count(cfg.total_steps, 'step')} of "
            f"{_count(cfg.data.batch_size, 'prompt')} x {_count(g.num_generations, 'completion')}; stages {stages}; "
            f"loss {g.loss_type}, beta {g.beta}")


def rollout_key(seed: int, step: int) -> jax.Array:
    """The sampling key of step `step` (0-based): another at every step, the same at that step of a resumed
    run."""
    return jax.random.fold_in(jax.random.key(seed, impl=RNG_IMPL), step)


def updates_on(step_fn, logps_fn, state, base, rest, batch: GroupBatch, num_iterations: int):
    """A step's updates on what it sampled: the sampling policy's and the reference's log-probs first (when
    `logps_fn`: num_iterations > 1 or beta != 0), stored in the batch, then `num_iterations` updates, each
    from the state the previous one left (all of them, so state.step stays num_iterations x steps; a
    non-finite update keeps the parameters). (state, [each update's metrics, on the device])."""
    if logps_fn is not None:
        old, ref = logps_fn(state.params, base, rest, batch)
        batch = batch._replace(old_logps=old, ref_logps=ref)
    updates = []
    for _ in range(num_iterations):
        state, out = step_fn(state, base, rest, batch)
        updates.append(out)
    return state, updates


def _sequence_tokens(batch: GroupBatch, num_generations: int) -> int:
    """The real tokens of the update's prompt + completion sequences (with shared prompts, each prompt's
    counted G times: the same figure whichever way the update runs them)."""
    if batch.completions is None:
        return int(batch.inputs.attention_mask.sum())
    return int(batch.inputs.attention_mask.sum()) * num_generations + int(batch.completions.attention_mask.sum())


def update_metrics(updates: list[dict]) -> dict:
    """A step's metrics from its num_iterations updates' (fetched to the host): each metric's mean over
    the updates (what TRL logs with logging_steps = num_iterations; the first update's ratio is 1 and its
    clip ratio 0 unless LoRA dropout, active in the update only, moves its log-probs off the sampling
    policy's), the last update's learning rate, "finite" only if every update was."""
    out = {k: float(np.mean([u[k] for u in updates])) for k in updates[0] if k not in ("finite", "learning_rate")}
    out["learning_rate"] = float(updates[-1]["learning_rate"])
    out["finite"] = all(bool(u["finite"]) for u in updates)
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def updates_done(optimizer_steps: int, num_iterations: int, checkpoint_step: int | None) -> int:
    """The GRPO steps a (resumed) state has made: its optimiser steps / num_iterations. A checkpoint whose
    count does not divide (or disagrees with its own step) was not written by this loop: an error, not a
    silently shifted schedule."""
    steps, rest = divmod(optimizer_steps, num_iterations)
    if rest or (checkpoint_step is not None and steps != checkpoint_step):
        whole = checkpoint_step and optimizer_steps % checkpoint_step == 0
        saved = optimizer_steps // checkpoint_step if whole else None
        if saved is not None and saved != num_iterations:  # (the schedule counts updates: it cannot change)
            raise ConfigError(f"grpo.num_iterations: the run was saved with {saved} update(s) a step (step "
                              f"{checkpoint_step}: {optimizer_steps} updates) and is resumed with {num_iterations}; "
                              f"it cannot change on resume: set grpo.num_iterations={saved}, or start a new run "
                              f"from this one with model.from_run")
        raise ValueError(f"grpo: the checkpoint of step {checkpoint_step} holds {optimizer_steps} optimiser updates, "
                         f"not {num_iterations} (grpo.num_iterations) per step")
    return steps
