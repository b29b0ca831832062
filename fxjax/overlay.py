"""Detection overlays: the regions a completion grounds, drawn on the original image, with the verdict.

    image = draw_detection(original, regions=[("warped fingers", (x1, y1, x2, y2)), ...], verdict="generated")
    image.save("photo.overlay.png")

Boxes are in the original image's pixels (`fxjax.rewards.parse_completion(..., original_size=,
model_size=)` gives them as ``boxes_original``). The line width and font size follow the image's size so
an overlay reads the same on a thumbnail and on a 4k photograph; a box reaching outside the image is
drawn clipped to it. The verdict sits in the top-left corner: red for generated, green for real, grey
for an answer without a verdict (with `note` saying why).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from fxjax.image_processing import pil_to_rgb

__all__ = ["BOX_COLOURS", "VERDICT_COLOURS", "draw_detection", "outline_corners", "overlay_sheet"]

# Distinct, saturated colours for successive regions (cycled).
BOX_COLOURS = ((255, 64, 64), (255, 176, 0), (0, 200, 255), (190, 90, 255), (64, 220, 64), (255, 90, 200))
VERDICT_COLOURS = {"generated": (200, 30, 30), "real": (20, 140, 60)}
NO_VERDICT_COLOUR = (96, 96, 96)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans (matplotlib ships it: Latin, Greek, Cyrillic, many symbols) at `size`: Pillow's own font
    drew accented letters, Greek and marks such as a check mark as empty boxes. Without FreeType, Pillow's
    bitmap font (Latin-1 only: `_drawable` replaces what it lacks)."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
            return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """`text` as `font` can draw it: a bitmap font (no FreeType) takes Latin-1 only, and raised
    UnicodeEncodeError on anything else; there, other characters become "?"."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _label_size(draw: ImageDraw.ImageDraw, text: str, font, pad: int) -> tuple[int, int, int, int]:
    """(width, height, left, top) of a label: the text's box plus padding, and the text's own offsets."""
    left, top, right, bottom = draw.textbbox((0, 0), _drawable(text, font), font=font)
    return right - left + 2 * pad, bottom - top + 2 * pad, left, top


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill, bounds: tuple[int, int],
           pad: int) -> tuple[float, float, float, float]:
    """`text` on a filled rectangle whose top-left is `xy`, moved inside the image when it would leave it;
    returns the rectangle."""
    text = _drawable(text, font)
    w, h, left, top = _label_size(draw, text, font, pad)
    x = min(max(0.0, xy[0]), max(0, bounds[0] - w))
    y = min(max(0.0, xy[1]), max(0, bounds[1] - h))
    draw.rectangle((x, y, x + w, y + h), fill=fill)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255))
    return x, y, x + w, y + h


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_detection(image: Image.Image, regions: Sequence[tuple[str, Sequence[float]]], verdict: str | None,
                   note: str | None = None) -> Image.Image:
    """A new RGB image: `image` with each (caption, box) of `regions` outlined and numbered, its caption
    above the box, and the verdict (or, without one, `note`) in the top-left corner."""
    out = pil_to_rgb(image)  # a copy, as the model saw it (transparency on white): the caller's image is left as is
    width, height = out.size
    scale = max(width, height)
    line = max(2, round(scale / 250))
    font = _font(max(10, round(scale / 45)))
    pad = max(2, line)
    draw = ImageDraw.Draw(out)
    if verdict in VERDICT_COLOURS:
        banner, banner_colour = verdict.upper(), VERDICT_COLOURS[verdict]
    else:
        banner, banner_colour = f"NO VERDICT{': ' + note if note else ''}", NO_VERDICT_COLOUR
    banner_font = _font(max(12, round(scale / 30)))
    bw, bh, _, _ = _label_size(draw, banner, banner_font, pad)
    if bw > width and note:  # the note would be cut off mid-word: the banner alone
        banner = "NO VERDICT"
        bw, bh, _, _ = _label_size(draw, banner, banner_font, pad)
    banner_box = (0, 0, min(bw, width), min(bh, height))
    for i, (caption, box) in enumerate(regions):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        cx1, cy1 = min(max(x1, 0.0), width - 1), min(max(y1, 0.0), height - 1)
        cx2, cy2 = min(max(x2, 0.0), width - 1), min(max(y2, 0.0), height - 1)
        draw.rectangle((cx1, cy1, cx2, cy2), outline=colour, width=line)
        text = f"{i + 1}. {caption}" if caption else f"{i + 1}"
        w, h, _, _ = _label_size(draw, text, font, pad)
        # Above the box; inside its top edge when there is no room above; below the verdict banner when
        # either place would hide under it (the banner is drawn last, on top).
        y = cy1 - h if cy1 - h >= 0 else cy1 + line
        if _overlaps((cx1, y, cx1 + w, y + h), banner_box):
            y = banner_box[3] + 1
        _label(draw, (cx1, y), text, font, colour, (width, height), pad)
    _label(draw, (0, 0), banner, banner_font, banner_colour, (width, height), pad)
    return out


def outline_corners(box, scale: int, size: tuple[int, int]) -> list[int]:
    """A box's (x2, y2 exclusive) outline on the image scaled `scale` times: its last pixels are x2 * scale - 1
    and y2 * scale - 1 (drawn at x2 * scale, a band's edge on the image's border fell outside the tile)."""
    x1, y1, x2, y2 = (int(round(v * scale)) for v in box)
    return [min(x1, size[0] - 1), min(y1, size[1] - 1), min(max(x2 - 1, x1), size[0] - 1),
            min(max(y2 - 1, y1), size[1] - 1)]


def overlay_sheet(images: list[dict], columns: dict[str, list[dict]], path: Path, scale: int = 3) -> Path:
    """One PNG side by side (the demo's before / after sheet): a row per image (`images`: its path "image" and
    true "boxes" in pixels), a column per named list of `fxjax detect` results (`columns`, a result per
    image); each tile the image `scale` times larger with its detection drawn (`draw_detection`) and the
    true regions outlined in white."""
    tiles = []
    for i, meta in enumerate(images):
        with Image.open(meta["image"]) as im:
            big = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        row = []
        for results in columns.values():
            r = results[i]
            regions = [(c["caption"], [v * scale for v in c["box"]]) for c in r["regions"]]
            tile = draw_detection(big, regions, r["verdict"], None if r["parsed"] else "answer did not parse")
            draw = ImageDraw.Draw(tile)
            for box in meta["boxes"]:
                draw.rectangle(outline_corners(box, scale, tile.size), outline=(255, 255, 255), width=1)
            row.append(tile)
        tiles.append(row)
    w, h = max(t.width for r in tiles for t in r), max(t.height for r in tiles for t in r)
    head, gap, foot = 22, 6, 34
    height = head + len(tiles) * (h + gap) + gap + foot
    sheet = Image.new("RGB", (len(columns) * (w + gap) + gap, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((gap + j * (w + gap), 5), name, fill=(0, 0, 0))
    draw.text((gap, height - foot + 2), "white outline: the true region (generated images)\ncoloured, numbered: the "
              "regions the model names; top left: its verdict", fill=(60, 60, 60))
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            sheet.paste(tile, (gap + j * (w + gap), head + i * (h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
