"""Rematerialisation of the decoder layers and vision blocks with a configurable policy.

`with_remat(model, policy, vision_policy)` wraps every `model.decoder.layers[i]` and
`model.visual.blocks[i]` of a model *that was merged inside the traced step* in `Remat`, whose call is
``jax.checkpoint(block, policy=...)``. The wrapping changes only that trace-local copy of the module
graph, never the model the caller holds, so parameter paths (HF export, PEFT names, shardings) stay as
they are and model/ needs no training knobs. Layers under scan (TextConfig / VisionConfig.scan_layers) are
one stacked module: there the policy goes to the decoder's `layer_remat` (the encoder's `block_remat`),
which checkpoints the scan body (one layer or block), the same per-layer rematerialisation.

Policies (`fxjax.config_sections.REMAT_POLICIES`):
  none                no rematerialisation: every activation of the block is kept for the backward pass
  full                keep only the block's inputs; recompute the block in the backward pass
  dots                keep matmul outputs (jax.checkpoint_policies.dots_saveable)
  dots_no_batch       keep matmul outputs without batch dimensions (weights x activations)
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

__all__ = ["Remat", "remat_policy", "with_remat"]


def remat_policy(name: str | None) -> Callable | None | bool:
    """Policy name -> jax.checkpoint policy; None for 'none' (no remat); True for 'full'."""
    cp = jax.checkpoint_policies
    if name in (None, "none"):
        return None
    table = {
        "full": True,
        "dots": cp.dots_saveable,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }
    if name not in table:
        raise ValueError(f"unknown remat policy {name!r}; choose from {['none', *table]}")
    return table[name]


class Remat(nnx.Module):
    """Calls `inner(*args)` under jax.checkpoint (the inner module's state is an explicit input)."""

    def __init__(self, inner: nnx.Module, policy):
        self.inner = inner
        self.policy = None if policy is True else policy

    def __call__(self, *args):
        graphdef, state = nnx.split(self.inner)

        def run(state, *args):
            return nnx.merge(graphdef, state)(*args)

        return jax.checkpoint(run, policy=self.policy)(state, *args)


def with_remat(model, policy: str | None, vision_policy: str | None = None):
    """Wrap the decoder layers (and vision blocks, with vision_policy or else policy) in place; returns model."""
    text = remat_policy(policy)
    vision = remat_policy(policy if vision_policy is None else vision_policy)
    if text is not None and model.decoder.cfg.scan_layers:
        model.decoder.layer_remat = text  # model.scan.scan_stack's `remat`: True or a policy
    elif text is not None:
        layers = model.decoder.layers
        for i in range(len(layers)):
            if not isinstance(layers[i], Remat):
                layers[i] = Remat(layers[i], text)
    if vision is not None and model.visual.cfg.scan_layers:
        model.visual.block_remat = vision
    elif vision is not None:
        blocks = model.visual.blocks
        for i in range(len(blocks)):
            if not isinstance(blocks[i], Remat):
                blocks[i] = Remat(blocks[i], vision)
    return model
