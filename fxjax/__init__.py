"""fxjax: grounded AI-generated-image detection with Qwen2.5-VL in JAX/Flax NNX.

Public API:
    model = fxjax.from_pretrained(path, dtype="float32")
    logits = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    fxjax.save_pretrained(model, out_dir)          # LoRA adapters, if any, merged into the weights
    model = fxjax.from_pretrained(path, lora=fxjax.LoRAConfig(rank=8, alpha=32))   # fresh adapters
    model = fxjax.from_pretrained(path, adapter=peft_dir)                         # a PEFT adapter
    fxjax.save_peft_adapter(model, out_dir)         # loads with peft.PeftModel.from_pretrained
    pixel_values, image_grid_thw = fxjax.process_image(pil_image, min_pixels=3136, max_pixels=12845056)
    mesh = fxjax.make_mesh(fxjax.MeshConfig(data=1, fsdp=4, tensor=2))   # axes ("data", "fsdp", "tensor")
    model = fxjax.from_pretrained(path, dtype="bfloat16", mesh=mesh)   # each tensor straight to its shards
    tokens = fxjax.greedy_generate(model, input_ids, mask, pv, grid, max_new_tokens=256, eos_token_ids=[151645])
    fxjax.rewards.score(completions, targets, stage="alpha")   # the reward terms, as GRPO computes them
    model = fxjax.init_model("tiny", seed=0)         # a preset's random weights (fxjax.presets), no download

The names load on first use (PEP 562): `import fxjax` alone does not import jax, so the command line's
--help and argument errors answer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fxjax.lazy_exports import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "from_pretrained": "fxjax.hf_checkpoint",
    "save_pretrained": "fxjax.hf_save",
    "process_image": "fxjax.image_processing",
    "load_peft_adapter": "fxjax.peft_io",
    "save_peft_adapter": "fxjax.peft_io",
    "MeshConfig": "fxjax.device_mesh",
    "make_mesh": "fxjax.device_mesh",
    "LoRAConfig": "fxjax.model.lora",
    "apply_lora": "fxjax.peft_io",
    "remove_lora": "fxjax.model.lora",
    "lora_disabled": "fxjax.model.lora",
    "LORA_PARAMS": "fxjax.model.lora",
    "BASE_PARAMS": "fxjax.model.lora",
    "generate": "fxjax.model.generate",
    "greedy_generate": "fxjax.model.generate",
    "CheckpointError": "fxjax.hf_config",
    "AdapterError": "fxjax.peft_io",
    "MergedLoRAError": "fxjax.merged_lora",
    "ShardingError": "fxjax.device_mesh",
    "init_model": "fxjax.model_init",
}
# subpackages and modules reachable as attributes after a bare `import fxjax` (fxjax.rewards.score, ...)
_SUBMODULES = ("model", "rewards", "train", "data", "distributed", "partition_rules", "presets", "evaluate", "detector",
               "train_config", "grpo_config")

__all__ = ["from_pretrained", "save_pretrained", "process_image", "LoRAConfig", "apply_lora", "remove_lora",
           "lora_disabled", "LORA_PARAMS", "BASE_PARAMS", "load_peft_adapter", "save_peft_adapter", "MeshConfig",
           "make_mesh", "generate", "greedy_generate", "CheckpointError", "AdapterError", "MergedLoRAError",
           "ShardingError", "init_model"]

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from fxjax.hf_checkpoint import from_pretrained
    from fxjax.hf_config import CheckpointError
    from fxjax.hf_save import save_pretrained
    from fxjax.image_processing import process_image
    from fxjax.merged_lora import MergedLoRAError
    from fxjax.model.generate import generate, greedy_generate
    from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS, LoRAConfig, lora_disabled, remove_lora
    from fxjax.peft_io import AdapterError, apply_lora, load_peft_adapter, save_peft_adapter
    from fxjax.device_mesh import MeshConfig, ShardingError, make_mesh
    from fxjax.model_init import init_model


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), _SUBMODULES)
