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


def _size(axis: str) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape[axis] if axis in mesh.axis_names else 1


def tensor_parts(heads: int) -> int:
    """Into how many parts the ambient mesh's "tensor" axis splits `heads` attention heads (the partition
    rules split the projections' heads over it where it divides them; else 1)."""
    tensor = _size("tensor")
    return tensor if heads % tensor == 0 else 1


def shard_batch_and_features(x: jax.Array) -> jax.Array:
    """A column-parallel layer's output: dim 0 over the batch axes (as `shard_batch`), the last (features)
    over "tensor", the layout its row-parallel successor takes. With fsdp and tensor both > 1, XLA's
    propagation otherwise split the features over fsdp x tensor and then had to replicate the whole
    activation to reach the batch layout ("Involuntary full rematerialization"); a no-op without tensor."""
    tensor = _size("tensor")
    if tensor == 1 or x.shape[-1] % tensor:
        return shard_batch(x)
    batch = _batch_axes() if batch_parts(x.shape[0]) > 1 else None
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.PartitionSpec(batch or None, *([None] * (x.ndim - 2)), "tensor"))


def vocab_parallel(table: jax.Array) -> jax.Array:
    """An embedding table [vocab, hidden] as a lookup takes it: the vocabulary over "tensor", the hidden
    size whole (FSDP gathers it, as any weight before use). With fsdp and tensor both > 1 a lookup of the
    fsdp-split table gave hidden-split rows that XLA could reach the batch layout from only by replicating
    them; with one of the two the table is left as it is."""
    tensor, fsdp = _size("tensor"), _size("fsdp")
    if tensor == 1 or fsdp == 1:
        return table
    return jax.lax.with_sharding_constraint(
        table, jax.sharding.PartitionSpec("tensor" if table.shape[0] % tensor == 0 else None, None))
