"""Read and write HF Qwen2.5-VL config.json in both layouts.

Hub releases are flat (text fields at the top level, `rope_theta`, `rope_scaling: {type: mrope,
mrope_section}`); transformers 5.x writes a nested `text_config` with `rope_parameters`. Every token id
comes from the file, never from a literal here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxjax.model.config import Qwen25VLConfig, TextConfig, VisionConfig


class CheckpointError(ValueError):
    """A folder `from_pretrained` (or an export) cannot read as a Hugging Face Qwen2.5-VL checkpoint: no
    config.json or weights there, a run's folder given instead, tensors missing or of other shapes."""


class HFConfigError(CheckpointError):
    """An HF config.json fxjax cannot build a model from (fxjax's own run configs: config_mapping.ConfigError):
    a CheckpointError, so that `except fxjax.CheckpointError` catches every folder from_pretrained refuses."""


def _rope(section: dict[str, Any]) -> dict[str, Any]:
    """The rope dict of a text section, whichever key holds it (rope_scaling wins, as transformers reads a
    file that has both)."""
    rope = section.get("rope_scaling") or section.get("rope_parameters") or {}
    return rope if isinstance(rope, dict) else {}


def _slides(flat: dict[str, Any]) -> bool:
    """Whether transformers' Qwen2.5-VL gives some decoder layer a sliding window: use_sliding_window with a
    window, and a layer of layer_types "sliding_attention", or (layer_types unset) a layer at or past
    max_window_layers (80 by default). use_sliding_window with max_window_layers at least the layer count
    (the 3B's 70 for 36 layers) slides nowhere: every layer attends fully, as fxjax's do."""
    if not flat.get("use_sliding_window") or flat.get("sliding_window", 4096) is None:
        return False
    types = flat.get("layer_types")
    if types:
        return "sliding_attention" in types
    return int(flat.get("max_window_layers", 80)) < int(flat.get("num_hidden_layers", 0))


TRANSFORMERS_MROPE_SECTION = (16, 24, 24)


def _head_dim(flat: dict[str, Any]) -> int | None:
    try:
        return int(flat["hidden_size"]) // int(flat["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # (the missing or bad key is named where the text config is built)


def text_config_from_dict(flat: dict[str, Any], source: str) -> TextConfig:
    """`flat` is the top-level dict (Hub layout) or, when the file has one, text_config (transformers 5.x)."""
    rope = _rope(flat)
    theta = rope.get("rope_theta", flat.get("rope_theta", 1000000.0))
    section = rope.get("mrope_section")
    if section is None:  # (transformers' Qwen2.5-VL rotary takes [16, 24, 24], the released models' split)
        section = TRANSFORMERS_MROPE_SECTION
        head_dim = _head_dim(flat)
        if head_dim is not None and 2 * sum(section) != head_dim:
            raise HFConfigError(f"{source}: no mrope_section in rope_parameters/rope_scaling, and transformers' "
                                f"default {list(section)} does not fit head_dim {head_dim} (it must sum to "
                                f"{head_dim // 2}): add the model's mrope_section to rope_parameters")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):  # (transformers would scale the rotary angles: other logits)
        raise HFConfigError(f"{source}: rope type {kind!r} in rope_parameters/rope_scaling is not supported: fxjax "
                          "implements Qwen2.5-VL's plain M-RoPE (rope type 'default' or 'mrope'); remove the "
                          "scaling keys to load the model as released")
    if _slides(flat):
        raise HFConfigError(f"{source}: use_sliding_window=true with layers that slide (from max_window_layers "
                            f"{flat.get('max_window_layers', 80)}, or layer_types) is not supported: Qwen2.5-VL "
                            "releases attend over the whole sequence in every layer")
    try:
        heads = int(flat["num_attention_heads"])
        return TextConfig(
            vocab_size=int(flat["vocab_size"]),
            hidden_size=int(flat["hidden_size"]),
            intermediate_size=int(flat["intermediate_size"]),
            num_hidden_layers=int(flat["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(flat.get("num_key_value_heads") or heads),
            hidden_act=str(flat.get("hidden_act", "silu")),
            rms_norm_eps=float(flat.get("rms_norm_eps", 1e-5)),  # (transformers' default when absent)
            rope_theta=float(theta),
            mrope_section=tuple(int(s) for s in section),
            max_position_embeddings=int(flat.get("max_position_embeddings", 128000)),
        )
    except KeyError as err:
        raise HFConfigError(f"{source}: missing text config key {err.args[0]!r}") from None


def vision_config_from_dict(v: dict[str, Any], source: str) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    try:
        return VisionConfig(
            depth=int(v["depth"]),
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_heads=int(v["num_heads"]),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
            patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            window_size=int(v.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            out_hidden_size=int(v["out_hidden_size"]),
            hidden_act=str(v.get("hidden_act", "silu")),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
    except KeyError as err:
        raise HFConfigError(f"{source}: missing vision_config key {err.args[0]!r}") from None


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> Qwen25VLConfig:
    if raw.get("model_type") not in (None, "qwen2_5_vl"):
        raise HFConfigError(f"{source}: model_type {raw.get('model_type')!r} is not 'qwen2_5_vl'")
    if "vision_config" not in raw:
        raise HFConfigError(f"{source}: no vision_config")
    nested = raw.get("text_config")
    # transformers builds the text config from text_config alone when there is one (top-level text keys,
    # which older files also carry, are then ignored), else from the top level
    text = text_config_from_dict(nested if isinstance(nested, dict) else raw, source)
    # (token ids and tying: either level; transformers 5 writes some of them at the top)
    text_section = {**raw, **nested} if isinstance(nested, dict) else raw
    vision = vision_config_from_dict(raw["vision_config"], source)
    tie = bool(raw.get("tie_word_embeddings", False) or text_section.get("tie_word_embeddings", False))
    default = Qwen25VLConfig  # (its field defaults: Qwen2.5-VL's token ids, for a file without them)
    try:
        return Qwen25VLConfig(
            vision=vision, text=text, tie_word_embeddings=tie,
            image_token_id=int(raw.get("image_token_id", text_section.get("image_token_id", default.image_token_id))),
            video_token_id=int(raw.get("video_token_id", text_section.get("video_token_id", default.video_token_id))),
            vision_start_token_id=int(raw.get("vision_start_token_id", default.vision_start_token_id)),
            vision_end_token_id=int(raw.get("vision_end_token_id", default.vision_end_token_id)),
            bos_token_id=text_section.get("bos_token_id"),
            eos_token_id=_eos_tuple(text_section.get("eos_token_id")),
            pad_token_id=text_section.get("pad_token_id"),
        )
    except ValueError as err:
        raise HFConfigError(f"{source}: {err}") from None


def load_config(path: str | Path) -> tuple[Qwen25VLConfig, dict[str, Any]]:
    """(parsed config, raw dict) from a checkpoint directory or a config.json path."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        from fxjax.run_files import fxjax_folder_hint

        raise HFConfigError(f"{file}: not found (expected an HF Qwen2.5-VL checkpoint directory)"
                            + fxjax_folder_hint(path))
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:  # (not JSON, or not UTF-8: UnicodeDecodeError came out raw)
        raise HFConfigError(f"{file}: not valid JSON ({err})") from None
    return config_from_dict(raw, str(file)), raw


def config_to_hub_dict(cfg: Qwen25VLConfig, dtype: str) -> dict[str, Any]:
    """The flat Hub layout, which both transformers 4.x and 5.x read."""
    t, v = cfg.text, cfg.vision
    eos: Any = list(cfg.eos_token_id) if len(cfg.eos_token_id) != 1 else cfg.eos_token_id[0]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "torch_dtype": dtype,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "use_sliding_window": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act,
            "tokens_per_second": 2,
        },
    }
