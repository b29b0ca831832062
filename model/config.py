"""Architecture configuration of Qwen2.5-VL as typed, frozen dataclasses.

These hold only what the forward pass needs; reading HF's config.json (both layouts) lives in
fxjax.hf_config so that model/ depends on nothing of ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Attention kernels (model.attention.select_backend): auto picks splash on TPU, cudnn on an NVIDIA GPU in
# bfloat16/float16, else xla, the HF-exact reference.
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "splash")


def _check_attention(where: str, name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{where} attention {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention: str = "xla"  # the kernel, not the architecture (ATTENTION_BACKENDS); xla is HF-exact
    # The layout: True stacks the blocks' parameters and scans them (see TextConfig.scan_layers); a block
    # picks window or full attention (fullatt_block_indexes) with lax.cond, so groups need no regularity.
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch row: (C, T, p, p)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size * self.spatial_merge_size

    @property
    def window_merged_side(self) -> int:
        """Side of an attention window in merged units (4 for 112 px windows of 14 px patches)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_slots(self) -> int:
        """Patch slots of one attention window: window_merged_side^2 merged units of merge_unit patches."""
        return self.window_merged_side ** 2 * self.merge_unit

    def __post_init__(self) -> None:
        _check_attention("vision", self.attention)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.window_merged_side < 1:
            raise ValueError(
                f"vision window_size {self.window_size} is smaller than one merged unit "
                f"({self.spatial_merge_size * self.patch_size} px)"
            )


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    attention: str = "xla"  # the kernel, not the architecture (ATTENTION_BACKENDS); xla is HF-exact
    # The layout, not the architecture: True stacks the decoder layers' parameters on a leading layer axis
    # and runs them under jax.lax.scan (model.scan), so the program and its compile time do not grow with
    # depth (MaxText's scan_layers). False: a Python loop over per-layer modules. The same numbers either way.
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        _check_attention("text", self.attention)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
            )


@dataclass(frozen=True)
class Qwen25VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size {self.text.hidden_size}"
            )

    def replace(self, **changes) -> "Qwen25VLConfig":
        return dataclasses.replace(self, **changes)

    def with_attention(self, text: str, vision: str | None = None) -> "Qwen25VLConfig":
        """The same model with the attention kernel of the decoder (`text`) and of the vision encoder
        (`vision`, default: the same) replaced; see ATTENTION_BACKENDS."""
        return self.replace(text=dataclasses.replace(self.text, attention=text),
                            vision=dataclasses.replace(self.vision, attention=text if vision is None else vision))

    def with_scan_layers(self, scan: bool = True, vision: bool | None = None) -> "Qwen25VLConfig":
        """The same model with its decoder layers (`scan`) and vision blocks (`vision`, default: the same)
        stacked and scanned, or looped; see TextConfig.scan_layers."""
        vision = scan if vision is None else vision
        return self.replace(text=dataclasses.replace(self.text, scan_layers=bool(scan)),
                            vision=dataclasses.replace(self.vision, scan_layers=bool(vision)))
