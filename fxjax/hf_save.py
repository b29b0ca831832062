"""Write an fxjax model as an HF Qwen2.5-VL checkpoint directory (reading one: fxjax.hf_checkpoint).

One tensor at a time is gathered (a collective across processes), its enabled LoRA merged in, converted
to HF layout and names, and written by process 0 into safetensors shards with their index, beside
config.json, generation_config.json and the tokenizer and processor files of the directory the model was
loaded from. Layers under scan come out one slice at a time.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.device_mesh import barrier, gather
from fxjax.file_modes import make_readable, save_safetensors
from fxjax.hf_checkpoint import HFSource, disk_dtype, per_layer_paths, read_tensor, weight_files
from fxjax.hf_config import CheckpointError, config_to_hub_dict
from fxjax.merged_lora import merge_record, merged_fingerprints, write_merged_record
from fxjax.model import Qwen25VL, Qwen25VLConfig
from fxjax.model.hf_names import HUB, hf_name, is_stacked, to_fxjax, to_hf, unstack
from fxjax.model.lora import BASE_PARAMS, lora_linears, merge_lora
from fxjax.peft_io import NP_DTYPES
from fxjax.rewards.output_format import FORMAT_MARKERS
from fxjax.safetensors_reading import stored_dtypes_by_name

__all__ = ["hf_tensors", "save_pretrained", "write_checkpoint"]

logger = logging.getLogger(__name__)

# Files a checkpoint directory carries besides weights and config: copied on export so the output serves.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
               "chat_template.jinja", "video_preprocessor_config.json")

def hf_tensors(model: Qwen25VL, naming: str = HUB, base_files: dict[str, tuple[Path, str]] | None = None
               ) -> Iterator[tuple[str, int, Callable[[], np.ndarray | None]]]:
    """(HF name, its number of elements, thunk giving the host tensor) for each parameter (each layer of a
    stacked one); a thunk gathers one tensor. Processes other than 0 only join the gathers (their thunks
    return None: process 0 writes; the merge and the conversion would be done for nothing on every other
    host of a pod). `base_files` (HF name -> (file, stored dtype)): a tensor the model holds rounded (in a
    narrower dtype than stored) is read from its file instead, by process 0."""
    # Enabled LoRA adapters are merged into their kernels (W + scaling * A @ B); the model is not changed.
    adapters = {path: linear.lora for path, linear in lora_linears(model) if linear.lora.enabled}

    def layer(value, index):  # slicing on the device first: only one layer comes to the host
        return value if index is None else value[index]

    for path, variable in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):
        adapter = adapters.get(path[:-1]) if path[-1] == "kernel" else None
        for layer_param in per_layer_paths(path, tuple(variable.shape)):
            index = unstack(layer_param)[1] if is_stacked(path) else None
            name = hf_name(layer_param, naming)
            held = jnp.dtype(variable.dtype).name
            file, stored = (base_files or {}).get(name, (None, held))
            if stored == held or held == "float32":  # held as stored, or losslessly widened
                file = None  # (the same on every process: the gathers stay in step)

            def thunk(variable=variable, path=layer_param, adapter=adapter, index=index, name=name,
                      file=file) -> np.ndarray | None:
                main = jax.process_index() == 0
                if file is None:
                    array = gather(layer(variable[...], index))  # a collective across processes
                else:
                    array = to_fxjax(read_tensor(file, name), path) if main else None
                if adapter is not None:
                    a, b = gather(layer(adapter.lora_a[...], index)), gather(layer(adapter.lora_b[...], index))
                    array = merge_lora(array, a, b, adapter.scaling) if main else None
                return to_hf(array, path, model.config.vision) if main else None

            elements = math.prod(variable.shape[1:] if index is not None else variable.shape)
            yield name, elements, thunk


def save_pretrained(model: Qwen25VL, out_dir: str | Path, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write an HF checkpoint directory: config.json, generation_config.json and safetensors shards of at
    most `max_shard_bytes` with their index; returns `out_dir`.

    Enabled LoRA adapters are merged into their kernels (W + scaling * A @ B in float32; the model itself is
    not changed) and recorded in fxjax_merged_lora.json (fxjax.merged_lora), so the same adapter cannot be
    loaded on top of the result. The tokenizer and processor files of the directory the model was loaded
    from are copied along. dtype defaults to the dtype the checkpoint had on disk (or the parameter dtype for
    a model not loaded from HF), so HF -> fxjax -> HF reproduces every tensor bit for bit; a tensor the model
    holds rounded (a bfloat16 model of a float32 checkpoint) is read from the checkpoint's file as stored,
    so the merge is PEFT's merge_and_unload of that checkpoint.
    A warning when merged LoRA goes out beside a tokenizer that lacks the six output-format markers (a Hub
    base model's): `fxjax.train.export.save_merged` writes the run's tokenizer instead.
    """
    return write_checkpoint(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, say_tokenizer=True)


def write_checkpoint(model: Qwen25VL, out_dir: str | Path, *, dtype: str | None = None,
                     max_shard_bytes: int = 5 * 1024**3, say_tokenizer: bool = False) -> Path:
    """`save_pretrained`'s writing, without its tokenizer warning unless `say_tokenizer` (save_merged writes
    the run's tokenizer after it)."""
    if not isinstance(model, Qwen25VL):  # (save_pretrained(out, model) said "'str' object has no attribute")
        raise TypeError(f"save_pretrained(model, out_dir): the first argument is the model (fxjax.from_pretrained), "
                        f"got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, (int, np.integer)) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes is a positive int (bytes per safetensors file), got {max_shard_bytes!r}")
    out = Path(out_dir)
    source: HFSource | None = getattr(model, "hf_source", None)
    if source is not None and out.resolve() == Path(source.directory).resolve():
        raise CheckpointError(f"{out} is the directory the model was loaded from: write to another one (its "
                              f"weights would be overwritten while they are the source of the side files)")
    dtype = dtype or (source.dtype if source else jnp.dtype(_param_dtype(model)).name)
    if dtype not in NP_DTYPES:
        raise CheckpointError(f"cannot save in dtype {dtype!r}; use one of {sorted(NP_DTYPES)}")
    # the adapters merged before (a malformed record fails here, before anything is written) and now; every
    # process joins the fingerprint's gathers
    merged_now = merge_record(model)
    record = (merged_fingerprints(source.directory) if source else []) + merged_now
    out.mkdir(parents=True, exist_ok=True)
    naming = source.naming if source else HUB
    base_files = _unrounded_base(model, source)
    tensors = list(hf_tensors(model, naming, base_files))
    if jax.process_index() != 0:  # several processes: all join each tensor's gather, process 0 writes
        for _, _, thunk in tensors:
            thunk()
        barrier("fxjax.save_pretrained")
        return out

    # an earlier save's index first: a save killed while it writes its shards over that save's (the same names
    # for the same count) leaves no index that loads a mix of the two models
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    (out / "model.safetensors").unlink(missing_ok=True)
    sizes = [(name, elements * np.dtype(NP_DTYPES[dtype]).itemsize) for name, elements, _ in tensors]
    shard_of = _shard_plan(sizes, max_shard_bytes)
    count = max(shard_of.values(), default=0) + 1
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]  # (named once: no renames,
    for shard, members in itertools.groupby(tensors, key=lambda t: shard_of[t[0]]):  # each a copy on a bucket)
        save_safetensors({name: thunk().astype(NP_DTYPES[dtype]) for name, _, thunk in members}, out / files[shard],
                         metadata={"format": "pt"})  # mode 0644, not 0600
    weight_map = {name: files[shard_of[name]] for name in sorted(shard_of)}
    total = sum(nbytes for _, nbytes in sizes)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _remove_stale_weights(out, set(files))

    raw = dict(source.raw_config) if source else config_to_hub_dict(model.config, dtype)
    if source:
        raw["torch_dtype" if "torch_dtype" in raw else "dtype"] = dtype
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    _write_generation_config(model.config, out, source)
    if source:
        for side in _SIDE_FILES:
            if (Path(source.directory) / side).exists():
                _copy_readable(Path(source.directory) / side, out / side)
    write_merged_record(out, record)
    if merged_now and say_tokenizer:
        _say_markerless_tokenizer(out)
    barrier("fxjax.save_pretrained")
    return out


def _say_markerless_tokenizer(out: Path) -> None:
    """A warning when the tokenizer copied beside merged LoRA lacks the output-format markers (a Hub base
    model's does): the trained model answers in them, and that tokenizer decodes `<think>...<verdict>
    generated</verdict>` as plain text no parser reads. fxjax.train.export.save_merged writes the run's."""
    try:
        added = {t.get("content") for t in json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
                 .get("added_tokens", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return  # (no tokenizer copied, or not one this can read: nothing to say)
    missing = [m for m in FORMAT_MARKERS if m not in added]
    if missing:
        logger.warning("%s: the tokenizer copied beside the merged LoRA lacks the output-format markers (%s): "
                       "decoded with it, the detector's answers lose them and no parser reads them; save with "
                       "fxjax.train.export.save_merged(model, out, tokenizer_dir=the run's tokenizer, data=...) "
                       "or `fxjax export`", out, ", ".join(missing))


def _shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> dict[str, int]:
    """Which shard (0, 1, ...) each tensor goes to, in order: a new shard where the next tensor would take
    the current one over `max_shard_bytes` (a tensor larger than that alone fills one). Planned from the
    sizes before anything is gathered, so each file is written once under its final `-of-N` name."""
    plan, shard, used = {}, 0, 0
    for name, nbytes in sizes:
        if used and used + nbytes > max_shard_bytes:
            shard, used = shard + 1, 0
        plan[name] = shard
        used += nbytes
    return plan


_WEIGHT_FILE = re.compile(r"model(-\d{5}(-of-\d{5})?)?\.safetensors")  # (model-00001: a save's own, before its count)


def _remove_stale_weights(out: Path, written: set[str]) -> None:
    """Weight files of an earlier save into `out` that this one did not write: shards of another count stayed
    beside the new ones (a tool that globs *.safetensors saw two models), and a model.safetensors of one file
    is what transformers loads before the index, so it would have served the old weights."""
    for path in sorted(out.iterdir()):
        if path.name not in written and _WEIGHT_FILE.fullmatch(path.name) and path.is_file():
            logger.info("%s: removed %s, a weight file of an earlier save that this one replaces", out, path.name)
            path.unlink()


def _param_dtype(model: Qwen25VL):
    return model.embed_tokens.embedding.dtype


def _unrounded_base(model: Qwen25VL, source: HFSource | None) -> dict[str, tuple[Path, str]] | None:
    """HF name -> (file, stored dtype) of the checkpoint the model was loaded from, so that a tensor loading
    rounded (a bfloat16 model of a float32 checkpoint, or of one with float32 norms) is written from the
    file as stored, its LoRA merged into that, as PEFT's merge_and_unload on the checkpoint does and `fxjax
    export` (which loads it unrounded) did already. None without a source, or when its files changed since."""
    if source is None or jnp.dtype(_param_dtype(model)).name == "float32":
        return None
    try:
        files = weight_files(Path(source.directory))
        stored = stored_dtypes_by_name(files, CheckpointError)
        if disk_dtype(files, set(stored.values())) == source.dtype:
            return {name: (files[name], dtype) for name, dtype in stored.items()}
    except (CheckpointError, OSError):
        pass
    logger.warning("%s: the checkpoint the model was loaded from is gone or changed: the export holds the "
                   "base weights as the model does", source.directory)
    return None


def _copy_readable(source: Path, target: Path) -> None:
    """A side file copied with the usual mode (shutil.copy kept the source's: a 0666 file stayed writable by
    every user of a shared machine)."""
    shutil.copyfile(source, target)
    make_readable(target)


def _write_generation_config(cfg: Qwen25VLConfig, out: Path, source: HFSource | None) -> None:
    if source and (Path(source.directory) / "generation_config.json").exists():
        _copy_readable(Path(source.directory) / "generation_config.json", out / "generation_config.json")
        return
    eos: Any = list(cfg.eos_token_id) if len(cfg.eos_token_id) != 1 else cfg.eos_token_id[0]
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))
