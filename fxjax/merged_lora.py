"""The record a merged export keeps of the LoRA adapters merged into its weights.

`fxjax.save_pretrained` merges every enabled adapter into its kernel and writes fxjax_merged_lora.json beside
the weights: a fingerprint of each adapter merged so far (those the source checkpoint had merged, then this
one). Loading the same adapter on top of that checkpoint (a PEFT adapter, or a run's LoRA) would add its
update a second time with nothing to show for it but worse outputs, so it is refused by name; an exported
adapter that continued that LoRA (its fxjax_export.json's `continues`) or of another step of the run merged
there is refused from the records (`refuse_stacked_adapter`, before a weight is read); one trained on the
merged model loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from fxjax.device_mesh import gather
from fxjax.export_record import read_export_record
from fxjax.model.hf_names import layer_path
from fxjax.model.lora import lora_linears, stacked_layers

__all__ = ["MERGED_LORA_FILE", "MergedLoRAError", "lora_fingerprint", "merge_record", "merged_fingerprints",
           "refuse_merged_twice", "refuse_stacked_adapter", "write_merged_record"]

MERGED_LORA_FILE = "fxjax_merged_lora.json"


class MergedLoRAError(ValueError):
    """An adapter applied to a checkpoint that already has it merged, or an unreadable record."""


def lora_fingerprint(model, via: str | None = None) -> str | None:
    """A hash of the model's enabled LoRA adapters (None without any): their per-layer fxjax names, scaling and
    A / B rounded to bfloat16, so an adapter saved in float32 or bfloat16, looped or stacked, hashes the same.
    `via` "float16": the hash of the adapter as a float16 export stores it (rounded to float16 first, which
    rounds some values to another bfloat16 than float32 does). Every process must call it (it gathers)."""
    return _fingerprints(model, (via,))[0]


def merge_record(model) -> list[str]:
    """The fingerprints a merged export records of the model's LoRA: as saved in float32 / bfloat16 and as
    saved in float16 ([] without LoRA; A and B gathered once). Every process must call it."""
    return [f for f in dict.fromkeys(_fingerprints(model, (None, "float16"))) if f]


def _fingerprints(model, vias) -> list[str | None]:
    """`lora_fingerprint` for each of `vias`, from one gather of every adapter."""
    layers = []
    for path, linear in lora_linears(model):
        if not linear.lora.enabled:
            continue
        a, b = (gather(x[...]).astype(np.float32) for x in (linear.lora.lora_a, linear.lora.lora_b))
        count = stacked_layers(path, linear)
        for i in range(count) if count is not None else (None,):
            name = "/".join(map(str, layer_path(path, i) if i is not None else path))
            layers.append((name, linear.lora.scaling, a if i is None else a[i], b if i is None else b[i]))
    if not layers:
        return [None] * len(vias)
    digests = [hashlib.sha256() for _ in vias]
    for name, scaling, a, b in sorted(layers, key=lambda layer: layer[0]):
        head = f"{name}:{float(scaling)!r}:{a.shape}:{b.shape}".encode()
        for via, digest in zip(vias, digests):
            digest.update(head)
            for x in (a, b):
                if via is not None:
                    x = x.astype(via).astype(np.float32)
                digest.update(np.ascontiguousarray(x.astype(ml_dtypes.bfloat16)).tobytes())
    return [digest.hexdigest() for digest in digests]


def merged_fingerprints(directory: str | Path) -> list[str]:
    """The fingerprints (`lora_fingerprint`) of the adapters merged into the checkpoint in `directory`."""
    path = Path(directory) / MERGED_LORA_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["merged_adapters"])
    except (ValueError, KeyError, TypeError) as err:
        raise MergedLoRAError(f"{path}: not a list of merged adapters ({err})") from err


def refuse_merged_twice(model, what: str) -> None:
    """MergedLoRAError when the model's LoRA is one its base checkpoint (`model.hf_source`) already has merged
    into its weights: applying it again would add its update twice."""
    source = getattr(model, "hf_source", None)
    if source is None:
        return
    merged = merged_fingerprints(source.directory)
    if merged and lora_fingerprint(model) in merged:
        raise MergedLoRAError(
            f"{what} is already merged into the weights of {source.directory} ({MERGED_LORA_FILE}): applying it "
            f"again would add its update twice. Use {source.directory} alone, or the adapter on the base model.")


def refuse_stacked_adapter(model: Path, adapter: Path, what: str) -> None:
    """MergedLoRAError for an exported adapter on a merged export its LoRA already includes (both records say
    it, without loading a weight): the adapter of a run that continued the merged LoRA (model.adapter /
    model.from_run: it holds that LoRA plus its own updates), or an adapter of the very run merged there
    (another step). Either adds that LoRA's update a second time, and the answers were garbage with no word.
    An adapter trained on the merged export itself (its base) loads. `what` names the adapter in the error."""
    merged = merged_fingerprints(model)
    record, merged_record = read_export_record(adapter), read_export_record(model)
    if not merged or not record or Path(str(record.get("base_model"))).resolve() == Path(model).resolve():
        return
    continues = record.get("continues") if isinstance(record.get("continues"), list) else []
    if set(continues) & set(merged):
        raise MergedLoRAError(f"{what} continues the LoRA merged into {model} (its run started from it: "
                              f"`continues` in its fxjax_export.json): on those weights that LoRA's update would "
                              f"count twice. Apply it to the base model it was trained on ({record.get('base_model')}"
                              f"), or use {model} alone")
    run = record.get("checkpoints")
    if run is not None and run == merged_record.get("checkpoints"):
        raise MergedLoRAError(f"{what} (step {record.get('step')}) and {model} (merged, step "
                              f"{merged_record.get('step')}) are exports of one run ({run}): its LoRA on those "
                              f"merged weights would count twice. Apply it to the base model "
                              f"({record.get('base_model')}), or use {model} alone")


def write_merged_record(out: Path, fingerprints: list[str]) -> None:
    """Write the record of `fingerprints` into `out` (or remove a stale one when there are none)."""
    path = Path(out) / MERGED_LORA_FILE
    if fingerprints:
        path.write_text(json.dumps({"merged_adapters": fingerprints, "about": "fingerprints of the LoRA adapters "
                                    "fxjax merged into these weights (fxjax.merged_lora.lora_fingerprint)"},
                                   indent=2) + "\n", encoding="utf-8")
    elif path.exists():  # written into a directory that held another merged export
        path.unlink()
