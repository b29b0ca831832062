"""Flax NNX Qwen2.5-VL. Imports nothing else of fxjax."""

from model.config import Qwen25VLConfig, TextConfig, VisionConfig
from model.inputs import ModelInputs, prepare_inputs
from model.kv_cache import KVCache
from model.qwen2_5_vl import Qwen25VL

__all__ = ["Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "ModelInputs", "prepare_inputs", "KVCache"]
