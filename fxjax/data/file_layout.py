"""What a dataset file is as a whole, told from its start (`whole_file_problem`): gzip, UTF-16, one JSON array
or one pretty-printed object, a COCO annotation file, a CSV. Each line's own error, 74 times "invalid JSON"
or "not valid UTF-8", said none of it."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

__all__ = ["whole_file_problem"]


def whole_file_problem(path: Path) -> str | None:
    """What makes a whole file other than JSON Lines, told from its start (each line's own error, 74 times
    "invalid JSON" or "not valid UTF-8", said none of it): gzip, UTF-16, one JSON array, or one JSON object
    over several lines. None for a file that may be JSONL."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed: decompress it first (gunzip -k FILE)"
    image = next((name for name, magic in _IMAGE_SIGNATURES if head.startswith(magic)), None)
    if image is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        image = "WebP"
    if image is None and head[:2] == b"BM" and head[6:10] == bytes(4):  # (a BMP's reserved bytes: not text)
        image = "BMP"
    if image is not None:
        return (f"is a {image} image, not a JSON Lines file of records: give the .jsonl that names the "
                f"images, one record per line (docs/data.md)")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "is UTF-16 text: save it as UTF-8"
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    first = text.splitlines()[0].strip() if text else ""
    if _looks_like_coco(text, first):
        return ("looks like a COCO annotation file (one object with 'images' and 'annotations'), not JSON Lines "
                "records: convert it to one record per image (docs/data.md, \"From a COCO annotation file\")")
    if first and not first.startswith(("{", "[")) and ("," in first or "\t" in first) and \
            path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return ("looks like CSV, not JSON Lines (one JSON record per line): convert it (docs/data.md, \"From a CSV "
                "or COCO's boxes\")")
    if first.startswith("[") and not first.endswith("]"):
        return "holds one JSON array, not JSON Lines (one record per line): convert it, e.g. jq -c '.[]' FILE"
    if first == "{":
        return "holds JSON spread over lines (pretty-printed), not JSON Lines (one record per line): convert it, " \
               "e.g. jq -c . FILE"
    if first.startswith("{") and _spread_over_lines(text, first):
        return ("holds a record spread over lines (line 1 is not a whole JSON object, lines 1 and on are), not "
                "JSON Lines (one record per line): put each record on one line, e.g. jq -c . FILE")
    if first.startswith("[") and first.endswith("]"):
        try:
            if isinstance(json.loads(first), list):
                return ("holds a JSON array on a line, not JSON Lines (one record per line): convert it, e.g. "
                        "jq -c '.[]' FILE")
        except ValueError:
            pass
    return None


# the first bytes of the image files a dataset's JSONL names, given instead of it
_IMAGE_SIGNATURES = (("JPEG", b"\xff\xd8\xff"), ("PNG", b"\x89PNG\r\n\x1a\n"), ("GIF", b"GIF8"),
                     ("TIFF", b"II*\x00"), ("TIFF", b"MM\x00*"))


def _looks_like_coco(text: str, first: str) -> bool:
    """A COCO annotation file: one object whose 'images' and 'annotations' are lists. Where the file's first
    line is a whole JSON object, that object is looked at (a JSONL record with an "info" or "images" key of
    its own is no COCO file); else (pretty-printed, or a first line past the 4 KiB read) its keys' shapes."""
    if not text.startswith("{"):
        return False
    try:
        obj = json.loads(first)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return isinstance(obj.get("images"), list) and isinstance(obj.get("annotations"), list)
    return bool(re.search(r'"images"\s*:\s*\[\s*\{', text)
                and re.search(r'"(annotations|categories|licenses)"\s*:\s*\[', text))


def _spread_over_lines(text: str, first: str) -> bool:
    """Whether the file's first line is not a JSON value but its first lines together are one object (an
    example record wrapped for reading, copied as it is)."""
    try:
        json.loads(first)
        return False
    except ValueError:
        pass
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return False  # (a broken first line: its own error says where)
    return isinstance(value, dict) and "\n" in text[:end]
