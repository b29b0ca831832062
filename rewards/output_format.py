"""The grounded output format (REFERENCE.md section 2): the one place that knows its markers.

A completion is
    <think> reasoning
    <|object_ref_start|>caption<|object_ref_end|><|box_start|>[x1, y1, x2, y2]<|box_end|> ...
    <tag>tag, tag</tag>
    </think>
    <verdict>generated</verdict>
with boxes in absolute pixels of the image as the model sees it (after smart_resize).
"""

from __future__ import annotations

from typing import Sequence

THINK_START, THINK_END = "<think>", "</think>"
TAG_START, TAG_END = "<tag>", "</tag>"
VERDICT_START, VERDICT_END = "<verdict>", "</verdict>"
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
# Added to the tokenizer as special tokens by the authors; the grounding tokens already exist in Qwen's vocab.
FORMAT_MARKERS = (THINK_START, THINK_END, TAG_START, TAG_END, VERDICT_START, VERDICT_END)
LABELS = ("real", "generated")


def format_box(box: Sequence[float]) -> str:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return f"[{x1}, {y1}, {x2}, {y2}]"


def render_completion(label: str, regions: Sequence[tuple[str, Sequence[float]]] = (),
                      tags: Sequence[str] = (), reasoning: str = "") -> str:
    """The SFT target. `regions` are (caption, box) with boxes already in model-input pixels."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    lines = [f"{THINK_START} {reasoning}".rstrip()]
    for caption, box in regions:
        lines.append(f"{REF_START}{caption}{REF_END}{BOX_START}{format_box(box)}{BOX_END}")
    if tags or label == "generated":  # the format check for generated images requires a tag block
        lines.append(f"{TAG_START}{', '.join(tags)}{TAG_END}")
    lines.append(THINK_END)
    lines.append(f"{VERDICT_START}{label}{VERDICT_END}")
    return "\n".join(lines)
