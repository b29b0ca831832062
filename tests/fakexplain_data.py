"""A tiny dataset shaped like the FakeXplain release (ms-swift JSONL, images relative to the JSONL), for tests.

Layout, as the release ships it: ``<folder>/<name>.jsonl`` and ``<folder>/images/{real,generated/<gen>}/...``;
generated records carry ``<ref-object><bbox>`` placeholders in the assistant text and the captions / boxes
(original-image pixels) in ``objects``; real ones have no objects (one with the key absent, one with empty
lists, as both occur in ms-swift data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SYSTEM = "You are an expert in detecting AI-generated images."
USER = "<image>Is this image real or generated? Point out the artefacts."

# (relative image path, size (w, h), PIL mode, label, [(caption, box)])
IMAGES = (
    ("images/generated/sdxl/000.png", (90, 70), "RGB", "generated",
     [("warped fingers", [10, 12, 40, 50]), ("melted text", [50, 5, 88, 30])]),
    ("images/real/coco_001.jpg", (64, 120), "RGB", "real", []),
    ("images/generated/midjourney/002.png", (100, 100), "RGBA", "generated", [("floating lamp", [0, 0, 100, 60])]),
    ("images/real/coco_003.jpg", (80, 60), "L", "real", []),
)


def assistant_text(label: str, n_regions: int) -> str:
    if label == "real":
        return "<think> Natural noise and consistent lighting.\n</think>\n<verdict>real</verdict>"
    spans = " and ".join("the <ref-object><bbox>" for _ in range(n_regions))
    return (f"<think> Look at {spans}: they are implausible.\n<tag>texture quality, attribute correctness</tag>\n"
            "</think>\n<verdict>generated</verdict>")


def fakexplain_records() -> list[dict]:
    rows = []
    for i, (rel, _, _, label, regions) in enumerate(IMAGES):
        row = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                            {"role": "assistant", "content": assistant_text(label, len(regions))}],
               "images": [rel]}
        if regions:
            row["objects"] = {"ref": [c for c, _ in regions], "bbox": [b for _, b in regions]}
        elif i % 2:
            row["objects"] = {"ref": [], "bbox": []}
        rows.append(row)
    return rows


def write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for rel, (w, h), mode, _, _ in IMAGES:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path)  # mode from the shape


def write_fakexplain(folder: Path, name: str = "train.jsonl", extra_lines: tuple[str, ...] = ()) -> Path:
    """Images and ``<folder>/<name>``; ``extra_lines`` (raw JSONL lines) are appended after the good records."""
    folder.mkdir(parents=True, exist_ok=True)
    write_images(folder)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in fakexplain_records()) +
                    "".join(line + "\n" for line in extra_lines))
    return path
