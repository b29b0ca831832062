"""The jitted SFT step: grad_accum micro-batches scanned, one AdamW update, a non-finite guard.

The model is split once into (graphdef, LoRA params, base params, rest). `rest` holds the LoRA dropout
RNG streams; every micro-batch reseeds them from (train seed, step, micro-batch index), so dropout masks
are a pure function of the step and a resumed run draws exactly what an uninterrupted one would.

    step_fn = make_train_step(...)            # jax.jit with explicit in/out shardings, state donated;
                                              # with shardings it runs under their mesh (OnMesh)
    state, metrics = step_fn(state, base, rest, batch)

`TrainState` is a plain pytree (checkpointed as is): the step counter, the LoRA parameters (float32),
the optax state and the raw RNG key data. The loss is the mean token cross-entropy over every supervised
token of the whole step (all micro-batches), i.e. exactly the loss of one big batch.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS
from fxjax.device_mesh import use_mesh
from fxjax.train.batching import StepBatch
from fxjax.model.batch_axis import batch_parts
from fxjax.train.losses import LossTargets, chunked_cross_entropy
from fxjax.train.optimizer import keep_if_finite
from fxjax.train.remat import with_remat

RNG_IMPL = "rbg"  # cheap to compile (XLA RngBitGenerator); deterministic on a given platform

__all__ = ["OnMesh", "RNG_IMPL", "TrainState", "make_eval_loss", "make_train_step", "micro_loss", "reseed_rest",
           "split_model"]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates done
    params: Any  # nnx.State of the LoRA parameters (float32)
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's root key

    @classmethod
    def fresh(cls, params, tx, seed: int, opt_state=None) -> "TrainState":
        """The state a run starts from: step 0, `opt_state` (default: tx.init(params)) and the root key of
        `seed` (train.run_setup.init_state places it on a mesh)."""
        return cls(jnp.zeros((), jnp.int32), params, tx.init(params) if opt_state is None else opt_state,
                   jax.random.key_data(jax.random.key(seed, impl=RNG_IMPL)))


def split_model(model):
    """(graphdef, LoRA params, base params and other parameters, rest) of a model with LoRA adapters."""
    graphdef, params, base, rest = nnx.split(model, LORA_PARAMS, BASE_PARAMS, ...)
    return graphdef, params, base, rest


def _path_salt(path) -> int:
    return zlib.crc32("/".join(str(p) for p in path).encode()) & 0x7FFFFFFF


def reseed_rest(rest, key: jax.Array):
    """Give every RNG stream in `rest` a key folded from `key` and its path, and a zero count."""
    flat = []
    for path, variable in nnx.to_flat_state(rest):
        if isinstance(variable, nnx.RngKey):
            variable = variable.replace(jax.random.fold_in(key, _path_salt(path)))
        elif isinstance(variable, nnx.RngCount):
            variable = variable.replace(jnp.zeros_like(variable.get_value()))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


def micro_loss(graphdef, params, base, rest, inputs, targets: LossTargets, key, *, loss_chunk: int,
               remat: str | None, remat_vision: str | None, grad: bool):
    """(NLL sum, token count, grads or None) of one micro-batch."""
    model = nnx.merge(graphdef, params, base, reseed_rest(rest, key))

    def loss_fn(model):
        with_remat(model, remat, remat_vision)  # inside: the gradient keeps the unwrapped parameter paths
        hidden, _ = model.hidden_states(inputs)
        # the slots' layout (per batch shard) follows the mesh's split of the batch, as the activations do
        total, count = chunked_cross_entropy(hidden, targets, model.logits, loss_chunk,
                                             shards=batch_parts(hidden.shape[0]))
        return total, count

    if not grad:
        total, count = loss_fn(model)
        return total, count, None
    (total, count), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LORA_PARAMS), has_aux=True)(model)
    return total, count, grads


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, *, loss_chunk: int,
                    remat: str | None, remat_vision: str | None,
                    state_shardings=None, base_shardings=None, rest_shardings=None, batch_shardings=None,
                    with_grads: bool = False):
    """The jitted step (state, base, rest, batch) -> (state, metrics); `state` is donated.

    Metrics (device scalars): loss, grad_norm (before clipping), learning_rate, target_tokens,
    finite (loss and gradient finite); with `with_grads` also "grads", the step's gradient (accumulated over
    the micro-batches, per supervised token, before clipping; laid out like the parameters), for checks.
    A non-finite step never changes the parameters or the optimiser state (the update is skipped); the step
    counter advances. The caller decides whether to go on (train.on_nonfinite = "skip") or to stop without
    saving this state ("stop").
    """

    def step(state: TrainState, base, rest, batch: StepBatch):
        root = jax.random.wrap_key_data(state.rng, impl=RNG_IMPL)
        step_key = jax.random.fold_in(root, state.step)
        n_micro = batch.targets.index.shape[0]

        # The model's state rides in the scan carry (unchanged): NNX refuses to merge Variables whose
        # values are tracers of an enclosing trace.
        def body(carry, i):
            (grads_sum, loss_sum, count_sum), (params, base_, rest_) = carry
            total, count, grads = micro_loss(graphdef, params, base_, rest_, _index(batch.inputs, i),
                                             _index(batch.targets, i), jax.random.fold_in(step_key, i),
                                             loss_chunk=loss_chunk, remat=remat, remat_vision=remat_vision,
                                             grad=True)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return ((grads_sum, loss_sum + total, count_sum + count), (params, base_, rest_)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = ((zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (state.params, base, rest))
        if n_micro == 1:
            ((grads, loss_sum, count), _), _ = body(init, 0)
        else:
            ((grads, loss_sum, count), _), _ = jax.lax.scan(body, init, jnp.arange(n_micro))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_params = keep(new_params, state.params)
        new_opt = keep_if_finite(finite, new_opt, state.opt_state)
        new_state = TrainState(state.step + 1, new_params, new_opt, state.rng)
        metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                       target_tokens=count, finite=finite)
        if with_grads:
            metrics["grads"] = grads
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    mesh = state_shardings.step.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    metric_shardings = dict(loss=replicated, grad_norm=replicated, learning_rate=replicated,
                            target_tokens=replicated, finite=replicated)
    if with_grads:
        metric_shardings["grads"] = state_shardings.params
    return OnMesh(jax.jit(step, in_shardings=(state_shardings, base_shardings, rest_shardings, batch_shardings),
                          out_shardings=(state_shardings, metric_shardings), donate_argnums=(0,)), mesh)


class OnMesh:
    """A jitted function that traces, compiles and runs under `mesh` (fxjax.device_mesh.use_mesh), whoever calls
    it: the model reads the ambient mesh to pin activations' batch axis to ("data", "fsdp")
    (model.qwen2_5_vl.shard_batch), so without it the compiler may gather activations instead of weights."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with use_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with use_mesh(self.mesh):
            return self.jitted.lower(*args)


def make_eval_loss(graphdef, *, loss_chunk: int, params_shardings=None, base_shardings=None,
                   rest_shardings=None, batch_shardings=None):
    """Jitted (params, base, rest, batch) -> (NLL sum, token count) over every micro-batch (no dropout:
    pass the graphdef of a model in eval mode)."""

    def evaluate(params, base, rest, batch: StepBatch):
        def body(carry, i):
            (acc_total, acc_count), (params_, base_, rest_) = carry
            total, count, _ = micro_loss(graphdef, params_, base_, rest_, _index(batch.inputs, i),
                                         _index(batch.targets, i), jax.random.key(0, impl=RNG_IMPL),
                                         loss_chunk=loss_chunk, remat=None, remat_vision=None, grad=False)
            return ((acc_total + total, acc_count + count), (params_, base_, rest_)), None

        zero = jnp.zeros((), jnp.float32)
        ((total, count), _), _ = jax.lax.scan(body, ((zero, zero), (params, base, rest)),
                                              jnp.arange(batch.targets.index.shape[0]))
        return total, count

    if params_shardings is None:
        return jax.jit(evaluate)
    mesh = jax.tree.leaves(params_shardings)[0].mesh
    return OnMesh(jax.jit(evaluate, in_shardings=(params_shardings, base_shardings, rest_shardings,
                                                  batch_shardings)), mesh)
