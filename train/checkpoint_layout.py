"""Train checkpoints across the two layouts of the decoder layers: looped (one entry per layer,
`params.decoder.layers.3.mlp.up_proj.lora.lora_a`) and under scan (model.scan_layers: one stacked entry,
`params.decoder.layers.mlp.up_proj.lora.lora_a` [layers, ...]). The optimiser moments follow the same names.

A checkpoint saved in one layout restores into a run of the other: `saved_layout` gives the abstract
state in the checkpoint's names (each layer's entry cut out of the stacked one, or the layers' entries
stacked), orbax restores that, and `to_current_layout` stacks or slices the arrays back onto the run's
shardings. The state is the LoRA parameters and their optimiser moments, small next to the model, so
holding both forms for a moment costs little. Names that differ otherwise stay an error.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from fxjax.model.hf_names import STACKS

__all__ = ["LayoutError", "saved_layout", "to_current_layout"]

_STACK_NAMES = "|".join(re.escape(".".join(stack)) for stack in STACKS)
# <prefix><stack>.<i>.<rest>: one layer's entry in the looped layout
_PER_LAYER = re.compile(rf"^(?P<head>(?:.*\.)?(?:{_STACK_NAMES}))\.(?P<i>\d+)\.(?P<rest>.+)$")
# <prefix><stack>.<rest>: the stacked entry (rest does not start with a layer index)
_STACKED = re.compile(rf"^(?P<head>(?:.*\.)?(?:{_STACK_NAMES}))\.(?P<rest>(?!\d+\.).+)$")


class LayoutError(ValueError):
    pass


def _layer_name(stacked: str, index: int) -> str:
    m = _STACKED.match(stacked)
    return f"{m['head']}.{index}.{m['rest']}"


def _stacked_name(layer: str) -> tuple[str, int] | None:
    m = _PER_LAYER.match(layer)
    return (f"{m['head']}.{m['rest']}", int(m["i"])) if m else None


def _sharding_of_layer(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _sharding_of_stack(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding


def saved_layout(abstract: Mapping[str, jax.ShapeDtypeStruct], saved: set[str], where: str, *,
                 partial: bool = False) -> dict[str, jax.ShapeDtypeStruct] | None:
    """The run's abstract flat state (`abstract`) renamed and reshaped to the layout of a checkpoint holding
    the names `saved`; None when the names already agree. Raises LayoutError when they differ in more than
    the layout (`where` names the checkpoint). `partial`: only part of the checkpoint is restored (its names
    need only include the run's)."""
    def agree(names) -> bool:
        return set(names) <= saved if partial else set(names) == saved

    if agree(abstract):
        return None
    out: dict[str, jax.ShapeDtypeStruct] = {}
    stacks: dict[str, list[tuple[int, jax.ShapeDtypeStruct]]] = {}
    for name, leaf in abstract.items():
        sharding = getattr(leaf, "sharding", None)
        if name in saved:
            out[name] = leaf
        elif _STACKED.match(name) and _layer_name(name, 0) in saved:  # run scanned, checkpoint looped
            for i in range(leaf.shape[0]):
                out[_layer_name(name, i)] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                                                 sharding=_sharding_of_layer(sharding))
        elif _stacked_name(name) and _stacked_name(name)[0] in saved:  # run looped, checkpoint scanned
            stacked, index = _stacked_name(name)
            stacks.setdefault(stacked, []).append((index, leaf))
        else:
            out[name] = leaf  # no counterpart: reported below
    for stacked, layers in stacks.items():
        layers.sort(key=lambda item: item[0])
        if [i for i, _ in layers] != list(range(len(layers))):
            raise LayoutError(f"{where}: this run's state has layers {[i for i, _ in layers]} of {stacked}")
        leaf = layers[0][1]
        out[stacked] = jax.ShapeDtypeStruct((len(layers), *leaf.shape), leaf.dtype,
                                            sharding=_sharding_of_stack(getattr(leaf, "sharding", None)))
    if not agree(out):
        missing, extra = sorted(set(out) - saved), sorted(saved - set(out))
        raise LayoutError(f"{where}: the checkpoint's state does not match this run's: it lacks {missing[:4]} "
                          f"and holds {extra[:4]} (a different model, LoRA targets or optimiser?)")
    return out


def to_current_layout(abstract: Mapping[str, jax.ShapeDtypeStruct], restored: Mapping[str, Any]) -> dict[str, Any]:
    """Arrays restored in a checkpoint's layout (`saved_layout`) -> the run's names, shapes and shardings."""
    out = {}
    for name, leaf in abstract.items():
        sharding = getattr(leaf, "sharding", None)
        if name in restored:
            out[name] = restored[name]
        elif _STACKED.match(name) and _layer_name(name, 0) in restored:
            value = jnp.stack([restored[_layer_name(name, i)] for i in range(leaf.shape[0])])
            out[name] = jax.device_put(value, sharding) if sharding is not None else value
        else:
            stacked, index = _stacked_name(name)
            value = restored[stacked][index]
            out[name] = jax.device_put(value, sharding) if sharding is not None else value
    return out
