"""The LoRA SFT loop: `run_sft(cfg)` (what `fxjax sft --config configs/sft.yaml` runs).

    model (HF dir or preset) + LoRA -> mesh -> data pipeline -> jitted step (donated state)
      (the next batch is built in a background thread (train.prefetch) while the device runs the step, and
       a step's metrics are fetched once the next step is dispatched)
      -> metrics.jsonl / TensorBoard / tqdm -> periodic evaluation -> orbax checkpoints -> export

Data per process: every process follows one global example stream but decodes, tokenises and builds only
the rows of each global batch that live on its devices (`DataConfig.batch_rows`, from
`train.batching.process_rows`); the processes agree on each step's padded sizes
(`train.batching.agree_floor`) and the global arrays are assembled from their parts
(`train.batching.place_local_batch`). Pixel patches travel in the compute dtype.

Resume: with checkpoint.resume (default) a run whose checkpoint directory already holds a checkpoint
continues from the latest one: LoRA parameters, optimiser state, step, RNG and the data iterator's
position are restored (each process's own; the same process count is required), so the continued run
computes exactly what an uninterrupted one would.

Signals: SIGTERM / SIGINT / SIGHUP (preemption, a dropped connection) finish the current step, save a checkpoint, wait for it to be
committed and return with `result.preempted` (the CLI exits 0). A non-finite loss or gradient stops the
run (`NonFiniteError`, naming the step; the last good checkpoint stays the latest) unless
train.on_nonfinite is "skip", which skips that update and goes on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax

from fxjax.config_mapping import checked_config
from fxjax.config_sections import steps_for_epochs
from fxjax.data.pipeline import DataConfig, DataPipeline, reading_note
from fxjax.model.qwen2_5_vl import as_dtype
from fxjax.device_mesh import MeshConfig, make_mesh
from fxjax.host_allocator import say_cpu_memory_note
from fxjax.train import faults
from fxjax.train.batching import (agree_floor, batch_shardings, build_step_batch, check_same_records, grow_floor,
                                  place_local_batch, process_image_share, process_rows, with_patch_dtype)
from fxjax.train.loop_control import LoopControl, NonFiniteError, RunEvaluation, handle_nonfinite, log_end
from fxjax.train.metrics import IntervalMeans, MetricsLogger
from fxjax.train.prefetch import StepBatches
from fxjax.train.resume import checkpoint_data_state, per_process_state, process_rows_per_batch
from fxjax.train.run_lock import locked_run_dirs
from fxjax.train.run_joining import join_run
from fxjax.train.run_setup import (batch_divides, build_model, check_eval_batch, held_out_evaluator, keep_start_lora,
                                   resumed_start, start_description, start_run)
from fxjax.train.step import make_train_step, split_model
from fxjax.train_config import SFTConfig


__all__ = ["NonFiniteError", "SFTResult", "build_model", "data_config", "run_sft"]

@dataclass
class SFTResult:
    steps: int  # updates done when the run returned
    total_steps: int
    final_loss: float | None = None
    preempted: bool = False
    resumed_from: int | None = None
    skipped_steps: int = 0
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics)
    checkpoint_dir: str | None = None
    exported: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    host_seconds: float = 0.0  # the loop's wait for host batches (built, or taken from the prefetch queue)
    # (not in the repr: a notebook echoing the result printed every LoRA array, 440k characters on the tiny model)
    params: Any = field(default=None, repr=False)  # final LoRA parameters (nnx.State of jax arrays)
    model: Any = field(default=None, repr=False)  # the model with the final LoRA parameters


# ---- set-up ----------------------------------------------------------------------------------------

def data_config(cfg: SFTConfig) -> DataConfig:
    """The training DataConfig: one global example stream (the same shuffle on every process); `run_sft`
    sets `batch_rows` to the rows of each global batch that this process builds."""
    return DataConfig(data_files=cfg.data.train_files, tokenizer=cfg.tokenizer, **cfg.data.pipeline_fields(),
                      mode="sft", drop_remainder=True, num_epochs=None, shard_index=0, shard_count=1)


def total_steps(cfg: SFTConfig, records_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    return steps_for_epochs(cfg.train.epochs, records_per_epoch, cfg.data.batch_size * cfg.optim.grad_accum)


# ---- the run ---------------------------------------------------------------------------------------

def run_sft(cfg: SFTConfig, *, log: Callable[[str], None] | None = None, overlap: bool = True) -> SFTResult:
    """Run (or resume) LoRA SFT as configured. See the module docstring.

    `overlap` (default): the next batch is built in a background thread while the device runs the current
    step, and a step's metrics are fetched after the next step is dispatched. False: both happen in line
    (bench/sft_step.py --loop compares the two); the logged values are the same either way."""
    started = time.perf_counter()
    # (a config built in code is checked as a YAML one is)
    cfg = checked_config(cfg, SFTConfig, "run_sft", "fxjax.train_config.from_dict(...) or load_sft_config(path)")
    main, say = join_run("sft", cfg, log)
    with locked_run_dirs(cfg, main, say):  # (one run at a time in a run's folders)
        return _run_joined(cfg, main, say, started, overlap)


def _run_joined(cfg: SFTConfig, main: bool, say: Callable[[str], None], started: float, overlap: bool) -> SFTResult:
    """run_sft once its process has joined the run and holds the run's folders."""
    recorded, cfg = cfg, resumed_start(cfg, say)  # a resume: its start from the run's own copy (start_lora)

    mesh = make_mesh(MeshConfig(**cfg.mesh.axes()))
    say(f"sft: {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {dict(mesh.shape)}")
    say_cpu_memory_note(jax.devices()[0].platform, say)  # (on a CPU: what the host allocator does)
    shard_rows = batch_divides("data.batch_size", cfg.data.batch_size, mesh,
                               allow_replicated=cfg.mesh.allow_replicated_batch, log=say,
                               accumulates=cfg.optim.grad_accum > 1)  # (its advice: a lower grad_accum)
    check_eval_batch(cfg, mesh, say)
    dcfg = data_config(cfg)
    # Each process decodes, tokenises and builds only the rows of its own batch shards (all rows when the
    # batch is replicated, or when its devices hold every shard).
    mine = process_rows(mesh, cfg.data.batch_size, shard_rows)
    shard_ids, built_shards = mine.shard_ids, mine.built_shards  # shard_ids None: one packed vision
    say(f"sft: {reading_note(dcfg, jax.process_count())}")
    pipeline = DataPipeline(dataclasses.replace(dcfg, batch_rows=mine.batch_rows), image_share=process_image_share())
    check_same_records(pipeline)
    evaluator = held_out_evaluator(cfg, dcfg, mesh, pipeline.records, say)  # (its files checked before the load)
    steps_total = total_steps(cfg, len(pipeline))
    model = build_model(cfg, mesh)
    keep_start_lora(model, recorded)  # (the run's own start: already kept when it resumes through the copy)
    model.train()
    graphdef, params, base, rest = split_model(model)
    n_lora = sum(int(x.size) for x in jax.tree.leaves(params))
    say(f"sft: model {start_description(cfg)} ({cfg.model.dtype} compute): {n_lora:,} trainable parameters; "
        f"{len(pipeline)} training records; "
        f"{steps_total} steps of {cfg.data.batch_size} x {cfg.optim.grad_accum} examples")

    resolved = recorded.to_dict()  # what each checkpoint records
    tx, schedule, state, shardings, checkpointer, iterator, floor, latest, skipped = start_run(
        "sft", cfg, params, base, rest, mesh=mesh, pipeline=pipeline, steps_total=steps_total, log=say,
        recorded=resolved)
    result = SFTResult(steps=0, total_steps=steps_total, checkpoint_dir=str(checkpointer.directory),
                       resumed_from=latest)
    step_now = int(jax.device_get(state.step))

    # (no checkpoint: a start from scratch, which drops what an attempt killed before its first one logged)
    metrics = MetricsLogger(cfg.train.output_dir, enabled=main, tensorboard=cfg.train.tensorboard,
                            resume_step=latest or 0)
    run_eval = RunEvaluation("sft", evaluator, metrics, result, cfg.eval.generate, say)

    model_cfg, pad_id, accum = model.config, pipeline.pad_id, cfg.optim.grad_accum  # the producer thread's inputs
    patch_dtype = as_dtype(cfg.model.dtype)

    def make_batch(source, floor: dict):
        """This process's part of one step batch (its shards' rows; images packed per shard, so each device
        encodes only its own rows' images), padded to the sizes agreed by every process, and the step's
        total (all processes') attended tokens."""
        micro = [next(source) for _ in range(accum)]
        batch = build_step_batch(micro, model_cfg, pad_id, floor=floor, batch_shards=built_shards,
                                 shard_ids=shard_ids)
        tokens = int(sum(mb["attention_mask"].sum() for mb in micro)) * mine.counted_share  # each row once
        # (a peer whose run stopped never answers: stop waiting once this run's batches are closed too)
        agreed, total = agree_floor(floor, batch, model_cfg, built_shards, tokens=tokens,
                                    cancelled=lambda: batches.stopping)
        if agreed != grow_floor(floor, batch, model_cfg, built_shards):  # another process needs more room
            batch = build_step_batch(micro, model_cfg, pad_id, floor=agreed, batch_shards=built_shards,
                                     shard_ids=shard_ids)
        return (with_patch_dtype(batch, patch_dtype), total["tokens"]), agreed

    # The checkpoint holds the position and shape floor of the batches the loop consumed (not of the ones
    # built ahead), so a resumed run continues with exactly the next batch.
    batches = StepBatches(iterator, make_batch, floor=floor, count=steps_total - step_now, background=overlap)
    pending = None  # (update number, device metrics, tokens, start): fetched after the next step's dispatch
    interval = IntervalMeans()  # the steps since the last logged record
    last_done = 0.0  # when the last step's metrics arrived
    last_rate = math.nan  # the learning rate of the last step settled

    def settle() -> None:
        """Fetch, check and log the pending step's metrics (a no-op when none). Runs before anything that
        must see the step as finished and finite (a save, an evaluation, a fault point, the end), so a
        non-finite step stops or is skipped exactly as if its metrics had been fetched at once."""
        nonlocal pending, skipped, last_done, last_rate
        if pending is None:
            return
        step, out, tokens, start = pending
        pending = None
        out = {k: float(v) for k, v in jax.device_get(out).items()}
        now = time.perf_counter()
        # from the later of its batch being taken and the previous step's end: overlapped, the device's time
        # for the step; in line, the step with its batch (no save or evaluation time either way)
        dt, last_done = now - max(start, last_done), now
        values = dict(loss=out["loss"], grad_norm=out["grad_norm"], step_time=dt, tokens_per_s=tokens / dt,
                      target_tokens=out["target_tokens"])
        if not out["finite"]:
            skipped = handle_nonfinite("sft", cfg, step, out, checkpointer, skipped, say,
                                       lambda: record_stop(step, values, out["learning_rate"]))
        interval.add(values)
        result.final_loss, last_rate = out["loss"], out["learning_rate"]
        if step % cfg.train.log_every == 0 or step == steps_total:
            # means over the steps since the last record (HF Trainer's logged loss); the rate and count now
            metrics.log(step, "train", dict(interval.take(), learning_rate=out["learning_rate"], skipped=skipped))
        control.bar.update(1, dict(loss=out["loss"], lr=out["learning_rate"], tok_s=round(tokens / dt)))

    def record_stop(step: int, values: dict, rate: float) -> None:
        """The records of a run a non-finite step stops: the means of the good steps since the last record
        (at the step before), then the step itself, marked "stopped"."""
        if interval:
            metrics.log(step - 1, "train", dict(interval.take(), learning_rate=last_rate, skipped=skipped))
        metrics.log(step, "train", dict(values, learning_rate=rate, skipped=skipped, stopped="non-finite"))
        log_end(metrics, step, "non-finite")

    def evaluate(tag: str) -> dict:
        settle()
        return run_eval(tag, step_now, model, state.params, base, rest)

    def save(step: int) -> None:
        settle()
        # a record at every save (the interval is not in the checkpoint): a resumed run loses none of the
        # steps before it, and at the scheduled checkpoints logs what a straight run does
        if interval:
            metrics.log(step, "train", dict(interval.take(), learning_rate=last_rate, skipped=skipped))
        iterator_states = per_process_state(batches.get_state(), process_rows_per_batch(pipeline.cfg))  # each process's own
        metrics.sync()  # (the log on disk through the checkpoint's step: a bucket holds it once synced)
        checkpointer.save(step, state, checkpoint_data_state(iterator_states, batches.floor, skipped, mesh), resolved)

    step_fn = None
    batch_sh = None
    with LoopControl("sft", cfg, steps_total=steps_total, first=step_now, checkpointer=checkpointer, save=save,
                     say=say, show_progress=main, evaluate=evaluate if evaluator is not None else None,
                     metrics=metrics, iterator=batches, sync=settle) as control:
        for step_now in control.updates(step_now):
            t0 = time.perf_counter()
            batch, tokens = next(batches).batch
            batch = faults.nan_patches(batch, step_now + 1)  # test hook (FXJAX_FAULT=nan_batch@N); else a no-op
            if batch_sh is None:
                batch_sh = batch_shardings(batch, mesh, shard_rows, built_shards=built_shards)
                step_fn = make_train_step(graphdef, tx, schedule, loss_chunk=cfg.train.loss_chunk,
                                          remat=cfg.model.remat, remat_vision=cfg.model.remat_vision,
                                          state_shardings=shardings.state, base_shardings=shardings.base,
                                          rest_shardings=shardings.rest, batch_shardings=batch_sh)
            placed = place_local_batch(batch, batch_sh, built_shards)
            result.host_seconds += time.perf_counter() - t0
            # step_fn runs under the mesh (train.step.OnMesh): the model pins activations' batch axis to
            # (data, fsdp), so FSDP gathers weights rather than activations.
            state, out = step_fn(state, base, rest, placed)
            settle()  # the previous step's metrics, while the device has this step queued
            step_now += 1  # from here on: the number of updates made (what the loop control counts too)
            pending = (step_now, out, tokens, t0)
            if not overlap or faults.armed("after_step", step_now):
                settle()
        settle()
        control.wrap_up(result, model, state.params, skipped=skipped, cfg=cfg, started=started)
    return result
