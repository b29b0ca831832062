"""Parity of fxjax.image_processing with transformers' Qwen2VLImageProcessorPil."""

from __future__ import annotations

import re

import numpy as np
import pytest
import skimage.data
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from fxjax.image_processing import model_input_size, process_image, smart_resize

SMALL_MAX = 200_000  # keeps the clamp case and big images fast


@pytest.fixture(scope="module")
def hf_default():
    return transformers.Qwen2VLImageProcessorPil()


@pytest.fixture(scope="module")
def hf_small():
    return transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=SMALL_MAX)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def _sized(name: str, height: int, width: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    # Crop first so extreme aspect ratios still show real texture, not a smear.
    img = _photo(name)
    if box is not None:
        img = img.crop(box)
    return img.resize((width, height), Image.Resampling.LANCZOS)


def _assert_parity(hf, image, **kwargs) -> None:
    ref = hf(image, return_tensors="np")
    pv, thw = process_image(image, **kwargs)
    ref_pv, ref_thw = ref["pixel_values"], ref["image_grid_thw"]
    assert pv.dtype == np.float32 and thw.dtype == np.int64
    np.testing.assert_array_equal(thw, ref_thw)
    assert pv.shape == ref_pv.shape
    assert np.abs(pv - ref_pv).max() <= 1e-6


CASES = {
    "photo_480x640": lambda: _sized("astronaut", 480, 640),
    "native_chelsea_300x451": lambda: _photo("chelsea"),
    "nonsquare_333x517": lambda: _sized("coffee", 333, 517),
    "wide_30x3000": lambda: _sized("chelsea", 30, 3000, box=(0, 140, 451, 160)),
    "tall_3000x30": lambda: _sized("astronaut", 3000, 30, box=(200, 0, 220, 512)),
    "near150_20x3000": lambda: _sized("coffee", 20, 3000, box=(0, 200, 600, 210)),
    "tiny_10x10": lambda: _sized("astronaut", 10, 10, box=(180, 60, 260, 140)),
    "tiny_odd_7x23": lambda: _sized("rocket", 7, 23),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_default_limits(hf_default, case):
    _assert_parity(hf_default, CASES[case]())


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_small_max(hf_small, case):
    _assert_parity(hf_small, CASES[case](), max_pixels=SMALL_MAX)


def test_max_pixels_clamp_hit(hf_small):
    img = _sized("astronaut", 900, 1200)
    h, w = model_input_size(900, 1200, max_pixels=SMALL_MAX)
    assert h * w <= SMALL_MAX < round(900 / 28) * 28 * round(1200 / 28) * 28
    _assert_parity(hf_small, img, max_pixels=SMALL_MAX)
    _, thw = process_image(img, max_pixels=SMALL_MAX)
    assert thw.tolist() == [[1, h // 14, w // 14]]


def _rgba_with_gradient_alpha() -> Image.Image:
    rgb = np.asarray(_sized("astronaut", 200, 300))
    alpha = np.linspace(0, 255, 300, dtype=np.float64)[None, :].repeat(200, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


MODE_CASES = {
    "RGBA": _rgba_with_gradient_alpha,
    "L": lambda: _sized("chelsea", 250, 180).convert("L"),
    "LA": lambda: _rgba_with_gradient_alpha().convert("LA"),
    "P": lambda: _sized("coffee", 150, 220).convert("P"),
    "P_transparency": lambda: _p_with_transparency(),
    "CMYK": lambda: _sized("rocket", 160, 90).convert("CMYK"),
    "1": lambda: _sized("camera", 128, 128).convert("1"),
}


def _p_with_transparency() -> Image.Image:
    img = _sized("coffee", 150, 220).convert("P")
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_pil_modes_match_hf(hf_small, mode):
    img = MODE_CASES[mode]()
    _assert_parity(hf_small, img, max_pixels=SMALL_MAX)


def test_a_16_bit_or_float_image_is_converted_as_hf_does_with_a_warning(hf_small):
    """process_image took an 'I;16' or 'F' image silently (clipped to 8 bits: nearly all white / black),
    which training and `fxjax detect` refuse; it still matches HF's processor there, and warns."""
    gray = np.asarray(_sized("camera", 96, 64).convert("L"), dtype=np.uint16) * 257  # 16-bit values
    for img, looks in ((Image.fromarray(gray), "nearly all white"),
                       (Image.fromarray(gray.astype(np.float32) / 65535), "nearly all black")):
        assert img.mode in ("I;16", "F")
        with pytest.warns(UserWarning, match=rf"mode {re.escape(img.mode)}\) is converted to RGB as transformers' "
                                             rf"processor does.*{looks}"):
            _assert_parity(hf_small, img, max_pixels=SMALL_MAX)


def test_numpy_inputs_match_hf(hf_small):
    rgb = np.asarray(_sized("coffee", 123, 457))
    _assert_parity(hf_small, rgb, max_pixels=SMALL_MAX)
    # Same pixels as a PIL image give the same result.
    pv_np, _ = process_image(rgb, max_pixels=SMALL_MAX)
    pv_pil, _ = process_image(Image.fromarray(rgb), max_pixels=SMALL_MAX)
    np.testing.assert_array_equal(pv_np, pv_pil)
    rgba = np.asarray(_rgba_with_gradient_alpha())
    _assert_parity(hf_small, rgba, max_pixels=SMALL_MAX)
    gray = np.asarray(_sized("chelsea", 90, 130).convert("L"))[:, :, None]
    _assert_parity(hf_small, gray, max_pixels=SMALL_MAX)


def test_patch_layout_roundtrip():
    # Independent of HF: un-patchify and compare with a direct normalised resize.
    img = _sized("astronaut", 100, 150)
    pv, thw = process_image(img)
    _, gh, gw = thw[0]
    p, m = 14, 2
    x = pv.reshape(gh // m, gw // m, m, m, 3, 2, p, p)
    np.testing.assert_array_equal(x[:, :, :, :, :, 0], x[:, :, :, :, :, 1])
    recon = x[:, :, :, :, :, 0].transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)
    h, w = model_input_size(100, 150)
    resized = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (resized - np.float32([0.48145466, 0.4578275, 0.40821073])) / np.float32(
        [0.26862954, 0.26130258, 0.27577711]
    )
    np.testing.assert_allclose(recon, expected, atol=1e-5)


@pytest.mark.parametrize(
    "image, match",
    [
        (Image.new("RGB", (0, 5)), r"image is empty \(5x0"),
        (Image.new("RGB", (5, 0)), r"image is empty \(0x5"),
        (np.zeros((0, 5, 3), np.uint8), r"image is empty \(0x5"),
        (Image.new("RGB", (2510, 10)), r"aspect ratio 251\.0 exceeds 200"),
        (np.zeros((2510, 10, 3), np.uint8), r"aspect ratio 251\.0 exceeds 200"),
        (np.zeros((8, 8, 3), np.float32), "must be uint8"),
        (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"got shape \(2, 8, 8, 3\)"),
        (Image.new("La", (8, 8)), "cannot convert PIL mode 'La' to RGB"),
    ],
)
def test_clear_errors(image, match):
    with pytest.raises(ValueError, match=match):
        process_image(image)


def test_bad_type():
    with pytest.raises(TypeError, match="PIL.Image.Image or numpy array"):
        process_image([[1, 2, 3]])  # type: ignore[arg-type]


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect ratio 250.0 exceeds 200"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="empty"):
        smart_resize(0, 100)
    assert smart_resize(10, 2000) == hf_smart_resize(10, 2000)  # exactly 200 is allowed


# Mix small sides (min_pixels branch, aspect-ratio rejection) with large ones (max clamp).
_side = st.one_of(st.integers(1, 120), st.integers(1, 6000))


@settings(max_examples=200, deadline=None)
# sides at an odd multiple of factor / 2 within the limits: Python's round goes to even (70 / 28 = 2.5 -> 56),
# which random sides seldom reach
@example(height=70, width=126, factor=28, min_pixels=3136, max_pixels=12845056)
@example(height=182, width=98, factor=28, min_pixels=3136, max_pixels=12845056)
@given(
    height=_side,
    width=_side,
    factor=st.sampled_from([14, 28, 32]),
    min_pixels=st.integers(1, 200_000),
    max_pixels=st.integers(1_000, 20_000_000),
)
def test_smart_resize_matches_hf(height, width, factor, min_pixels, max_pixels):
    try:
        expected = hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError:
        with pytest.raises(ValueError, match="exceeds 200"):
            smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return
    got = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert got == expected
    assert got[0] % factor == 0 and got[1] % factor == 0
