"""The one table of partition rules for Qwen2.5-VL parameters, and placing a model's variables by it.

Mesh axes are ("data", "fsdp", "tensor") (fxjax.device_mesh); any may have size 1.

* fsdp shards every large weight along its model ("embed") dimension: the hidden size of the decoder,
  the vision width, the merger's input, the patch row of the patch embedding. A device holds about
  1/fsdp of the base weights and XLA gathers each weight where it is used.
* tensor shards attention heads and MLP width Megatron-style: column-parallel kernels [in, out]
  (q/k/v, gate/up, vision qkv, merger fc1, patch embedding, lm_head) split `out`, row-parallel ones
  (o_proj, down_proj, vision attn.proj, merger fc2) split `in`; column-parallel biases follow `out`,
  the embedding splits its vocabulary. Norm scales and row-parallel biases are replicated.
* LoRA A [in, r] takes the spec of its base kernel's `in` dimension, B [r, out] that of `out`, plus
  "fsdp" where that entry lacks it (so every factor shards over fsdp); the rank dimension is replicated
  (it takes "fsdp" only where the shared dimension cannot).
* Stacked layers (layers under scan, TextConfig.scan_layers: 'decoder/layers/mlp/up_proj/kernel'
  [layers, in, out]) take their per-layer rule behind an unsharded leading layer axis; their LoRA factors
  likewise.

A dimension that its mesh axes do not divide is replicated instead (`replicated_dims` lists them), so
small test configs run on any mesh. A parameter no rule names is an error, never silently replicated.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fxjax.device_mesh import REPLICATED, MeshConfig, ShardingError, axis_sizes, put
from fxjax.model.hf_names import is_stacked, layer_path

COLUMN = P("fsdp", "tensor")  # kernel [in, out]: out split over heads / MLP width
ROW = P("tensor", "fsdp")  # kernel [in, out]: in split over heads / MLP width
COLUMN_BIAS = P("tensor")
# REPLICATED, P(): every device holds the whole array (fxjax.device_mesh)

_L = r"\d+"
# (regex over the '/'-joined parameter path, logical PartitionSpec); the first match wins.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    # language model
    (r"embed_tokens/embedding", P("tensor", "fsdp")),  # [vocab, hidden]: vocab-parallel
    (rf"decoder/layers/{_L}/self_attn/(q_proj|k_proj|v_proj)/kernel", COLUMN),
    (rf"decoder/layers/{_L}/self_attn/(q_proj|k_proj|v_proj)/bias", COLUMN_BIAS),
    (rf"decoder/layers/{_L}/self_attn/o_proj/kernel", ROW),
    (rf"decoder/layers/{_L}/mlp/(gate_proj|up_proj)/kernel", COLUMN),
    (rf"decoder/layers/{_L}/mlp/down_proj/kernel", ROW),
    (rf"decoder/layers/{_L}/(input_layernorm|post_attention_layernorm)/weight", REPLICATED),
    (r"decoder/norm/weight", REPLICATED),
    (r"lm_head/kernel", COLUMN),  # [hidden, vocab]
    # vision encoder
    (r"visual/patch_embed/kernel", COLUMN),  # [C*T*p*p, hidden]
    (rf"visual/blocks/{_L}/attn/qkv/kernel", COLUMN),
    (rf"visual/blocks/{_L}/attn/qkv/bias", COLUMN_BIAS),
    (rf"visual/blocks/{_L}/attn/proj/kernel", ROW),
    (rf"visual/blocks/{_L}/attn/proj/bias", REPLICATED),
    (rf"visual/blocks/{_L}/mlp/(gate_proj|up_proj)/kernel", COLUMN),
    (rf"visual/blocks/{_L}/mlp/(gate_proj|up_proj)/bias", COLUMN_BIAS),
    (rf"visual/blocks/{_L}/mlp/down_proj/kernel", ROW),
    (rf"visual/blocks/{_L}/mlp/down_proj/bias", REPLICATED),
    (rf"visual/blocks/{_L}/(norm1|norm2)/weight", REPLICATED),
    # merger
    (r"visual/merger/ln_q/weight", REPLICATED),
    (r"visual/merger/fc1/kernel", COLUMN),
    (r"visual/merger/fc1/bias", COLUMN_BIAS),
    (r"visual/merger/fc2/kernel", ROW),
    (r"visual/merger/fc2/bias", REPLICATED),
)
_COMPILED = tuple((re.compile(pattern), spec) for pattern, spec in PARTITION_RULES)
# A LoRA factor lives at <base Linear>/lora/lora_a|lora_b next to the base <base Linear>/kernel.
_LORA = re.compile(r"(.*)/lora/(lora_a|lora_b)")


# ---- partition specs --------------------------------------------------------------------------------

def path_str(path: Iterable) -> str:
    return "/".join(str(p) for p in path)


def per_layer_name(name: str) -> str | None:
    """A stacked-layer parameter's name -> the name of its layer 0, whose rule it follows behind the layer
    axis ('decoder/layers/mlp/up_proj/kernel' -> 'decoder/layers/0/mlp/up_proj/kernel'); None otherwise."""
    parts = tuple(int(p) if p.isdigit() else p for p in name.split("/"))
    return path_str(layer_path(parts, 0)) if is_stacked(parts) else None


def logical_spec(path: Iterable | str) -> P:
    """The rule's spec for a base parameter path (before divisibility). Raises for unknown paths."""
    name = path if isinstance(path, str) else path_str(path)
    layer = per_layer_name(name)
    if layer is not None:
        return P(None, *logical_spec(layer))
    for pattern, spec in _COMPILED:
        if pattern.fullmatch(name):
            return spec
    raise ShardingError(
        f"no partition rule for parameter {name!r}; add one to fxjax.partition_rules.PARTITION_RULES "
        f"(unknown parameters are not replicated silently)")


class ReplicatedDim(NamedTuple):
    """A dimension its rule wanted sharded, replicated because the mesh axes do not divide it."""

    path: str
    dim: int
    size: int
    axes: tuple[str, ...]
    axes_size: int


def _fit(spec: P, shape: tuple[int, ...], sizes: Mapping[str, int], name: str,
         dropped: list[ReplicatedDim] | None) -> P:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        raise ShardingError(f"{name}: rule {spec} has more entries than the parameter's shape {shape}")
    out = []
    for dim, (entry, size) in enumerate(zip(entries, shape)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n = math.prod(sizes[a] for a in axes)
        if axes and size % n:
            if dropped is not None:
                dropped.append(ReplicatedDim(name, dim, size, axes, n))
            entry = None
        out.append(entry)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_spec(path: Iterable | str, shape: tuple[int, ...], mesh: Mesh | Mapping[str, int] | MeshConfig,
               *, dropped: list[ReplicatedDim] | None = None) -> P:
    """The PartitionSpec of one parameter of `shape` on `mesh` (divisibility applied).

    LoRA factors (…/lora/lora_a [in, r], …/lora/lora_b [r, out]) take the entry of their base kernel
    (…/kernel [in, out]) for the dimension they share with it, with "fsdp" added when missing and the
    dimension divides (`_with_fsdp`); the rank dimension is replicated, or takes "fsdp" where the shared
    dimension cannot.
    """
    name = path if isinstance(path, str) else path_str(path)
    layer = per_layer_name(name)
    if layer is not None:  # stacked layers: one layer's spec behind the unsharded layer axis
        if not shape:
            raise ShardingError(f"{name}: a stacked-layer parameter needs a leading layer axis, got a scalar")
        inner: list[ReplicatedDim] = []
        spec = param_spec(layer, tuple(shape[1:]), mesh, dropped=inner)
        if dropped is not None:
            dropped.extend(d._replace(path=name, dim=d.dim + 1) for d in inner)
        return P(None, *spec) if len(spec) else P()
    sizes = axis_sizes(mesh)
    lora = _LORA.fullmatch(name)
    if lora is None:
        return _fit(logical_spec(name), tuple(shape), sizes, name, dropped)
    base_name, which = lora.group(1) + "/kernel", lora.group(2)
    if len(shape) != 2:
        raise ShardingError(f"{name}: a LoRA factor must be 2-D, got shape {tuple(shape)}")
    base = list(logical_spec(base_name)) + [None, None]
    dim = 0 if which == "lora_a" else 1
    entry = _with_fsdp(base[dim], shape[dim], sizes)
    rank = None
    if "fsdp" not in _axes(entry) and _with_fsdp(None, shape[1 - dim], sizes) == "fsdp":
        rank = "fsdp"  # the shared dimension cannot take fsdp (e.g. vision MLP 3420 over 8): the rank does
    spec = P(entry, rank) if which == "lora_a" else P(rank, entry)
    return _fit(spec, tuple(shape), sizes, name, dropped)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _with_fsdp(entry, size: int, sizes: Mapping[str, int]):
    """A LoRA factor's shared-dimension entry, with "fsdp" added (as the minor factor) when the base's entry
    lacks it and the dimension divides: FSDP stores every factor 1/fsdp per device (gathered where used),
    so LoRA parameters and their optimiser moments fall ~1/fsdp, not only the half whose base dimension
    is the fsdp one."""
    axes = _axes(entry)
    if "fsdp" in axes or sizes.get("fsdp", 1) == 1:
        return entry
    wider = axes + ("fsdp",)
    if size % math.prod(sizes[a] for a in wider):
        return entry
    return wider if len(wider) > 1 else "fsdp"


def state_spec(path: Iterable, shape: tuple[int, ...], mesh: Mesh | Mapping[str, int] | MeshConfig,
               *, is_param: bool = False) -> P:
    """Spec of any variable: a parameter by the rules; state that mirrors a parameter at the end of its
    path (optimizer moments: ('opt_state', 0, 'mu', 'decoder', ...)) like that parameter; else
    replicated. A Parameter (`is_param`) that no rule names is an error."""
    path = tuple(path)
    name = path_str(path)
    if is_param or _known(name):
        return param_spec(name, shape, mesh)
    for start in range(1, len(path)):
        suffix = path_str(path[start:])
        if _known(suffix):
            return param_spec(suffix, shape, mesh)
    return REPLICATED


def _known(name: str) -> bool:
    name = per_layer_name(name) or name
    lora = _LORA.fullmatch(name)
    name = lora.group(1) + "/kernel" if lora else name
    return any(pattern.fullmatch(name) for pattern, _ in _COMPILED)



def _flat(model_or_state) -> list[tuple[tuple, Any]]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return list(nnx.to_flat_state(state))


def _shape(value) -> tuple[int, ...]:
    value = value.get_value() if isinstance(value, nnx.Variable) else value
    return tuple(getattr(value, "shape", ()))


def _specs(model_or_state, mesh, dropped) -> list[tuple[tuple, P]]:
    out = []
    for path, variable in _flat(model_or_state):
        if isinstance(variable, nnx.Param):
            spec = param_spec(path, _shape(variable), mesh, dropped=dropped)
        else:  # RNG keys/counts and other non-parameter state: small, replicated
            spec = REPLICATED
        out.append((path, spec))
    return out


def partition_specs(model_or_state, mesh: Mesh | Mapping[str, int] | MeshConfig) -> nnx.State:
    """nnx.State of PartitionSpecs for every variable of a model (or its state); a tree prefix of it."""
    return nnx.from_flat_state(_specs(model_or_state, mesh, None))


def param_shardings(model_or_state, mesh: Mesh) -> nnx.State:
    """nnx.State of NamedShardings, usable as jit in/out_shardings and device_put target for the state."""
    return nnx.from_flat_state([(p, NamedSharding(mesh, s)) for p, s in _specs(model_or_state, mesh, None)])


def replicated_dims(model_or_state, mesh: Mesh | Mapping[str, int] | MeshConfig) -> list[ReplicatedDim]:
    """Dimensions a rule wanted sharded but the mesh does not divide (they are replicated)."""
    dropped: list[ReplicatedDim] = []
    _specs(model_or_state, mesh, dropped)
    return dropped


class UnsplitParametersWarning(UserWarning):
    """A mesh leaves parameters whole on every device (`warn_unsplit`)."""


def unsplit_message(model, mesh) -> str | None:
    """What to say when the mesh does not divide dimensions the rules shard, so each device holds those
    parameters whole (memory the mesh was meant to save); None when it divides them all."""
    dropped = replicated_dims(model, mesh)
    if not dropped:
        return None
    return f"the mesh {axis_sizes(mesh)} leaves parameters unsplit: {replicated_summary(dropped)}"


def split_heads_message(config, mesh) -> str | None:
    """What to say when mesh.tensor does not divide the attention heads (`config`: the model's Qwen25VLConfig):
    q/k/v split their outputs over "tensor", so a head's features then sit on several devices, and the
    attention over the KV cache (sampling, decoding) replicates them at every step (XLA warns "Involuntary
    full rematerialization"): right numbers, wasted work. The 3B's 2 key/value heads take tensor 1 or 2."""
    tensor = axis_sizes(mesh).get("tensor", 1)
    heads = {"the decoder's {} key/value heads": config.text.num_key_value_heads,
             "the decoder's {} attention heads": config.text.num_attention_heads,
             "the vision encoder's {} heads": config.vision.num_heads}
    split = [what.format(n) for what, n in heads.items() if n % tensor]
    if tensor == 1 or not split:
        return None
    fits = [t for t in range(tensor - 1, 0, -1) if all(n % t == 0 for n in heads.values())][0]
    return (f"mesh.tensor={tensor} does not divide {' or '.join(split)}, so heads are split across devices and "
            f"attention over the KV cache copies them whole to every device each step (right numbers, slower); "
            f"mesh.tensor={fits} keeps every head whole (the other devices on fsdp or data)")


def warn_unsplit(model, mesh, stacklevel: int = 2) -> None:
    """`unsplit_message` as a warning (UnsplitParametersWarning): the Python API's (a run prints it)."""
    import warnings

    message = unsplit_message(model, mesh)
    if message:
        warnings.warn(message, UnsplitParametersWarning, stacklevel=stacklevel + 1)


def replicated_summary(dropped: Sequence[ReplicatedDim]) -> str:
    """One line for `replicated_dims`' result, grouped by (size, axes): what a run warns about, since each
    device then holds those parameters whole ("" when nothing is replicated)."""
    groups: dict[tuple[int, tuple[str, ...], int], list[str]] = {}
    for d in dropped:
        groups.setdefault((d.size, d.axes, d.axes_size), []).append(d.path)
    parts = [f"{len(paths)} parameter(s) of dim {size} not divisible by {' x '.join(axes)} = {n} (e.g. {paths[0]})"
             for (size, axes, n), paths in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    return "; ".join(parts)


# ---- placing parameters -----------------------------------------------------------------------------

def placer(mesh: Mesh) -> Callable[[tuple, np.ndarray], jax.Array]:
    """A `place(path, array)` callback for hf_checkpoint.load_weights: each tensor straight to its shards."""
    def place(path: tuple, array: np.ndarray) -> jax.Array:
        return put(array, NamedSharding(mesh, param_spec(path, array.shape, mesh)))
    return place


def _move(value, sharding: NamedSharding):
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        # Typed PRNG keys (LoRA dropout streams) have no numpy form: move their raw key data.
        impl = jax.random.key_impl(value)
        return jax.random.wrap_key_data(_move(jax.random.key_data(value), sharding), impl=impl)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.jit(lambda x: x, out_shardings=sharding)(value)
    return put(np.asarray(jax.device_get(value)), sharding)


def shard_model(model, mesh: Mesh):
    """Move every variable of a model (or an nnx.State of it) onto `mesh` by the rules, in place, one
    variable at a time: parameters by PARTITION_RULES, everything else (RNG keys and counts) replicated.
    Variables already on their sharding are left alone."""
    for (path, spec), (_, variable) in zip(_specs(model, mesh, None), _flat(model)):
        variable.set_value(_move(variable.get_value(), NamedSharding(mesh, spec)))
    return model


def compile_sharded_init(build: Callable[[], Any], mesh: Mesh):
    """(graphdef, compiled init) for `build()` (which constructs an nnx.Module) with the rules as
    out_shardings; `compiled.memory_analysis()` gives the per-device bytes before anything is allocated."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))

    def init():
        return nnx.split(build())[1]

    return graphdef, jax.jit(init, out_shardings=param_shardings(abstract_state, mesh)).lower().compile()


def init_sharded(build: Callable[[], Any], mesh: Mesh):
    """Run `build()` under jit with every variable born on its shards (no device holds it whole)."""
    graphdef, compiled = compile_sharded_init(build, mesh)
    return nnx.merge(graphdef, compiled())


# ---- accounting -------------------------------------------------------------------------------------

def device_bytes(model_or_state, filter=nnx.Param) -> dict[Any, int]:
    """Live buffer accounting: bytes of the filtered variables held on each addressable device."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, filter)
    totals: dict[Any, int] = {}
    for _, variable in nnx.to_flat_state(state):
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        for shard in value.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def shard_bytes(model_or_state, mesh: Mesh | Mapping[str, int] | MeshConfig, filter=nnx.Param) -> int:
    """Largest per-device bytes of the filtered variables from shapes and specs alone (abstract models)."""
    sizes = axis_sizes(mesh)
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, filter)
    total = 0
    flat = dict(_flat(state))
    for path, spec in _specs(state, sizes, None):
        value = flat[path].get_value() if isinstance(flat[path], nnx.Variable) else flat[path]
        shape = list(value.shape)
        for dim, entry in enumerate(spec):
            if entry is not None:
                axes = (entry,) if isinstance(entry, str) else entry
                shape[dim] //= math.prod(sizes[a] for a in axes)
        total += math.prod(shape) * np.dtype(value.dtype).itemsize
    return total
