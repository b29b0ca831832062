"""fxjax: grounded AI-generated-image detection with Qwen2.5-VL in JAX/Flax NNX.

Public API:
    model = fxjax.from_pretrained(path, dtype="float32")
    logits = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    fxjax.save_pretrained(model, out_dir)
    pixel_values, image_grid_thw = fxjax.process_image(pil_image, min_pixels=3136, max_pixels=12845056)
"""

from fxjax.hf_checkpoint import from_pretrained, save_pretrained
from fxjax.image_processing import process_image

__all__ = ["from_pretrained", "save_pretrained", "process_image"]
