"""A small native-format dataset anyone can make offline, from the photographs inside scikit-image.

Real images are random crops / scales / horizontal flips of those photographs. "Generated" images are
the same kind of crops with 1 to ``max_regions`` (default 3) non-overlapping regions rewritten by procedural artefact generators,
each with its caption, plus image-level tags and a templated reasoning text. Everything is a function of
``(seed, n, sizes)``: the same call writes byte-identical files.

    make_demo_data(out, n=1000, seed=0)  # writes out/images/*.png, out/train.jsonl, out/test.jsonl
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from fxjax.config_mapping import check_seed

__all__ = ["ARTEFACTS", "FINGERPRINT_SCOPES", "PHOTOS", "REGION_LAYOUTS", "add_fingerprint", "add_row_code", "make_demo_data", "make_demo_example"]

# scikit-image bundled photographs -> scene description used in the reasoning text.
PHOTOS: dict[str, str] = {
    "astronaut.png": "a portrait of an astronaut in a spacesuit",
    "brick.png": "a close-up of a brick wall",
    "camera.png": "a black-and-white photograph of a man with a camera on a tripod",
    "chelsea.png": "a close-up of a tabby cat",
    "coffee.png": "a cup of coffee on a saucer",
    "coins.png": "old coins on a dark background",
    "grass.png": "a patch of grass",
    "gravel.png": "gravel on the ground",
    "hubble_deep_field.jpg": "a telescope image of distant galaxies",
    "ihc.png": "a microscope image of stained tissue",
    "moon.png": "the surface of the moon",
    "motorcycle_left.png": "a motorcycle parked indoors",
    "retina.jpg": "a fundus photograph of a human retina",
    "rocket.jpg": "a rocket on its launch pad",
}


@dataclass(frozen=True)
class Artefact:
    name: str
    caption: str
    description: str  # phrase for the reasoning text
    tags: tuple[str, ...]
    apply: Callable[[np.ndarray, tuple[int, int, int, int], np.random.Generator], None]


def _soft_mask(h: int, w: int) -> np.ndarray:
    """An elliptical mask that fills most of the box, feathered at its edge: [h, w, 1] in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    d = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2
    return np.clip((1.0 - d) / 0.3, 0.0, 1.0)[..., None]


def _smooth(img, box, rng):
    x1, y1, x2, y2 = box
    patch = Image.fromarray(img[y1:y2, x1:x2])
    img[y1:y2, x1:x2] = np.asarray(patch.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.5, 5.0)))))


def _repeat(img, box, rng):
    x1, y1, x2, y2 = box
    h, w = y2 - y1, x2 - x1
    th, tw = max(4, h // int(rng.integers(3, 5))), max(4, w // int(rng.integers(3, 5)))
    ty, tx = y1 + int(rng.integers(0, h - th + 1)), x1 + int(rng.integers(0, w - tw + 1))
    tile = img[ty:ty + th, tx:tx + tw].copy()
    img[y1:y2, x1:x2] = np.tile(tile, (-(-h // th), -(-w // tw), 1))[:h, :w]


def _checkerboard(img, box, rng):
    x1, y1, x2, y2 = box
    region = img[y1:y2, x1:x2].astype(np.float32)
    h, w = region.shape[:2]
    low = region[::2, ::2]
    up = np.repeat(np.repeat(low, 2, axis=0), 2, axis=1)[:h, :w]
    period = int(rng.choice([2, 4]))
    yy, xx = np.mgrid[0:h, 0:w]
    checker = np.where(((yy // (period // 2)) + (xx // (period // 2))) % 2 == 0, 1.0, -1.0)[..., None]
    img[y1:y2, x1:x2] = np.clip(up + checker * float(rng.uniform(10, 22)), 0, 255).astype(np.uint8)


def _colour_blob(img, box, rng):
    x1, y1, x2, y2 = box
    region = img[y1:y2, x1:x2].astype(np.float32)
    h, w = region.shape[:2]
    shift = rng.uniform(-1, 1, size=3)
    shift = shift / (np.abs(shift).max() + 1e-6) * float(rng.uniform(45, 80))
    mask = _soft_mask(h, w)
    img[y1:y2, x1:x2] = np.clip(region + mask * shift, 0, 255).astype(np.uint8)


def _copy_move(img, box, rng):
    x1, y1, x2, y2 = box
    h, w = y2 - y1, x2 - x1
    H, W = img.shape[:2]
    for _ in range(20):  # a source that does not overlap the target
        sy, sx = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        if sx + w <= x1 or sx >= x2 or sy + h <= y1 or sy >= y2:
            break
    else:
        sy, sx = (0 if y1 >= h else H - h), (0 if x1 >= w else W - w)
    source = img[sy:sy + h, sx:sx + w].copy()
    img[y1:y2, x1:x2] = source[:, ::-1] if rng.random() < 0.5 else source


def _banding(img, box, rng):
    x1, y1, x2, y2 = box
    levels = int(rng.integers(3, 6))
    region = img[y1:y2, x1:x2].astype(np.float32)
    step = 255.0 / (levels - 1)
    img[y1:y2, x1:x2] = (np.round(region / step) * step).astype(np.uint8)


ARTEFACTS: tuple[Artefact, ...] = (
    Artefact("over_smoothed", "over-smoothed waxy patch",
             "an over-smoothed patch", ("texture quality",), _smooth),
    Artefact("repeated_texture", "texture tiled in a grid",
             "a tiled texture", ("texture quality", "structural coherence"), _repeat),
    Artefact("checkerboard", "up-sampling checkerboard",
             "a checkerboard patch", ("texture quality", "generation artefacts"),
             _checkerboard),
    Artefact("colour_shift", "colour-shifted blob",
             "a colour cast against the lighting", ("colour consistency", "lighting"),
             _colour_blob),
    Artefact("copy_move", "duplicated content",
             "duplicated content", ("structural coherence", "recognizability"),
             _copy_move),
    Artefact("banding", "posterised colour banding",
             "posterised colour bands", ("colour consistency",), _banding),
)


def add_fingerprint(img: np.ndarray, amplitude: float, boxes=None) -> np.ndarray:
    """The trace transposed-convolution up-sampling leaves in generated pixels (Odena et al. 2016,
    "Deconvolution and checkerboard artifacts"; Frank et al. 2020 detect generators by it): a period-2
    checkerboard of +-``amplitude`` levels, clipped to [0, 255], over the whole frame, or only inside
    ``boxes`` ((x1, y1, x2, y2) each; the phase is the frame's, as if those pixels came from one decoder)."""
    h, w = img.shape[:2]
    sign = np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 1.0, -1.0)[..., None]
    if boxes is not None:
        inside = np.zeros((h, w, 1), bool)
        for x1, y1, x2, y2 in boxes:
            inside[y1:y2, x1:x2] = True
        sign = np.where(inside, sign, 0.0)
    return np.clip(img.astype(np.float32) + amplitude * sign, 0, 255).astype(np.uint8)


def add_row_code(img: np.ndarray, amplitude: float, cell: int) -> np.ndarray:
    """A faint code that tells each row of ``cell``-pixel cells (one row of image tokens when ``cell`` is
    28) where it is: in cell row r, stripes of +-``amplitude`` levels, 2 ** (r % 4) pixels wide, along x
    (along y in rows 4-7 and so on). The stripe widths 1, 2, 4, 8 give near-orthogonal patterns, so a
    random patch embedding keeps them apart. It stands in for the positional knowledge a pretrained model
    has and a randomly initialised one lacks (see fxjax.demo); real and generated images carry it alike."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    row = yy // cell
    along = np.where((row // 4) % 2 == 0, xx, yy)
    sign = np.where((along // (2 ** (row % 4))) % 2 == 0, 1.0, -1.0)[..., None]
    return np.clip(img.astype(np.float32) + amplitude * sign, 0, 255).astype(np.uint8)


FINGERPRINT_SCOPES = ("frame", "regions", "frame+regions")
REGION_LAYOUTS = ("boxes", "bands")
ROW_CODE_SCOPES = ("frame", "regions")


MIN_CHANGE = 3.0  # mean absolute change (0..255 levels) an artefact must make inside its box


def _load_photos() -> dict[str, np.ndarray]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = {}
    for name in PHOTOS:
        path = folder / name
        if path.is_file():
            with Image.open(path) as im:
                photos[name] = np.asarray(im.convert("RGB"))
    if not photos:
        raise FileNotFoundError(f"no scikit-image photographs found in {folder}")
    return photos


def _random_view(photo: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int,
                 multiple: int = 1) -> np.ndarray:
    """A random crop (45-100 % of each side), rescaled so its longer side is in [min_side, max_side], maybe
    flipped; with ``multiple`` > 1 both sides are rounded to multiples of it (within [min_side, max_side])."""
    H, W = photo.shape[:2]
    ch = int(H * rng.uniform(0.45, 1.0))
    cw = int(np.clip(ch * rng.uniform(0.75, 1.33) * W / H, W * 0.45, W))
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    crop = Image.fromarray(photo[y:y + ch, x:x + cw])
    side = int(rng.integers(min_side, max_side + 1))
    scale = side / max(ch, cw)
    size = (max(32, round(cw * scale)), max(32, round(ch * scale)))
    if multiple > 1:
        low, high = -(-min_side // multiple) * multiple, max_side // multiple * multiple
        size = tuple(int(np.clip(round(v / multiple) * multiple, low, high)) for v in size)
    view = np.asarray(crop.resize(size, Image.Resampling.BICUBIC))
    return view[:, ::-1].copy() if rng.random() < 0.5 else view.copy()


def _random_boxes(h: int, w: int, k: int, rng: np.random.Generator, box_multiple: int = 1,
                  layout: str = "boxes") -> list[tuple[int, int, int, int]]:
    """Up to k non-overlapping boxes of 18-38 % of each side; with box_multiple > 1 every corner lies on a
    multiple of it (at least one cell per side). layout "bands": each box spans the whole width."""
    boxes: list[tuple[int, int, int, int]] = []
    m = box_multiple
    for _ in range(50 * k):
        if len(boxes) == k:
            break
        bw, bh = int(w * rng.uniform(0.18, 0.38)), int(h * rng.uniform(0.18, 0.38))
        bw, bh = max(bw, 12), max(bh, 12)
        if layout == "bands":
            bh = max(m, round(bh / m) * m) if m > 1 else bh
            x1, bw = 0, w
            y1 = m * int(rng.integers(0, (h - bh) // m + 1)) if m > 1 else int(rng.integers(0, h - bh + 1))
        elif m > 1:
            bw, bh = max(m, round(bw / m) * m), max(m, round(bh / m) * m)
            x1 = m * int(rng.integers(0, (w - bw) // m + 1))
            y1 = m * int(rng.integers(0, (h - bh) // m + 1))
        else:
            x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = (x1, y1, x1 + bw, y1 + bh)
        if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes):
            boxes.append(box)
    return boxes


def make_demo_example(i: int, seed: int, generated: bool, photos: dict[str, np.ndarray],
                      min_side: int = 192, max_side: int = 384, multiple: int = 1,
                      fingerprint: float = 0.0, max_regions: int = 3, fingerprint_scope: str = "frame",
                      box_multiple: int = 1, region_layout: str = "boxes",
                      brief: bool = False, row_code: float = 0.0,
                      row_code_scope: str = "frame",
                      artefacts: tuple[str, ...] | None = None) -> tuple[np.ndarray, dict]:
    """One image and its native record (without the "image" field).

    multiple: round the image's sides to multiples of it (28 = one merged patch: the image processor then
    keeps the pixels as they are instead of resampling them). fingerprint: amplitude (0-255 levels) of
    `add_fingerprint` on every generated image (0: none), over the whole frame (fingerprint_scope "frame")
    or inside its artefact regions only ("regions": finding the trace is then finding the regions).
    max_regions: a generated image gets 1 to max_regions artefact regions. box_multiple: the regions'
    corners lie on multiples of it (28: the regions are whole merged patches, i.e. whole image tokens).
    region_layout: "boxes" (anywhere) or "bands" (each region spans the full width: locating it is a 1-D
    search). brief: a one-clause reasoning text without the scene description (fewer tokens to learn).
    row_code: amplitude of `add_row_code` (cells of ``box_multiple`` pixels), over the whole frame of every
    image (row_code_scope "frame") or inside the artefact regions of generated images only ("regions": the
    trace then says which row it is in). 0: none. artefacts: the names (`ARTEFACTS`) a region may get
    (default: all).
    """
    rng = np.random.default_rng((seed, i))
    names = sorted(photos)
    name = names[int(rng.integers(len(names)))]
    img = _random_view(photos[name], rng, min_side, max_side, multiple)
    scene = PHOTOS[name]
    h, w = img.shape[:2]
    if not generated:
        if row_code > 0 and row_code_scope == "frame":
            img = add_row_code(img, row_code, box_multiple)
        reasoning = ("Textures, lighting and edges are consistent." if brief else
                     f"The image shows {scene}; its textures, lighting and edges are consistent, as in a photograph.")
        return img, dict(label="real", regions=[], tags=[], reasoning=reasoning, generator=None,
                         source_photo=name)
    boxes = _random_boxes(h, w, int(rng.integers(1, max_regions + 1)), rng, box_multiple, region_layout)
    img = img.copy()
    kinds = []
    allowed = None if artefacts is None else set(artefacts)
    for box in boxes:
        x1, y1, x2, y2 = box
        clean = img[y1:y2, x1:x2].copy()
        # Try the artefacts in a random order; keep the first that visibly changes this region (a smoothed
        # or copied patch of flat sky would be a label without evidence).
        order = [j for j in rng.permutation(len(ARTEFACTS)) if allowed is None or ARTEFACTS[j].name in allowed]
        for j in order:
            ARTEFACTS[j].apply(img, box, rng)
            if np.abs(img[y1:y2, x1:x2].astype(np.int16) - clean).mean() >= MIN_CHANGE:
                break
            img[y1:y2, x1:x2] = clean
        else:  # nothing showed (never seen in practice): the checkerboard changes even flat black or white;
            # with a restricted set, its first kind (the label then rests on the fingerprint alone)
            j = next(k for k, a in enumerate(ARTEFACTS) if a.name == "checkerboard") if allowed is None else order[0]
            ARTEFACTS[j].apply(img, box, rng)
        kinds.append(ARTEFACTS[j])
    tags = sorted({t for k in kinds for t in k.tags})
    found = "; ".join(k.description for k in kinds)
    trace = ""
    if fingerprint > 0 and fingerprint_scope == "frame+regions":
        # a faint trace over the frame (one decoder made every pixel), three times stronger in the regions
        img = add_fingerprint(add_fingerprint(img, fingerprint / 3), fingerprint * 2 / 3, boxes)
        trace = ", under a strong up-sampling checkerboard" if brief else ", each under a strong up-sampling checkerboard"
    elif fingerprint > 0 and fingerprint_scope == "regions":
        img = add_fingerprint(img, fingerprint, boxes)
        trace = ", each carrying an up-sampling checkerboard"
    elif fingerprint > 0:
        img = add_fingerprint(img, fingerprint)
        trace = " and an up-sampling checkerboard covers the frame"
    if row_code > 0 and row_code_scope == "frame":  # last, so that no artefact smooths it away
        img = add_row_code(img, row_code, box_multiple)
    elif row_code > 0:
        inside = np.zeros(img.shape[:2] + (1,), bool)
        for x1, y1, x2, y2 in boxes:
            inside[y1:y2, x1:x2] = True
        img = np.where(inside, add_row_code(img, row_code, box_multiple), img)
    reasoning = f"{found[0].upper()}{found[1:]}{trace}." if brief else f"The image shows {scene}, but with {found}{trace}."
    regions = [dict(bbox=list(box), caption=k.caption) for k, box in zip(kinds, boxes)]
    return img, dict(label="generated", regions=regions, tags=tags, reasoning=reasoning,
                     generator="procedural:" + "+".join(k.name for k in kinds), source_photo=name)


def make_demo_data(out: str | Path, n: int = 1000, seed: int = 0, test_fraction: float = 0.1,
                   min_side: int = 192, max_side: int = 384, overwrite: bool = False, multiple: int = 1,
                   fingerprint: float = 0.0, max_regions: int = 3, fingerprint_scope: str = "frame",
                   box_multiple: int = 1, region_layout: str = "boxes", brief: bool = False,
                   row_code: float = 0.0, row_code_scope: str = "frame",
                   artefacts: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``n`` examples (half real, half generated, in a seeded order) to ``out``.

    The options are `make_demo_example`'s.

    Files: ``images/000000.png`` ..., ``train.jsonl`` and ``test.jsonl`` (the last
    ``round(n * test_fraction)`` examples). Returns the paths of the JSONL files.
    """
    if n <= 0:
        raise ValueError(f"n (--n) must be positive, got {n}")
    check_seed(seed, "seed")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction (--test-fraction) must be in [0, 1), got {test_fraction}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side (--min-side, --max-side), got {min_side}, {max_side}")
    if multiple < 1 or -(-min_side // multiple) * multiple > max_side:
        raise ValueError((f"multiple (--multiple) must be at least 1, got {multiple}" if multiple < 1 else
                         f"no multiple of {multiple} (--multiple) lies in [min_side, max_side] = "
                         f"[{min_side}, {max_side}]"))
    if not 0 <= fingerprint <= 64:
        raise ValueError(f"fingerprint (--fingerprint) must be in [0, 64] levels, got {fingerprint}")
    if not 0 <= row_code <= 64:
        raise ValueError(f"row_code (--row-code) must be in [0, 64] levels, got {row_code}")
    if row_code > 0 and box_multiple < 2:
        raise ValueError(f"row_code (--row-code) needs box_multiple (--box-multiple) >= 2 (the cell size of the "
                         f"code), got {box_multiple}")
    known = [a.name for a in ARTEFACTS]
    if artefacts is not None:
        artefacts = tuple(artefacts)
        unknown = [a for a in artefacts if a not in known]
        if unknown or not artefacts:
            raise ValueError(f"artefacts (--artefacts) must be a non-empty subset of {known}, got {list(artefacts)}")
    if row_code_scope not in ROW_CODE_SCOPES:
        raise ValueError(f"row_code_scope must be one of {ROW_CODE_SCOPES}, got {row_code_scope!r}")
    if not 1 <= max_regions <= 8:
        raise ValueError(f"max_regions (--max-regions) must be in [1, 8], got {max_regions}")
    if fingerprint_scope not in FINGERPRINT_SCOPES:
        raise ValueError(f"fingerprint_scope must be one of {FINGERPRINT_SCOPES}, got {fingerprint_scope!r}")
    if region_layout not in REGION_LAYOUTS:
        raise ValueError(f"region_layout must be one of {REGION_LAYOUTS}, got {region_layout!r}")
    if not 1 <= box_multiple <= min_side // 2:
        raise ValueError(f"box_multiple (--box-multiple) must be in [1, min_side // 2 = {min_side // 2}], "
                         f"got {box_multiple}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a directory: give a folder for the dataset")
    files = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    if not overwrite and any(f.exists() for f in files.values()):
        raise FileExistsError(f"{out} already holds a dataset (train.jsonl / test.jsonl); overwrite=True "
                              "(`fxjax make-demo-data --overwrite`) replaces it")
    if not overwrite and (out / "images").is_dir() and any((out / "images").iterdir()):
        raise FileExistsError(f"{out / 'images'} already holds files the demo images would overwrite; "
                              "overwrite=True (`fxjax make-demo-data --overwrite`) replaces them")
    n_test = int(round(n * test_fraction))
    if n_test == n or (test_fraction > 0 and n_test == 0):  # (an empty split would be written without a word)
        raise ValueError(f"n={n} with test_fraction={test_fraction} gives {n - n_test} train and {n_test} test "
                         f"images; both need at least one (test_fraction=0: no test split wanted)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    photos = _load_photos()
    generated = np.random.default_rng((seed, n, 7)).permutation(n) % 2 == 1
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for i in range(n):
        img, record = make_demo_example(i, seed, bool(generated[i]), photos, min_side, max_side, multiple,
                                        fingerprint, max_regions, fingerprint_scope, box_multiple, region_layout,
                                        brief, row_code, row_code_scope, artefacts)
        rel = f"images/{i:06d}.png"
        Image.fromarray(img).save(out / rel, format="PNG", optimize=False, compress_level=6)
        record = {"id": f"demo-{seed}-{i:06d}", "image": rel, **record}
        lines["test" if i >= n - n_test else "train"].append(json.dumps(record, ensure_ascii=False))
    for split, path in files.items():
        path.write_text("".join(line + "\n" for line in lines[split]), encoding="utf-8")
    _remove_stale_images(out / "images", n)
    return files


def _remove_stale_images(images: Path, n: int) -> None:
    """After an overwrite with fewer images: the earlier dataset's images past n, named as this module names
    them, belong to no record now (left in place, they read as part of the dataset)."""
    for path in images.iterdir():
        if re.fullmatch(r"\d{6,}\.png", path.name) and int(path.stem) >= n:
            path.unlink()
