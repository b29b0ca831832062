"""HF Qwen2.5-VL names of fxjax parameters and modules (shared by fxjax's checkpoint I/O and model.lora).

Canonical names are the Hub's (`visual.*`, `model.layers.*`, `lm_head.weight`), which transformers
< 4.52 also used as module names and transformers 5.x writes to disk again; transformers >= 4.52 names
its modules `model.visual.*`, `model.language_model.*` and `lm_head` (PEFT adapters follow those).
"""

from __future__ import annotations

Path = tuple[str | int, ...]

HUB = "hub"  # Hub / transformers < 4.52 names
TRANSFORMERS = "transformers"  # transformers >= 4.52 module names
NAMINGS = (HUB, TRANSFORMERS)


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


def module_name(linear_path: Path, naming: str = TRANSFORMERS) -> str:
    """fxjax path of a Linear module -> the HF module name holding its weight, e.g.
    ('decoder', 'layers', 0, 'self_attn', 'q_proj') -> 'model.language_model.layers.0.self_attn.q_proj'."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; use one of {NAMINGS}")
    name = hf_name(tuple(linear_path) + ("kernel",))[: -len(".weight")]
    return transformers_name(name) if naming == TRANSFORMERS else name
