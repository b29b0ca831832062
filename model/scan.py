"""Layers under scan: one module whose parameters carry a leading layer axis, run by jax.lax.scan.

`stack_modules(make, count, rngs)` builds `count` copies of the module `make(rngs)` at once (nnx.vmap over
split rngs, as the Flax NNX docs build scanned layers): every Param gets a leading [count] axis, the
module's attributes (config, activation, LoRA flags) stay as for one layer. `scan_stack` runs them in
order, layer i on slice i of every Param, so the traced program holds one layer whatever the depth.

What rides where in the scan:
* parameters (nnx.Param, LoRA factors included): scanned inputs, sliced per layer, never returned (so
  no copy of the weights is built as a scan output);
* every other variable (the LoRA dropout RNG stream: one stream per stacked Linear, advanced by each
  layer's draw, so layers get different masks): the carry, written back after the scan where a dropout
  draws (train mode; the looped layers leave a stream they do not draw from untouched);
* per-layer inputs (`xs`, e.g. the KV cache's keys and values [layers, ...]) and outputs (`ys`): scanned.

Rematerialisation applies to one layer's call (jax.checkpoint of the scan body), what wrapping each layer
of the loop in train.remat.Remat does: `remat` is None (off), True (keep only the layer's inputs) or a
jax.checkpoint policy (jax.checkpoint_policies.*).

A stacked layer computes exactly what the per-layer module computes (the same ops on the same slices);
random initialisation differs from the loop's (the keys are split per layer, not drawn in turn), so scan
and loop models agree when their weights come from the same checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from .layers import dropout_active

RematPolicy = Callable[..., Any] | bool | None


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` modules `make(rngs_i)` as one, every Param stacked on a new leading axis (layer i = slice i)."""
    if count < 1:
        raise ValueError(f"a stack needs at least one layer, got {count}")

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return build(rngs)


def scan_stack(stack: nnx.Module, step: Callable, carry, xs=None, broadcast: tuple = (), *,
               remat: RematPolicy = None):
    """Run the layers of `stack` in order: `carry, ys_i = step(layer_i, carry, xs_i, *broadcast)`.

    `xs` is a pytree of per-layer inputs with a leading [layers] axis (or None); `broadcast` the inputs
    every layer sees (rotary tables, attention masks). Returns (final carry, ys stacked on a leading
    [layers] axis). Non-parameter state the layers change (RNG counts) is written back into `stack`.
    """
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

    def one_layer(params_i, rest, carry, xs_i, broadcast):
        layer = nnx.merge(graphdef, params_i, rest)
        carry, ys_i = step(layer, carry, xs_i, *broadcast)
        return carry, ys_i, nnx.state(layer, nnx.Not(nnx.Param))

    if remat is not None and remat is not False:
        one_layer = jax.checkpoint(one_layer, policy=None if remat is True else remat)

    def body(state, sliced):
        carry, rest = state
        params_i, xs_i = sliced
        carry, ys_i, rest = one_layer(params_i, rest, carry, xs_i, broadcast)
        return (carry, rest), ys_i

    (carry, rest), ys = jax.lax.scan(body, (carry, rest), (params, xs))
    # Written back only where a layer drew from its stream: inside a decode loop (a lax.while_loop over this
    # scan, LoRA dropout in eval mode) the write failed, "Cannot mutate RngCount from a different trace
    # level", while the looped layers never touch a stream they do not draw from.
    if nnx.to_flat_state(rest) and dropout_active(stack):
        nnx.update(stack, rest)
    return carry, ys


__all__ = ["RematPolicy", "stack_modules", "scan_stack"]
