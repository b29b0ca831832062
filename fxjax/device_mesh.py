"""Device meshes and what runs on them: the mesh, the activations' batch layout, host <-> device arrays.

Mesh axes are ("data", "fsdp", "tensor"); any may have size 1. `make_mesh` lays devices out with
jax.experimental.mesh_utils (the TPU torus, GPU numbering); MeshConfig's dcn_data / dcn_fsdp say how much
of data / fsdp crosses TPU slices (GPU hosts), so only those collectives use the slow network.

* Activations shard the batch over ("data", "fsdp"). The vision encoder's inputs, packed per batch shard
  (a leading shard axis, model.inputs.prepare_inputs's batch_shards), shard that axis the same way; one
  packed sequence for the whole batch is not a batch axis and stays replicated.
* `put` places a host array on its shards (each process only its own), `gather` brings one back to every
  process, `barrier` waits for every process.

How each parameter shards (the one table of partition rules) is fxjax.partition_rules', built on this module.

Use:
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))       # after fxjax.distributed.initialize()
    model = fxjax.from_pretrained(path, dtype="bfloat16", mesh=mesh, lora=LoRAConfig(...))
    inputs = shard_inputs(model.prepare(ids, mask, pixel_values, grid, batch_shards=batch_shards(mesh)), mesh)
    with use_mesh(mesh):                # the model pins activations' batch to ("data", "fsdp")
        loss, grads = jitted_step(model, optimizer, inputs)   # jitted with out_shardings = the inputs' own,
                                                              # so parameters and moments keep their layout
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
REPLICATED = P()  # every device holds the whole array


class ShardingError(ValueError):
    """A mesh, a batch or a partition rule that does not fit the devices or the arrays."""


# ---- meshes -----------------------------------------------------------------------------------------

DCN_AXES = ("dcn_data", "dcn_fsdp")  # MeshConfig keys: the part of data / fsdp that crosses slices or hosts


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. One size may be -1: it takes the devices the others leave.

    dcn_data / dcn_fsdp: how much of the data / fsdp axis crosses the slow network between TPU slices (or,
    on GPUs, between hosts); the rest of each axis stays on the fast interconnect inside a slice (host).
    data = dcn_data x (its ICI part), likewise fsdp; tensor never crosses. With both 1 (the default) the
    whole mesh is one slice's, or one plain device order.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "MeshConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - set(AXES) - set(DCN_AXES))
        if unknown:
            raise ShardingError(f"unknown mesh axis/axes {unknown}; axes are {list(AXES)}, "
                                f"cross-slice factors {list(DCN_AXES)}")
        sizes = {}
        for key, value in data.items():
            try:
                sizes[key] = int(value)
            except (TypeError, ValueError):
                raise ShardingError(f"mesh.{key}: {value!r} is not an integer") from None
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):  # 2.5 became 2
                raise ShardingError(f"mesh.{key}: {value!r} is not an integer")
        return cls(**sizes)

    @classmethod
    def data_takes_rest(cls, **sizes: int) -> "MeshConfig":
        """As a run config's mesh section reads: an axis not given is 1, and data takes the rest of the
        devices (-1) unless another axis does (fsdp=4 on 8 devices: data=2 x fsdp=4)."""
        given = {k: v for k, v in sizes.items() if k in AXES}
        return cls(**{"data": 1 if -1 in given.values() else -1, **sizes})

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn_shape(self) -> tuple[int, int, int]:
        """The mesh's shape over slices (hosts): (dcn_data, dcn_fsdp, 1)."""
        return (self.dcn_data, self.dcn_fsdp, 1)

    @property
    def ici_shape(self) -> tuple[int, int, int]:
        """The mesh's shape inside one slice (host); needs resolved sizes."""
        return (self.data // self.dcn_data, self.fsdp // self.dcn_fsdp, self.tensor)

    def resolve(self, device_count: int) -> "MeshConfig":
        """Fill a -1 size and check that the sizes multiply to `device_count` and the DCN factors divide."""
        sizes = list(self.shape)
        if any(s == 0 or s < -1 for s in sizes):
            raise ShardingError(f"mesh sizes must be positive (or one -1), got {dict(zip(AXES, sizes))}")
        if sizes.count(-1) > 1:
            hint = ("; data is -1 unless set (the rest of the devices): give it a size, e.g. mesh.data=1 with "
                    "another axis at -1") if sizes[0] == -1 else ""
            raise ShardingError(f"at most one mesh size may be -1, got {dict(zip(AXES, sizes))}{hint}")
        for key in DCN_AXES:
            if getattr(self, key) < 1:
                raise ShardingError(f"mesh {key} must be >= 1 (1: the axis stays inside a slice), "
                                    f"got {getattr(self, key)}")
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            if device_count % known:
                raise ShardingError(f"cannot fill mesh {dict(zip(AXES, sizes))}: {device_count} devices "
                                    f"are not a multiple of {known}")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise ShardingError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                f"but {device_count} device(s) are available; make the sizes multiply to {device_count}")
        for axis, size, dcn in (("data", sizes[0], self.dcn_data), ("fsdp", sizes[1], self.dcn_fsdp)):
            if size % dcn:
                raise ShardingError(f"mesh dcn_{axis}={dcn} must divide {axis}={size} (the {axis} axis is "
                                    f"dcn_{axis} slices x {axis}/dcn_{axis} devices inside each)")
        return replace(self, data=sizes[0], fsdp=sizes[1], tensor=sizes[2])


def require_fxjax_mesh(mesh) -> None:
    """`mesh` (None, or where weights are placed) is fxjax's: a jax Mesh with the axes AXES (a dict, or a Mesh
    of other axes, failed deep inside the placement)."""
    if mesh is None:
        return
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh is a jax Mesh: fxjax.make_mesh(fxjax.MeshConfig(...)) (a dict goes into MeshConfig."
                        f"from_dict), got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != tuple(AXES):
        raise ValueError(f"mesh has the axes {tuple(mesh.axis_names)}; fxjax places weights on the axes {tuple(AXES)}: "
                         f"build it with fxjax.make_mesh(fxjax.MeshConfig(...))")


def make_mesh(cfg: MeshConfig | Mapping[str, int] | None = None, devices: Iterable | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all global devices, every process's);
    `cfg` None: MeshConfig(fsdp=-1), every device on the fsdp axis.

    Axes are Auto (GSPMD propagation). The device grid is `device_grid`'s: topology-aware on TPU/GPU
    (jax.experimental.mesh_utils), process then local order on CPU, with the dcn_* factors crossing
    slices (hosts) when they are set.
    """
    if cfg is None:
        cfg = MeshConfig(fsdp=-1)
    elif isinstance(cfg, Mapping):
        cfg = MeshConfig.from_dict(cfg)
    elif not isinstance(cfg, MeshConfig):
        raise TypeError(f"make_mesh takes a MeshConfig (MeshConfig(data=..., fsdp=..., tensor=...)), a mapping of "
                        f"its keys ({{'fsdp': 4, 'tensor': 2}}) or None, got {type(cfg).__name__} {cfg!r}")
    devices = list(jax.devices() if devices is None else devices)
    cfg = cfg.resolve(len(devices))
    return Mesh(device_grid(cfg, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(cfg: MeshConfig, devices: Iterable) -> np.ndarray:
    """The devices of a resolved `cfg` as an object array of shape cfg.shape (rows of data, fsdp, tensor).

    * dcn_data x dcn_fsdp > 1: mesh_utils.create_hybrid_device_mesh, one ICI block (cfg.ici_shape) per
      slice, or per process where the devices carry no several slices (GPU hosts); the slow network only
      carries the outer part of data / fsdp.
    * CPU: process order, then local order (the fastest-varying axes, tensor then fsdp, stay inside a
      process where they can); mesh_utils would give the same order, this keeps it explicit.
    * TPU / GPU: mesh_utils.create_device_mesh, which follows the physical torus (TPU) or XLA's global
      numbering (GPU). Devices of several TPU slices need the dcn_* factors.
    """
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    slices = {getattr(d, "slice_index", None) for d in devices}
    processes = {d.process_index for d in devices}
    dcn = math.prod(cfg.dcn_shape)
    if dcn > 1:
        if len(slices) == dcn and None not in slices:
            by_process = False
        elif len(processes) == dcn:
            by_process = True
        else:
            raise ShardingError(
                f"mesh dcn_data={cfg.dcn_data} x dcn_fsdp={cfg.dcn_fsdp} = {dcn}, but the devices span "
                f"{len(slices)} slice(s) and {len(processes)} process(es); the product must equal the number "
                f"of slices (TPU multislice) or of hosts/processes (GPU)")
        return _split_if_needed(cfg, devices, lambda **split: mesh_utils.create_hybrid_device_mesh(
            cfg.ici_shape, cfg.dcn_shape, devices, process_is_granule=by_process, **split))
    platform = devices[0].platform
    if platform == "cpu":
        return np.array(devices, dtype=object).reshape(cfg.shape)
    if platform == "tpu" and len(slices) > 1:
        raise ShardingError(
            f"the devices span {len(slices)} TPU slices: set mesh.dcn_data (or mesh.dcn_fsdp) so that "
            f"dcn_data x dcn_fsdp = {len(slices)}, e.g. dcn_data={len(slices)}")
    return _split_if_needed(cfg, devices, lambda **split: mesh_utils.create_device_mesh(cfg.shape, devices, **split))


def _split_if_needed(cfg: MeshConfig, devices: list, build) -> np.ndarray:
    """`build()`'s grid (one of mesh_utils' functions), or, for a shape that splits a physical axis of the
    chips' torus (a v5e-16's 4 x 4 as data 2 x fsdp 8), `build(allow_split_physical_axes=True)`'s with a
    warning: JAX refused such a shape with a message naming a setting fxjax has no key for. It runs, with a
    mesh axis spread over parts of several torus rings (slower collectives along it)."""
    try:
        return build()
    except NotImplementedError:
        _logger.warning("mesh %s splits a physical axis of the %s chips' torus (%s): built with JAX's "
                        "allow_split_physical_axes; a shape whose axes follow the torus is faster",
                        "x".join(map(str, cfg.shape)), devices[0].device_kind, _torus_shape(devices))
        return build(allow_split_physical_axes=True)


def _torus_shape(devices: list) -> str:
    """The chips' physical grid ("4x4x1"), from their coords (TPU devices carry them)."""
    coords = [getattr(d, "coords", None) for d in devices]
    if any(c is None for c in coords):
        return "no coordinates"
    return "x".join(str(len({c[i] for c in coords})) for i in range(len(coords[0])))


def axis_sizes(mesh: Mesh | Mapping[str, int] | MeshConfig) -> dict[str, int]:
    if isinstance(mesh, MeshConfig):
        return dict(zip(AXES, mesh.shape))
    if isinstance(mesh, Mapping):
        return {a: int(mesh.get(a, 1)) for a in AXES}
    return {a: int(mesh.shape[a]) if a in mesh.shape else 1 for a in AXES}


def use_mesh(mesh: Mesh | None):
    """Context manager making `mesh` the ambient mesh: the model then shards activations' batch over
    ("data", "fsdp") (see model.qwen2_5_vl), bare PartitionSpecs resolve against it and the Splash kernel
    runs per shard (model.attention.on_local_shards; a multi-chip program cannot hold it whole). None (one
    device): nothing changes."""
    return jax.sharding.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


# ---- placing host arrays --------------------------------------------------------------------------

def put(array, sharding: NamedSharding) -> jax.Array:
    """Host array -> global jax.Array; each process materialises only its addressable shards.

    Works with one process or many (each must pass the same global value). `array` is a numpy array or
    anything with a `shape` whose ``[index]`` gives that region as one (a tensor read from disk region by
    region, fxjax.hf_checkpoint.StoredTensor: a process then reads its shards only), each region read once
    however many of this process's devices hold it. Every shard is a copy, so no device buffer keeps the
    whole host tensor alive.
    """
    if isinstance(array, jax.Array) or not (hasattr(array, "shape") and hasattr(array, "__getitem__")):
        array = np.asarray(array)  # (a device array: to the host once, not a device op per region)
    regions: dict[tuple, np.ndarray] = {}

    def region(index: tuple) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)  # (slices are not hashable before Python 3.12)
        if key not in regions:
            regions[key] = np.asarray(array[index])
        return np.array(regions[key], copy=True)

    return jax.make_array_from_callback(tuple(array.shape), sharding, region)


# ---- activations ------------------------------------------------------------------------------------

def batch_spec(ndim: int = 1, batch_dim: int = 0) -> P:
    entries: list = [None] * ndim
    entries[batch_dim] = BATCH_AXES
    return P(*entries)


def batch_sharding(mesh: Mesh, ndim: int = 1, batch_dim: int = 0) -> NamedSharding:
    """Sharding of a [B, ...] activation: batch over ("data", "fsdp")."""
    return NamedSharding(mesh, batch_spec(ndim, batch_dim))


def batch_shards(mesh: Mesh | Mapping[str, int] | MeshConfig) -> int:
    """Into how many parts activations split the batch: the product of the BATCH_AXES sizes."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes[a] for a in BATCH_AXES)


def splits_batch(mesh: Mesh | Mapping[str, int] | MeshConfig, batch: int) -> bool:
    """Whether a batch of `batch` rows can shard over the batch axes (else it must be replicated)."""
    return batch % batch_shards(mesh) == 0


def require_batch_split(mesh: Mesh | Mapping[str, int] | MeshConfig, batch: int, name: str) -> None:
    """An error naming `name` when `batch` rows cannot shard over the mesh's batch devices (every device would
    process the whole batch)."""
    if not splits_batch(mesh, batch):
        n = batch_shards(mesh)
        raise ValueError(f"{name} {batch} does not divide over the {n} batch devices of the mesh "
                         f"{dict(axis_sizes(mesh))}: every device would decode the whole batch; use a multiple "
                         f"of {n} (e.g. {-(-batch // n) * n}) or a --mesh with fewer data x fsdp devices (--mesh data=1: one)")


def process_batch_shards(mesh: Mesh, process: int | None = None) -> tuple[int, ...]:
    """The batch shards (positions along the flattened ("data", "fsdp") axes, the order in which a
    [B, ...] array sharded over BATCH_AXES splits its rows) that `process`'s devices (default: this
    process's) hold, increasing. A process holds rows [s * B / S, (s + 1) * B / S) of each shard s."""
    process = jax.process_index() if process is None else int(process)
    names = list(mesh.axis_names)
    sizes = [mesh.shape[a] for a in BATCH_AXES]
    held = set()
    for position, device in np.ndenumerate(mesh.devices):
        if device.process_index == process:
            held.add(int(np.ravel_multi_index([position[names.index(a)] for a in BATCH_AXES], sizes)))
    return tuple(sorted(held))


def along_batch(mesh: Mesh, x, dim: int | None, split: bool = True) -> NamedSharding | None:
    """The sharding of array `x` whose batch (rows) is at `dim`: split over ("data", "fsdp"), or replicated
    (`dim` None, or `split` False); None for an absent field."""
    if x is None:
        return None
    return NamedSharding(mesh, batch_spec(np.ndim(x), dim) if split and dim is not None else REPLICATED)


def inputs_shardings(inputs, mesh: Mesh, *, batch_dim: int = 0, split: bool = True):
    """The NamedShardings of model.ModelInputs whose batch is at `batch_dim` (1 for a step's micro-batches
    [A, B, ...]): [.., B, ...] fields shard B over ("data", "fsdp"), position_ids [.., 3, B, L] theirs; vision
    prepared per batch shard (valid [.., S, P]) shards S the same way, one packed vision sequence (not a
    batch axis) is replicated; `split` False replicates everything. The one owner of that layout:
    `shard_inputs`, train.batching and GRPO's batches take it from here."""
    per_shard = inputs.vision is not None and np.ndim(inputs.vision.valid) == batch_dim + 2
    on = lambda x, dim: along_batch(mesh, x, dim, split)  # noqa: E731
    vision = None if inputs.vision is None else type(inputs.vision)(
        *(on(v, batch_dim if per_shard else None) for v in inputs.vision))
    return type(inputs)(input_ids=on(inputs.input_ids, batch_dim), attention_mask=on(inputs.attention_mask, batch_dim),
                        position_ids=on(inputs.position_ids, batch_dim + 1), rope_deltas=on(inputs.rope_deltas, batch_dim),
                        image_feature_index=on(inputs.image_feature_index, batch_dim), vision=vision)


def shard_inputs(inputs, mesh: Mesh):
    """model.ModelInputs (host arrays, the same on every process) -> global arrays on `mesh`.

    [B, ...] fields shard the batch over ("data", "fsdp"), position_ids [3, B, L] its second axis; vision
    prepared per batch shard (`model.prepare(..., batch_shards=batch_shards(mesh))`, fields [S, ...]) shards
    its shard axis the same way; one packed vision sequence (not a batch axis) is replicated. The batch
    must be divisible by data * fsdp (`splits_batch`).
    """
    batch = int(np.shape(inputs.input_ids)[0])
    if not splits_batch(mesh, batch):
        raise ShardingError(f"batch {batch} is not divisible by data x fsdp = {batch_shards(mesh)}")

    vision = inputs.vision
    if vision is not None and np.ndim(vision.valid) == 2 and np.shape(vision.valid)[0] != batch_shards(mesh):
        raise ShardingError(f"vision packed for {np.shape(vision.valid)[0]} batch shards, but data x fsdp = "
                            f"{batch_shards(mesh)}")
    return jax.tree.map(lambda x, sharding: put(np.asarray(x), sharding), inputs, inputs_shardings(inputs, mesh))


# ---- gathering and synchronising --------------------------------------------------------------------

def gather(value) -> np.ndarray:
    """One array -> its full host value, on every process (a collective when the array spans processes)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def barrier(name: str) -> None:
    """Wait for every process (no-op with one): host-side, through the coordination service's key-value store
    (`fxjax.host_exchange.allgather_json`), not a device collective, so that a process whose peer failed stops
    with `PeerFailed` naming it instead of waiting in the barrier until JAX's timeouts end the run. Every
    barrier orders host work (files one process writes and the others read)."""
    if jax.process_count() > 1:
        from fxjax.host_exchange import BARRIER_TIMEOUT_S, allgather_json

        allgather_json(f"barrier/{name}", None, timeout_s=BARRIER_TIMEOUT_S)
