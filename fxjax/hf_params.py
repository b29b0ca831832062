"""Mapping between HF Qwen2.5-VL tensor names and fxjax parameter paths.

Canonical names are the Hub's (`visual.*`, `model.layers.*`, `lm_head.weight`), which transformers
5.x also writes; transformers 4.52-4.x wrote `model.visual.*` and `model.language_model.*`.
HF Linear weights are [out, in] and become `kernel` [in, out]; the Conv3d patch embedding
[out, C, T, p, p] is a Linear over flattened (C, T, p, p) patch rows.
"""

from __future__ import annotations

import re

import numpy as np

from fxjax.model.hf_names import canonical_name, hf_name, transformers_name  # noqa: F401  (re-exported)

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
