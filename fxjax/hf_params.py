"""Mapping between HF Qwen2.5-VL tensor names and fxjax parameter paths.

Canonical names are the Hub's (`visual.*`, `model.layers.*`, `lm_head.weight`), which transformers
5.x also writes; transformers 4.52-4.x wrote `model.visual.*` and `model.language_model.*`.
HF Linear weights are [out, in] and become `kernel` [in, out]; the Conv3d patch embedding
[out, C, T, p, p] is a Linear over flattened (C, T, p, p) patch rows.
"""

from __future__ import annotations

import re

import numpy as np

Path = tuple[str | int, ...]

# (canonical prefix, fxjax path prefix); longest first wins.
_PREFIXES: tuple[tuple[str, Path], ...] = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding")),
    ("model.layers.", ("decoder", "layers")),
    ("model.norm.", ("decoder", "norm")),
    ("visual.", ("visual",)),
    ("lm_head.", ("lm_head",)),
)
_RENAMES = {"mlp.0": "fc1", "mlp.2": "fc2", "patch_embed.proj": "patch_embed"}
# HF keys that hold no parameters (old checkpoints saved rotary buffers).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


def canonical_name(name: str) -> str:
    """Any supported HF naming -> the Hub naming."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def transformers_name(canonical: str) -> str:
    """Hub naming -> transformers 4.52+ module naming (as in-memory state_dict keys and PEFT adapters)."""
    if canonical.startswith("visual."):
        return "model." + canonical
    if canonical.startswith("model."):
        return "model.language_model." + canonical[len("model."):]
    return canonical


def is_ignored(name: str) -> bool:
    return bool(_IGNORED.match(name))


def _split(rest: str) -> list[str | int]:
    for old, new in _RENAMES.items():
        rest = rest.replace(old, new)
    return [int(p) if p.isdigit() else p for p in rest.split(".") if p]


def param_path(canonical: str) -> Path | None:
    """Canonical HF name -> fxjax path with leaf 'weight' (norms) or 'bias'; Linear weights are
    resolved to 'kernel' by `resolve_leaf` against the model. None if the name is not ours."""
    for prefix, target in _PREFIXES:
        if canonical == prefix:
            return target
        if canonical.startswith(prefix) and prefix.endswith("."):
            return target + tuple(_split(canonical[len(prefix):]))
    return None


def hf_name(path: Path) -> str:
    """fxjax param path -> canonical HF name (inverse of param_path + kernel naming)."""
    if path == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if parts[:2] == ["decoder", "layers"]:
        parts = ["model", "layers"] + parts[2:]
    elif parts[:2] == ["decoder", "norm"]:
        parts = ["model", "norm"] + parts[2:]
    name = ".".join(parts)
    name = name.replace("merger.fc1", "merger.mlp.0").replace("merger.fc2", "merger.mlp.2")
    return name.replace("patch_embed.weight", "patch_embed.proj.weight")


def to_fxjax(array: np.ndarray, leaf: str, hf_shape_ndim: int) -> np.ndarray:
    """HF tensor -> fxjax layout for a leaf named `leaf` ('kernel' means transpose/flatten)."""
    if leaf != "kernel":
        return array
    if hf_shape_ndim > 2:  # Conv3d patch embedding
        array = array.reshape(array.shape[0], -1)
    return np.ascontiguousarray(array.T)


def to_hf(array: np.ndarray, path: Path, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """fxjax layout -> HF tensor; `hf_shape` restores the Conv3d shape of the patch embedding."""
    if path[-1] != "kernel":
        return array
    out = np.ascontiguousarray(array.T)
    return out.reshape(hf_shape) if hf_shape is not None else out
