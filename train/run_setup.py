"""What SFT and GRPO runs share before their first step: the model with LoRA on the mesh, the train state
placed on its shardings, and a checkpoint to resume from.

    mesh = make_mesh(...); model = build_model(cfg, mesh)
    graphdef, params, base, rest = split_model(model)
    state, shardings = init_state(params, base, rest, tx, seed=cfg.train.seed, mesh=mesh)
    state, data_state, saved_config, step = restore_latest(checkpointer, state, log)   # or None
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fxjax.hf_checkpoint import from_pretrained
from fxjax.model.lora import LoRAConfig, apply_lora
from fxjax.model_init import init_model
from fxjax.peft_io import load_peft_adapter
from fxjax.sharding import param_shardings, put, shard_model
from fxjax.train.step import RNG_IMPL, TrainState
from fxjax.train_config import ConfigError

__all__ = ["StateShardings", "batch_divides", "build_model", "init_state", "place", "restore_latest"]


def batch_divides(what: str, batch: int, mesh, *, allow_replicated: bool, log: Callable[[str], None]) -> bool:
    """Whether a global batch of `batch` rows shards over the mesh's batch devices (data x fsdp).

    When it does not, the run stops with an error saying which numbers to change, unless
    `mesh.allow_replicated_batch` opted into replicating it (then a warning, every run): every batch device
    would compute the whole batch."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % n == 0:
        return True
    advice = (f"{what} = {batch} does not divide over the {n} batch devices (mesh.data {mesh.shape['data']} x "
              f"mesh.fsdp {mesh.shape['fsdp']}): set {what} to a multiple of {n} (e.g. {-(-batch // n) * n}; "
              f"lower optim.grad_accum to keep the effective batch), or move devices to mesh.tensor")
    if not allow_replicated:
        raise ConfigError(advice + "; or set mesh.allow_replicated_batch=true to replicate it (wasteful)")
    log(f"warning: {advice}; mesh.allow_replicated_batch is set, so every batch device computes the whole "
        f"batch ({n}x the work)")
    return False


def build_model(cfg, mesh):
    """The base model (HF checkpoint or random preset) on the mesh, with LoRA adapters attached and placed.

    `cfg` is any run config with `model` and `lora` sections (SFTConfig, GRPOConfig)."""
    m = cfg.model
    param_dtype = m.param_dtype or m.dtype
    if m.path is not None:
        model = from_pretrained(m.path, dtype=m.dtype, param_dtype=param_dtype, mesh=mesh)
    else:
        model = init_model(m.preset, seed=m.init_seed, dtype=m.dtype, param_dtype=param_dtype, mesh=mesh)
    rngs = nnx.Rngs(params=cfg.lora.init_seed, dropout=cfg.lora.init_seed)
    if m.adapter is not None:
        load_peft_adapter(model, m.adapter, rngs=rngs)
    else:
        lc = cfg.lora
        apply_lora(model, LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.use_rslora,
                                     target_modules=lc.target_modules, exclude_modules=lc.exclude_modules),
                   rngs=rngs)
    shard_model(model, mesh)  # LoRA parameters by the rules; dropout RNG streams replicated
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


def init_state(params, base, rest, tx, *, seed: int, mesh) -> tuple[TrainState, StateShardings]:
    """A fresh TrainState (step 0, optimiser state, the run's root key) placed on the mesh, and the shardings
    of the state, the frozen base and the rest (RNG streams) for the jitted step."""
    replicated = NamedSharding(mesh, P())
    params_sh = param_shardings(params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    state_sh = TrainState(replicated, params_sh, jax.tree.map(lambda _: replicated, opt_state), replicated)
    rng = jax.random.key_data(jax.random.key(seed, impl=RNG_IMPL))
    state = TrainState(put(np.zeros((), np.int32), replicated), params, opt_state, put(np.asarray(rng), replicated))
    state = jax.tree.map(place, state_sh, state)
    shardings = StateShardings(state_sh, param_shardings(base, mesh), jax.tree.map(lambda _: replicated, rest),
                               replicated)
    return state, shardings


def restore_latest(checkpointer, state: TrainState, log: Callable[[str], None]):
    """(state, data_state, saved_config, step) from the newest checkpoint that restores, or None when the
    directory holds none. A checkpoint that fails to restore (truncated or corrupted files) is reported with
    its step, set aside (renamed ``<step>.unreadable-<n>``, so the run can write that step again) and the
    next older one is tried; if none restores, the error of the newest is raised and nothing is renamed."""
    steps = sorted(checkpointer.all_steps(), reverse=True)
    if not steps:
        return None
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    first_error = None
    broken = []
    for step in steps:
        try:
            restored = checkpointer.restore(template, step)
        except Exception as err:  # orbax raises many types for damaged files; the message says which
            first_error = first_error or err
            broken.append(step)
            log(f"warning: the checkpoint of step {step} in {checkpointer.directory} cannot be restored "
                f"({type(err).__name__}: {str(err)[:300]}); trying the previous one")
            continue
        for bad in broken:
            log(f"warning: set the unreadable checkpoint of step {bad} aside as {checkpointer.set_aside(bad)}")
        return restored
    raise RuntimeError(f"no checkpoint in {checkpointer.directory} restores (steps {steps}); the newest failed "
                       f"with: {first_error}") from first_error
