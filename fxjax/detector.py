"""`fxjax detect` from Python: a trained detector loaded once, then asked about images (files or PIL images).

    from fxjax.detector import ImageDetector

    detector = ImageDetector(model="export/merged")          # or adapter=..., or run="runs/grpo", step="gamma"
    for result in detector([Image.open("photo.jpg"), "scan.png"]):
        print(result["verdict"], [(r["caption"], r["box"]) for r in result["regions"]])

Each result is the object `fxjax detect --json` prints for that image (verdict, regions with boxes in the
original image's pixels, tags, parsed, note, truncated, completion, size, model_size, ...), in the order the
images were given; an image that cannot be analysed gives {"index", "image", "error"}. The options are the
command's, checked as the command checks them (the same parser), and the prompts, pixel limits and answer
length are what the model trained with, resolved as the command resolves them: the one code path, so the
answers are the command's. The weights load at the first call and stay; the compiled decoder is kept for
calls with the same batch size.

This module is the app layer (it drives the command's resolution, which reads training runs).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ImageDetector"]

# the command's options a detector takes as keywords (--images, --out, --json and the overlay are __call__'s)
OPTIONS = ("adapter", "run", "step", "dtype", "mesh", "tokenizer", "batch_size", "max_new_tokens", "min_pixels",
           "max_pixels", "max_length", "system_prompt", "user_prompt", "max_image_pixels")


class ImageDetector:
    """A detector (`fxjax detect`'s --model / --adapter / --run / --step and its other options, as keywords)
    that analyses images given as paths or PIL images; see the module docstring."""

    def __init__(self, model: str | Path | None = None, **options: Any) -> None:
        from fxjax.commands.model_args import resolve_detector

        from fxjax.keyword_options import command_arguments, in_keyword_words

        self._args = command_arguments("detect", ["IMAGE", "--no-overlay"], {"model": model, **options},
                                       "ImageDetector", allowed=("model", *OPTIONS))
        try:
            self._detector = resolve_detector(self._args)  # (paths, prompts and settings checked; nothing loaded)
        except (ValueError, TypeError, OSError) as err:  # (said in the keywords' words: model=PATH, not --model)
            raise in_keyword_words(err, "detect")

    def _say(self, text: str) -> None:
        print(f"fxjax detect: {text}", file=sys.stderr, flush=True)

    def __call__(self, images: Sequence[Any], overlays: str | Path | None = None) -> list[dict[str, Any]]:
        """One result per image, in the order given (`overlays`: a folder for the overlay PNGs, as --out; their
        paths in each result's "overlay"). A PIL image is analysed as the file it would be: turned upright by
        its EXIF orientation (an image opened from a phone's JPEG), saved losslessly in its own mode (TIFF:
        CMYK and 16-bit images too, which the analysis then reads or refuses as it does files), its "image" in
        the result "<PIL image i>", i its place among the images."""
        from PIL import Image, ImageOps

        from fxjax.commands.detect import analyse_images
        from fxjax.keyword_options import in_keyword_words

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        with tempfile.TemporaryDirectory(prefix="fxjax-detect-") as scratch:
            paths, names = [], {}
            for i, image in enumerate(images):
                if isinstance(image, Image.Image):
                    path = Path(scratch) / f"image-{i}.tiff"  # (PNG stores no CMYK, LAB or float image)
                    upright = ImageOps.exif_transpose(image)  # (saved, the file would not say it any more)
                    (upright if upright.mode != "HSV" else upright.convert("RGB")).save(path, compression="raw")
                    names[str(path)] = f"<PIL image {i}>"
                elif isinstance(image, (str, Path)):
                    path = Path(image)
                else:
                    raise TypeError(f"image {i}: a path or a PIL image, got {type(image).__name__}")
                paths.append(str(path))
            self._args.images, self._args.overlay = paths, overlays is not None
            self._args.out = str(overlays) if overlays is not None else None
            if overlays is not None:
                Path(overlays).mkdir(parents=True, exist_ok=True)
            results: list[dict[str, Any]] = []
            try:
                analyse_images(self._args, self._detector, self._say, results.append)
            except (ValueError, TypeError, OSError) as err:
                raise in_keyword_words(err, "detect")
        for result in results:
            result["image"] = names.get(result["image"], result["image"])
        return sorted(results, key=lambda r: r["index"])
