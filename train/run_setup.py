"""What SFT and GRPO runs share before their first step, once their processes joined (train.run_joining):
the model with LoRA on the mesh, the train state placed on its shardings, and a checkpoint to resume from
(train.resume).

    main, say = join_run("sft", cfg, log)   # fxjax.train.run_joining
    mesh = make_mesh(...); model = build_model(cfg, mesh)
    graphdef, params, base, rest = split_model(model)
    tx, schedule, state, shardings, checkpointer, iterator, floor, latest, skipped = start_run(
        "sft", cfg, params, base, rest, mesh=mesh, pipeline=pipeline, steps_total=steps, log=say)
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fxjax.export_record import OtherBaseWarning, other_base_note
from fxjax.host_exchange import BARRIER_TIMEOUT_S, allgather_json
from fxjax.hf_checkpoint import from_pretrained
from fxjax.model.attention import current_platform, select_backend
from fxjax.model.lora import LoRAConfig, apply_lora
from fxjax.model.qwen2_5_vl import as_dtype
from fxjax.model_init import init_model
from fxjax.peft_io import load_peft_adapter
from fxjax.device_mesh import barrier, batch_shards, put, splits_batch
from fxjax.partition_rules import (UnsplitParametersWarning, param_shardings, shard_model, split_heads_message,
                                    unsplit_message)
from fxjax.train.checkpointing import TrainCheckpointer
from fxjax.train.evaluation import Evaluator
from fxjax.train.optimizer import make_optimizer
from fxjax.train.resume import check_resume_mesh, process_rows_per_batch, resume_run
from fxjax.train.resume_check import WATCHED
from fxjax.train.step import TrainState
from fxjax.config_mapping import ConfigError
from fxjax.run_files import START_FILE, START_LORA_DIR, checkpoint_dir_of, committed_steps, start_step_text
from fxjax.run_start import resumes_from_kept_start

__all__ = ["RunStart", "StateShardings", "batch_divides", "build_model", "check_eval_batch", "evaluates", "init_state",
           "keep_start_lora", "opt_state_shardings", "place", "resumed_start", "start_run"]


def batch_divides(what: str, batch: int, mesh, *, allow_replicated: bool, log: Callable[[str], None],
                  accumulates: bool = True, micro_batches: int = 1) -> bool:
    """Whether a global batch of `batch` rows shards over the mesh's batch devices (data x fsdp); with
    `micro_batches` > 1 (GRPO: data.batch_size prompts a step in optim.grad_accum updates) each of its
    micro-batches of batch / micro_batches rows must.

    When it does not, the run stops with an error saying which numbers to change, unless
    `mesh.allow_replicated_batch` opted into replicating it (then a warning, every run): every batch device
    would compute the whole batch. `accumulates`: a training batch (optim.grad_accum keeps its effective
    size when it grows); eval.batch_size is not one."""
    n = batch_shards(mesh)
    rows = batch // micro_batches
    if splits_batch(mesh, rows):
        return True
    devices = f"the {n} batch devices (mesh.data {mesh.shape['data']} x mesh.fsdp {mesh.shape['fsdp']})"
    if micro_batches > 1:
        step = n * micro_batches
        advice = (f"{what} {batch} / optim.grad_accum {micro_batches} = {rows} rows a micro-batch, which do not "
                  f"divide over {devices}: set {what} to a multiple of {n} x {micro_batches} = {step} (e.g. "
                  f"{-(-batch // step) * step}), or lower optim.grad_accum, or move devices to mesh.tensor")
    else:
        advice = (f"{what} = {batch} does not divide over {devices}: set {what} to a multiple of {n} (e.g. "
                  f"{-(-batch // n) * n}" + ("; lower optim.grad_accum to keep the effective batch" if accumulates
                                             else "") + "), or move devices to mesh.tensor")
    if not allow_replicated:
        raise ConfigError(advice + "; or set mesh.allow_replicated_batch=true to replicate it (wasteful)")
    log(f"warning: {advice}; mesh.allow_replicated_batch is set, so every batch device computes the whole "
        f"batch ({n}x the work)")
    return False


def warn_held_out_overlap(train_records, held_out_records, say: Callable[[str], None]) -> list:
    """Say (process 0) which held-out records show an image the run trains on (a train / test leak that
    `fxjax data check` warns about, and the run did not): the held-out metrics then overstate what the
    model learned. An image is its file's content: a copy under another name is the same image. Returns
    those records on process 0 ([] on the others, which neither read the files nor say it)."""
    if jax.process_index() != 0:  # (only process 0 says it: the others would read every file for nothing)
        return []
    from fxjax.data.images import images_in_both

    def pixel_sizes(records):
        return {r.image: (r.width, r.height) for r in records}

    in_both = images_in_both(pixel_sizes(train_records), pixel_sizes(held_out_records))
    shared = [r for r in held_out_records if r.image in in_both]
    if shared:
        say(f"warning: {len(shared)} of the {len(held_out_records)} held-out record(s) show a training image "
            f"(e.g. {shared[0].source}: {shared[0].image}): the held-out metrics overstate what the model learned")
    return shared


def evaluates(cfg) -> bool:
    """Whether a run evaluates on held-out files at all (eval files and a time to do it: GRPO's stage ends
    are one when the rewards are staged)."""
    stage_ends = getattr(cfg.eval, "at_stage_ends", False) and cfg.grpo.schedule != "continuous"
    return bool(cfg.data.eval_files) and bool(cfg.eval.every or cfg.eval.at_start or cfg.eval.at_end or stage_ends)


def held_out_evaluator(cfg, data_cfg, mesh, train_records, say) -> Evaluator | None:
    """The run's Evaluator of cfg.data.eval_files (None when the run does not evaluate), built before the
    model loads: a held-out file that is missing, has invalid records or differs between the processes is
    then an error in seconds, not after minutes of loading and restoring on a pod; and the held-out images
    that are training images are named (process 0)."""
    if not evaluates(cfg):
        return None
    evaluator = Evaluator(data_cfg, cfg.data.eval_files, batch_size=cfg.eval.batch_size,
                          max_examples=cfg.eval.max_examples, max_new_tokens=cfg.eval.max_new_tokens,
                          loss_chunk=cfg.train.loss_chunk, mesh=mesh,
                          gather_for_decoding=cfg.mesh.gather_for_decoding, say=say)
    warn_held_out_overlap(train_records, evaluator.loss_pipeline.records, say)
    return evaluator


def check_eval_batch(cfg, mesh, log: Callable[[str], None]) -> None:
    """eval.batch_size against the batch devices, with the run's other batch checks (before the model
    loads): the evaluator's decoder would otherwise decode the whole batch on every device."""
    if evaluates(cfg):
        batch_divides("eval.batch_size", cfg.eval.batch_size, mesh, allow_replicated=cfg.mesh.allow_replicated_batch,
                      log=log, accumulates=False)


def build_model(cfg, mesh):
    """The base model (HF checkpoint or random preset) on the mesh, with LoRA adapters attached and placed.

    `cfg` is any run config with `model` and `lora` sections (SFTConfig, GRPOConfig)."""
    m = cfg.model
    param_dtype = m.param_dtype or m.dtype
    try:
        dtype = as_dtype(m.dtype)
    except ValueError as err:  # (load_run(dtype=) sets it unchecked by the config)
        raise ConfigError(f"model.dtype: {err}") from None
    try:  # a kernel this machine cannot run fails here, before any weight is read
        select_backend(m.attention, current_platform(), dtype)
    except ValueError as err:
        raise ConfigError(f"model.{err}") from None
    if m.from_run is not None:
        model = _model_of_run(cfg, mesh)
        warn_replicated(model, mesh)
        return model
    if m.path is not None:
        with warnings.catch_warnings():  # said once below, with the adapters, as the run's own warning
            warnings.simplefilter("ignore", UnsplitParametersWarning)
            model = from_pretrained(m.path, dtype=m.dtype, param_dtype=param_dtype, mesh=mesh,
                                    scan_layers=m.scan_layers)
    else:
        model = init_model(m.preset, seed=m.init_seed, dtype=m.dtype, param_dtype=param_dtype, mesh=mesh,
                           scan_layers=m.scan_layers)
    rngs = nnx.Rngs(params=cfg.lora.init_seed, dropout=cfg.lora.init_seed)
    if m.adapter is not None:
        with warnings.catch_warnings():  # (said in the run's first line: start_description)
            warnings.simplefilter("ignore", OtherBaseWarning)
            load_peft_adapter(model, m.adapter, rngs=rngs)
    else:
        lc = cfg.lora
        try:
            apply_lora(model, LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.use_rslora,
                                         target_modules=lc.target_modules, exclude_modules=lc.exclude_modules),
                       rngs=rngs)
        except ValueError as err:  # e.g. target_modules that match no Linear: named as the config key
            raise ConfigError(f"lora.{err}") from None
    shard_model(model, mesh)  # LoRA parameters by the rules; dropout RNG streams replicated
    warn_replicated(model, mesh)
    return model.use_attention(m.attention)


def start_description(cfg) -> str:
    """What the run's model starts from, for its first log line: the base and where its LoRA comes from (an
    adapter's or a run's own rank, alpha and targets, when it starts from one: the lora section then shapes
    nothing)."""
    m = cfg.model
    if m.from_run is not None:
        step = start_step_text(m.from_run, m.from_run_step)
        text = f"the run {m.from_run} at {step} (its base model and LoRA; lora.* unused)"
    elif m.adapter is not None:
        text = f"{m.path or f'preset {m.preset}'} with the adapter {m.adapter} (its rank, alpha and targets; lora.* unused)"
        other_base = other_base_note(m.adapter, m.path) if m.path is not None else ""
        text += f" (warning: {other_base})" if other_base else ""
    else:
        text = f"{m.path or f'preset {m.preset}'}, fresh LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha}"
    try:
        resumes = cfg.checkpoint.resume and bool(committed_steps(cfg.checkpoint_dir))
    except OSError:
        resumes = False
    # (said before the resume is: a resumed run read "fresh LoRA" and then "resumed from step 5")
    return text + ("; resuming, so the LoRA values are its checkpoint's (below)" if resumes else "")


def keep_start_lora(model, cfg) -> Path | None:
    """Keep the LoRA shape of a run that starts from another's (model.adapter or model.from_run) in its
    checkpoint directory (run_files.START_LORA_DIR: the starting LoRA as a PEFT adapter, and START_FILE), so
    that `load_run` rebuilds the run's model when that adapter or run has moved or is gone: the checkpoints
    hold every LoRA value, but not which modules carry one, their ranks and alphas. Written once, before any
    checkpoint is restored (so with the starting values and their dtype); every process calls it (the
    adapter's arrays are gathered). Returns the directory, or None for a run with fresh LoRA."""
    from fxjax.merged_lora import merge_record
    from fxjax.peft_io import save_peft_adapter
    from fxjax.train.export import written_whole
    from fxjax.train_config import base_model_section

    m = cfg.model
    if m.adapter is None and m.from_run is None:
        return None
    target = Path(cfg.checkpoint_dir) / START_LORA_DIR
    # kept when this run started: process 0's view decides for all (the write below gathers on every process,
    # and a host whose network file system cached an older view of the folder would skip it and hang the rest)
    # (after every host loaded the weights: one on a cold network disk may come long after the others)
    if allgather_json("fxjax.keep-start-lora", resumes_from_kept_start(cfg), timeout_s=BARRIER_TIMEOUT_S)[0]:
        return target

    def write(folder: Path) -> None:  # process 0 writes, every process gathers
        save_peft_adapter(model, folder)
        fingerprints = merge_record(model)  # (gathers too)
        if jax.process_index() != 0:
            return
        source = getattr(model, "hf_source", None)
        base = base_model_section(cfg) or m  # a from_run run's: the first run's, followed run to run
        start = {"adapter": m.adapter and str(Path(m.adapter).resolve()),
                 "from_run": m.from_run and str(Path(m.from_run).resolve()), "from_run_step": m.from_run_step,
                 # as the config wrote them: a relative path still names this start after the project moved
                 "adapter_given": m.adapter, "from_run_given": m.from_run,
                 # the base model (a from_run run's is the other run's): its directory, or preset and seed
                 "path": str(Path(source.directory).resolve()) if source is not None else None,
                 "preset": None if source is not None else base.preset, "init_seed": base.init_seed,
                 "tokenizer": str(Path(cfg.tokenizer).resolve()),
                 # the starting LoRA and what it continued: an export of this run records them (`continues`)
                 "lora_fingerprints": fingerprints, "continues": start_lineage(m)}
        (folder / START_FILE).write_text(json.dumps(start, indent=2))

    # whole or absent (a run killed while writing it writes it again); an earlier run's in this directory
    # (another start, or checkpoint.resume false) is replaced
    written_whole(target, write)
    barrier("fxjax.keep_start_lora")
    return target


def start_lineage(m) -> list[str]:
    """What the LoRA a run starts from continued (`run_lineage`): an exported adapter's record says it, a run's
    kept start does (model.section `m`)."""
    from fxjax.export_record import read_export_record
    from fxjax.train.export import run_lineage

    if m.adapter is not None:
        continues = read_export_record(m.adapter).get("continues")
        return list(continues) if isinstance(continues, list) else []
    return run_lineage(checkpoint_dir_of(m.from_run)) if m.from_run is not None else []


def resumed_start(cfg, log: Callable[[str], None]):
    """The config a resuming run builds its model (and reads its tokenizer) from: `cfg` with the run's own
    copy of its model.adapter / model.from_run start (`keep_start_lora`) in its place, whether that folder
    moved (or the run continues on another machine) or still holds what it held then or not (another
    adapter of the same rank and targets but another alpha would scale the LoRA other than it trained). The
    checkpoint restores every LoRA value; the copy gives the shape (and for a from_run start, the base model
    and tokenizer it named). A copy kept for another start is not used: `cfg` as it is. The checkpoints go on recording
    `cfg` itself (start_run's `recorded`), so nothing reads as changed and the run loads as before."""
    if not resumes_from_kept_start(cfg):
        return cfg
    from fxjax.train.run_loading import start_from_kept_copy

    return start_from_kept_copy(cfg, Path(cfg.checkpoint_dir).absolute(), cfg.model.path is not None, log)


def warn_replicated(model, mesh) -> None:
    """Say which parameters stay whole on every device because the mesh does not divide a dimension their
    rule shards (e.g. the vision MLP's 3420 over tensor 8): memory the mesh was meant to save."""
    message = unsplit_message(model, mesh)
    if message and jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    message = split_heads_message(model.config, mesh)
    if message and jax.process_index() == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)


def _model_of_run(cfg, mesh):
    """`model.from_run`: the base model and the LoRA parameters of that run's step (its LoRA shape: rank,
    alpha, targets and dropout are the run's), in train mode as a fresh model is."""
    from fxjax.train.run_loading import load_run

    m = cfg.model
    model = load_run(m.from_run, m.from_run_step, mesh=mesh, model_path=m.path, dtype=m.dtype,
                     param_dtype=m.param_dtype or m.dtype, attention=m.attention, scan_layers=m.scan_layers).model
    model.train()
    return model


def place(sharding, subtree):
    """Put every array of `subtree` on `sharding` (already-placed arrays are left alone)."""

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return put(np.asarray(jax.device_get(x)), sharding)

    return jax.tree.map(one, subtree)


class StateShardings(NamedTuple):
    state: TrainState
    base: Any
    rest: Any
    replicated: NamedSharding


def opt_state_shardings(tx, params, params_sh, replicated: NamedSharding):
    """Shardings of `tx`'s state over `params`: every leaf that mirrors a parameter (Adam's mu and nu) takes
    that parameter's sharding, the rest (step counts) is replicated; so under fsdp = N a device holds
    ~1/N of the moments, as of the LoRA parameters."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract, params_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_state(params, base, rest, tx, *, seed: int, mesh) -> tuple[TrainState, StateShardings]:
    """A fresh TrainState (step 0, optimiser state, the run's root key) placed on the mesh, and the shardings
    of the state, the frozen base and the rest (RNG streams) for the jitted step."""
    replicated = NamedSharding(mesh, P())
    params_sh = param_shardings(params, mesh)
    opt_sh = opt_state_shardings(tx, params, params_sh, replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state_sh = TrainState(replicated, params_sh, opt_sh, replicated)
    state = jax.tree.map(place, state_sh, TrainState.fresh(params, tx, seed, opt_state))
    shardings = StateShardings(state_sh, param_shardings(base, mesh), jax.tree.map(lambda _: replicated, rest),
                               replicated)
    return state, shardings


class RunStart(NamedTuple):
    """What a training loop starts from: the optimiser and its schedule, the (restored or fresh) state and
    its shardings, the checkpointer, the data iterator (at its restored position), the batch-shape floors,
    the step of the checkpoint resumed from (None: a fresh run) and the non-finite updates skipped before it."""

    tx: Any
    schedule: Any
    state: TrainState
    shardings: StateShardings
    checkpointer: TrainCheckpointer
    iterator: Any
    floor: dict
    latest: int | None
    skipped: int = 0


def warn_long_warmup(optim, updates: int, log: Callable[[str], None]) -> None:
    """optim.warmup_steps at or past the run's updates: the schedule warms up over the whole run and never
    decays (warmup is clamped to the run), which is rarely what was meant; said once, at the start."""
    if optim.warmup_steps is not None and optim.warmup_steps >= updates:
        log(f"warning: optim.warmup_steps {optim.warmup_steps} >= the run's {updates} updates: the learning "
            f"rate rises over the whole run and never decays (to {optim.learning_rate:g} at the last update)")


def start_run(name: str, cfg, params, base, rest, *, mesh, pipeline, steps_total: int, log: Callable[[str], None],
              watched=WATCHED, recorded=None, preserve: Sequence[int] = ()) -> RunStart:
    """The optimiser and a fresh state on the mesh, then `resume_run` from cfg's checkpoint directory
    (`recorded`: what the checkpoints record, as `resume_run`'s; `preserve`: steps whose checkpoints are kept
    from pruning, TrainCheckpointer's)."""
    tx, schedule = make_optimizer(cfg.optim, steps_total)
    warn_long_warmup(cfg.optim, steps_total, log)
    state, shardings = init_state(params, base, rest, tx, seed=cfg.train.seed, mesh=mesh)
    checkpointer = TrainCheckpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save, preserve=preserve)
    iterator = iter(pipeline)
    resumed = resume_run(name, checkpointer, state, iterator, cfg, log, watched, recorded,
                         rows_per_batch=process_rows_per_batch(pipeline.cfg))
    if resumed is None:
        return RunStart(tx, schedule, state, shardings, checkpointer, iterator, {}, None)
    check_resume_mesh(resumed.data_state.get("mesh"), mesh, log)
    # floor: the running max of the padded batch shapes (see train.batching), so a resumed run compiles the
    # same programs as the uninterrupted one
    return RunStart(tx, schedule, resumed.state, shardings, checkpointer, iterator,
                    dict(resumed.data_state.get("shape_floor", {})), resumed.step,
                    int(resumed.data_state.get("skipped", 0)))
