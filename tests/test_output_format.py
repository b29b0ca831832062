"""The output format (docs/format.md): rendering, and a parser that follows the authors' regexes
and never raises."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxjax.rewards import output_format as of
from fxjax.rewards import parse_box, parse_completion, render_completion, render_scaled_completion, scale_boxes
from fxjax.rewards.output_format import BOX_END, BOX_START, REF_END, REF_START

from reference_format import BOX_RE, GEN_RE, REAL_RE, REGION_RE, TAG_RE, THINK_RE, VERDICT_RE, ref_box

def ref_parse(text: str):
    boxes = [b for b in (ref_box(r) for r in BOX_RE.findall(text)) if b is not None]
    m = VERDICT_RE.search(text)
    verdict = None if m is None else m.group(1).strip().lower()
    return bool(GEN_RE.search(text)), bool(REAL_RE.search(text)), verdict, tuple(boxes)


# ---- rendering -----------------------------------------------------------------------------------

def test_render_completion_output_unchanged():
    """The data pipeline depends on this exact text; generated targets open <think> with a region."""
    out = render_completion("generated", [("six fingers", [10.4, 20, 30.6, 40]), ("eye", (1, 2, 3, 4))],
                            ["texture quality", "recognizability"], "The hand looks wrong.")
    assert out == ("<think><|object_ref_start|>six fingers<|object_ref_end|><|box_start|>[10, 20, 31, 40]<|box_end|>\n"
                   "<|object_ref_start|>eye<|object_ref_end|><|box_start|>[1, 2, 3, 4]<|box_end|>\n"
                   "The hand looks wrong.\n"
                   "<tag>texture quality, recognizability</tag>\n</think>\n<verdict>generated</verdict>")
    assert render_completion("real") == "<think>\n</think>\n<verdict>real</verdict>"
    assert render_completion("generated") == "<think>\n<tag></tag>\n</think>\n<verdict>generated</verdict>"
    with pytest.raises(ValueError, match="label must be one of"):
        render_completion("fake")


@pytest.mark.parametrize("label,regions,tags,reasoning", [
    ("generated", [("six fingers", [10, 20, 30, 40]), ("melted eye", [0, 5, 448, 392])], ["texture quality"], "r"),
    ("generated", [("a", [1, 2, 3, 4])], ["texture quality", "attribute correctness"], ""),
    ("real", [], [], "natural lighting, consistent shadows"),
    ("real", [], ["sharp"], ""),
])
def test_render_parse_round_trip(label, regions, tags, reasoning):
    p = parse_completion(render_completion(label, regions, tags, reasoning))
    assert p.verdict == label and p.label == label and p.label_ok(label)
    assert p.captions == tuple(c for c, _ in regions)
    assert p.boxes == tuple(tuple(float(v) for v in b) for _, b in regions)
    assert p.regions == tuple((c, tuple(float(v) for v in b)) for c, b in regions)
    assert p.tags == tuple(tags)
    assert p.skipped == ()
    if label == "real":
        assert p.format_ok("real")


def test_rendered_generated_target_passes_authors_format_check():
    for reasoning in ("", "The hand and the text look synthetic."):
        text = render_completion("generated", [("six fingers", [10, 20, 30, 40]), ("text", [1, 2, 3, 4])],
                                 ["texture quality"], reasoning)
        assert text.startswith("<think><|object_ref_start|>six fingers")
        assert bool(GEN_RE.search(text))
        assert parse_completion(text).format_ok("generated")
    real = render_completion("real", [], ["natural lighting"], "Consistent shadows.")
    assert bool(REAL_RE.search(real)) and parse_completion(real).format_ok("real")


def test_render_scaled_completion_scales_to_model_pixels_and_parse_scales_back():
    original, model = (1000, 2000), (500, 1000)  # (h, w)
    text = render_scaled_completion("generated", [("hand", [200, 100, 600, 300])], ["t"], original_size=original,
                         model_size=model)
    assert "[100, 50, 300, 150]" in text
    p = parse_completion(text, original_size=original, model_size=model)
    assert p.boxes == ((100.0, 50.0, 300.0, 150.0),)
    assert p.boxes_original == ((200.0, 100.0, 600.0, 300.0),)
    assert parse_completion(text).boxes_original is None
    # sizes that cannot be (height, width) pairs, one size alone, token ids: said (they gave None, or a score of
    # the text "[1, 2]", without a word)
    for sizes in (dict(original_size=(0, 5), model_size=model), dict(original_size="100x200", model_size=model),
                  dict(original_size=(1, 2, 3), model_size=model), dict(original_size=original)):
        with pytest.raises(ValueError, match="original_size and model_size"):
            parse_completion(text, **sizes)
    with pytest.raises(TypeError, match="a completion is a string, got a list: decode the tokens first"):
        parse_completion([1, 2])
    with pytest.raises(ValueError, match="give both original_size and model_size"):
        render_scaled_completion("generated", [("hand", [0, 0, 1, 1])], original_size=original)


def test_scale_boxes():
    b = np.array([[10, 20, 30, 40], [0, 0, 1, 1]], float)
    s = scale_boxes(b, from_size=(100, 200), to_size=(50, 400))  # y x 0.5, x x 2
    np.testing.assert_allclose(s, [[20, 10, 60, 20], [0, 0, 2, 0.5]])
    np.testing.assert_allclose(scale_boxes(s, (50, 400), (100, 200)), b)
    assert scale_boxes([], (1, 1), (2, 2)).shape == (0, 4)
    with pytest.raises(ValueError, match="sizes must be positive"):
        scale_boxes(b, (0, 1), (1, 1))


# ---- parsing: golden cases -----------------------------------------------------------------------

@pytest.mark.parametrize("raw,box", [
    ("[1, 2, 3, 4]", (1, 2, 3, 4)),
    (" [1.5,-2,3e2,4E-1] ", (1.5, -2, 300, 0.4)),
    ("[[1, 2], [3, 4]]", (1, 2, 3, 4)),
    ("[[1.5, 2],[3, 4.25]]", (1.5, 2, 3, 4.25)),
    ("[-0, 0, 10000000, 1]", (0, 0, 1e7, 1)),
    ("[1, 2, 3]", None), ("[1, 2, 3, 4, 5]", None), ("(1, 2), (3, 4)", None), ("1, 2, 3, 4", None),
    ("[NaN, 1, 2, 3]", None), ("[Infinity, 1, 2, 3]", None), ("[1e400, 0, 0, 0]", None),
    ("[true, 1, 2, 3]", None), ('["1", 2, 3, 4]', None), ("[null, 1, 2, 3]", None), ("[[1, 2], [3]]", None),
    ("[[1, 2], 3, 4]", None), ("[[1, 2, 3], [4, 5, 6]]", None), ("[1, 2, 3, 4", None), ("{}", None),
    ("[01, 2, 3, 4]", None), ("[.5, 2, 3, 4]", None), ("[+1, 2, 3, 4]", None), ("[1, 2, 3, 20000000]", None),
    ("[" * 100000 + "]" * 100000, None), ("[" + "1" * 5000 + ", 0, 0, 0]", None), ("", None),
])
def test_parse_box(raw, box):
    assert parse_box(raw) == box
    assert ref_box(raw) == box


def test_parse_golden():
    text = ("junk <think><|object_ref_start|> hand <|object_ref_end|>\n <|box_start|>[1, 2, 3, 4]<|box_end|>"
            "<|object_ref_start|>bad<|object_ref_end|><|box_start|>[1, 2, 3]<|box_end|>"
            "<|object_ref_start|>cap\nsplit<|object_ref_end|><|box_start|>[9, 9, 9, 9]<|box_end|>"
            "<|object_ref_start|>pairs<|object_ref_end|><|box_start|>[[5, 6], [7, 8]]<|box_end|>"
            "<tag> texture quality ,, attribute correctness </tag></think>  \n<verdict> GENERATED </verdict>"
            "<verdict>real</verdict>")
    p = parse_completion(text)
    assert p.format_ok_generated and p.format_ok_real
    assert p.verdict == "generated"
    assert p.boxes == ((1, 2, 3, 4), (5, 6, 7, 8)) and p.captions == ("hand", "pairs")
    assert p.skipped == (("bad", "[1, 2, 3]"),)  # the caption with a newline is not a region (no DOTALL)
    assert p.tags == ("texture quality", "attribute correctness")
    assert p.think.startswith("<|object_ref_start|> hand")


@pytest.mark.parametrize("text,verdict", [
    ("<verdict>real</verdict>", "real"), ("<verdict> Real\t</verdict>", "real"),
    ("<verdict>gen\nerated</verdict><verdict>fake</verdict>", "fake"),  # no DOTALL: the first on one line
    ("<verdict>generated", None), ("", None), ("<verdict></verdict>", ""),
])
def test_verdict(text, verdict):
    assert parse_completion(text).verdict == verdict
    assert parse_completion(text).label == (verdict if verdict in ("real", "generated") else None)


@pytest.mark.parametrize("text,gen,real", [
    ("<think><|object_ref_start|>a<|object_ref_end|><|box_start|>x<|box_end|><tag></tag></think><verdict>"
     "</verdict>", True, True),
    ("<think> r <|object_ref_start|>a<|object_ref_end|><|box_start|>x<|box_end|><tag></tag></think><verdict>"
     "</verdict>", False, True),  # text between <think> and the first region
    ("<think><|object_ref_start|>a<|object_ref_end|> x <|box_start|>x<|box_end|><tag></tag></think><verdict>"
     "</verdict>", False, True),  # non-space between ref_end and box_start
    ("<think><|object_ref_start|>a<|object_ref_end|><|box_start|>x<|box_end|></think><verdict>real</verdict>",
     False, True),  # no tag
    ("<think></think> x <verdict>real</verdict>", False, False),
    ("<think>\n</think>\n\t <verdict>\nreal\n</verdict>", False, True),
    ("<think></think><verdict>real", False, False),  # truncated
])
def test_format_golden(text, gen, real):
    p = parse_completion(text)
    assert (p.format_ok_generated, p.format_ok_real) == (gen, real)
    assert (bool(GEN_RE.search(text)), bool(REAL_RE.search(text))) == (gen, real)


def test_parse_non_strings():
    assert parse_completion(None).verdict is None
    assert parse_completion(b"<verdict>real</verdict>\xff").verdict == "real"
    with pytest.raises(TypeError, match="got a int"):  # (not a completion at all: a caller's mistake, said)
        parse_completion(123)


def test_pathological_completion_is_linear():
    """The literal generated-format regex backtracks exponentially here; the parser must not."""
    region = "<|object_ref_start|>a<|object_ref_end|><|box_start|>[1, 2, 3, 4]<|box_end|>"
    for text in ("<think>" + region * 400 + "</think><verdict>generated</verdict>",
                 ("<think>" + "<|object_ref_start|>" * 3000 + "<|object_ref_end|> ") * 3,
                 "<|object_ref_start|>" * 3000 + "<|object_ref_end|> x" * 3000 + "<|box_end|>",
                 "<|object_ref_start|>" * 3000 + "<|object_ref_end|><|box_start|>\n" * 3000 + "<|box_end|>",
                 "<verdict>" * 5000 + "</think> " * 5000, "<verdict>\n" * 5000 + "</verdict>",
                 "<tag><think>" * 5000):
        t0 = time.perf_counter()
        parse_completion(text)
        # a hang guard, not a speed claim: the backtracking regex takes hours on these, the parser milliseconds
        assert time.perf_counter() - t0 < 10


# ---- parsing: never raises, and agrees with the authors' regexes ----------------------------------

MARKERS = ["<think>", "</think>", "<tag>", "</tag>", "<verdict>", "</verdict>", REF_START, REF_END, BOX_START,
           BOX_END]
FRAGMENTS = MARKERS + [m[:-1] for m in MARKERS] + [m[1:] for m in MARKERS] + [
    " ", "\n", "\t", "\r\n", "\u00a0", "\u2003", "\x1c", "\x85", "real", "generated", " Real ", "GENERATED\n",
    "fake", "texture quality, recognizability", "[1, 2, 3, 4]", "[[1, 2], [3, 4]]", "[10.5, 20, 30.25, 40]",
    "[1, 2, 3]", "[NaN, 1, 2, 3]", "[1e400, 0, 0, 0]", "[true, 1, 2, 3]", "[[1, 2], [3]]", "[" * 30, "{}",
    '"x"', "[1, 2, 3, 4", "[-5, 0, 1e3, 2e3]", "(1,2),(3,4)", "[40, 30, 20, 10]", "\ud800", "\x00",
]
REGION = st.builds(lambda c, b, sep: f"{REF_START}{c}{REF_END}{sep}{BOX_START}{b}{BOX_END}",
                   st.sampled_from(["hand", "", " eye ", "a\nb", "<tag>"]), st.sampled_from(FRAGMENTS[30:]),
                   st.sampled_from(["", " ", "\n", "x"]))


@st.composite
def near_miss(draw):
    """A plausible completion, then cut, spliced or mutated."""
    regions = draw(st.lists(REGION, max_size=5))
    head = draw(st.sampled_from(["<think>", "<think> why\n", "", "<think>\n"]))
    tag = draw(st.sampled_from(["<tag>t1, t2</tag>", "", "<tag>t"]))
    tail = draw(st.sampled_from(["</think>\n<verdict>generated</verdict>", "</think><verdict>real</verdict>",
                                 "</think> . <verdict>real</verdict>", "</think>\n<verdict>gen", ""]))
    text = head + "\n".join(regions) + tag + tail
    cut = draw(st.integers(0, len(text)))
    op = draw(st.sampled_from(["keep", "truncate", "delete", "insert"]))
    if op == "truncate":
        return text[:cut]
    if op == "delete":
        return text[:cut] + text[cut + draw(st.integers(1, 20)):]
    if op == "insert":
        return text[:cut] + draw(st.sampled_from(FRAGMENTS)) + text[cut:]
    return text


STRINGS = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=20).map("".join),
    near_miss(),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(STRINGS)
def test_parser_never_raises_and_matches_authors_regexes(text):
    p = parse_completion(text)
    gen, real, verdict, boxes = ref_parse(text)
    assert (p.format_ok_generated, p.format_ok_real) == (gen, real)
    assert p.verdict == verdict
    assert p.boxes == boxes
    regions = REGION_RE.findall(text)
    assert of._region_spans(text) == regions  # fast path, falling back to the general one
    assert of._region_spans_from(text, 0) == regions  # the general path alone
    assert len(p.captions) == len(p.boxes)
    tag, think = TAG_RE.search(text), THINK_RE.search(text)
    assert p.think == (think and think.group(1))
    assert p.tags == (() if tag is None else tuple(t.strip() for t in tag.group(1).split(",") if t.strip()))
    assert all(math.isfinite(v) for b in p.boxes for v in b)


def test_linear_format_check_is_the_authors_regex_on_many_near_misses():
    """Cheap extra coverage of the format-check equivalence with plain numpy-random token strings."""
    rng = np.random.default_rng(0)
    pool = MARKERS + [" ", "\n", "x", "<|object_ref_end|> <|box_start|>", "</think>\n<verdict>"]
    authors_gen = re.compile(of.AUTHORS_FORMAT_GENERATED, re.DOTALL)
    authors_real = re.compile(of.AUTHORS_FORMAT_REAL, re.DOTALL)
    for _ in range(3000):
        text = "".join(rng.choice(pool, size=rng.integers(0, 16)))
        assert of.format_ok(text, "generated") == bool(GEN_RE.search(text)) == bool(authors_gen.search(text))
        assert of.format_ok(text, "real") == bool(REAL_RE.search(text)) == bool(authors_real.search(text))
