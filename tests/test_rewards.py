"""GRPO rewards (docs/rewards.md): golden cases per part and stage, and the jitted batch function against
a plain-Python implementation on 1,000 random cases."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxjax import rewards
from fxjax.rewards import RewardWeights, box_iou, continuous_weights, load_stage, score
from fxjax.rewards.output_format import BOX_END, BOX_START, REF_END, REF_START
from fxjax.rewards.stages import CONFIG_PATH, load_config

from reference_format import BOX_RE, GEN_FLAT_RE, GEN_RE, REAL_RE, VERDICT_RE, ref_box


# ---- a plain-Python implementation of docs/rewards.md ---------------------------------------------

STAGES = {  # the table in docs/rewards.md: base, w_iou, label +/-, format +/-
    "alpha": (0, 1.0, 1, -1, 2, -1),
    "beta": (0, 1.5, 2, -2, 1, -1),
    "gamma": (-1, 2.0, 0.5, -1, 0.5, -1),
}


def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_centre_distance(a, b):
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    return math.sqrt(dx * dx + dy * dy)


def ref_matched_iou(preds, gts):
    if not preds or not gts:
        return 0.0
    unmatched, total = list(range(len(gts))), 0.0
    for p in preds:
        if not unmatched:
            break
        j = min(unmatched, key=lambda j: ref_centre_distance(p, gts[j]))
        unmatched.remove(j)
        total += ref_iou(p, gts[j])
    return total / len(gts)


def ref_reward(completion, target, w, relaxation="paper", eta=1.1, power=1.1):
    base, w_iou, lp, lm, fp, fm = w
    label = target["label"]
    fmt = bool((GEN_FLAT_RE if label == "generated" else REAL_RE).search(completion))
    if label == "generated" and completion.count(BOX_END) <= 4:
        assert fmt == bool(GEN_RE.search(completion))
    m = VERDICT_RE.search(completion)
    lab = m is not None and m.group(1).strip().lower() == label
    if label == "real":
        iou = 1.0
    else:
        preds = [b for b in (ref_box(r) for r in BOX_RE.findall(completion)) if b is not None]
        iou = ref_matched_iou(preds, [list(map(float, b)) for b in target["boxes"]])
    r_g = min(1.0, eta * iou) if relaxation == "paper" else iou ** power
    return dict(total=base + w_iou * r_g + (lp if lab else lm) + (fp if fmt else fm), format=float(fmt),
                label=float(lab), iou=iou, iou_relaxed=r_g)


# ---- helpers --------------------------------------------------------------------------------------

def region(box, caption="artifact", sep=""):
    text = box if isinstance(box, str) else "[" + ", ".join(str(v) for v in box) + "]"
    return f"{REF_START}{caption}{REF_END}{sep}{BOX_START}{text}{BOX_END}"


def completion(boxes=(), verdict="generated", tag=True, reasoning=""):
    """A completion that passes the generated format check (when it has a box, a tag and a verdict)."""
    return ("<think>" + reasoning + "".join(region(b) for b in boxes) + ("<tag>texture quality</tag>" if tag else "")
            + "</think>\n" + (f"<verdict>{verdict}</verdict>" if verdict is not None else ""))


def iou_of(boxes, gt):
    return float(score([completion(boxes)], [{"label": "generated", "boxes": gt}])["iou"][0])


# ---- golden: IoU ----------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,want", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3),
    ([0, 0, 4, 4], [1, 1, 3, 3], 0.25),
    ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),  # apart on both axes: the authors' product clamp would give 1.0
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching
    ([10, 10, 0, 0], [0, 0, 10, 10], 0.0),  # inverted prediction
    ([10, 0, 0, 10], [0, 0, 10, 10], 0.0),  # inverted on one axis only: negative area, union 0 -> 0
    ([3, 3, 3, 3], [3, 3, 3, 3], 0.0),  # union 0
    ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),
])
def test_iou_golden(a, b, want):
    assert float(box_iou(np.array(a, float), np.array(b, float))) == pytest.approx(want, abs=1e-7)
    assert ref_iou(a, b) == pytest.approx(want, abs=1e-12)
    assert iou_of([a], [b]) == pytest.approx(want, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e7, 1e7, allow_nan=False), min_size=8, max_size=8))
def test_iou_in_unit_interval(v):
    out = float(box_iou(np.array(v[:4]), np.array(v[4:])))
    assert 0.0 <= out <= 1.0


# ---- golden: matching -----------------------------------------------------------------------------

A, B = [0, 0, 10, 10], [20, 0, 30, 10]


def test_matching_nearest_centre_in_output_order():
    # [12, 0, 22, 10] (centre 17) is nearer B (centre 25) than A (centre 5): IoU with B = 20 / 180.
    assert iou_of([[12, 0, 22, 10], A], [A, B]) == pytest.approx((1 / 9 + 1) / 2, abs=1e-12)


def test_matching_is_greedy_not_optimal():
    a, b = [0, 0, 10, 10], [4, 0, 14, 10]
    # p1 (centre 8) takes b (IoU 90/110); p2 == b then gets a (IoU 60/140). Optimal would be 7/13 + 1.
    assert iou_of([[3, 0, 13, 10], b], [a, b]) == pytest.approx((9 / 11 + 3 / 7) / 2, abs=1e-12)


def test_matching_tie_goes_to_lowest_gt_index():
    a, b, p = [0, 0, 10, 10], [16, -5, 34, 15], [10, 0, 20, 10]  # centres 5 and 25; p's centre 15: a tie
    assert ref_centre_distance(p, a) == ref_centre_distance(p, b)
    assert iou_of([p], [a, b]) == 0.0  # a (index 0): touching, IoU 0
    assert iou_of([p], [b, a]) == pytest.approx((2 / 21) / 2, abs=1e-12)  # b first: 40 / 420


def test_matching_extra_missing_and_no_predictions():
    assert iou_of([A, A, B], [A]) == 1.0  # later predictions match nothing
    assert iou_of([A, [100, 100, 110, 110]], [A]) == 1.0
    assert iou_of([A], [A, B]) == 0.5  # missing predictions
    assert iou_of([], [A, B]) == 0.0  # no predicted boxes
    assert iou_of(["[1, 2, 3]", "[NaN, 0, 1, 1]", "(0,0),(10,10)", [[0, 0], [10, 10]]], [A]) == 1.0  # skipped
    assert iou_of([A], []) == 0.0  # generated with no GT boxes: nothing to match (0 / 0 -> 0)


def test_matching_a_true_box_whose_distance_overflows_never_takes_a_box_twice():
    """A true box far enough away that its squared centre distance overflows to inf tied with the taken boxes'
    inf: argmin took box 0 a second time (IoU 1.0 for one of two boxes found); the far box is now the only one
    left to take, at IoU 0."""
    far = [1e200, 1e200, 1e200 + 1, 1e200 + 1]
    assert iou_of([A, A], [A, far]) == 0.5


def test_caption_with_newline_is_not_a_region():
    text = (f"<think>{REF_START}a\nb{REF_END}{BOX_START}[0, 0, 10, 10]{BOX_END}<tag>t</tag></think>"
            "<verdict>generated</verdict>")
    out = score([text], [{"label": "generated", "boxes": [A]}])
    assert out["iou"][0] == 0.0 and out["format"][0] == 1.0


def test_real_ground_truth_iou_term_is_one():
    out = score(["<think>fine</think><verdict>real</verdict>", completion([B]), "nothing"],
                [{"label": "real"}, {"label": "real", "boxes": [A]}, {"label": "real", "boxes": []}])
    np.testing.assert_array_equal(out["iou"], [1, 1, 1])
    np.testing.assert_array_equal(out["format"], [1, 1, 0])
    np.testing.assert_array_equal(out["label"], [1, 0, 0])


# ---- golden: relaxations, label, format, stages ----------------------------------------------------

HALF = [0, 0, 5, 10]  # IoU 0.5 with A


@pytest.mark.parametrize("iou_boxes,relaxation,want", [
    ([HALF], "paper", 0.55), ([HALF], "authors", 0.5 ** 1.1),
    ([[0, 0, 10, 9.5]], "paper", 1.0), ([[0, 0, 10, 9.5]], "authors", 0.95 ** 1.1),
    ([], "paper", 0.0), ([], "authors", 0.0), ([A], "authors", 1.0),
])
def test_relaxations(iou_boxes, relaxation, want):
    out = score([completion(iou_boxes)], [{"label": "generated", "boxes": [A]}], relaxation=relaxation)
    assert out["iou_relaxed"][0] == pytest.approx(want, abs=1e-12)
    eta = score([completion(iou_boxes)], [{"label": "generated", "boxes": [A]}], eta=1.5)["iou_relaxed"][0]
    assert eta == pytest.approx(min(1.0, 1.5 * (out["iou"][0])), abs=1e-12)


GOOD = completion([HALF])  # format ok, verdict generated, IoU 0.5 -> R_G 0.55
BAD = completion([HALF], verdict="real", tag=False)  # format fails, label wrong, IoU 0.5
GT = {"label": "generated", "boxes": [A]}
REAL_GOOD = "<think>looks natural</think>\n<verdict>Real</verdict>"


@pytest.mark.parametrize("stage,good,bad,real", [
    ("alpha", 0.55 + 1 + 2, 0.55 - 1 - 1, 1 + 1 + 2),
    ("beta", 1.5 * 0.55 + 2 + 1, 1.5 * 0.55 - 2 - 1, 1.5 + 2 + 1),
    ("gamma", -1 + 2 * 0.55 + 0.5 + 0.5, -1 + 2 * 0.55 - 1 - 1, -1 + 2 + 0.5 + 0.5),
])
def test_stage_totals_golden(stage, good, bad, real):
    out = score([GOOD, BAD, REAL_GOOD], [GT, GT, {"label": "real", "boxes": []}], stage=stage)
    np.testing.assert_allclose(out["total"], [good, bad, real], atol=1e-12)
    np.testing.assert_array_equal(out["format"], [1, 0, 1])
    np.testing.assert_array_equal(out["label"], [1, 0, 1])
    np.testing.assert_allclose(out["iou"], [0.5, 0.5, 1.0], atol=1e-12)


def test_label_and_format_parts_golden():
    cases = {  # completion -> (format, label) against a generated ground truth
        completion([A]): (1, 1),
        completion([A], verdict=" GENERATED "): (1, 1),
        completion([A], verdict="gen\nerated"): (1, 0),  # verdict spans a line: format ok, label not found
        completion([A], verdict="fake"): (1, 0),
        completion([A], reasoning="because "): (0, 1),  # text before the first region
        completion([], verdict="generated"): (0, 1),  # no region
        completion([A], verdict=None): (0, 0),
        completion([A])[:-5]: (0, 0),  # truncated
    }
    texts = list(cases)
    out = score(texts, [GT] * len(texts))
    np.testing.assert_array_equal(np.stack([out["format"], out["label"]], 1), list(cases.values()))


def test_continuous_schedule():
    assert continuous_weights(0, 100) == RewardWeights(0, 0.5, 1, -1, 1, -1)
    assert continuous_weights(50, 100).w_iou == 0.75
    assert continuous_weights(100, 100).w_iou == 1.0
    assert continuous_weights(250, 100).w_iou == 1.0 and continuous_weights(-5, 100).w_iou == 0.5
    for t, w in ((0, 0.5), (50, 0.75), (100, 1.0)):
        out = score([GOOD, BAD], [GT, GT], stage="continuous", step=t, total_steps=100)
        np.testing.assert_allclose(out["total"], [w * 0.55 + 2, w * 0.55 - 2], atol=1e-12)
    with pytest.raises(ValueError, match="needs step and total_steps"):
        score([GOOD], [GT], stage="continuous")
    with pytest.raises(ValueError, match="T must be positive, got 0"):
        continuous_weights(1, 0)


def test_presets_yaml_matches_reference_table():
    assert CONFIG_PATH.is_file()
    cfg = load_config()
    assert cfg["relaxation"] == "paper" and cfg["eta"] == 1.1 and cfg["power"] == 1.1
    for stage, row in STAGES.items():
        assert load_stage(stage) == RewardWeights(*row)
        assert load_stage(stage, CONFIG_PATH) == RewardWeights(*row)
    with pytest.raises(ValueError, match="no reward stage 'delta'"):
        load_stage("delta")


def test_a_bad_reward_file_is_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [alpha\n")
    with pytest.raises(ValueError, match=r"reward config .*broken.yaml: invalid YAML"):
        load_stage("alpha", broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("\n".join(line.replace("label_plus", "label_pls") if line.strip().startswith("alpha:") else line
                              for line in CONFIG_PATH.read_text().splitlines()))
    with pytest.raises(ValueError, match=r"typo.yaml: stages.alpha: unknown keys \['label_pls'\], missing keys "
                                         r"\['label_plus'\]"):
        load_stage("alpha", typo)
    with pytest.raises(FileNotFoundError, match=r"reward config .*nowhere.yaml does not exist"):
        load_stage("alpha", tmp_path / "nowhere.yaml")
    # every key is checked: a misspelt one was ignored (its default used), a bad value found mid-run
    preset = CONFIG_PATH.read_text()
    for n, (old, new, error) in enumerate([
            ("relaxation: paper", "relaxtion: authors", r"unknown keys \['relaxtion'\]; a reward config has relaxation, "
                                                        r"eta, power, stages, continuous"),
            ("eta: 1.1", "eta: abc", r"eta: must be a finite number, got 'abc'"),
            ("power: 1.1", "power: -2", r"power: must be positive, got -2"),
            ("  w_iou_end: 1.0", "  w_iou_end: .nan", r"continuous.w_iou_end: must be a finite number, got nan"),
            ("  format_minus: -1.0\n", "  format_minus: -1.0\n  format_mins: 1\n",
             r"continuous: unknown keys \['format_mins'\]$"),
            ("alpha: {base: 0.0,", "alpha: {base: x,", r"stages.alpha.base: must be a finite number, got 'x'"),
            # a weight of the wrong sign trains the opposite of what it says, without an error
            ("label_minus: -2.0", "label_minus: 2.5", r"stages.beta.label_minus \(2.5\) is above label_plus \(2\): a "
                                                      r"wrong verdict would score more than a right one \(the \*_minus "
                                                      r"values are added as written, so a penalty is negative: "
                                                      r"label_minus: -2.5\)"),
            ("format_plus: 0.5, format_minus: -1.0", "format_plus: -1.5, format_minus: -1.0",
             r"stages.gamma.format_minus \(-1\) is above format_plus \(-1.5\): a wrong answer format would score more "
             r"than a right one \(swapped\? format_plus: -1, format_minus: -1.5\)"),
            # negating the minus would still leave it above the plus: swapped, not a sign
            ("label_plus: 2.0, label_minus: -2.0", "label_plus: -3.0, label_minus: 2.0",
             r"stages.beta.label_minus \(2\) is above label_plus \(-3\): a wrong verdict would score more than a right "
             r"one \(swapped\? label_plus: 2, label_minus: -3\)"),
            ("base: -1.0, w_iou: 2.0", "base: -1.0, w_iou: -2.0", r"stages.gamma.w_iou: must be >= 0 \(a negative "
                                                                 r"weight rewards boxes away from the artefacts\), got -2"),
            ("  w_iou_start: 0.5", "  w_iou_start: -0.5", r"continuous.w_iou_start: must be >= 0")]):
        assert old in preset, old
        bad = tmp_path / f"bad{n}.yaml"
        bad.write_text(preset.replace(old, new, 1))
        with pytest.raises(ValueError, match=rf"bad{n}.yaml: {error}"):
            load_stage("beta", bad)
    strings = tmp_path / "strings.yaml"  # a number YAML reads as a string (1e-3 has no dot) still counts
    strings.write_text(preset.replace("eta: 1.1", "eta: 11e-1"))
    assert load_config(strings)["eta"] == "11e-1"
    without = tmp_path / "without_continuous.yaml"
    without.write_text(preset[:preset.index("# Continuous alternative")])
    assert load_stage("gamma", without) == load_stage("gamma")
    with pytest.raises(ValueError, match=r"without_continuous.yaml: no 'continuous' section, which the continuous "
                                         r"schedule \(grpo.schedule=continuous\) reads"):
        continuous_weights(1, 10, without)
    with pytest.raises(ValueError, match=rf"reward config {tmp_path}: cannot be read \(Is a directory\)"):
        load_stage("alpha", tmp_path)


def test_weights_override_and_options():
    w = RewardWeights(base=10, w_iou=0, label_plus=0, label_minus=0, format_plus=0, format_minus=0)
    assert score([GOOD], [GT], weights=w)["total"][0] == 10
    assert score([GOOD], [GT], weights=dict(base=0, w_iou=2, label_plus=0, label_minus=0, format_plus=0,
                                            format_minus=0))["total"][0] == pytest.approx(1.1)
    with pytest.raises(ValueError, match=r"missing keys \['format_minus'"):
        score([GOOD], [GT], weights=dict(base=0))
    with pytest.raises(ValueError, match="relaxation must be one of"):
        score([GOOD], [GT], relaxation="cubic")
    with pytest.raises(ValueError, match="no reward stage 'delta'"):
        score([GOOD], [GT], stage="delta")


def test_grouping_and_validation():
    out = score([GOOD, BAD, REAL_GOOD, GOOD], [GT, {"label": "real"}])  # two groups of two
    np.testing.assert_array_equal(out["label"], [1, 0, 1, 0])
    assert score([], [])["total"].shape == (0,)
    with pytest.raises(ValueError, match="3 completions do not split into groups over 2 targets"):
        score([GOOD] * 3, [GT, GT])
    with pytest.raises(ValueError, match="4 completions != 2 targets x group size 3"):
        score([GOOD] * 4, [GT, GT], group_size=3)
    with pytest.raises(TypeError, match="got one string: pass \\[completion\\]"):  # not 26 characters scored
        score(GOOD, [GT])
    with pytest.raises(TypeError, match="got one dict: pass \\[target\\]"):
        score([GOOD], GT)
    # token ids (generate's rows) were scored as the text "[1, 2, 3]": -1, no word; a generator had "no len()"
    with pytest.raises(TypeError, match=r"completions\[1\] is a list, not a string: decode the tokens first"):
        score([GOOD, [1, 2, 3]], [GT, GT])
    np.testing.assert_array_equal(score((c for c in [GOOD, None]), iter([GT, GT]))["format"], [1, 0])
    for bad, says in (({"label": "fake", "boxes": []}, "label must be one of"), ({"boxes": []}, "needs a 'label' key"),
                      ({"label": "generated", "boxes": [[1, 2, 3]]}, r"got shape \(1, 3\)"),
                      ({"label": "generated", "boxes": [[0, 0, float("nan"), 1]]}, "boxes must be finite")):
        with pytest.raises(ValueError, match=says):
            score([GOOD], [bad])
    # a generated target's boxes under another key (a native record's bbox) scored IoU 0, silently
    with pytest.raises(ValueError, match=r"a generated target needs its true boxes under 'boxes' .*got the keys "
                                         r"\['bbox', 'label'\]: 'bbox' is not read"):
        score([GOOD], [{"label": "generated", "bbox": GT["boxes"]}])
    assert score([GOOD], [{"label": "generated", "boxes": []}])["iou"][0] == 0  # (no true boxes: said so, allowed)


def test_public_api():
    for name in ("score", "parse_completion", "render_completion", "RewardWeights", "load_stage", "scale_boxes",
                 "continuous_weights", "reward_core"):
        assert hasattr(rewards, name)
    out = rewards.score([GOOD], [GT], stage="alpha")
    assert {"total", "format", "label", "iou"} <= set(out)
    assert all(isinstance(v, np.ndarray) and v.shape == (1,) for v in out.values())


def test_rewards_package_imports_nothing_else_of_ours():
    import ast
    from pathlib import Path

    for path in Path(rewards.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("fxjax", "model", "train") for n in names), (path, names)


# ---- the jitted batch function against the plain-Python implementation on random cases ------------

def random_case(rng: np.random.Generator, group: int):
    """A target and `group` completions: malformed / inverted / pair / float boxes, extra and missing boxes,
    near and exact hits, distance ties, real images, broken format, odd verdicts, truncation."""
    real = rng.random() < 0.25
    n_gt = int(rng.integers(0, 7)) if rng.random() < 0.95 else 0
    gts = []
    for _ in range(n_gt):
        if gts and rng.random() < 0.1:
            gts.append(list(gts[int(rng.integers(len(gts)))]))  # duplicate GT boxes: distance ties
            continue
        x, y = rng.integers(0, 900, 2)
        w, h = rng.integers(1, 300, 2)
        gts.append([int(x), int(y), int(x + w), int(y + h)])
    target = {"label": "real" if real else "generated", "boxes": gts}
    texts = []
    for _ in range(group):
        parts = []
        for _ in range(int(rng.integers(0, 9))):
            r = rng.random()
            if gts and r < 0.35:  # exact or jittered GT box
                b = np.array(gts[int(rng.integers(len(gts)))]) + (rng.integers(-20, 21, 4) if rng.random() < 0.6 else 0)
                box = [int(v) for v in b]
            elif r < 0.55:
                x, y = rng.integers(0, 1000, 2)
                box = [int(x), int(y), int(x + rng.integers(-50, 300)), int(y + rng.integers(-50, 300))]
            elif r < 0.62:
                box = [round(float(v), 3) for v in rng.uniform(0, 1000, 4)]
            elif r < 0.7:
                x, y = rng.integers(0, 900, 2)
                box = f"[[{x}, {y}], [{x + rng.integers(1, 200)}, {y + rng.integers(1, 200)}]]"
            else:
                box = str(rng.choice(["[1, 2, 3]", "[NaN, 1, 2, 3]", "(1,2),(3,4)", "[1e400, 0, 0, 0]",
                                      "[true, 1, 2, 3]", "[a, b, c, d]", "", "[5, 5, 5, 5]", "[2e7, 0, 1, 1]",
                                      "[[1, 2], [3]]"]))
            caption = str(rng.choice(["hand", "blurry text", "a\nb", ""]))
            sep = str(rng.choice(["", "", " ", "\n", " x "]))
            parts.append(region(box, caption, sep))
        head = str(rng.choice(["<think>", "<think>", "<think> reasoning\n", "", "<think>\n"]))
        joiner = str(rng.choice(["", "\n", " some text "]))
        tag = str(rng.choice(["<tag>texture quality, recognizability</tag>", "", "<tag>t"]))
        verdict = str(rng.choice(["generated", "real", " Generated ", "REAL\t", "fake", "gen\nerated", ""]))
        close = str(rng.choice(["</think>\n", "</think>", "</think> x ", ""]))
        text = head + joiner.join(parts) + tag + close + f"<verdict>{verdict}</verdict>"
        if rng.random() < 0.15:
            text += f"<verdict>{rng.choice(['real', 'generated'])}</verdict>"
        if rng.random() < 0.2:
            text = text[:int(rng.integers(0, len(text) + 1))]  # truncated
        texts.append(text)
    return target, texts


def test_jitted_rewards_equal_plain_python_on_1000_random_cases():
    rng = np.random.default_rng(1234)
    group = 4
    cases = [random_case(rng, group) for _ in range(250)]
    targets = [t for t, _ in cases]
    texts = [c for _, cs in cases for c in cs]
    assert len(texts) == 1000
    settings_ = [(stage, relaxation) for stage in STAGES for relaxation in ("paper", "authors")]
    seen = dict(fmt=0, lab=0, partial=0, real=0)
    for stage, relaxation in settings_ + [("continuous", "paper")]:
        w = STAGES.get(stage) or tuple(continuous_weights(30, 100).as_array())
        out = score(texts, targets, stage, relaxation=relaxation, step=30, total_steps=100)
        for i, text in enumerate(texts):
            want = ref_reward(text, targets[i // group], w, relaxation)
            for key, value in want.items():
                assert abs(out[key][i] - value) <= 1e-6, (stage, relaxation, key, text, targets[i // group])
        assert ((out["iou"] >= 0) & (out["iou"] <= 1)).all()
    seen["fmt"] = int(out["format"].sum())
    seen["lab"] = int(out["label"].sum())
    seen["partial"] = int(((out["iou"] > 0) & (out["iou"] < 1)).sum())
    seen["real"] = sum(t["label"] == "real" for t in targets) * group
    assert min(seen.values()) > 50, seen  # the random cases exercise every branch


def test_group_size_one_equals_grouped():
    rng = np.random.default_rng(7)
    cases = [random_case(rng, 3) for _ in range(20)]
    targets = [t for t, _ in cases]
    texts = [c for _, cs in cases for c in cs]
    grouped = score(texts, targets, "beta")
    flat = score(texts, [t for t in targets for _ in range(3)], "beta")
    for k in grouped:
        np.testing.assert_allclose(grouped[k], flat[k], rtol=0, atol=1e-12)


def test_buckets_keep_compiles_few():
    assert [rewards.next_power_of_two(n) for n in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]
    assert rewards.next_power_of_two(3, 8) == 8 and rewards.next_power_of_two(9, 8) == 16
    rewards.reward_core.clear_cache()
    for n in (3, 4, 8):  # up to 8 targets and 4 boxes -> one shape
        score([completion([A] * (n % 2 + 1))] * n, [{"label": "generated", "boxes": [A, B]}] * n, "gamma")
    score([GOOD] * 4, [GT] * 4, "alpha", relaxation="authors")  # weights and relaxation are traced values
    score(["x"], [{"label": "real"}], "continuous", step=1, total_steps=2)
    assert rewards.reward_core._cache_size() == 1
    score([completion([A] * 5)] * 9, [{"label": "generated", "boxes": [A] * 5}] * 9)
    assert rewards.reward_core._cache_size() == 2


def test_matched_iou_gives_nothing_to_predictions_past_the_true_boxes():
    """The jitted core on padded arrays as a caller may pass them (scoring.prepare_batch cuts each
    completion's boxes to the number of true ones first, so `score` alone could not tell): once every true
    box is taken, a later prediction matches nothing, even one identical to a taken box."""
    from fxjax.rewards.reward_math import matched_iou

    gt = np.array([[[0, 0, 10, 10], [20, 0, 30, 10]]], np.float32)
    pred = np.array([[[[0, 0, 10, 5], [20, 0, 30, 5], [0, 0, 10, 10]]]], np.float32)
    got = matched_iou(pred, np.ones((1, 1, 3), bool), gt, np.ones((1, 2), bool))
    assert float(got[0, 0]) == 0.5  # (0.5 + 0.5 + nothing) / 2 true boxes


def test_stage_weights_steer_only_groups_whose_format_or_verdict_differs():
    # README / docs/demo_tuning.md: where every sample of a group has the format and the verdict right, the
    # stages' totals differ only by the IoU weight and a constant, which the group advantage removes, so
    # alpha, beta and gamma make the same update; a group with a broken sample is where the stages differ.
    from fxjax.train.grpo_loss import group_advantages

    def answer(box, verdict="generated", close="</think>"):
        return (f"<think>{REF_START}banding{REF_END}{BOX_START}{box}{BOX_END}\nBands.\n<tag>colour</tag>\n"
                f"{close}\n<verdict>{verdict}</verdict>")

    good = [answer("[0, 0, 56, 28]"), answer("[0, 28, 56, 56]"), answer("[0, 0, 56, 42]"), answer("[0, 0, 56, 28]")]
    mixed = [answer("[0, 0, 56, 28]"), answer("[0, 28, 56, 56]"), answer("[0, 0, 56, 42]", close=""),
             answer("[0, 0, 56, 28]", verdict="real")]
    targets = [{"label": "generated", "boxes": [[0, 0, 56, 28]]}] * 8
    adv = {stage: np.asarray(group_advantages(np.asarray(score(good + mixed, targets, stage=stage)["total"],
                                                         np.float32), 4))
           for stage in ("alpha", "beta", "gamma")}
    assert np.ptp(adv["alpha"][:4]) > 1  # the good group's samples do differ (their IoU)
    for stage in ("beta", "gamma"):
        np.testing.assert_allclose(adv[stage][:4], adv["alpha"][:4], atol=2e-4)  # (the 1e-4 in std + 1e-4)
        assert np.abs(adv[stage][4:] - adv["alpha"][4:]).max() > 0.1


def test_a_stages_reward_is_said_and_its_slips_warned_about(tmp_path):
    """A penalty written positive (`label_minus: 1.0`) and a stage whose reward cannot vary loaded without a
    word; the run now prints each stage's reward and these warnings. A stage name the reward config lacks
    names the file and its stages ('continuous' is a schedule, not a stage)."""
    from fxjax.rewards.stages import describe_weights, weight_warnings

    alpha = load_stage("alpha")
    assert describe_weights(alpha) == (f"total = {alpha.base:g} + {alpha.w_iou:g} x R_G + verdict "
                                       f"{alpha.label_plus:+g}/{alpha.label_minus:+g} + format "
                                       f"{alpha.format_plus:+g}/{alpha.format_minus:+g} (right/wrong)")
    assert all(weight_warnings(load_stage(s)) == [] for s in ("alpha", "beta", "gamma"))
    slip = RewardWeights(base=0, w_iou=1, label_plus=2, label_minus=1, format_plus=1, format_minus=-1)
    assert weight_warnings(slip) == ["label_minus +1 is positive: a wrong verdict earns a reward (the *_minus values "
                                     "are added as written; a penalty is negative)"]
    flat = RewardWeights(base=1, w_iou=0, label_plus=0, label_minus=0, format_plus=0.5, format_minus=0.5)
    assert weight_warnings(flat)[-1].startswith("every completion scores the same")
    assert weight_warnings(flat, other_terms=True) == weight_warnings(flat)[:-1]  # (a reward of one's own varies)
    with pytest.raises(ValueError, match=rf"no reward stage 'continuous' in {re.escape(str(CONFIG_PATH))} \(its "
                                         r"stages: alpha, beta, gamma\); the continuous schedule is not a stage: "
                                         r"grpo.schedule=continuous"):
        load_stage("continuous")
    with pytest.raises(ValueError, match=r"no reward stage 'delta' in .* \(its stages: alpha, beta, gamma\)$"):
        load_stage("delta")


def test_a_reward_file_edited_in_one_process_is_read_again_and_its_dict_is_the_callers(tmp_path):
    """The reward YAML was cached by path: an edit between two runs of one process (a notebook) was ignored,
    and a caller's change to load_config's dict changed every later load_stage, unchecked."""
    import os

    from fxjax.rewards.stages import CONFIG_PATH, load_config

    path = tmp_path / "rewards.yaml"
    text = CONFIG_PATH.read_text()
    path.write_text(text)
    assert load_stage("alpha", path).w_iou == 1.0
    path.write_text(text.replace("w_iou: 1.0", "w_iou: 3.0", 1))
    os.utime(path, ns=(1, 2_000_000_000))  # (a new mtime however fast the edit)
    assert load_stage("alpha", path).w_iou == 3.0
    load_config(path)["stages"]["alpha"]["w_iou"] = -99
    assert load_stage("alpha", path).w_iou == 3.0


def test_a_reward_config_given_as_values_scores_as_its_file_and_is_checked_as_one(tmp_path):
    """What a GRPO run reads once at its start and scores every step with: the values `load_config` gave,
    not the file again (an edit of the file during a run changed the weights of its later steps)."""
    import copy

    from fxjax.rewards.stages import load_config, missing_stage

    path = tmp_path / "rewards.yaml"
    path.write_text(CONFIG_PATH.read_text().replace("relaxation: paper", "relaxation: authors"))
    values = load_config(path)
    path.write_text(CONFIG_PATH.read_text())  # (edited after the read: the values stay what was read)
    completions, targets = [GOOD, GOOD.replace("generated", "real")], [GT, GT]
    for stage in ("alpha", "gamma"):
        got, want = score(completions, targets, stage, config=values), score(completions, targets, stage)
        assert got["total"][0] != want["total"][0]  # ("authors" relaxation: IoU ** 1.1, not min(1, 1.1 IoU))
        np.testing.assert_allclose(got["iou_relaxed"], np.asarray(got["iou"]) ** 1.1, rtol=1e-12)
        assert load_stage(stage, values) == load_stage(stage, path)
    assert missing_stage("delta", values).startswith("no reward stage 'delta' in the reward config given as a mapping")
    bad = copy.deepcopy(values)
    bad["stages"]["beta"]["label_minus"] = 5.0
    with pytest.raises(ValueError, match=r"the reward config given as a mapping: stages.beta.label_minus \(5\) is "
                                         r"above label_plus"):
        load_stage("alpha", bad)
    load_config(values)["stages"]["alpha"]["w_iou"] = -99  # (a copy, as a file's)
    assert load_stage("alpha", values).w_iou == 1.0


def test_a_runs_reward_file_is_read_as_its_config_is(tmp_path):
    """fxjax.grpo_config.read_reward_config, what `fxjax grpo` reads its reward file with: a key given twice
    (the second alpha won, silently) and YAML 1.1's integers (010 was 8, 1:30 was 90) as the run config
    loader reads them, every error naming the file."""
    from fxjax.grpo_config import read_reward_config

    text = CONFIG_PATH.read_text()
    assert read_reward_config(None) == load_config()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "eta: 5\n")
    with pytest.raises(ValueError, match=rf"reward config {twice}: invalid YAML .*eta"):
        read_reward_config(str(twice))
    octal = tmp_path / "octal.yaml"
    octal.write_text(text.replace("label_plus: 2.0", "label_plus: 010", 1))
    assert read_reward_config(str(octal))["stages"]["beta"]["label_plus"] == 10  # (safe_load: 8)
    for bad, message in (("- 1\n", "expected a mapping with a 'stages' key"), ("", "expected a mapping"),
                         (text.replace("w_iou: 1.0", "w_iou: -1.0", 1), r"stages.alpha.w_iou: must be >= 0")):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.yaml'}: {message}"):
            read_reward_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(FileNotFoundError, match=rf"reward config {tmp_path / 'none.yaml'} does not exist"):
        read_reward_config(str(tmp_path / "none.yaml"))
    with pytest.raises(ValueError, match=rf"reward config {tmp_path}: cannot be read"):
        read_reward_config(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"w_iou": float("nan")}, r"reward weights: w_iou: must be a finite number, got nan"),
    ({"w_iou": True}, r"reward weights: w_iou: must be a finite number, got True"),
    ({"w_iou": "abc"}, r"reward weights: w_iou: must be a finite number, got 'abc'"),
    ({"w_iou": -3.0}, r"reward weights.w_iou: must be >= 0"),
    ({"label_minus": 5.0}, r"reward weights.label_minus \(5\) is above label_plus \(1\)"),
])
def test_weights_given_to_score_are_checked_as_a_reward_files_are(change, message):
    weights = {**dataclasses.asdict(load_stage("alpha")), **change}
    with pytest.raises(ValueError, match=message):
        score([GOOD], [GT], weights=weights)
    with pytest.raises(ValueError, match=r"eta and power must be positive and finite"):
        score([GOOD], [GT], eta=-1.0)


def test_iou_of_equal_boxes_far_from_the_origin_is_one_not_more():
    """float32 rounds the area of a box 2.8e6 pixels from the origin, and an IoU of a box with itself came out
    1.0000001 (one CI's draw of the property test above): clipped at 1."""
    box = np.array([-2830874.6875, 0.0, 0.0, 77.0])
    assert float(box_iou(box, box)) == 1.0
