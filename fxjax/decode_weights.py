"""The weights gathered once for decoding, when the mesh shards them over `fsdp`.

Under `mesh.fsdp` > 1 each device stores 1/fsdp of every large weight and a forward pass all-gathers each
layer's weights where it uses them. A training step is one forward and backward pass over thousands of
tokens, which carry that traffic; a decoding step is a forward pass of one token per row, so GRPO's
rollout and the greedy evaluation would move the whole model over the interconnect for every generated
token (with `model.scan_layers`, the compiled decode loop all-gathers each layer's weights inside its
layer scan at every token: bench/plan.py's rollout program; with the layers unrolled, XLA's CPU compile
hoisted most of the gathers out of the loop by itself, holding the whole model for the loop either way).

Gathered once before a rollout (or an evaluation pass), the weights are whole on every device (still split
over `tensor`) and the decoding is data parallel: each device decodes its rows with no weight traffic.
This is TRL's `ds3_gather_for_generation` under DeepSpeed ZeRO-3. It costs the gathered copy's memory for
as long as the decoding runs; the training state keeps its sharded layout throughout.

    plan = decode_plan(model, "auto")           # once per run: whether to gather, and why (said in the log)
    decoding = weights_for_decoding(model, plan)  # the model itself when there is nothing to gather
    out = sample_groups(decoding, inputs, ...)

`mesh.gather_for_decoding`: "auto" gathers when the extra memory per device is at most half of what the
devices have free (the rest is left to the KV cache and the decode loop's temporaries), on CPU devices
always (they share the host's memory), and not on devices that report no memory; "always" and "never"
decide without looking. At fsdp 1 nothing is split, so nothing is gathered or said.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DecodePlan", "GATHER_SETTINGS", "choose_plan", "decode_plan", "gathered_spec", "weights_for_decoding"]

GATHER_SETTINGS = ("auto", "always", "never")
GATHERED_AXIS = "fsdp"
FREE_FRACTION = 0.5  # auto: the gathered copy may take at most this share of the devices' free memory
GIB = 1024 ** 3


@dataclass(frozen=True)
class DecodePlan:
    gather: bool
    reason: str  # for the run's log: what decoding does and why
    splits: bool = True  # some weight is split over fsdp (False: nothing to decide, nothing worth saying)

    def __bool__(self) -> bool:
        return self.gather


def gathered_spec(spec: P, axis: str = GATHERED_AXIS) -> P:
    """`spec` without `axis`: the dimensions it split become whole (or split by the other axes only)."""
    def drop(entry):
        if entry is None or entry == axis:
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != axis)
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return entry

    return P(*(drop(e) for e in spec))


def _split_over(sharding: NamedSharding, axis: str) -> bool:
    """Whether `axis` really splits some dimension: named in the spec and of size > 1 (the rules name fsdp
    whatever its size; at fsdp 1 a "gathered" copy would be a second copy of every such weight)."""
    spec = sharding.spec
    named = any(e == axis or (isinstance(e, tuple) and axis in e) for e in spec)
    return named and sharding.mesh.shape.get(axis, 1) > 1


def _gathered_leaves(state) -> list[tuple[int, jax.Array, NamedSharding]]:
    """(leaf index, array, its gathered sharding) of every array of `state` split over the fsdp axis."""
    out = []
    for i, leaf in enumerate(jax.tree.leaves(state)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and _split_over(sharding, GATHERED_AXIS):
            out.append((i, leaf, NamedSharding(sharding.mesh, gathered_spec(sharding.spec))))
    return out


def _extra_bytes(leaves) -> int:
    """Bytes each device holds beyond its shards once `leaves` are gathered."""
    return sum((math.prod(target.shard_shape(leaf.shape)) - math.prod(leaf.sharding.shard_shape(leaf.shape)))
               * leaf.dtype.itemsize for _, leaf, target in leaves)


def _free_bytes() -> int | None:
    """The least free device memory among every process's devices (None: a device reports none).
    Every process gets the same answer, so all compile the same decoding program."""
    free = []
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return _agree(None)
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return _agree(min(free) if free else None)


def _agree(value: int | None) -> int | None:
    if jax.process_count() == 1:
        return value
    from fxjax.host_exchange import allgather_json

    values = allgather_json("decode_plan_free_bytes", value)
    return None if any(v is None for v in values) else min(values)


def decode_plan(model, setting: Literal["auto", "always", "never"] = "auto", *,
                source: str = "mesh.gather_for_decoding") -> DecodePlan:
    """Whether decoding runs on gathered weights (`setting`, given as `source`: the config key or the CLI
    flag), decided from the model's current placement and, for "auto", the devices' free memory now."""
    if setting not in GATHER_SETTINGS:
        raise ValueError(f"{source}: {setting!r} is not one of {', '.join(GATHER_SETTINGS)}")
    leaves = _gathered_leaves(nnx.state(model))
    if not leaves:
        return DecodePlan(False, "no weight is split over fsdp; nothing to gather", splits=False)
    mesh = leaves[0][2].mesh
    cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return choose_plan(setting, fsdp=mesh.shape[GATHERED_AXIS], extra=_extra_bytes(leaves),
                       free=_free_bytes() if setting == "auto" else None, cpu=cpu, source=source)


def choose_plan(setting: str, *, fsdp: int, extra: int, free: int | None, cpu: bool = False,
                source: str = "mesh.gather_for_decoding") -> DecodePlan:
    """The plan for weights split `fsdp` ways whose gathered copy takes `extra` more bytes per device, with
    `free` bytes free on the fullest device (None: a device does not say; gathered on a CPU, whose devices
    share the host's memory, and not elsewhere: a GPU or TPU that reports nothing is not guessed at)."""
    size = f"{_size(extra)} more per device"
    gathered = f"the weights are gathered over fsdp={fsdp} once per decoding pass ({size})"
    sharded = (f"the weights stay split over fsdp={fsdp} while decoding, so the decode loop may gather each "
               "layer's weights again for every generated token")
    if setting == "always":
        return DecodePlan(True, f"{gathered}: {source} is always")
    if setting == "never":
        return DecodePlan(False, f"{sharded}: {source} is never")
    if free is None:
        if cpu:
            return DecodePlan(True, f"{gathered}: CPU devices, in the host's memory")
        return DecodePlan(False, f"{sharded} (the devices report no free memory to size the gathered copy by; "
                                 f"{source}: always gathers it)")
    if extra <= FREE_FRACTION * free:
        return DecodePlan(True, f"{gathered}, {_size(free)} free")
    return DecodePlan(False, f"{sharded} (gathering them needs {size}, more than half of the {_size(free)} free; "
                             f"{source}: always forces it)")


def _identity(arrays):
    return arrays


@functools.lru_cache(maxsize=8)
def _gather_program(targets: tuple[NamedSharding, ...]):
    """The jitted identity onto `targets`, made once per layout: a new function each call would be traced,
    lowered and compiled again at every rollout."""
    return jax.jit(_identity, out_shardings=list(targets))


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def weights_for_decoding(model, plan: DecodePlan | bool):
    """`model` with its fsdp-split arrays gathered (a new module over new arrays; `model` keeps its own), or
    `model` itself when the plan says not to or nothing is split. Drop the result after decoding: it holds
    the gathered copy."""
    if not plan:
        return model
    graphdef, state = nnx.split(model)
    leaves = _gathered_leaves(state)
    if not leaves:
        return model
    # one jitted identity whose outputs are laid out whole over fsdp: XLA all-gathers each array once
    # (across processes too), and the arrays that are not split over fsdp are not copied
    gathered = _gather_program(tuple(target for _, _, target in leaves))([x for _, x, _ in leaves])
    flat, treedef = jax.tree.flatten(state)
    for (i, _, _), array in zip(leaves, gathered):
        flat[i] = array
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, flat))
