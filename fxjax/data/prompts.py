"""Prompts and targets in the Qwen2.5-VL chat format.

* :data:`SYSTEM_PROMPT` and nine distinct :data:`USER_TEMPLATES` asking for the grounded analysis;
  :func:`pick_template` chooses one per (seed, record, epoch), deterministically and independently of
  sharding, worker count or iteration order;
* :func:`render_prompt` renders ``<|im_start|>system ... <|im_start|>assistant\\n`` exactly as
  Qwen2.5-VL's chat template does for ``[image, text]`` content, with ``<|image_pad|>`` repeated to the
  image's token count;
* :func:`render_target` gives the SFT completion: ``rewards.output_format.render_completion`` for
  native records, the record's own assistant text with its ``<ref-object><bbox>`` placeholders filled
  in for ms-swift records. Boxes are in model-input pixels either way.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from fxjax.data.formats import (IM_END, IM_START, IMAGE_PAD, SWIFT_BBOX, SWIFT_IMAGE, SWIFT_REF, VISION_END,
                                VISION_START)
from fxjax.data.records import Record
from fxjax.rewards.output_format import (BOX_END, BOX_START, REF_END, REF_START, TAG_END, TAG_START, THINK_END,
                                         THINK_START, VERDICT_END, VERDICT_START, format_box, render_completion)

__all__ = [
    "IMAGE_PAD",
    "QWEN_DEFAULT_SYSTEM",
    "SYSTEM_PROMPT",
    "USER_TEMPLATES",
    "pick_template",
    "prompt_parts",
    "render_prompt",
    "render_target",
    "serving_prompt",
]

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."

SYSTEM_PROMPT = (
    "You are an image forensics expert. Decide whether an image is a real photograph or was generated "
    f"by an AI model. Reason step by step inside {THINK_START} {THINK_END}. For a generated image, "
    f"ground every artefact you find as {REF_START}short description{REF_END}{BOX_START}[x1, y1, x2, y2]"
    f"{BOX_END} in pixel coordinates of the image as you see it, and list image-level qualities that "
    f"are wrong inside {TAG_START} {TAG_END}. Finish with {VERDICT_START}real{VERDICT_END} or "
    f"{VERDICT_START}generated{VERDICT_END}."
)

USER_TEMPLATES: tuple[str, ...] = (
    "Is this image real or AI-generated? Explain your reasoning and locate any artefacts.",
    "Analyse this image for signs of AI generation. Point out suspicious regions with bounding boxes, "
    "then give your verdict.",
    "Examine the picture carefully: was it captured by a camera or synthesised by a generative model? "
    "Ground your evidence in the image.",
    "Please determine whether this image is authentic or generated, marking every region that reveals "
    "synthesis.",
    "Act as a forensic analyst. Inspect the textures, lighting, geometry and fine details of this image, "
    "box any anomalies, and conclude whether it is real or generated.",
    "Could this image have been produced by an AI model? Give a grounded analysis with boxes around the "
    "evidence.",
    "Look for generation artefacts in this image. Describe and localise each one, name the affected "
    "qualities, and state whether the image is real or generated.",
    "Decide whether this is a genuine photograph. Support your answer with region-level evidence.",
    "Detect whether this image is AI-generated. Think step by step, localise artefacts with bounding "
    "boxes, and end with your verdict.",
)


def pick_template(seed: int, record_index: int, epoch: int, n: int = len(USER_TEMPLATES)) -> int:
    """Template index for one record in one epoch: a pure function of (seed, record, epoch)."""
    if min(seed, record_index, epoch) < 0:
        raise ValueError(f"seed, record index and epoch must be >= 0, got {(seed, record_index, epoch)}")
    return int(np.random.default_rng((seed, record_index, epoch, 0x9E37)).integers(n))


def prompt_parts(system: str, user: str) -> tuple[str, str]:
    """The chat prompt split around the image tokens: ``(before, after)``.

    The full prompt is ``before + "<|image_pad|>" * n + after``. ``user`` may contain one ms-swift
    ``<image>`` tag marking where the image goes; without one the image comes first, as Qwen2.5-VL's
    template renders content ``[{"type": "image"}, {"type": "text"}]``.
    """
    head, sep, tail = user.partition(SWIFT_IMAGE)
    if not sep:
        head, tail = "", user
    before = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{head}{VISION_START}"
    after = f"{VISION_END}{tail}{IM_END}\n{IM_START}assistant\n"
    return before, after


def render_prompt(system: str, user: str, image_tokens: int = 1) -> str:
    """The chat text of one image and `user`'s question under `system`, up to the assistant's turn, with
    `image_tokens` <|image_pad|> tokens: prod(image_grid_thw) // 4 for an image of `fxjax.process_image` (one
    per 2x2 merged patches). The text training prompts with (and `fxjax detect` serves), byte for byte."""
    before, after = prompt_parts(system, user)
    return before + IMAGE_PAD * image_tokens + after


def serving_prompt(system_prompt: str | None, user_prompt: str | None) -> dict[str, str]:
    """The system and user prompt for an image outside the training data (`fxjax detect`, a server), from
    the data settings a model trained with: those texts, else the built-in system prompt and the first
    template (None means unset; an empty string is a prompt)."""
    return dict(system=system_prompt if system_prompt is not None else SYSTEM_PROMPT,
                user=user_prompt if user_prompt is not None else USER_TEMPLATES[0])


def record_prompt(record: Record, template: int, system_prompt: str | None = None,
                  prompts: str = "auto", user_prompt: str | None = None) -> tuple[str, str]:
    """(system, user) for a record: the templates (or ``user_prompt`` when given, for every record), or for
    ms-swift records (prompts 'auto'/'record') its own."""
    if prompts not in ("auto", "record", "templates"):
        raise ValueError(f"prompts must be 'auto', 'record' or 'templates', got {prompts!r}")
    if record.format == "swift" and prompts != "templates":
        return (record.system if record.system is not None else QWEN_DEFAULT_SYSTEM), (record.user or "")
    if prompts == "record":
        raise ValueError(f"{record.source}: native records have no prompts of their own; use prompts='templates'")
    user = user_prompt if user_prompt is not None else USER_TEMPLATES[template]
    return (system_prompt if system_prompt is not None else SYSTEM_PROMPT), user


def render_target(record: Record, boxes: Sequence[Sequence[float]]) -> str:
    """The assistant text with ``boxes`` (one per region, model-input pixels) in grounding tokens."""
    if len(boxes) != len(record.regions):
        raise ValueError(f"{record.source}: {len(boxes)} boxes for {len(record.regions)} regions")
    if record.format != "swift":
        regions = [(r.caption, b) for r, b in zip(record.regions, boxes)]
        return render_completion(record.label, regions, record.tags, record.reasoning)
    # As ms-swift: the i-th <ref-object> becomes the i-th caption, the i-th <bbox> the i-th box.
    refs = iter(f"{REF_START}{r.caption}{REF_END}" for r in record.regions)
    boxes_text = iter(f"{BOX_START}{format_box(b)}{BOX_END}" for b in boxes)
    pattern = re.compile(f"({re.escape(SWIFT_REF)})|{re.escape(SWIFT_BBOX)}")
    return pattern.sub(lambda m: next(refs) if m.group(1) else next(boxes_text), record.assistant or "")
