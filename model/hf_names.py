"""The one table between HF Qwen2.5-VL tensor/module names and fxjax parameter paths; every name in
either direction, in either HF naming, is derived from it (checkpoint I/O, PEFT adapters, LoRA targets).

HF namings:
* HUB: the Hub checkpoints' names (`visual.*`, `model.layers.*`, `lm_head.weight`), which transformers
  < 4.52 also used as module names and transformers 5.x writes to disk again;
* TRANSFORMERS: transformers >= 4.52 module names (`model.visual.*`, `model.language_model.*`, `lm_head`),
  which PEFT adapters saved with those versions use, and 4.52-4.x wrote to disk.

Layouts: an HF Linear weight [out, in] is the fxjax `kernel` [in, out]; the Conv3d patch embedding
[out, C, T, p, p] is an fxjax Linear over flattened (C, T, p, p) pixel rows.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .config import VisionConfig

Path = tuple[str | int, ...]

HUB = "hub"
TRANSFORMERS = "transformers"
NAMINGS = (HUB, TRANSFORMERS)

# What an HF module is, which decides its parameter names and layouts (HF leaf -> fxjax leaf).
LINEAR, CONV3D, NORM, EMBEDDING = "linear", "conv3d", "norm", "embedding"
_LEAVES: dict[str, dict[str, str]] = {
    LINEAR: {"weight": "kernel", "bias": "bias"},
    CONV3D: {"weight": "kernel"},
    NORM: {"weight": "weight"},
    EMBEDDING: {"weight": "embedding"},
}

# THE table: HF module (Hub naming) | fxjax module path | kind. "{i}" is a layer / block index.
MODULES: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens", "embed_tokens", EMBEDDING),
    ("model.layers.{i}.input_layernorm", "decoder.layers.{i}.input_layernorm", NORM),
    ("model.layers.{i}.self_attn.q_proj", "decoder.layers.{i}.self_attn.q_proj", LINEAR),
    ("model.layers.{i}.self_attn.k_proj", "decoder.layers.{i}.self_attn.k_proj", LINEAR),
    ("model.layers.{i}.self_attn.v_proj", "decoder.layers.{i}.self_attn.v_proj", LINEAR),
    ("model.layers.{i}.self_attn.o_proj", "decoder.layers.{i}.self_attn.o_proj", LINEAR),
    ("model.layers.{i}.post_attention_layernorm", "decoder.layers.{i}.post_attention_layernorm", NORM),
    ("model.layers.{i}.mlp.gate_proj", "decoder.layers.{i}.mlp.gate_proj", LINEAR),
    ("model.layers.{i}.mlp.up_proj", "decoder.layers.{i}.mlp.up_proj", LINEAR),
    ("model.layers.{i}.mlp.down_proj", "decoder.layers.{i}.mlp.down_proj", LINEAR),
    ("model.norm", "decoder.norm", NORM),
    ("visual.patch_embed.proj", "visual.patch_embed", CONV3D),
    ("visual.blocks.{i}.norm1", "visual.blocks.{i}.norm1", NORM),
    ("visual.blocks.{i}.attn.qkv", "visual.blocks.{i}.attn.qkv", LINEAR),
    ("visual.blocks.{i}.attn.proj", "visual.blocks.{i}.attn.proj", LINEAR),
    ("visual.blocks.{i}.norm2", "visual.blocks.{i}.norm2", NORM),
    ("visual.blocks.{i}.mlp.gate_proj", "visual.blocks.{i}.mlp.gate_proj", LINEAR),
    ("visual.blocks.{i}.mlp.up_proj", "visual.blocks.{i}.mlp.up_proj", LINEAR),
    ("visual.blocks.{i}.mlp.down_proj", "visual.blocks.{i}.mlp.down_proj", LINEAR),
    ("visual.merger.ln_q", "visual.merger.ln_q", NORM),
    ("visual.merger.mlp.0", "visual.merger.fc1", LINEAR),
    ("visual.merger.mlp.2", "visual.merger.fc2", LINEAR),
    ("lm_head", "lm_head", LINEAR),
)

# How transformers >= 4.52 renamed the top-level modules: (Hub prefix, transformers prefix).
_RENAMED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)
# HF keys that hold no parameters (old checkpoints saved rotary buffers).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


class _Row(NamedTuple):
    hf: str
    fx: str
    kind: str
    hf_pattern: re.Pattern
    fx_pattern: re.Pattern


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_ROWS = tuple(_Row(hf, fx, kind, _pattern(hf), _pattern(fx)) for hf, fx, kind in MODULES)


# ---- namings -------------------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """An HF name in any supported naming -> the Hub naming."""
    for hub, renamed in _RENAMED_PREFIXES:
        if name.startswith(renamed):
            return hub + name[len(renamed):]
    return name


def in_naming(canonical: str, naming: str) -> str:
    """A Hub-naming HF name -> the same name in `naming`."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown HF naming {naming!r}; use one of {NAMINGS}")
    if naming == TRANSFORMERS:
        for hub, renamed in _RENAMED_PREFIXES:
            if canonical.startswith(hub):
                return renamed + canonical[len(hub):]
    return canonical


def naming_of(name: str) -> str | None:
    """TRANSFORMERS for a name only transformers >= 4.52 spells so, HUB for one only the Hub spells so,
    None for one both spell alike (`lm_head`)."""
    if canonical_name(name) != name:
        return TRANSFORMERS
    return HUB if in_naming(name, TRANSFORMERS) != name else None


def is_ignored(name: str) -> bool:
    """Whether a checkpoint tensor is a buffer without a parameter behind it."""
    return bool(_IGNORED.match(name))


# ---- stacked layers (layers under scan, model.scan) -----------------------------------------------

# Module lists whose layers may be stacked on a leading parameter axis (TextConfig.scan_layers): a
# per-layer path has the layer index right after the list's path ('decoder', 'layers', 3, 'mlp', ...),
# the stacked one does not ('decoder', 'layers', 'mlp', ...; layer 3 is slice 3). Every name in the table
# is a per-layer one: stacked paths go through `layer_path` / `unstack` first.
STACKS: tuple[Path, ...] = (("decoder", "layers"), ("visual", "blocks"))


def _stack_of(path: Path) -> int:
    """Length of the STACKS entry that `path` lies under (0 if none)."""
    for stack in STACKS:
        if tuple(path[:len(stack)]) == stack and len(path) > len(stack):
            return len(stack)
    return 0


def is_stacked(path: Path) -> bool:
    """Whether `path` (a module or parameter) is under a stack without a layer index: stacked layers."""
    n = _stack_of(path)
    return bool(n) and not isinstance(path[n], int)


def layer_path(stacked: Path, index: int) -> Path:
    """A stacked path and a layer index -> the per-layer path, e.g. ('decoder', 'layers', 'mlp', 'up_proj')
    and 3 -> ('decoder', 'layers', 3, 'mlp', 'up_proj')."""
    if not is_stacked(stacked):
        raise KeyError(f"fxjax path {stacked!r} is not a stacked-layer path (model/hf_names.py STACKS)")
    n = _stack_of(stacked)
    return tuple(stacked[:n]) + (int(index),) + tuple(stacked[n:])


def unstack(path: Path) -> tuple[Path, int | None]:
    """A per-layer path -> (the stacked path, the layer index); any other path -> (path, None)."""
    n = _stack_of(path)
    if not n or not isinstance(path[n], int):
        return tuple(path), None
    return tuple(path[:n]) + tuple(path[n + 1:]), int(path[n])


# ---- fxjax path -> HF name -----------------------------------------------------------------------

def _row_of_module(module: Path) -> tuple[_Row, str | None]:
    dotted = ".".join(str(p) for p in module)
    for row in _ROWS:
        match = row.fx_pattern.fullmatch(dotted)
        if match:
            return row, match.groupdict().get("i")
    raise KeyError(f"fxjax module {dotted!r} has no HF name (model/hf_names.py MODULES)")


def module_kind(module: Path) -> str:
    """LINEAR, CONV3D, NORM or EMBEDDING: what the fxjax module at `module` is in HF."""
    return _row_of_module(tuple(module))[0].kind


def module_name(module: Path, naming: str = TRANSFORMERS) -> str:
    """fxjax module path -> HF module name, e.g. ('decoder', 'layers', 0, 'self_attn', 'q_proj') ->
    'model.language_model.layers.0.self_attn.q_proj' (PEFT's target and adapter names)."""
    row, index = _row_of_module(tuple(module))
    return in_naming(row.hf.replace("{i}", index or ""), naming)


def hf_name(path: Path, naming: str = HUB) -> str:
    """fxjax parameter path -> HF tensor name, e.g. ('visual', 'merger', 'fc1', 'kernel') ->
    'visual.merger.mlp.0.weight'."""
    row, _ = _row_of_module(tuple(path[:-1]))
    by_fx_leaf = {fx: hf for hf, fx in _LEAVES[row.kind].items()}
    if path[-1] not in by_fx_leaf:
        raise KeyError(f"fxjax parameter {path!r} has no HF name: a {row.kind} has {sorted(by_fx_leaf)}")
    return f"{module_name(path[:-1], naming)}.{by_fx_leaf[path[-1]]}"


# ---- HF name -> fxjax path -----------------------------------------------------------------------

def param_path(name: str) -> Path | None:
    """HF tensor name (either naming) -> fxjax parameter path; None if the name is not in the table."""
    module, _, leaf = canonical_name(name).rpartition(".")
    for row in _ROWS:
        match = row.hf_pattern.fullmatch(module)
        if match and leaf in _LEAVES[row.kind]:
            index = match.groupdict().get("i")
            parts = row.fx.replace("{i}", index or "").split(".")
            return tuple(int(p) if p.isdigit() else p for p in parts) + (_LEAVES[row.kind][leaf],)
    return None


# ---- layouts -------------------------------------------------------------------------------------

def conv3d_kernel_shape(cfg: VisionConfig) -> tuple[int, ...]:
    """The patch embedding's HF Conv3d kernel shape after its output axis: (C, T, p, p)."""
    return (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)


def to_fxjax(array: np.ndarray, path: Path) -> np.ndarray:
    """An HF tensor -> the layout of the fxjax parameter at `path` (kernels transposed, Conv3d flattened)."""
    if path[-1] != "kernel":
        return array
    return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)


def to_hf(array: np.ndarray, path: Path, vision: VisionConfig) -> np.ndarray:
    """An fxjax parameter at `path` -> the HF tensor layout (the patch embedding back to its Conv3d shape)."""
    if path[-1] != "kernel":
        return array
    out = np.ascontiguousarray(array.T)
    if module_kind(path[:-1]) == CONV3D:
        out = out.reshape(out.shape[0], *conv3d_kernel_shape(vision))
    return out
