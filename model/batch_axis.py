"""Pinning an activation's leading (batch) axis to the ambient mesh's batch axes."""

from __future__ import annotations

import math

import jax


def _batch_axes() -> tuple[str, ...]:
    mesh = jax.sharding.get_abstract_mesh()
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)


def batch_parts(rows: int) -> int:
    """Into how many parts a batch of `rows` splits over the ambient mesh's ("data", "fsdp") axes: their
    size when it divides `rows`, else 1 (the batch is replicated; no mesh: 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    parts = math.prod(mesh.shape[a] for a in _batch_axes())
    return parts if rows % parts == 0 else 1


def shard_batch(x: jax.Array) -> jax.Array:
    """Shard dim 0 (the batch) over the ambient mesh's ("data", "fsdp") axes (jax.sharding.set_mesh);
    a no-op without such a mesh. Pins activations so that sharded weights are gathered (FSDP) rather
    than activations."""
    if batch_parts(x.shape[0]) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(_batch_axes()))
