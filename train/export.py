"""Export after training: the PEFT adapter, and the merged model as an HF checkpoint.

Thin wrappers over fxjax's own writers, which work with one process or several (every process joins the
gathers; process 0 writes): `fxjax.peft_io.save_peft_adapter` writes the LoRA factors as a PEFT adapter
directory, and `fxjax.save_pretrained` merges every enabled adapter into its kernel (W + scaling * A @ B,
in float32, stored in the checkpoint's dtype) while writing, leaving the model itself unchanged.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_adapter", "save_merged"]


def save_adapter(model, out_dir: str | Path) -> Path:
    """PEFT adapter directory (adapter_config.json + adapter_model.safetensors) of the model's LoRA."""
    from fxjax.peft_io import save_peft_adapter

    return save_peft_adapter(model, Path(out_dir))


def save_merged(model, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """An HF checkpoint directory of base + LoRA merged (loads in transformers without peft)."""
    from fxjax.hf_checkpoint import save_pretrained

    return save_pretrained(model, Path(out_dir), dtype=dtype)
