"""`fxjax report RUN_A RUN_B ...`: several training runs of one kind (two seeds, two settings) on one PNG.

Each panel a single run's report draws (fxjax.commands.report_panels), with every run's series in it: a
colour per series as in a single report, a line style per run (solid, dashed, dotted, dash-dot; the legend
names both), each run's moving average thick over its per-step values thin, and its evaluations as
markers (a fill per run: hollow, full, half). The reward stages are shaded and named when the runs share
them (a run stopped partway shares the stages it reached); otherwise no line of a run crosses its own stage
boundaries and the subtitle lists each run's stages. A panel is drawn when any
run has values for it; the subtitle names the ones left out. For GRPO runs each run's training reward
trend per stage is printed, as `fxjax report RUN` prints one run's.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from fxjax.commands.report_drawing import (COMPARE_REPORT_FILE, draw_eval_points, draw_train_series,
                                           drawable_series, factor_into_labels, format_axes, left_out, mark_stages,
                                           read_run_metrics, run_kind, shared_stages, stage_spans, staged_rewards)
from fxjax.commands.report_panels import STEP_LABELS, panels_for

__all__ = ["COMPARE_REPORT_FILE", "RUN_STYLES", "build_comparison", "write_comparison"]

RUN_STYLES = ("-", "--", ":", "-.")  # one per run: at most this many runs on one figure
_EVAL_JOINS = (":", (0, (1, 4)), (0, (3, 3, 1, 3)), (0, (1, 1)))  # a held-out join's style, by run
_EVAL_FILLS = ("none", "full", "left", "bottom")  # a held-out marker's fill, by run (the joins alone were faint)


def _legend(ax, series_drawn: Sequence[tuple[str, str, str | None]], labels: Sequence[str]) -> None:
    """One entry per series (its colour, its marker for an evaluation) and one per run (its line style)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, lw=2, marker=marker or None, mfc="none", ls="-" if not marker else "none",
                      label=name) for name, colour, marker in series_drawn]
    evals = any(marker for _, _, marker in series_drawn)
    handles += [Line2D([], [], color="#333333", lw=1.5, ls=style, label=label,
                       **({"marker": "o", "fillstyle": fill, "mfcalt": "white"} if evals else {}))
                for style, fill, label in zip(RUN_STYLES, _EVAL_FILLS, labels)]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)


def build_comparison(runs: Sequence[tuple[str, list[dict]]], title: str | None = None, timings: bool = True):
    """The figure comparing `runs` ((label, metrics records) each, all SFT or all GRPO, 2 to len(RUN_STYLES))."""
    from matplotlib.figure import Figure

    if not 2 <= len(runs) <= len(RUN_STYLES):
        raise ValueError(f"a comparison draws 2 to {len(RUN_STYLES)} runs (a line style each), got {len(runs)}")
    for label, records in runs:
        if not records:
            raise ValueError(f"{label}: no metrics records to plot")
    kinds = {label: run_kind(records) for label, records in runs}
    if len(set(kinds.values())) > 1:
        raise ValueError("the runs compared must be of one kind: " + ", ".join(f"{k} is {v.upper()}" for k, v in kinds.items()))
    kind = next(iter(kinds.values()))
    labels = [label for label, _ in runs]
    spans = {label: stage_spans(records) if kind == "grpo" else [] for label, records in runs}
    shaded = shared_stages(list(spans.values()))  # (one run stopped in a stage the others finished: shared)
    # (the panels of every run's records together: the own reward terms' panel holds every run's terms)
    candidates = [p for p in panels_for(kind, [r for _, records in runs for r in records]) if timings or not p.timing]
    why = {p.title: [left_out(records, p) for _, records in runs] for p in candidates}
    panels = [p for p in candidates if None in why[p.title]]  # (drawn when any run has values for it)
    missing = [why[p.title][0] for p in candidates if None not in why[p.title]]
    if not panels:
        raise ValueError("the metrics records hold none of the values a report plots")
    train_steps = max(len({r["step"] for r in records if r.get("kind") == "train"}) for _, records in runs)
    window = max(1, min(25, train_steps // 15))
    steps = [r["step"] for _, records in runs for r in records]
    margin = max(0.5, 0.02 * (max(steps) - min(steps)))
    xlim = (min(steps) - margin, max(steps) + margin)
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if shaded:
            mark_stages(ax, shaded, xlim)
        plotted, drawn = [], {}
        for run_index, (label, records) in enumerate(runs):
            for colour, marker, line, x, y in drawable_series(records, panel):
                plotted += [v for v in y if math.isfinite(v)]
                if line.kind == "eval":
                    draw_eval_points(ax, x, y, colour, marker, None, join=_EVAL_JOINS[run_index],
                                     fill=_EVAL_FILLS[run_index])
                    drawn.setdefault(line.label, (colour, marker))
                else:
                    draw_train_series(ax, x, y, spans[label], colour=colour, window=window, smooth=line.smooth,
                                      label=None, style=RUN_STYLES[run_index])
                    drawn.setdefault(line.label, (colour, None))
        format_axes(ax, panel, plotted, bool(shaded), STEP_LABELS[kind], xlim)
        _legend(ax, [(name, colour, marker) for name, (colour, marker) in drawn.items()], labels)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    detail = "runs: " + ", ".join(f"{label} {style}" for label, style in zip(labels, ("solid", "dashed", "dotted",
                                                                                         "dash-dot")))
    if kind == "grpo" and not shaded and any(spans.values()):
        detail += ("\nthe runs' stages differ (not shaded): " + "; ".join(
            f"{label} " + ", ".join(f"{s.name} {s.first}-{s.last}" for s in spans[label]) for label in labels))
    elif shaded:
        detail += "; stages " + ", ".join(f"{s.name} {s.first}-{s.last}" for s in shaded)
        shorter = [label for label in labels if spans[label] != shaded]
        if shorter:
            detail += " (" + ", ".join(f"{label} ends at step {spans[label][-1].last}" for label in shorter) + ")"
    if window > 1 and train_steps > window:
        detail += f"; thin lines: as logged, thick: centred moving average of {2 * (window // 2) + 1} points"
    if missing:
        detail += "\nnot plotted (no run has values): " + "; ".join(missing)
    lines = [textwrap.fill(line, width=70 * cols) for line in f"({detail})".split("\n")]
    fig.suptitle("\n".join([title or f"{kind.upper()} runs compared", *lines]), fontsize=12)
    factor_into_labels(fig)
    fig.missing_panels = missing
    return fig


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                     labels: Sequence[str] | None = None, title: str | None = None, timings: bool = True) -> Path:
    """Read each run's metrics.jsonl, draw `build_comparison`, save it as PNG (default: compare_report.png in
    the folder holding the first run); returns its path."""
    from fxjax.commands.eval_report import png_path

    files = [read_run_metrics(d) for d in run_dirs]
    if labels is None:
        names = [f.parent.name or str(f.parent) for f, _ in files]
        labels = names if len(set(names)) == len(names) else [str(f.parent) for f, _ in files]
    elif len(labels) != len(files):
        raise ValueError(f"--labels: {len(labels)} names for {len(files)} runs")
    fig = build_comparison([(label, records) for label, (_, records) in zip(labels, files)], title, timings)
    path = png_path(out, files[0][0].parent.parent, COMPARE_REPORT_FILE)
    fig.savefig(path, dpi=110)
    if fig.missing_panels:
        print(f"fxjax report: panels left out (named in the subtitle): {'; '.join(fig.missing_panels)}",
              file=sys.stderr)
    from fxjax.demo_summary import stage_trends

    for label, (_, records) in zip(labels, files):
        staged = staged_rewards(records)
        if staged:
            print(f"fxjax report: {label}: training reward by stage (mean of its first third -> last third): "
                  f"{stage_trends(staged)}", file=sys.stderr)
    return path
