"""Dataset images: where a record's image path may point, and opening an image file safely.

* :func:`resolve_image_path` keeps a record's image inside the dataset root: relative paths only (``..``
  and symlinks that leave the root are refused), unless the caller allows absolute paths for a dataset it
  trusts (the checks of the text alone, `image_path_in_root`, and of where links lead, `outside_root_problem`,
  apart for a loader that resolves many paths in threads);
* :func:`open_image` accepts a whitelist of raster formats, checks the decompression-bomb limit and the
  aspect-ratio limit of Qwen2.5-VL's image processor from the header (before decoding), and applies the
  EXIF orientation as transformers' ``load_image`` does;
* :func:`image_size` is the (width, height) a record is validated against.

Every failure is a :class:`ImageError` whose ``kind`` is the category the loader counts skips by
(``FileNotFoundError`` for a missing file).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Hashable, Iterable, Mapping

from PIL import Image, ImageOps

from fxjax.image_processing import MAX_ASPECT_RATIO, WIDE_MODES

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "SWAPPED_AXES",
    "content_keys",
    "images_in_both",
    "exif_orientation",
    "image_size",
    "open_image",
    "image_path_in_root",
    "outside_root_problem",
    "resolve_image_path",
]

ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit (about 0.25 GiB of RGBA)


class ImageError(ValueError):
    """An image that cannot be used; ``kind`` is one of image_too_large, image_aspect, image_mode,
    not_an_image, image_undecodable."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # picklable across grain worker processes
        return ImageError, (str(self), self.kind)


def _is_absolute(rel: str) -> bool:
    # Both conventions: a dataset written on Windows must not reach C:\ on a Linux reader either.
    return PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or bool(PureWindowsPath(rel).drive)


def image_path_in_root(root: Path, rel: Any, allow_absolute: bool = False) -> Path:
    """``root / rel`` as written (nothing on disk is looked at), if its text keeps it inside ``root``; raises
    ValueError (with the reason) otherwise. Where symbolic links take it: `outside_root_problem`.

    ``allow_absolute``: take an absolute ``rel`` as it is (for datasets whose images live elsewhere and whose
    JSONL the user trusts); '..' in a relative path is refused all the same.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"image path must be a non-empty string, got {rel!r}")
    if "\x00" in rel:
        raise ValueError(f"image path {rel!r} contains a NUL byte")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+://", rel):
        raise ValueError(f"image path {rel!r} is a URL: download the image and give its path")
    if _is_absolute(rel):
        if allow_absolute and Path(rel).is_absolute():
            return Path(rel)
        if allow_absolute:
            raise ValueError(f"image path {rel!r} is absolute on another operating system, not on this one")
        raise ValueError(f"image path {rel!r} is absolute; paths must be relative to the dataset root {root.resolve()} "
                         "(allow absolute paths only for a dataset you trust: allow_absolute_paths / "
                         "--allow-absolute-paths)")
    if ".." in re.split(r"[\\/]", rel):
        raise ValueError(f"image path {rel!r} escapes the dataset root {root} through '..'")
    return root / rel


def outside_root_problem(rel: str, resolved: Path, root: Path, allow_absolute: bool = False) -> str | None:
    """Why the image `rel`, whose path resolves (symbolic links followed) to `resolved`, may not be read from
    the dataset root `root` (resolved): a link out of the root, unless ``allow_absolute`` (a dataset the user
    trusts). None where it may."""
    if allow_absolute or _is_absolute(rel) or resolved.is_relative_to(root):
        return None
    return (f"image path {rel!r} resolves to {resolved}, outside the dataset root {root} (a symbolic link? follow "
            "links out of the root only for a dataset you trust: allow_absolute_paths / --allow-absolute-paths)")


def resolve_image_path(root: Path, rel: Any, allow_absolute: bool = False, root_resolved: bool = False) -> Path:
    """``root / rel`` resolved (symbolic links followed), if it stays inside ``root``: `image_path_in_root`'s
    checks of the text, then `outside_root_problem`'s of the links; raises ValueError (with the reason).
    ``root_resolved``: ``root`` is resolved already."""
    root = root if root_resolved else root.resolve()
    path = image_path_in_root(root, rel, allow_absolute).resolve()
    problem = outside_root_problem(rel, path, root, allow_absolute)
    if problem:
        raise ValueError(problem)
    return path


_WARNING_FILTERS = threading.Lock()


@contextmanager
def _pil_bomb_warnings_off():
    """PIL's DecompressionBombWarning ignored for the block, one thread at a time: warnings.catch_warnings
    saves and restores the process's filter list, so two threads' blocks that overlapped (the data check's and
    the pipeline's image threads) left the `ignore` in place for good, silencing PIL's warning for the rest of
    the process (a notebook's own images too)."""
    with _WARNING_FILTERS, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_image(path: str | Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               decode: bool = True) -> Image.Image:
    """Open an image file safely: allowed formats only, size limit checked before decoding,
    EXIF orientation applied (as transformers' ``load_image``). Raises :class:`ImageError` with a one-line
    reason; ``FileNotFoundError`` when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist" if not path.exists() else f"{path} is not a file")
    with _pil_bomb_warnings_off():  # we apply our own limit below
        try:
            image = Image.open(path, formats=ALLOWED_IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            raise ImageError(f"image {path} exceeds the decompression-bomb limit: {err}", "image_too_large") from None
        except Image.UnidentifiedImageError:
            if path.stat().st_size == 0:
                raise ImageError(f"{path} is an empty file (0 bytes), not an image", "not_an_image") from None
            raise ImageError(f"{path} is not an image in an accepted format {ALLOWED_IMAGE_FORMATS}",
                             "not_an_image") from None
    width, height = image.size
    if width * height > max_image_pixels:
        image.close()
        raise ImageError(f"image {path} is {width}x{height} = {width * height} pixels, over the "
                         f"decompression-bomb limit of {max_image_pixels} (data.max_image_pixels, "
                         "--max-image-pixels)", "image_too_large")
    if width <= 0 or height <= 0:
        raise ImageError(f"image {path} is empty ({width}x{height})", "image_undecodable")
    if image.mode in WIDE_MODES:
        # PIL's convert("RGB"), which transformers' processor applies, clips such values at 255 instead of
        # scaling them: a 16-bit photograph comes out nearly all white, a float one nearly all black.
        image.close()
        wrong = "nearly all white" if image.mode.startswith("I") else "nearly all black (values in [0, 1])"
        raise ImageError(f"image {path} has {WIDE_MODES[image.mode]} pixels (PIL mode {image.mode}); converting "
                         f"them to RGB as transformers' processor does clips them to 8 bits instead of scaling "
                         f"them, so the model would see an image {wrong}: convert the file to 8-bit RGB first",
                         "image_mode")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        image.close()
        raise ImageError(f"image {path} is {width}x{height}: aspect ratio over Qwen2.5-VL's limit of "
                         f"{MAX_ASPECT_RATIO}", "image_aspect")
    if decode:
        # PIL checks a GIF frame's or TIFF tile's size again as it decodes: only an image over PIL's own
        # limit (max_image_pixels raised past it) can warn there, so only then is the decode serialised
        raised = Image.MAX_IMAGE_PIXELS is not None and max_image_pixels > Image.MAX_IMAGE_PIXELS
        quiet = _pil_bomb_warnings_off() if raised else nullcontext()
        try:
            with quiet:
                image.load()
                image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise ImageError(f"image {path} cannot be decoded: {err}", "image_undecodable") from None
    return image


SWAPPED_AXES = (5, 6, 7, 8)  # the EXIF orientations that swap width and height when displayed


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        # PIL's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixel data (which
        # writers put before it): "headers only" (data.check_decode false, data check --no-decode) decoded
        # every PNG. No eXIf chunk before the pixels: as stored (one after them is read by a decode only).
        return 1
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation
        return 1


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without decoding."""
    width, height = image.size
    return (height, width) if _orientation(image) in SWAPPED_AXES else (width, height)


def exif_orientation(path: str | Path) -> int:
    """The file's EXIF orientation (1: as stored; 5-8 swap width and height), read from its header; 1 for a
    file that cannot be opened."""
    try:
        with Image.open(path) as image:
            return _orientation(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1


def image_size(path: str | Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               decode: bool = True) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied); ``decode`` also proves the pixels decode."""
    image = open_image(path, max_image_pixels, decode=decode)
    try:
        return image.size if decode else _oriented_size(image)
    finally:
        image.close()


def _byte_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _content_digest(path: str) -> str:
    """The sha256 of the file's bytes; its path where it cannot be read now."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return path


def content_keys(paths: Iterable[str], threads: int = 8) -> dict[str, str]:
    """A key per image file that copies of one file share under any name (the same photo in the train and
    the test split): the sha256 of the files whose byte size another file has too, else the path (no file
    can be its copy; most of a dataset is never read again). A file that cannot be read now keeps its path."""
    paths = sorted(set(paths))
    with ThreadPoolExecutor(threads) as pool:  # (a network file system answers each stat in a round trip)
        sizes = dict(zip(paths, pool.map(_byte_size, paths)))
        counts = Counter(sizes.values())
        shared = [p for p in paths if sizes[p] is not None and counts[sizes[p]] > 1]
        keys = {p: p for p in paths}
        keys.update(zip(shared, pool.map(_content_digest, shared)))
    return keys


def images_in_both(first: Mapping[str, Hashable], second: Mapping[str, Hashable], threads: int = 8) -> set[str]:
    """The image files of `second` that are files of `first` or copies of one under another name (a held-out
    image the run trains on). Each path maps to a key that copies share and that costs no I/O (the image's
    pixel size); only the files whose key, and then whose byte size, occurs on both sides are read.
    `content_keys` over both sets hashed every file whose byte size another one shared, training files among
    themselves included: most of a large dataset, read by one host while the others waited."""
    both = set(first.values()) & set(second.values())
    ours, theirs = ([p for p, key in side.items() if key in both] for side in (first, second))
    with ThreadPoolExecutor(threads) as pool:  # (a network file system answers each stat in a round trip)
        ours_sizes, theirs_sizes = (dict(zip(paths, pool.map(_byte_size, paths))) for paths in (ours, theirs))
        sizes = (set(ours_sizes.values()) & set(theirs_sizes.values())) - {None}
        ours, theirs = ([p for p, size in side.items() if size in sizes] for side in (ours_sizes, theirs_sizes))
        digests = set(pool.map(_content_digest, ours))
        copies = {p for p, digest in zip(theirs, pool.map(_content_digest, theirs)) if digest in digests}
    return copies | (set(second) & set(first))  # (a file on both sides: the same image, read or not)
