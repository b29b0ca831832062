"""Random-initialised models from a config or preset (the same object from_pretrained returns)."""

from __future__ import annotations

import os

from flax import nnx

from fxjax.presets import load_preset
from fxjax.model import Qwen25VL, Qwen25VLConfig
from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS


def init_model(config: Qwen25VLConfig | str | os.PathLike, *, seed: int = 0, dtype: str = "float32",
               param_dtype: str | None = None, mesh=None, scan_layers: bool | None = None) -> Qwen25VL:
    """A Qwen2.5-VL with random weights; `config` may be a preset name or YAML path. `scan_layers` (None:
    as the config says) stacks the decoder layers under scan; the random weights then differ from the
    looped model's of the same seed (model.scan).

    With `mesh` (fxjax.device_mesh.make_mesh) the weights are created under jit directly on their shards
    (no device ever holds a whole unsharded model); values match the unsharded init to float rounding."""
    cfg = load_preset(config) if isinstance(config, (str, os.PathLike)) else config
    if scan_layers is not None:
        cfg = cfg.with_scan_layers(scan_layers)

    def build() -> Qwen25VL:
        return Qwen25VL(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype or dtype)

    if mesh is None:
        return build()
    from fxjax.partition_rules import init_sharded

    return init_sharded(build, mesh)


def parameter_counts(model: Qwen25VL) -> dict[str, int]:
    """Base parameters per top-level component (visual, embed_tokens, decoder, lm_head), their total,
    and the LoRA parameters on their own ("lora", only when adapters are attached)."""
    counts: dict[str, int] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):
        counts[str(path[0])] = counts.get(str(path[0]), 0) + int(value.size)
    counts["total"] = sum(counts.values())
    lora = sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, LORA_PARAMS)))
    if lora:
        counts["lora"] = lora
    return counts


def abstract_parameter_counts(cfg: Qwen25VLConfig) -> dict[str, int]:
    """Same as parameter_counts without allocating weights (works for 72B on a laptop)."""
    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    return parameter_counts(abstract)


__all__ = ["init_model", "parameter_counts", "abstract_parameter_counts"]
