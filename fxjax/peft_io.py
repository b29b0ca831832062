"""PEFT LoRA adapter directories <-> fxjax LoRA adapters.

A PEFT adapter is `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...) plus
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r], where <module> is the transformers module name of the version that saved it:
transformers >= 4.52 (what the installed peft writes) uses `model.visual.*`, `model.language_model.*`,
`lm_head`; older versions `visual.*`, `model.layers.*`, `lm_head`. Both load; an adapter saves back
with the naming, dtype and config it came with, so its keys and tensors round-trip bit for bit.
A LoRA on the patch embedding (PEFT's Conv3d LoRA: A [r, C, T, p, p], B [out, r, 1, 1, 1]) loads too.
With stacked layers (scan_layers) the per-layer tensors are stacked into, and sliced out of, the one
adapter of each stacked Linear; an adapter for only some of its layers (or with ranks differing between
them) is refused with a pointer to scan_layers=False.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from fxjax.export_record import OtherBaseWarning, other_base_note
from fxjax.file_modes import save_safetensors
from fxjax.device_mesh import barrier, gather
from fxjax.merged_lora import MergedLoRAError, refuse_merged_twice, refuse_stacked_adapter
from fxjax.model.hf_names import (CONV3D, HUB, TRANSFORMERS, conv3d_kernel_shape, layer_path, module_kind,
                                  module_name, unstack)
from fxjax.model.lora import (ALL_LINEAR, LoRAConfig, add_adapter, has_lora, linear_layers, linears, lora_linears,
                              pattern_key, remove_lora, stacked_layers, target_matches)
from fxjax.model.lora import apply_lora as _apply_lora
from fxjax.partition_rules import shard_model
from fxjax.safetensors_reading import dtype_name, open_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# the dtypes fxjax reads and writes safetensors in, by name (hf_checkpoint too)
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# adapter_config.json keys that change the weights or the forward pass in ways fxjax does not implement:
# any of them set (truthy) is an error rather than a silently different model.
_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "layers_pattern",
                "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora",
                "alora_invocation_tokens", "use_bdlora", "arrow_config")
# init_lora_weights values (besides true / false) that only set A and B, the base weights as they are
_PLAIN_INITS = ("gaussian", "orthogonal", "eva")
_AUTO_MAPPING = {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                 "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"}


class AdapterError(ValueError):
    """A PEFT adapter folder fxjax cannot load onto a model: no adapter_config.json or
    adapter_model.safetensors there, a PEFT option fxjax does not support (a peft_type other than LORA, a
    bias, DoRA and the like), tensors for modules the model lacks, or a model that has LoRA already."""


@dataclass(frozen=True)
class PeftSource:
    """Where a loaded adapter came from, so saving reproduces it (hashable: it is a graph static)."""

    directory: str
    raw_config_json: str
    naming: str  # "transformers" (>= 4.52 module names) or "hub" (< 4.52)
    dtype: str  # dtype of the tensors on disk
    lora_config: LoRAConfig  # what load recorded as model.lora_config

    @property
    def raw_config(self) -> dict[str, Any]:
        return json.loads(self.raw_config_json)


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise AdapterError(f"{directory}: not a directory (expected a PEFT adapter directory)")
    path = directory / ADAPTER_CONFIG
    if not path.exists():
        from fxjax.run_files import fxjax_folder_hint

        raise AdapterError(f"{path}: missing; a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
                           + fxjax_folder_hint(directory))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # (not JSON, or not UTF-8: UnicodeDecodeError came out raw)
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias {raw['bias']!r} is not supported (only 'none')")
    for key in _UNSUPPORTED:
        value = raw.get(key)  # set: anything but null, false or empty (0 is a layer index, not "unset")
        if value is not None and value is not False and value not in ([], {}, ""):
            hint = ("; a target_modules regex that names the layers selects the same modules, e.g. "
                    r"'.*\.layers\.(0|1)\.self_attn\.(q_proj|v_proj)'") if key in ("layers_to_transform",
                                                                                  "layers_pattern") else ""
            raise AdapterError(f"{path}: {key} = {raw[key]!r} is not supported by fxjax{hint}")
    if raw.get("fan_in_fan_out"):
        # (for GPT-2's transposed Conv1D weights; every module fxjax adapts is an nn.Linear, for which PEFT
        # sets it to False with this warning and loads the tensors as they are: so does fxjax)
        warnings.warn(f"{path}: fan_in_fan_out is set to True but the target modules are Linear layers; "
                      "loaded as False, as PEFT does", stacklevel=3)
    init = raw.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise AdapterError(f"{path}: init_lora_weights = {init!r} is not supported: PEFT rewrites the base weights "
                           "for it when it loads the adapter (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), which fxjax does "
                           "not; convert it to a plain LoRA adapter with PEFT's save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...)")
    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    for key in ("lora_alpha", "lora_dropout"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], (int, float))):
            raise AdapterError(f"{path}: {key} must be a number, got {raw[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(raw.get(key) or {}, dict):
            raise AdapterError(f"{path}: {key} must be an object, got {raw[key]!r}")
    return raw


def _read_tensors(directory: Path) -> tuple[dict[str, np.ndarray], str]:
    path = directory / ADAPTER_WEIGHTS
    if not path.exists():
        other = " (only safetensors adapters are supported; adapter_model.bin found)" if (
            directory / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: missing{other}")
    tensors, dtypes = {}, set()
    with open_safetensors(path, AdapterError) as f:
        for key in f.keys():
            dtypes.add(dtype_name(str(f.get_slice(key).get_dtype())))
            tensors[key] = f.get_tensor(key)
    if not tensors:
        raise AdapterError(f"{path}: holds no tensors")
    unsupported = dtypes - set(NP_DTYPES)
    if unsupported or len(dtypes) > 1:
        raise AdapterError(f"{path}: tensor dtypes {sorted(dtypes)}; expected one of {sorted(NP_DTYPES)} throughout")
    return tensors, dtypes.pop()


def _lora_shapes(model, path, rank: int, linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's lora_A / lora_B weight shapes for the Linear at `path` (Conv3d shapes for the patch embedding)."""
    if module_kind(path) == CONV3D:
        return (rank, *conv3d_kernel_shape(model.config.vision)), (linear.out_features, rank, 1, 1, 1)
    return (rank, linear.in_features), (linear.out_features, rank)


def load_peft_adapter(model, adapter_dir: str | Path, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Attach the LoRA adapter saved by PEFT in `adapter_dir` to a Qwen25VL without adapters.

    Returns the adapted module names as the adapter spells them. Records `model.lora_config` and
    `model.peft_source` (used by save_peft_adapter to write the adapter back as it came).
    """
    if next(linears(model), None) is None:
        raise AdapterError(f"load_peft_adapter needs a fxjax Qwen2.5-VL model (fxjax.from_pretrained), got "
                           f"{type(model).__name__}")
    directory = Path(adapter_dir)
    raw = _read_config(directory)
    source = getattr(model, "hf_source", None)
    if source is not None:  # (from the export records, before a weight is read)
        refuse_stacked_adapter(Path(source.directory), directory, f"the adapter {directory}")
        note = other_base_note(directory, source.directory)
        if note:  # (the shapes agree, or it would fail below: an adapter of another seed's model loaded mute)
            warnings.warn(note, OtherBaseWarning, stacklevel=3)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    tensors, disk_dtype = _read_tensors(directory)
    if has_lora(model):
        raise AdapterError(f"{directory}: the model already has LoRA adapters; call fxjax.remove_lora(model) first")

    # HF module name -> per-layer fxjax path (a stacked Linear has one per layer)
    by_name = {naming: {module_name(path, naming): path for path, _, _ in linear_layers(model)}
               for naming in (TRANSFORMERS, HUB)}
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{weights_file}: tensor {key!r} is not a '{_PREFIX}<module>.lora_A/lora_B.weight' LoRA weight "
                f"(DoRA magnitudes, LoRA biases and embedding adapters are not supported)")
        modules.setdefault(match["module"], {})[match["which"]] = key
    schemes = set()
    for module, keys in modules.items():
        found = {naming for naming, names in by_name.items() if module in names}
        if not found:
            key = next(iter(keys.values()))
            raise AdapterError(f"{weights_file}: tensor {key!r} is for module {module!r}, which is not a Linear "
                               f"layer of this Qwen2.5-VL (names look like "
                               f"{next(iter(by_name[TRANSFORMERS]))!r})")
        if len(found) == 1:
            schemes |= found
    if len(schemes) > 1:
        raise AdapterError(f"{weights_file}: mixes transformers >= 4.52 and < 4.52 module names")
    naming = schemes.pop() if schemes else TRANSFORMERS
    names = by_name[naming]

    targets, exclude = raw.get("target_modules"), raw.get("exclude_modules")
    for key, value in (("target_modules", targets), ("exclude_modules", exclude)):
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise AdapterError(f"{config_file}: {key} must be a regex string or a list of module names, got {value!r}")
    if targets is not None:
        try:
            selected = {n for n, p in names.items() if target_matches(n, targets, exclude, path=p)}
        except re.error as err:
            raise AdapterError(f"{config_file}: target_modules / exclude_modules is not a valid regex ({err})") from None
        extra = sorted(set(modules) - selected)
        if extra:
            raise AdapterError(f"{weights_file}: has tensors for {len(extra)} module(s) that target_modules in "
                               f"{config_file.name} does not select, e.g. {extra[:3]}")
        missing = sorted(selected - set(modules))
        if missing:
            raise AdapterError(f"{weights_file}: lacks tensors for {len(missing)} module(s) that target_modules in "
                               f"{config_file.name} selects, e.g. {missing[:3]}")
    # (after the targets: a tensor of a module target_modules does not select is named as that, not as a
    # module without its other factor)
    for module, keys in modules.items():
        for which in "AB":
            if which not in keys:
                raise AdapterError(f"{weights_file}: module {module!r} has no lora_{which}.weight")

    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    use_rslora, dropout = bool(raw.get("use_rslora", False)), float(raw.get("lora_dropout", 0.0))
    by_path = dict(linears(model))
    per_linear: dict[tuple, dict[int | None, tuple]] = {}  # Linear module path -> {layer index: tensors}
    for module, keys in modules.items():
        path = names[module]
        linear_path, index = (path, None) if path in by_path else unstack(path)
        linear = by_path[linear_path]
        rank_key, alpha_key = pattern_key(list(rank_pattern), module), pattern_key(list(alpha_pattern), module)
        rank = rank_pattern[rank_key] if rank_key is not None else r
        module_alpha = alpha_pattern[alpha_key] if alpha_key is not None else alpha
        want_a, want_b = _lora_shapes(model, path, rank, linear)
        where = f"rank_pattern[{rank_key!r}] = {rank}" if rank_key is not None else f"r = {rank}"
        for which, want in (("A", want_a), ("B", want_b)):
            got = tensors[keys[which]].shape
            if tuple(got) != want:
                raise AdapterError(f"{weights_file}: tensor {keys[which]!r} has shape {tuple(got)}, expected {want} "
                                   f"({where} in {config_file.name}, layer {linear.in_features} -> "
                                   f"{linear.out_features})")
        # fxjax layout: A [in, r], B [r, out]
        a = np.ascontiguousarray(tensors[keys["A"]].reshape(rank, -1).T)
        b = np.ascontiguousarray(tensors[keys["B"]].reshape(-1, rank).T)
        per_linear.setdefault(linear_path, {})[index] = (module, rank, module_alpha, a, b)
    plan = [_stack_plan(by_path[linear_path], linear_path, layers, weights_file)
            for linear_path, layers in per_linear.items()]

    rngs = rngs if rngs is not None else nnx.Rngs(0)
    for linear, count, rank, module_alpha, a, b in plan:
        adapter = add_adapter(linear, rank=rank, alpha=module_alpha, use_rslora=use_rslora, dropout=dropout,
                              rngs=rngs, layers=count)
        adapter.lora_a.set_value(jnp.asarray(a, jnp.float32))
        adapter.lora_b.set_value(jnp.asarray(b, jnp.float32))

    spec = targets if targets is not None else sorted(modules)
    lora_config = LoRAConfig(rank=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                             target_modules=spec, exclude_modules=exclude)
    model.lora_config = lora_config
    model.peft_source = PeftSource(str(directory), json.dumps(raw), naming, disk_dtype, lora_config)
    try:
        refuse_merged_twice(model, f"the adapter {directory}")
    except MergedLoRAError:  # the model as it was: without the refused adapter
        remove_lora(model)
        model.peft_source = None
        raise
    place_adapters(model)
    return list(modules)


def _stack_plan(linear, linear_path: tuple, layers: dict, weights_file: Path) -> tuple:
    """(Linear, stacked layer count or None, rank, alpha, A, B) for one Linear from its modules' tensors
    ({layer index (None: a per-layer Linear): (module, rank, alpha, A [in, r], B [r, out])}); a stacked
    Linear's factors are stacked in layer order."""
    count = stacked_layers(linear_path, linear)
    if count is None:
        (_, rank, alpha, a, b), = layers.values()
        return linear, None, rank, alpha, a, b
    name = module_name(layer_path(linear_path, 0)).replace(".0.", ".<i>.")
    if sorted(layers) != list(range(count)):
        raise AdapterError(f"{weights_file}: adapts layers {sorted(layers)} of {name}, whose {count} layers are "
                           f"stacked (scan_layers): an adapter for a stacked Linear covers all its layers; load the "
                           f"model with scan_layers=False")
    if len({(v[1], v[2]) for v in layers.values()}) > 1:
        raise AdapterError(f"{weights_file}: the layers of {name} have different LoRA ranks / alphas "
                           f"(rank_pattern / alpha_pattern), which stacked layers (scan_layers) cannot hold; load "
                           f"the model with scan_layers=False")
    _, rank, alpha, _, _ = layers[0]
    return (linear, count, rank, alpha, np.stack([layers[i][3] for i in range(count)]),
            np.stack([layers[i][4] for i in range(count)]))


def _fresh_config(model, adapters: list, names: list[str], naming: str) -> dict[str, Any]:
    """adapter_config.json for adapters made in fxjax (PEFT's LoraConfig fields that matter); `adapters[k]`
    serves the module `names[k]` (a stacked adapter is listed once per layer)."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if len({a.use_rslora for a in adapters}) > 1:
        raise AdapterError("cannot save adapters that mix rsLoRA and plain LoRA scaling in one PEFT config")
    r = cfg.rank if cfg else Counter(a.rank for a in adapters).most_common(1)[0][0]
    alpha = cfg.alpha if cfg else Counter(a.alpha for a in adapters).most_common(1)[0][0]
    rank_pattern = {re.escape(n): a.rank for n, a in zip(names, adapters) if a.rank != r}
    alpha_pattern = {re.escape(n): _number(a.alpha) for n, a in zip(names, adapters) if a.alpha != alpha}
    rates = {a.dropout.rate if a.dropout is not None else 0.0 for a in adapters}
    dropout = cfg.dropout if cfg else max(rates)
    if cfg is not None and naming == TRANSFORMERS and not (
            isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == ALL_LINEAR):
        # the spec as given: it was matched against these (transformers >= 4.52) names
        targets: Any = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        exclude = cfg.exclude_modules if isinstance(cfg.exclude_modules, (str, type(None))) else list(cfg.exclude_modules)
    else:  # the exact adapted set, unambiguous in any naming
        targets, exclude = sorted(names), None
    source = getattr(model, "hf_source", None)
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": _AUTO_MAPPING,
        # absolute: a relative path would name another folder from elsewhere (or read as a Hub id)
        "base_model_name_or_path": str(Path(source.directory).resolve()) if source is not None else None,
        "bias": "none",
        "exclude_modules": exclude,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _number(alpha),
        "lora_bias": False,
        "lora_dropout": dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": targets,
        "task_type": None,
        "use_dora": False,
        "use_rslora": adapters[0].use_rslora,
    }


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(model, out_dir: str | Path, *, naming: str | None = None, dtype: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory that
    `peft.PeftModel.from_pretrained(hf_model, out_dir)` loads.

    A loaded adapter is written back with its own naming and adapter_config.json (its base_model_name_or_path
    the base this model was loaded from), and in its own dtype while that holds the values exactly (an
    unchanged bfloat16 adapter stays bfloat16; one trained since loading is written in float32, so training
    is not rounded away); fxjax-made ones with the transformers >= 4.52 module names (what the installed peft
    writes) in float32.
    naming: "transformers" (model.language_model.*, model.visual.*) or "hub" (model.*, visual.*);
    dtype: "float32", "bfloat16" or "float16". Returns the directory.
    """
    items = list(lora_linears(model))
    if not items:
        raise AdapterError("the model has no LoRA adapters to save")
    source: PeftSource | None = getattr(model, "peft_source", None)
    if source is not None and getattr(model, "lora_config", None) != source.lora_config:
        source = None  # adapters replaced since loading
    naming = naming or (source.naming if source else TRANSFORMERS)
    if dtype is not None and dtype not in NP_DTYPES:
        raise AdapterError(f"cannot save adapters in dtype {dtype!r}; use one of {sorted(NP_DTYPES)}")
    if naming not in (HUB, TRANSFORMERS):
        raise AdapterError(f"naming {naming!r}: use {HUB!r} (the Hub's module names) or {TRANSFORMERS!r} "
                           f"(transformers >= 4.52's)")
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("model*.safetensors")):
        # (transformers loads an adapter_config.json it finds beside a model's config.json with the model)
        raise AdapterError(f"{out} holds an HF model (config.json and its weights): an adapter saved into it would "
                           "be loaded with that model by transformers from then on; give a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    tensors, names, adapters = {}, [], []
    for linear_path, linear in items:
        adapter = linear.lora
        count = stacked_layers(linear_path, linear)
        for index in [None] if count is None else range(count):
            path = linear_path if index is None else layer_path(linear_path, index)
            name = module_name(path, naming)
            # gather() is a collective for arrays spanning processes: every process runs it, one tensor at a
            # time (of a stacked adapter, one layer's slice, cut on the device).
            a, b = (adapter.lora_a[...], adapter.lora_b[...]) if index is None else (
                adapter.lora_a[...][index], adapter.lora_b[...][index])
            a = gather(a).astype(np.float32).T  # [r, in]
            b = gather(b).astype(np.float32).T  # [out, r]
            want_a, want_b = _lora_shapes(model, path, adapter.rank, linear)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(want_a))
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(want_b))
            names.append(name)
            adapters.append(adapter)
    if dtype is None:
        dtype = source.dtype if source is not None and _holds_exactly(tensors, source.dtype) else "float32"
    tensors = {k: v.astype(NP_DTYPES[dtype]) for k, v in tensors.items()}
    if jax.process_index() == 0:
        save_safetensors(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})  # mode 0644, not 0600
        config = source.raw_config if source is not None else _fresh_config(model, adapters, names, naming)
        base = getattr(model, "hf_source", None)
        if source is not None and base is not None and _is_local_path(config.get("base_model_name_or_path")):
            # the base it was loaded onto, which PEFT's Auto* classes load (a Hub id the adapter named is kept)
            config = dict(config, base_model_name_or_path=str(Path(base.directory).resolve()))
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    barrier("fxjax.save_peft_adapter")
    return out


def _is_local_path(name: Any) -> bool:
    """Whether an adapter's base_model_name_or_path names a local directory (absolute, relative, existing or
    gone) rather than a Hub id ("Qwen/Qwen2.5-VL-3B-Instruct": one '/', no such directory here)."""
    if not isinstance(name, str) or not name:
        return True  # none named: name ours
    return Path(name).is_absolute() or Path(name).exists() or name.startswith(".") or name.count("/") != 1


def _holds_exactly(tensors: dict, dtype: str) -> bool:
    """Whether every float32 tensor survives a round trip through `dtype` unchanged."""
    np_dtype = NP_DTYPES[dtype]
    return all(np.array_equal(v.astype(np_dtype).astype(np.float32), v) for v in tensors.values())


def place_adapters(model) -> None:
    """Put the model's LoRA adapters onto the mesh its weights are on (fxjax.partition_rules), so that a model
    loaded with `mesh=` keeps every variable there when adapters are attached afterwards."""
    kernel = next(linears(model))[1].kernel[...]
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, NamedSharding):  # loaded with mesh= (one device too: the specs are set)
        shard_model(model, sharding.mesh)


def apply_lora(model, cfg: LoRAConfig | None = None, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Attach fresh adapters (B = 0) to the Linears `cfg` targets (fxjax.model.lora.apply_lora), placed on the
    mesh of the model's weights. Returns the targeted HF module names."""
    if cfg is not None and not isinstance(cfg, LoRAConfig):  # (a dict failed deep inside: "no attribute 'selects'")
        raise TypeError(f"apply_lora(model, cfg): cfg is a LoRAConfig (fxjax.LoRAConfig(rank=..., alpha=...)), got "
                        f"{type(cfg).__name__}")
    names = _apply_lora(model, cfg, rngs=rngs)
    place_adapters(model)
    return names


def attach_lora(model, *, adapter: str | Path | None = None, lora: LoRAConfig | None = None, seed: int = 0) -> None:
    """from_pretrained's `adapter=` (a PEFT adapter directory) / `lora=` (fresh adapters) arguments."""
    if adapter is not None and lora is not None:
        raise ValueError("pass adapter= (load a PEFT adapter) or lora= (fresh adapters), not both")
    if adapter is not None:
        load_peft_adapter(model, adapter, rngs=nnx.Rngs(seed))
    elif lora is not None:
        if not isinstance(lora, LoRAConfig):
            raise TypeError(f"lora= takes a LoRAConfig (fxjax.LoRAConfig(rank=..., alpha=...)), got "
                            f"{type(lora).__name__}")
        apply_lora(model, lora, rngs=nnx.Rngs(seed))


__all__ = ["load_peft_adapter", "save_peft_adapter", "apply_lora", "attach_lora", "place_adapters", "AdapterError",
           "PeftSource",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "NP_DTYPES"]
