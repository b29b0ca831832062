"""Qwen2-VL / Qwen2.5-VL image preprocessing in numpy + PIL.

Bit-for-bit reimplementation of ``transformers.Qwen2VLImageProcessorPil`` for a
single still image, so data pipelines need neither torch nor transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "RELEASE_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "model_input_size",
    "pil_to_rgb",
    "process_image",
    "smart_resize",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # transformers' Qwen2VLImageProcessor() default (its longest_edge)
# max_pixels in the Qwen2.5-VL releases' preprocessor_config.json: the data pipeline's and run configs' default
RELEASE_MAX_PIXELS = 12845056
MAX_ASPECT_RATIO = 200


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image is empty ({height}x{width}, height x width)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {ratio} exceeds {MAX_ASPECT_RATIO} "
            f"(image is {height}x{width}, height x width); crop or pad it first"
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with area in [min_pixels, max_pixels].

    Same arithmetic as HF's ``smart_resize`` (including Python's round-half-to-even
    and the exact float operation order), so sizes agree on every input; the only
    difference is a ValueError instead of ZeroDivisionError for empty images.
    """
    _check_size(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


PIXELS_PER_TOKEN = 28 * 28  # one image token per 2 x 2 merged 14-px patches


def image_tokens(height: int, width: int) -> int:
    """The image tokens of a model-input image of height x width (multiples of 28): one per 28 x 28 pixels."""
    return (height // 28) * (width // 28)


def model_input_size(
    height: int,
    width: int,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
) -> tuple[int, int]:
    """(height, width) the image is resized to before patchifying.

    Callers scaling boxes between original and model pixel space need this;
    the grid is ``(h // patch_size, w // patch_size)``.
    """
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):  # ("12544" failed in a compare)
        if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.number)) or \
                not value >= 1 or not np.isfinite(value) or float(value) != int(value):
            raise ValueError(f"{name} is a pixel count (a positive integer), got {value!r}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is above max_pixels {max_pixels}")
    return smart_resize(
        height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
    )


# PIL modes whose values are not 8-bit (16-bit integers, 32-bit integers, 32-bit floats), named for errors.
WIDE_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
              "F": "32-bit float"}


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image as the model sees it: RGB, with any transparency composited onto white (a new image)."""
    # HF composites anything with an alpha band (or a palette/tRNS transparency)
    # onto white rather than dropping alpha; note "A" also matches LAB's a* band,
    # which HF treats the same way, so we do too.
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert PIL mode {image.mode!r} to RGB: {err}") from err


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(
            f"numpy images must be uint8 HxWx3 (or HxW, HxWx1, HxWx4), got dtype {array.dtype}"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"numpy images must be HxWx3 (or HxW, HxWx1, HxWx4), got shape {array.shape}"
        )
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        # HF's numpy path blends in float64 and rounds (not PIL's integer
        # alpha_composite); mirror it so arrays and PIL images each match HF.
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return array


def process_image(
    image: Image.Image | np.ndarray,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess one still image exactly like ``Qwen2VLImageProcessorPil`` (transformers' PIL backend; the
    torchvision backend, which AutoImageProcessor picks when torchvision is installed, resizes with other
    rounding: serve with ``backend="pil"`` for the pixels training saw).

    The pixel limits default to that class's own (max 28*28*1280 = 1,003,520 pixels); Qwen2.5-VL's Hub
    checkpoints, their preprocessor_config.json and fxjax training (`data.max_pixels`) use 12,845,056, so
    pass the limits the model was trained with (a merged export's preprocessor_config.json has them).

    Returns ``(pixel_values, image_grid_thw)``: float32
    ``[grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]`` in merge-block
    order and int64 ``[[1, grid_h, grid_w]]``.  Numpy inputs are channels-last
    uint8 (HF would guess the layout and can misread e.g. a 3xWx3 image).

    The image is taken as stored: no EXIF rotation (training and `fxjax detect` apply it first, with
    ``PIL.ImageOps.exif_transpose``). A 16-bit, 32-bit or float PIL image is converted as HF converts it,
    clipped to 8 bits (nearly all white, or black for values in [0, 1]), with a warning: training and
    `fxjax detect` refuse such files.
    """
    if isinstance(image, Image.Image):
        width, height = image.size
        if image.mode in WIDE_MODES:
            import warnings

            warnings.warn(f"process_image: a PIL image of {WIDE_MODES[image.mode]} pixels (mode {image.mode}) is "
                          f"converted to RGB as transformers' processor does, clipping them to 8 bits instead of "
                          f"scaling them: the model sees it nearly all "
                          f"{'white' if image.mode.startswith('I') else 'black (values in [0, 1])'}; convert it to "
                          f"8-bit RGB first", stacklevel=2)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be HxWx3 (or HxW, HxWx1, HxWx4), got shape {image.shape}")
        height, width = image.shape[:2]
    else:
        raise TypeError(f"expected a PIL.Image.Image or numpy array, got {type(image).__name__}")
    # Validate size before any conversion so bad inputs fail with a clear message.
    resized_h, resized_w = model_input_size(height, width, min_pixels, max_pixels, patch_size, merge_size)
    rgb = pil_to_rgb(image) if isinstance(image, Image.Image) else Image.fromarray(_array_to_rgb(image))
    # HF resizes the uint8 image with PIL bicubic (PIL's default reducing_gap,
    # i.e. none) and only then rescales, so the resize sees 8-bit pixels and
    # its output is already quantised back to uint8.
    resized = np.asarray(rgb.resize((resized_w, resized_h), resample=Image.Resampling.BICUBIC))

    # Match HF's dtype path exactly: rescale in float64 then cast to float32,
    # normalise with float32 mean/std; other orders differ in the last ulp.
    pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    pixels = (pixels - mean) / std

    grid_h, grid_w = resized_h // patch_size, resized_w // patch_size
    channels = pixels.shape[2]
    # Patchify straight from HWC: rows of the output are ordered by merge block
    # (gh/m, gw/m), then within-block (m, m); each row is (C, T, ph, pw).
    patches = pixels.reshape(
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size, channels
    ).transpose(0, 3, 1, 4, 6, 2, 5)
    # A still image is repeated over temporal_patch_size frames.
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:])
    )
    pixel_values = np.ascontiguousarray(
        patches.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    )
    image_grid_thw = np.array([[1, grid_h, grid_w]], dtype=np.int64)
    return pixel_values, image_grid_thw
