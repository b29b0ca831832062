"""LoRA on fxjax `Linear` layers, with PEFT's semantics (targets, scaling, init, forward, merge).

Layout: a targeted `model.layers.Linear` gets `linear.lora = LoRAAdapter(...)` with
`lora_a` = nnx.LoRAParam [in_features, rank] and `lora_b` = nnx.LoRAParam [rank, out_features]
(PEFT's lora_A.weight [r, in] and lora_B.weight [out, r], transposed like every fxjax kernel), so a
LoRA weight's state path is e.g. ('decoder', 'layers', 0, 'self_attn', 'q_proj', 'lora', 'lora_a').

    y = x @ W + b + scaling * (dropout(x) @ A) @ B,   scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

On a stacked Linear (layers under scan, TextConfig.scan_layers: kernel [layers, in, out]) one adapter
serves every layer, its factors stacked too (lora_a [layers, in, r], lora_b [layers, r, out]); a config
must then target all layers of it or none, and with one rank and alpha.

LoRA parameters are their own state type: filter them with `LORA_PARAMS` and the base weights with
`BASE_PARAMS` (nnx.LoRAParam subclasses nnx.Param, so a bare nnx.Param filter selects both). They are
stored in float32 whatever the base's param_dtype, and, as in PEFT, the update is computed in float32 too
(the input cast up) and added to the base output, the sum rounded once to the layer's compute dtype.

Targets are chosen by HF module name (transformers >= 4.52 names, e.g.
"model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.0.attn.qkv",
"model.visual.merger.mlp.0", "lm_head") as PEFT's `target_modules` does: a sequence of names matches
a module whose name equals one of them or ends with "." + one of them; a string is a regex that must
match the whole name; "all-linear" is every Linear except the output head (`lm_head`) and the patch
embedding (a Conv3d in HF, so never one of PEFT's all-linear targets).

Imports nothing of fxjax.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .hf_names import LINEAR, TRANSFORMERS, Path, is_stacked, layer_path, module_kind, module_name, unstack
from .layers import Linear, next_key, params_key

# The frozen base weights and the trainable LoRA weights. Use these filters everywhere.
LORA_PARAMS = nnx.LoRAParam
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

ALL_LINEAR = "all-linear"
# PEFT's "all-linear" drops the output embedding and selects only nn.Linear modules (so not the
# patch embedding, a Conv3d in HF: model.hf_names says which fxjax Linear is what in HF).
_OUTPUT_HEAD: Path = ("lm_head",)

def _as_spec(value, what: str):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(v, str) for v in items):
            raise TypeError(f"{what} must be a string or a sequence of strings, got {value!r}")
        return tuple(items)
    raise TypeError(f"{what} must be a string or a sequence of strings, got {type(value).__name__}")


def _is_all_linear(spec) -> bool:
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters, PEFT's LoraConfig in fxjax words (r -> rank, lora_alpha -> alpha).

    target_modules: "all-linear", a sequence of module names (suffix match on name components) or a
    regex string (full match); exclude_modules: the same forms, removing matches.
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    exclude_modules: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))
        targets = _as_spec(self.target_modules, "target_modules")
        if not targets:
            raise ValueError("target_modules is empty; use 'all-linear', module names or a regex")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "exclude_modules", _as_spec(self.exclude_modules, "exclude_modules") or None)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

    def selects(self, name: str, path: Path | None = None) -> bool:
        """Whether this config targets the Linear named `name` (HF module name; fxjax `path` for all-linear)."""
        return target_matches(name, self.target_modules, self.exclude_modules, path=path)


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def target_matches(name: str, target_modules, exclude_modules=None, *, path: Path | None = None) -> bool:
    """PEFT's check_target_module_exists for a Linear module named `name`.

    For "all-linear" the fxjax `path` decides (lm_head and the patch embedding are left out).
    """
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, name):
                return False
        elif name in exclude_modules or any(name.endswith(f".{e}") for e in exclude_modules):
            return False
    if _is_all_linear(target_modules):
        if path is None:
            raise ValueError("'all-linear' needs the module's fxjax path")
        return tuple(path) != _OUTPUT_HEAD and module_kind(path) == LINEAR
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """PEFT's get_pattern_key for rank_pattern / alpha_pattern: the first key matching the name's end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


class LoRAAdapter(nnx.Module):
    """The low-rank update of one Linear: scaling * (dropout(x) @ lora_a) @ lora_b.

    `lora_a` starts like PEFT's (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))),
    `lora_b` at zero, so a fresh adapter changes nothing. Dropout (rate > 0) draws from the `dropout`
    rng stream and is active only in train mode (`model.train()`; `model.eval()` turns it off; a fresh
    adapter starts in eval mode). `enabled` = False switches the adapter off (see `lora_disabled`).
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 use_rslora: bool = False, dropout: float = 0.0, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 layers: int | None = None, lora_a: jax.Array | None = None,
                 dropout_layer: nnx.Dropout | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.use_rslora = int(rank), float(alpha), bool(use_rslora)
        self.dtype = jnp.dtype(param_dtype)  # computes in its weights' dtype (see __call__)
        # `layers`: the adapter of a stacked Linear; its factors get the leading layer axis, and the scan
        # (model.scan) hands each layer its slice, so __call__ always sees 2-D factors. The dropout stream
        # stays one, advanced by each layer's draw.
        # `lora_a` / `dropout_layer`: A's initial value and the dropout module, made by apply_lora per layer
        # in the looped model's order (what this constructor would draw, in the same order).
        lead = () if layers is None else (int(layers),)
        if lora_a is None:
            lora_a = init_lora_a(rngs, (*lead, in_features, rank))
        elif tuple(lora_a.shape) != (*lead, in_features, rank):
            raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}, expected {(*lead, in_features, rank)}")
        self.lora_a = nnx.LoRAParam(jnp.asarray(lora_a).astype(param_dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, out_features), param_dtype))
        if dropout_layer is None and dropout > 0:
            dropout_layer = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.dropout = dropout_layer
        self.enabled = True

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

    def __call__(self, x: jax.Array) -> jax.Array:
        # PEFT casts the input to the adapter's dtype (float32) and computes the update there; with a bf16
        # base, computing it in bf16 instead left fxjax's LoRA gradients ~1.25x farther from the fp32 ones
        # than PEFT's (tests/test_bf16_parity.py). The Linear rounds base output + update once.
        x = x.astype(self.dtype)
        if self.dropout is not None and not self.dropout.deterministic and self.dropout.rate > 0:
            # the key the layer would draw from its stream, drawn by next_key (fast under a trace)
            x = self.dropout(x, rngs=next_key(self.dropout.rngs))
        # 2-D matmuls: the gradients of A and B then contract one [tokens] axis, a plain GEMM; with the
        # leading [batch, length] axes kept, XLA:CPU contracted two axes at several times the cost.
        lead = x.shape[:-1]
        h = jnp.dot(x.reshape(-1, x.shape[-1]), self.lora_a[...])
        y = jnp.dot(h, self.lora_b[...]) * jnp.asarray(self.scaling, self.dtype)
        return y.reshape(*lead, y.shape[-1])


def init_lora_a(rngs: nnx.Rngs, shape: tuple[int, ...]) -> jax.Array:
    """PEFT's A init (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)) of shape [..., in, rank]."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(params_key(rngs), shape, jnp.float32, -bound, bound)


def linears(model: nnx.Module) -> Iterator[tuple[Path, Linear]]:
    """(fxjax path, Linear) for every Linear of the model, in graph order."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            yield tuple(path), module


def lora_linears(model: nnx.Module) -> Iterator[tuple[Path, Linear]]:
    """(fxjax path, Linear) for every Linear that carries a LoRA adapter."""
    for path, linear in linears(model):
        if linear.lora is not None:
            yield path, linear


def has_lora(model: nnx.Module) -> bool:
    return next(lora_linears(model), None) is not None


def stacked_layers(path: Path, linear: Linear) -> int | None:
    """How many layers the Linear at `path` stacks (layers under scan), None for a per-layer Linear."""
    return int(linear.kernel.shape[0]) if is_stacked(path) else None


def linear_layers(model: nnx.Module) -> Iterator[tuple[Path, Path, int | None]]:
    """(per-layer fxjax path, path of the Linear module, layer index in it or None) for every layer of every
    Linear: a stacked Linear gives one entry per layer, named as the looped model's would be."""
    for path, linear in linears(model):
        count = stacked_layers(path, linear)
        if count is None:
            yield path, path, None
        else:
            for i in range(count):
                yield layer_path(path, i), path, i


def add_adapter(linear: Linear, *, rank: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0,
                rngs: nnx.Rngs, layers: int | None = None, lora_a: jax.Array | None = None,
                dropout_layer: nnx.Dropout | None = None) -> LoRAAdapter:
    """Attach one adapter (float32 parameters, computed in float32 as PEFT does) to `linear`; `layers`
    for a stacked Linear (`stacked_layers`); `lora_a` / `dropout_layer`: A's initial value and the dropout
    module (default: made from `rngs`)."""
    if linear.lora is not None:
        raise ValueError("this Linear already has a LoRA adapter; call remove_lora first")
    linear.lora = LoRAAdapter(linear.in_features, linear.out_features, rank=rank, alpha=alpha,
                              use_rslora=use_rslora, dropout=dropout, rngs=rngs, layers=layers, lora_a=lora_a,
                              dropout_layer=dropout_layer)
    return linear.lora


def select_targets(model: nnx.Module, cfg: LoRAConfig, naming: str = TRANSFORMERS) -> dict[str, Path]:
    """HF module name -> per-layer fxjax path of each Linear (layer) that `cfg` targets (names in `naming`)."""
    chosen = {}
    for path, _, _ in linear_layers(model):
        name = module_name(path, naming)
        if cfg.selects(name, path):
            chosen[name] = path
    return chosen


def group_by_linear(model: nnx.Module, layer_paths) -> dict[Path, list[int | None]]:
    """Per-layer Linear paths -> {path of the Linear module: its layer indices (None: a per-layer Linear)}.

    Raises ValueError when the paths cover only some layers of a stacked Linear: its one adapter serves
    all of them (build the model with scan_layers=False to adapt single layers)."""
    by_path = dict(linears(model))
    groups: dict[Path, list[int | None]] = {}
    for path in layer_paths:
        path = tuple(path)
        module, index = (path, None) if path in by_path else unstack(path)
        if module not in by_path:
            raise KeyError(f"fxjax path {path!r} is not a Linear of the model")
        groups.setdefault(module, []).append(index)
    for module, indices in groups.items():
        count = stacked_layers(module, by_path[module])
        if count is not None and sorted(indices) != list(range(count)):
            name = module_name(layer_path(module, 0)).replace(".0.", ".<i>.")
            raise ValueError(f"LoRA targets layers {sorted(indices)} of {name}, whose {count} layers are stacked "
                             f"(scan_layers): target all of them or none, or load the model with "
                             f"scan_layers=False")
    return groups


def apply_lora(model: nnx.Module, cfg: LoRAConfig | None = None, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Attach fresh adapters (B = 0) to the Linears of a Qwen25VL that `cfg` targets.

    Returns the targeted HF module names (transformers >= 4.52 naming). Records `model.lora_config`.
    `rngs` gives the `params` stream (A's init) and the `dropout` stream (default Rngs(0)).
    """
    cfg = cfg or LoRAConfig()
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; call remove_lora(model) first")
    targets = select_targets(model, cfg)
    if not targets:
        raise ValueError(f"target_modules {cfg.target_modules!r} matches no Linear of the model "
                         f"(names look like {module_name(next(linear_layers(model))[0])!r})")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    by_path = dict(linears(model))
    groups = group_by_linear(model, targets.values())
    # Each layer's A (and dropout stream) is drawn as LoRAAdapter draws it, layer by layer in the looped
    # model's order (its Linears in sorted path order); a stacked Linear's are then stacked (its dropout
    # stream is its first layer's). So both layouts start from the same A for the same rngs.
    drawn = {}
    for path in sorted(targets.values(), key=_loop_order):
        module = path if path in by_path else unstack(path)[0]
        a = init_lora_a(rngs, (by_path[module].in_features, cfg.rank))
        drawn[path] = (a, nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs) if cfg.dropout > 0 else None)
    for module, indices in groups.items():
        layers = [drawn[module if i is None else layer_path(module, i)] for i in sorted(indices, key=lambda i: i or 0)]
        add_adapter(by_path[module], rank=cfg.rank, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                    dropout=cfg.dropout, rngs=rngs, layers=stacked_layers(module, by_path[module]),
                    lora_a=layers[0][0] if indices == [None] else jnp.stack([a for a, _ in layers]),
                    dropout_layer=layers[0][1])
    model.lora_config = cfg
    return list(targets)


def _loop_order(path: Path):
    """Sort key of per-layer paths in the order nnx visits a looped model's modules (sorted keys)."""
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)


def remove_lora(model: nnx.Module) -> None:
    """Drop every adapter (the base model is left as it was)."""
    for _, linear in list(lora_linears(model)):
        linear.lora = None
    if getattr(model, "lora_config", None) is not None:
        model.lora_config = None


@contextlib.contextmanager
def lora_disabled(model: nnx.Module):
    """Inside, the model computes exactly its base (every adapter off): the reference policy without a
    copy of the weights. Works around eager calls and inside nnx.jit-ed functions alike."""
    adapters = [linear.lora for _, linear in lora_linears(model)]
    before = [a.enabled for a in adapters]
    try:
        for a in adapters:
            a.enabled = False
        yield model
    finally:
        for a, flag in zip(adapters, before):
            a.enabled = flag


def merge_lora(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scaling: float) -> np.ndarray:
    """W + scaling * A @ B on host arrays in fxjax layout (kernel [in, out], A [in, r], B [r, out]; stacked
    ones with a leading layer axis), float32 (PEFT's merge: W + (B @ A) * scaling in HF layout)."""
    delta = (np.asarray(lora_a, np.float32) @ np.asarray(lora_b, np.float32)) * np.float32(scaling)
    return np.asarray(kernel).astype(np.float32) + delta


def merged_kernel(linear: Linear) -> np.ndarray:
    """The Linear's kernel with its enabled adapter merged, as a host array [in, out] (single process)."""
    kernel = np.asarray(jax.device_get(linear.kernel[...]))
    if linear.lora is None or not linear.lora.enabled:
        return kernel
    return merge_lora(kernel, jax.device_get(linear.lora.lora_a[...]), jax.device_get(linear.lora.lora_b[...]),
                      linear.lora.scaling)


__all__ = ["LoRAConfig", "LoRAAdapter", "LORA_PARAMS", "BASE_PARAMS", "ALL_LINEAR", "apply_lora", "add_adapter",
           "remove_lora", "lora_disabled", "lora_linears", "linears", "has_lora",
           "stacked_layers", "linear_layers", "group_by_linear",
           "select_targets", "target_matches", "pattern_key", "lora_scaling", "merge_lora", "merged_kernel"]
