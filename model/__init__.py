"""Flax NNX Qwen2.5-VL. Imports nothing else of fxjax."""

from .config import Qwen25VLConfig, TextConfig, VisionConfig
from .inputs import ModelInputs, prepare_inputs
from .kv_cache import KVCache
from .qwen2_5_vl import Qwen25VL, forward

__all__ = ["Qwen25VL", "forward", "Qwen25VLConfig", "TextConfig", "VisionConfig", "ModelInputs", "prepare_inputs", "KVCache"]
