"""The detector's test-set metrics (the paper's, docs/rewards.md): pure functions of completions and truths.

    rows = score_completions(completions, truths)      # one prediction row per image (JSON-ready dicts)
    summary = summarize(rows, group_by=("generator",))  # accuracy, P/R/F1, format rate, IoU, confusion, groups
    print(metrics_table(summary))

A row holds what the model said (the completion, its verdict, regions and tags, boxes in the model's
resized-image pixels and in the original image's) and how it scores against the truth, all through
`fxjax.rewards`: ``format_ok`` is the authors' format check chosen by the true label, ``correct`` the
label check (the first ``<verdict>`` equals the truth), ``iou`` the matched IoU of the rewards (each
predicted box, in output order, takes the nearest not-yet-matched true box by centre distance; sum of
IoUs / number of true boxes) on generated images with boxes, None elsewhere.

Metrics over rows (`summarize`): ``accuracy`` = correct / images; ``precision``, ``recall``, ``f1`` of the
class "generated" (a missing or unknown verdict counts as not "generated"); ``format_rate``; ``mean_iou`` =
mean of ``iou`` over the generated images with at least one true box (``iou_images`` of them); the
``confusion`` matrix truth -> predicted (real / generated / none: no verdict or another word);
``truncated_rate`` (the share of rows whose completion hit the token limit, over the rows that say);
``ci95``: 95% intervals of accuracy, format rate and recall (Wilson) and of the mean IoU (+/- 1.96 SE); and the same
metrics per value of each grouping field (e.g. the generator's name), where a group of one true class has no
precision or F1 (None: a generator's images cannot hold a false positive). A ratio with a zero denominator
is None (null in JSON), never a made-up 0.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fxjax import rewards

__all__ = ["NO_VERDICT", "metrics_table", "score_completions", "steps_table", "summarize"]

NO_VERDICT = "none"  # the predicted class of a completion without a real/generated verdict
PREDICTED = (*rewards.LABELS, NO_VERDICT)
NO_GROUP = "(none)"  # the group of a record without a value for the grouping field


def _boxes(boxes) -> list[list[float]]:
    return [[float(v) for v in box] for box in np.asarray(boxes, np.float64).reshape(-1, 4)]


def score_completions(completions: Sequence[str], truths: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One prediction row per completion.

    truths[i]: ``label`` ("real" | "generated"), ``boxes`` (true boxes in the model's resized-image pixels,
    the completion's frame), and optionally ``model_size`` and ``original_size`` ((h, w): the predicted
    boxes are then also given in original-image pixels) and any other keys, copied into the row as they
    are (record id, source, groups, ...).
    """
    if len(completions) != len(truths):
        raise ValueError(f"{len(completions)} completions for {len(truths)} truths")
    if not completions:
        return []
    # (the label as rewards.score reads it: "Generated " was scored right, then neither counted nor confused)
    targets = [{"label": str(t["label"]).strip().lower(),
                "boxes": np.asarray(t.get("boxes", ()), np.float64).reshape(-1, 4)} for t in truths]
    # The rewards' own scoring: format check by the true label, label check, and the paper's box matching.
    scores = rewards.score(list(completions), targets, stage="alpha")
    rows = []
    for i, (text, truth, target) in enumerate(zip(completions, truths, targets)):
        parsed = rewards.parse_completion(text, original_size=truth.get("original_size"),
                                          model_size=truth.get("model_size"))
        label = target["label"]
        has_boxes = label == "generated" and len(target["boxes"]) > 0
        regions = [{"caption": c, "box": list(b)} for c, b in zip(parsed.captions, parsed.boxes)]
        if parsed.boxes_original is not None:
            for region, box in zip(regions, parsed.boxes_original):
                region["box_original"] = list(box)
        extra = {k: v for k, v in truth.items() if k not in ("label", "boxes")}
        rows.append({
            **extra,
            "label": label,
            "verdict": parsed.verdict,
            "predicted": parsed.label or NO_VERDICT,
            "correct": bool(scores["label"][i] > 0.5),
            "format_ok": bool(scores["format"][i] > 0.5),
            "iou": float(scores["iou"][i]) if has_boxes else None,
            "regions": regions,
            "unparsed_boxes": [{"caption": c, "text": raw} for c, raw in parsed.skipped],
            "tags": list(parsed.tags),
            "true_boxes": _boxes(target["boxes"]),
            "completion": text,
        })
    return rows


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval (95% by default) of a proportion: honest at 0 or n successes and for the
    small test sets a demo has, where the normal approximation gives intervals beyond [0, 1]."""
    if not n:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exactly 0 at no success and 1 at all (centre - half is 0 only up to rounding there: 2.8e-17)
    return [0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half)]


def mean_interval(values: Sequence[float], z: float = Z95, bounds=(0.0, 1.0)) -> list[float] | None:
    """mean +/- z standard errors, clipped to `bounds` (IoUs lie in [0, 1]); None for fewer than two values."""
    if len(values) < 2:
        return None
    mean, se = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return [max(bounds[0], mean - z * se), min(bounds[1], mean + z * se)]


def _metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    tp = sum(r["label"] == "generated" and r["predicted"] == "generated" for r in rows)
    fp = sum(r["label"] == "real" and r["predicted"] == "generated" for r in rows)
    fn = sum(r["label"] == "generated" and r["predicted"] != "generated" for r in rows)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    # 2TP / (2TP + FP + FN), the harmonic mean of the two where both exist, and 0 (as scikit-learn) for a
    # detector that never says "generated" about a set that has generated images
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    if len({r["label"] for r in rows}) < 2:
        # one true class (a generator's images, the real ones, a test set of one kind): precision and F1
        # say nothing about the detector (no false positive, or no true one, can occur); its accuracy is
        # the recall (or specificity)
        precision = f1 = None
    ious = [r["iou"] for r in rows if r.get("iou") is not None]
    confusion = {truth: {pred: 0 for pred in PREDICTED} for truth in rewards.LABELS}
    for r in rows:
        confusion[r["label"]][r["predicted"]] += 1
    correct, formatted = sum(bool(r["correct"]) for r in rows), sum(bool(r["format_ok"]) for r in rows)
    return {"examples": n, "accuracy": _ratio(correct, n),
            "precision": precision, "recall": recall, "f1": f1,
            "format_rate": _ratio(formatted, n),
            "mean_iou": float(np.mean(ious)) if ious else None, "iou_images": len(ious),
            "truncated_rate": _ratio(sum(bool(r["truncated"]) for r in rows if "truncated" in r),
                                     sum("truncated" in r for r in rows)),
            "confusion": confusion,
            # 95% intervals: Wilson for the rates, mean +/- 1.96 standard errors for the IoU
            "ci95": {"accuracy": wilson_interval(correct, n), "format_rate": wilson_interval(formatted, n),
                     "recall": wilson_interval(tp, tp + fn), "mean_iou": mean_interval(ious)}}


def group_value(row: Mapping[str, Any], field: str) -> str:
    value = (row.get("groups") or {}).get(field)
    return NO_GROUP if value is None or value == "" else str(value)


def summarize(rows: Iterable[Mapping[str, Any]], group_by: Sequence[str] = ()) -> dict[str, Any]:
    """The metrics of all rows, plus ``by[field][value]`` = the metrics of the rows whose
    ``row["groups"][field]`` is that value (missing or null values form the group "(none)")."""
    rows = list(rows)
    out = _metrics(rows)
    out["by"] = {}
    for field in group_by:
        values = sorted({group_value(r, field) for r in rows}, key=lambda v: (v == NO_GROUP, v))
        out["by"][field] = {v: _metrics([r for r in rows if group_value(r, field) == v]) for v in values}
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_COLUMNS = ("images", "accuracy", "precision", "recall", "F1", "format", "mean IoU", "IoU images")
_KEYS = ("examples", "accuracy", "precision", "recall", "f1", "format_rate", "mean_iou", "iou_images")


def _aligned(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> list[str]:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned, under a rule."""
    widths = [max(len(str(row[i])) for row in (header, *lines)) for i in range(len(header))]

    def fmt(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)]


def metrics_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table: the overall metrics and one row per group value, then the confusion matrix."""
    lines = [("all", *(_cell(summary[k]) for k in _KEYS))]
    for field, groups in summary.get("by", {}).items():
        for value, metrics in groups.items():
            lines.append((f"{field}={value}", *(_cell(metrics[k]) for k in _KEYS)))
    table = _aligned(("", *_COLUMNS), lines)
    confusion = summary["confusion"]
    table += ["", "confusion (rows: truth, columns: predicted; none = no real/generated verdict)",
              "            " + "".join(f"{p:>11}" for p in PREDICTED)]
    for truth in rewards.LABELS:
        table.append(f"{truth:<12}" + "".join(f"{confusion[truth][p]:>11}" for p in PREDICTED))
    ci = summary.get("ci95") or {}
    names = {"accuracy": "accuracy", "recall": "recall", "format_rate": "format", "mean_iou": "mean IoU"}
    shown = [f"{name} {ci[key][0]:.3f}-{ci[key][1]:.3f}" for key, name in names.items() if ci.get(key)]
    if shown:
        n = summary["examples"]  # (recall rests on the generated images, mean IoU on those with boxes)
        table += ["", f"95% intervals (of {n} image{'s' * (n != 1)}; Wilson, IoU: mean +/- 1.96 SE within [0, 1]; "
                      "recall over the generated images, mean IoU over those with boxes): " + ", ".join(shown)]
    if summary.get("truncated_rate"):
        table += ["", f"truncated: {summary['truncated_rate']:.1%} of the completions reached the token limit "
                      f"without a stop token (their verdicts and regions may be cut off)"]
    return "\n".join(table)


def steps_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A plain-text table of several evaluations (a run's steps), a row each: the overall metrics and the
    share of truncated completions."""
    lines = [(label, *(_cell(m.get(k)) for k in _KEYS), f"{m.get('truncated_rate') or 0:.1%}") for label, m in rows]
    return "\n".join(_aligned(("", *_COLUMNS, "truncated"), lines))
