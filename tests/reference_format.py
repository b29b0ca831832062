"""The authors' output-format regexes and box rule, written out from docs/format.md independently of
rewards/output_format.py: the plain-Python reference that test_output_format and test_rewards check the
parser and the jitted rewards against."""

from __future__ import annotations

import json
import math
import re

from fxjax.rewards.output_format import BOX_END, BOX_START, REF_END, REF_START

E = re.escape
GEN_RE = re.compile(r"<think>(" + E(REF_START) + r".*?" + E(REF_END) + r"\s*" + E(BOX_START) + r".*?" + E(BOX_END)
                    + r".*?)+.*?<tag>.*?</tag>.*?</think>\s*<verdict>.*?</verdict>", re.DOTALL)
# Under DOTALL, `(G)+.*?` accepts what `G.*?` accepts (G ends in a lazy `.*?` that can absorb later
# repetitions), so whether the search succeeds is the same with one repetition; the nested form backtracks
# exponentially on completions with many regions, so bulk checks use the flat one.
GEN_FLAT_RE = re.compile(r"<think>" + E(REF_START) + r".*?" + E(REF_END) + r"\s*" + E(BOX_START) + r".*?"
                         + E(BOX_END) + r".*?<tag>.*?</tag>.*?</think>\s*<verdict>.*?</verdict>", re.DOTALL)
REAL_RE = re.compile(r"<think>.*?</think>\s*<verdict>.*?</verdict>", re.DOTALL)
BOX_RE = re.compile(E(REF_START) + r".*?" + E(REF_END) + r"\s*" + E(BOX_START) + r"(.*?)" + E(BOX_END))
VERDICT_RE = re.compile(r"<verdict>(.*?)</verdict>")
REGION_RE = re.compile(E(REF_START) + r"(.*?)" + E(REF_END) + r"\s*" + E(BOX_START) + r"(.*?)" + E(BOX_END))
TAG_RE = re.compile(r"<tag>(.*?)</tag>", re.DOTALL)
THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def ref_box(raw: str) -> tuple[float, float, float, float] | None:
    """docs/format.md: a JSON list of four numbers or of two [x, y] pairs; anything else is not a box.
    Plus this project's rule: numbers finite, |x| <= 1e7, booleans are not numbers."""
    try:
        v = json.loads(raw)
    except Exception:
        return None
    if isinstance(v, list) and len(v) == 2 and all(isinstance(p, list) and len(p) == 2 for p in v):
        v = [v[0][0], v[0][1], v[1][0], v[1][1]]
    if not (isinstance(v, list) and len(v) == 4):
        return None
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        return None
    try:
        v = [float(x) for x in v]
    except OverflowError:
        return None
    return tuple(v) if all(math.isfinite(x) and abs(x) <= 1e7 for x in v) else None
