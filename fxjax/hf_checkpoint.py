"""Stream HF Qwen2.5-VL safetensors checkpoints into an fxjax model (writing them back: fxjax.hf_save).

Loading builds the model abstractly (no random init), then takes one tensor at a time and puts it on its
device(s), each process reading from the file only the regions its own devices hold, converted to fxjax's
layout and the target dtype (`StoredTensor`), so host memory stays near the model plus the largest tensor
and a host of a pod reads its share of the checkpoint. Export gathers one tensor at a time.

Layers under scan (scan_layers=True) hold each parameter of all layers in one array [layers, ...]: the
per-layer HF tensors stream into their slice of it (an in-place, donated update on the device) and back
out of it one slice at a time, so neither direction holds more than one HF tensor on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.hf_config import CheckpointError, load_config
from fxjax.peft_io import attach_lora
from fxjax.safetensors_reading import open_safetensors, stored_dtypes_by_name
from fxjax.device_mesh import require_fxjax_mesh
from fxjax.partition_rules import placer, warn_unsplit
from fxjax.model import Qwen25VL, Qwen25VLConfig
from fxjax.model.hf_names import (HUB, TRANSFORMERS, hf_name, is_ignored, is_stacked, layer_path, naming_of,
                                  param_path, to_fxjax, unstack)
from fxjax.model.generate import GenerationDefaults
from fxjax.model.lora import BASE_PARAMS, LoRAConfig
from fxjax.model.qwen2_5_vl import as_dtype

logger = logging.getLogger(__name__)

_EMBED, _HEAD = ("embed_tokens", "embedding"), ("lm_head", "kernel")  # fxjax paths of the input and output heads


@dataclass(frozen=True)
class HFSource:
    """Where a model came from, so export can reproduce it exactly."""

    directory: str
    # config.json as read, kept as JSON text: the model's graph statics (this object included) must be
    # hashable, or nnx.split(model)'s GraphDef cannot be a jit static argument.
    raw_config_json: str
    naming: str  # "hub" or "transformers"
    dtype: str  # dtype of the tensors on disk

    @property
    def raw_config(self) -> dict[str, Any]:
        return json.loads(self.raw_config_json)


def weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or a single model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files, got "
                                  f"{type(weight_map).__name__}")
        for file in set(weight_map.values()):  # (a downloaded index naming /elsewhere/x.safetensors or ../x)
            if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
                raise CheckpointError(f"{index}: names shard {file!r}, not a file name in {directory}: the shards "
                                      f"of a checkpoint lie in its own folder")
        files = {name: directory / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.exists():
                raise CheckpointError(f"{index}: names shard {file.name}, which does not exist")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        with open_safetensors(single, CheckpointError) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(files: dict[str, Path]) -> Iterator[tuple[str, Path, np.ndarray]]:
    """(name, file, tensor) one at a time, file by file.

    The file is reopened per tensor: a mapping kept open over a whole file leaves every tensor read so
    far resident as file-backed pages, so peak RSS grew by a whole file (bench/load_memory.py).
    """
    for name, file in _file_by_file(files):
        # No local keeps the tensor: the consumer's `del` must be able to free it.
        yield name, file, read_tensor(file, name)


def _file_by_file(files: dict[str, Path]) -> Iterator[tuple[str, Path]]:
    """(name, file) of `files`, the names of one file together."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        for name in names:
            yield name, file


def read_tensor(file: Path, name: str) -> np.ndarray:
    with open_safetensors(file, CheckpointError) as f:
        return f.get_tensor(name)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a safetensors file as the fxjax parameter at `path` holds it (`to_fxjax`'s layout, in
    `dtype`), read region by region: ``[index]`` reads only the rows and columns of the file that the region
    needs (safetensors' ``get_slice``), and ``np.asarray`` reads it whole. `device_mesh.put` asks each process
    for its own devices' regions, so a host of a pod reads its shards of a checkpoint, not every tensor whole
    (64 hosts each read all 146 GB of a 72B checkpoint through gcsfuse before)."""

    file: Path
    name: str
    path: tuple
    hf_shape: tuple[int, ...]
    dtype: Any = None  # None: as stored

    @classmethod
    def open(cls, file: Path, name: str, path: tuple) -> StoredTensor:
        """The tensor `name` of `file` (its header read for the shape; no data), in its stored dtype."""
        with open_safetensors(file, CheckpointError) as f:
            shape = tuple(f.get_slice(name).get_shape())
        return cls(file, name, path, shape)

    def astype(self, dtype) -> StoredTensor:
        return dataclasses.replace(self, dtype=np.dtype(dtype))

    @property
    def _transposed(self) -> bool:  # a Linear's [out, in] weight, read transposed region by region
        return self.path[-1] == "kernel" and len(self.hf_shape) == 2

    @property
    def shape(self) -> tuple[int, ...]:
        if self.path[-1] != "kernel":
            return self.hf_shape
        return math.prod(self.hf_shape[1:]), self.hf_shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if self._transposed:
            rows, cols = (*index, slice(None), slice(None))[:2]
            region = self._read((cols, rows)).T
        elif self.path[-1] == "kernel":  # (the patch embedding's Conv3d: small, read whole once, flattened)
            region = self._flattened[index]
        else:
            region = self._read(index)
        region = np.ascontiguousarray(region)
        return region if self.dtype is None else region.astype(self.dtype, copy=False)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[tuple(slice(None) for _ in self.shape)]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    @functools.cached_property
    def _flattened(self) -> np.ndarray:
        return to_fxjax(self._read(tuple(slice(None) for _ in self.hf_shape)), self.path)

    def _read(self, index: tuple) -> np.ndarray:
        """The region `index` of the tensor as stored."""
        with open_safetensors(self.file, CheckpointError) as f:
            return f.get_slice(self.name)[index]


def abstract_model(cfg: Qwen25VLConfig, dtype, param_dtype) -> Qwen25VL:
    return nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def per_layer_paths(path: tuple, shape: tuple[int, ...]) -> list[tuple]:
    """The per-layer parameter paths (HF tensors) a parameter holds: itself, or each layer of a stacked one."""
    return [layer_path(path, i) for i in range(shape[0])] if is_stacked(path) else [path]


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding):
    """jit of `stacked.at[index].set(layer)` that donates `stacked`: the update happens in place, so filling
    a stacked parameter never holds two copies of it."""
    def write(stacked, layer, index):
        return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _stacked_sharding(layer: jax.Array):
    """The sharding of a stacked parameter whose layers are placed like `layer`: the layer axis unsharded."""
    sharding = layer.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):  # replicated stays P() (the partition rules' spec)
        spec = jax.sharding.PartitionSpec(None, *sharding.spec) if len(sharding.spec) else jax.sharding.PartitionSpec()
        return jax.sharding.NamedSharding(sharding.mesh, spec)
    return sharding


def write_layer(stacked, layer: jax.Array, index: int, shape: tuple[int, ...]) -> jax.Array:
    """`stacked` (a jax.Array [layers, ...], or an abstract value: a zero array is made first) with slice
    `index` replaced by `layer`."""
    sharding = _stacked_sharding(layer)
    if not isinstance(stacked, jax.Array):
        stacked = jax.jit(lambda: jnp.zeros(shape, layer.dtype), out_shardings=sharding)()
    return _layer_writer(sharding)(stacked, layer, np.int32(index))


def load_weights(model: Qwen25VL, files: dict[str, Path],
                 place: Callable[[tuple, np.ndarray], jax.Array] | None = None) -> str:
    """Fill the Params of an (abstract) model from HF tensors; returns the naming scheme seen. A tensor of
    layer i of stacked layers (scan_layers) fills slice i of its stacked parameter."""
    params = dict(nnx.to_flat_state(nnx.state(model, BASE_PARAMS)))
    loaded: dict[tuple, str] = {}  # fxjax path -> the tensor that filled it
    naming = HUB
    place = place or (lambda path, tensor: jax.device_put(np.asarray(tensor)))
    for name, file in _file_by_file(files):
        if is_ignored(name):
            continue
        if naming_of(name) == TRANSFORMERS:
            naming = TRANSFORMERS
        path = param_path(name)
        if path == _HEAD and model.config.tie_word_embeddings:
            continue  # tied: a stored copy equal to the embeddings (from_pretrained unties a distinct one)
        tensor = StoredTensor.open(file, name, path)  # (a tensor the index names but its file lacks: said here)
        # A per-layer tensor of stacked layers fills slice `index` of the stacked parameter `target`.
        target, index = (path, None) if path is None or path in params else unstack(path)
        if target not in params:
            raise CheckpointError(f"{file}: tensor {name!r} does not belong to this Qwen2.5-VL config"
                                  + _beyond_the_layers(params, target, index))
        if path in loaded:  # (both namings of one weight, e.g. model.embed_tokens and model.language_model.*)
            raise CheckpointError(f"{file}: tensor {name!r} is the weight {loaded[path]!r} holds too: a checkpoint "
                                  "holds each weight once (which of the two to load is unknown)")
        variable = params[target]
        want = tuple(variable.shape) if index is None else tuple(variable.shape[1:])
        if index is not None and index >= variable.shape[0]:
            raise CheckpointError(f"{file}: tensor {name!r} is for layer {index}, but this config has "
                                  f"{variable.shape[0]} layers ({_depth_key(target)} in config.json)")
        tensor = tensor.astype(variable.dtype)
        if tensor.shape != want:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tensor.hf_shape}, expected "
                                  f"{_hf_shape(want, path)} for this config")
        placed = place(path, tensor)  # the per-layer path: its rule and shape decide the sharding
        if index is None:
            variable.set_value(placed)
        else:
            variable.set_value(write_layer(variable.get_value(), placed, index, tuple(variable.shape)))
            del placed
        loaded[path] = name
    missing = [hf_name(p) for target, variable in params.items()
               for p in per_layer_paths(target, tuple(variable.shape)) if p not in loaded]
    if missing:
        where = ", ".join(sorted({str(file.parent) for file in files.values()})) or "checkpoint"
        raise CheckpointError(f"{where}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    return naming


def _beyond_the_layers(params: dict, stacked: tuple, index: int | None) -> str:
    """For a tensor of layer `index` of per-layer (unstacked) layers past the config's last one: ": it is for
    layer i, but this config has n" (a checkpoint of a deeper model, or a config.json whose depth was cut)."""
    if index is None:
        return ""
    layers = {i for path in params for stack, i in [unstack(path)] if stack[:2] == stacked[:2] and i is not None}
    if not layers or index in layers:
        return ""
    return f": it is for layer {index}, but this config has {len(layers)} layers ({_depth_key(stacked)} in config.json)"


def _depth_key(stacked: tuple) -> str:
    return "num_hidden_layers" if stacked[0] == "decoder" else "vision_config.depth"


def _hf_shape(shape, path) -> tuple[int, ...]:
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def _header_dtypes(files: dict[str, Path]) -> set[str]:
    """The dtypes of the named tensors (safetensors headers only, nothing read)."""
    return set(stored_dtypes_by_name(files, CheckpointError).values())


def disk_dtype(files: dict[str, Path], found: set[str] | None = None) -> str:
    """The dtype export writes by default: the checkpoint's, or float32 for one of mixed dtypes (float32
    norms beside bfloat16 weights, say), which holds all of them. `found`: the tensors' dtypes, if read."""
    found = set(_header_dtypes(files) if found is None else found)
    return found.pop() if len(found) == 1 else "float32"


def stored_dtypes(directory: str | Path) -> set[str]:
    """The dtypes of the tensors `from_pretrained` loads from the checkpoint in `directory` (safetensors
    headers only, nothing read; buffers it ignores and a tied model's stored lm_head left out)."""
    tied = load_config(Path(directory))[0].tie_word_embeddings
    return _header_dtypes({name: file for name, file in weight_files(Path(directory)).items()
                           if not (is_ignored(name) or (tied and param_path(name) == _HEAD))})


def exact_param_dtype(directory: str | Path) -> str:
    """The smaller storage dtype that holds every weight of the checkpoint in `directory` exactly: bfloat16
    when all of them are bfloat16 on disk (as Qwen2.5-VL's are), float32 otherwise (float16 does not fit
    in bfloat16)."""
    return "bfloat16" if stored_dtypes(directory) == {"bfloat16"} else "float32"


def _stored_head_differs(files: dict[str, Path]) -> bool:
    """Whether the checkpoint stores an lm_head.weight unequal to its embeddings (transformers 5 then
    leaves a tied config untied; 4.x tied them all the same)."""
    names = {param_path(name): name for name in files if param_path(name) in (_EMBED, _HEAD)}
    if len(names) < 2:
        return False
    head, embed = (read_tensor(files[names[p]], names[p]) for p in (_HEAD, _EMBED))
    return head.shape != embed.shape or not np.array_equal(head, embed)


def config_as_loaded(directory: Path) -> tuple[Qwen25VLConfig, dict, dict[str, Path], bool]:
    """(the config `from_pretrained` builds the model of, config.json as read, the weight files, whether a
    tied config was untied because the checkpoint stores an lm_head.weight unequal to the embeddings)."""
    cfg, raw = load_config(directory)
    files = weight_files(directory)
    untied = cfg.tie_word_embeddings and _stored_head_differs(files)
    return (dataclasses.replace(cfg, tie_word_embeddings=False) if untied else cfg), raw, files, untied


def from_pretrained(path: str | Path, dtype: str = "float32", param_dtype: str | None = None,
                    *, mesh: jax.sharding.Mesh | None = None, adapter: str | Path | None = None,
                    lora: LoRAConfig | None = None, lora_seed: int = 0, scan_layers: bool = False) -> Qwen25VL:
    """Load an HF Qwen2.5-VL checkpoint directory. `dtype` is the compute dtype; weights are stored
    in `param_dtype` (default: the same). With `mesh` (fxjax.device_mesh.make_mesh), each tensor goes
    straight onto its shards as it streams in (fxjax.partition_rules.PARTITION_RULES); with several processes
    each materialises only its addressable shards.
    `adapter` loads a PEFT LoRA adapter directory (fxjax.peft_io); `lora` attaches fresh adapters
    (model.lora.LoRAConfig, B = 0, A drawn from `lora_seed`). `scan_layers` stacks the decoder layers
    and the vision blocks and runs them under scan (model.config.TextConfig.scan_layers); the checkpoint is the
    same either way."""
    require_fxjax_mesh(mesh)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"from_pretrained(path, ...): path is a checkpoint directory (str or Path), got "
                        f"{type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        hub_id = len(Path(path).parts) == 2 and not str(path).startswith((".", "/", "~"))
        raise CheckpointError(f"{directory}: not a directory" + (
            " (a Hub id? fxjax reads local directories only: download it first, e.g. "
            "huggingface_hub.snapshot_download, and pass that path)" if hub_id else ""))
    cfg, raw, files, untied = config_as_loaded(directory)
    cfg = cfg.with_scan_layers(scan_layers)
    if untied:
        logger.warning("%s: config.json ties the output head to the embeddings, but the checkpoint stores an "
                       "lm_head.weight that differs from them: loaded untied, as transformers 5 does", directory)
    model = abstract_model(cfg, as_dtype(dtype), as_dtype(param_dtype or dtype))
    naming = load_weights(model, files, placer(mesh) if mesh is not None else None)
    model.hf_source = HFSource(str(directory), json.dumps(raw), naming, disk_dtype(files))
    model.generation_defaults = generation_defaults(str(directory))  # model.generate stops where HF generate does
    if adapter is not None or lora is not None:
        # placed on the mesh (A/B take their base kernel's dims); an adapter merged into `path` is refused
        attach_lora(model, adapter=adapter, lora=lora, seed=lora_seed)
    if mesh is not None:
        warn_unsplit(model, mesh)
    return model


def stop_token_ids(model: Qwen25VL, im_end: int) -> tuple[int, ...]:
    """The tokens a completion ends at: <|im_end|> (where a chat answer ends) and the `eos_token_id` of
    the generation_config.json in the directory the model was loaded from, the list HF generate and
    TRL's GRPO stop at (Qwen2.5-VL-Instruct's: <|im_end|> and <|endoftext|>). A model built otherwise (a
    preset, random weights) stops at <|im_end|> only."""
    source: HFSource | None = getattr(model, "hf_source", None)
    extra = (generation_defaults(source.directory).eos_token_ids or ()) if source is not None else ()
    return tuple(dict.fromkeys((int(im_end), *extra)))


def generation_defaults(directory: str) -> GenerationDefaults:
    """The stop and pad tokens of a checkpoint's generation_config.json, which HF generate uses over
    config.json's (None where a key, or the file itself, is missing). `from_pretrained` keeps them on
    the model (`model.generation_defaults`) for model.generate's defaults."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    try:
        raw = json.loads(path.read_text())
        value, pad = raw.get("eos_token_id"), raw.get("pad_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a JSON object ({e})") from e
    values = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)):
        raise CheckpointError(f"{path}: pad_token_id must be a token id, got {pad!r}")
    return GenerationDefaults(tuple(values) if value is not None else None, pad)
