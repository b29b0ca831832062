"""Pinning an activation's leading (batch) axis to the ambient mesh's batch axes."""

from __future__ import annotations

import math

import jax


def shard_batch(x: jax.Array) -> jax.Array:
    """Shard dim 0 (the batch) over the ambient mesh's ("data", "fsdp") axes (jax.sharding.set_mesh);
    a no-op without such a mesh. Pins activations so that sharded weights are gathered (FSDP) rather
    than activations."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))
