"""The pieces `fxjax report` draws a run's panels with, and reads a run by (fxjax.commands.report builds
one run's figure of them, fxjax.commands.report_compare several runs' on shared panels): a run's metrics
and stage spans, each series' values, the stage shading and boundaries, the axes' formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fxjax.commands.report_panels import Panel
from fxjax.run_files import METRICS_FILE

COMPARE_REPORT_FILE = "compare_report.png"  # (fxjax.commands.report_compare draws it)
EVAL_MARKERS = ("o", "s", "^", "D", "v", "P")  # the held-out points' shapes, by the series' place in its panel
# a training series' line style, by its place in its panel: two series of equal values (w_iou and label_plus
# both 1.0 in alpha) drew one line over the other, and the panel read as if one of them were not there
LINE_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 3)))
STAGE_SHADES = ("#f2f2f2", "#ffffff")
STAGE_BOUNDARY = "stage-boundary"  # the gid of a boundary's line (a series may be dashed too)


def metric_value(value: Any) -> float:
    """A metrics value as a float: metrics.jsonl writes non-finite numbers as strings ("nan", "inf")."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def series(records: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `kind` that carry it."""
    steps, values = [], []
    for r in records:
        if r.get("kind") == kind and key in r:
            steps.append(int(r["step"]))
            values.append(metric_value(r[key]))
    return steps, values


@dataclass(frozen=True)
class StageSpan:
    name: str
    first: int  # first step of the stage (a GRPO step: one generation batch)
    last: int


def stage_spans(records: Sequence[dict]) -> list[StageSpan]:
    """Contiguous runs of the train records' "stage" (GRPO), in step order."""
    spans: list[StageSpan] = []
    for r in records:
        if r.get("kind") != "train" or "stage" not in r:
            continue
        name, step = str(r["stage"]), int(r["step"])
        if spans and spans[-1].name == name:
            spans[-1] = StageSpan(name, spans[-1].first, step)
        else:
            spans.append(StageSpan(name, step, step))
    return spans


def is_grpo_step(record: dict) -> bool:
    return record.get("kind") == "train" and ("stage" in record or "reward/total_mean" in record)


def run_kind(records: Sequence[dict]) -> str:
    """"grpo" when a training record has a stage or a reward (or, before the first step's record, an
    evaluation is tagged with a stage's end), else "sft"."""
    grpo = any(map(is_grpo_step, records)) or any(
        r.get("kind") == "eval" and str(r.get("tag", "")).startswith("end of stage") for r in records)
    return "grpo" if grpo else "sft"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred mean over the 2 * (window // 2) + 1 values around each one (fewer at the ends; NaNs skipped),
    so the average neither lags the data nor mixes in values beyond the series' ends. NaN at a non-finite
    value: the thick line breaks where the data does (it ran on through a NaN loss, hiding it)."""
    half = window // 2
    out = []
    for i, value in enumerate(values):
        near = [v for v in values[max(0, i - half):i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if near and math.isfinite(value) else math.nan)
    return out


def stage_segments(steps: Sequence[int], values: Sequence[float], spans: Sequence[StageSpan]):
    """(steps, values) of each stage (the whole series without stages): a stage's total reward has other
    weights than the next one's, so neither a line nor an average crosses a boundary."""
    if not spans:
        return [(list(steps), list(values))]
    out = []
    for span in spans:
        part = [(s, v) for s, v in zip(steps, values) if span.first <= s <= span.last]
        if part:
            out.append(([s for s, _ in part], [v for _, v in part]))
    return out


# ---- drawing -------------------------------------------------------------------------------------

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _has_data(records: Sequence[dict], panel: Panel) -> bool:
    return any(any(math.isfinite(v) for v in series(records, line.kind, line.key)[1]) for line in panel.lines)


def _all_zero(records: Sequence[dict], panel: Panel) -> bool:
    return all(v == 0 for line in panel.lines for v in series(records, line.kind, line.key)[1] if math.isfinite(v))


def left_out(records: Sequence[dict], panel: Panel) -> str | None:
    """Why a panel is not drawn (None: it is)."""
    if not _has_data(records, panel):
        return f"{panel.title} (no values in the metrics)"
    if panel.when_all_zero and _all_zero(records, panel):
        return f"{panel.title} ({panel.when_all_zero})"
    return None


# A stage name's width, in panel widths per character (bold 9 pt on a panel about 5 inches wide)
NAME_WIDTH_PER_CHAR = 0.016


def mark_stages(ax, spans: Sequence[StageSpan], xlim: tuple[float, float]) -> None:
    """Shade each stage, draw a dashed line at each boundary and name the stage at the top of the panel,
    where its name fits over it (`xlim`: the panel's step range; the names of stages too narrow for them
    overprinted their neighbours': the subtitle lists every stage)."""
    from matplotlib.transforms import blended_transform_factory

    to_axes = blended_transform_factory(ax.transData, ax.transAxes)  # x in steps, y in the panel's height
    for i, span in enumerate(spans):
        lo, hi = span.first - 0.5, span.last + 0.5
        ax.axvspan(lo, hi, color=STAGE_SHADES[i % 2], zorder=0, lw=0)
        if i:
            ax.axvline(lo, color="#555555", ls="--", lw=1.2, zorder=1, gid=STAGE_BOUNDARY)
        if (hi - lo) / (xlim[1] - xlim[0]) < NAME_WIDTH_PER_CHAR * (len(span.name) + 1):
            continue
        # Above the plotting area, between the panel and its title: never under a curve or a legend.
        ax.text((lo + hi) / 2, 1.01, span.name, transform=to_axes, ha="center", va="bottom", fontsize=9,
                color="#333333", fontweight="bold", clip_on=False)


def isolated(values: Sequence[float]) -> list[int]:
    """The indices of the finite values with no finite neighbour: a line through them draws nothing."""
    ok = [math.isfinite(v) for v in values]
    return [i for i, good in enumerate(ok)
            if good and (i == 0 or not ok[i - 1]) and (i == len(ok) - 1 or not ok[i + 1])]


def non_finite_note(records: Sequence[dict], panels: Sequence[Panel]) -> str | None:
    """Which plotted training series hold non-finite values (written "nan" / "inf"; not drawn), and at
    which steps: a gap in a line would otherwise pass for a missing record."""
    parts = []
    for key in dict.fromkeys(line.key for panel in panels for line in panel.lines if line.kind == "train"):
        steps = [s for s, v in zip(*series(records, "train", key)) if not math.isfinite(v)]
        if steps:
            shown = ", ".join(map(str, steps[:5])) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")
            parts.append(f"{key} at step{'s' if len(steps) > 1 else ''} {shown}")
    return "non-finite, not drawn: " + "; ".join(parts) if parts else None


def stop_notes(records: Sequence[dict]) -> list[str]:
    """What the subtitle says of updates a run skipped (train.on_nonfinite: skip; the logged means leave those
    steps out) and of a run stopped by a non-finite step (on_nonfinite: stop; its last record says so):
    without them such a run read as one that trained cleanly to its end."""
    train = [r for r in records if r.get("kind") == "train"]
    notes = []
    counts = [(int(r["step"]), int(r["skipped"])) for r in train if isinstance(r.get("skipped"), (int, float))
              and math.isfinite(r["skipped"])]
    rises = [step for (_, before), (step, now) in zip([(0, 0), *counts], counts) if now > before]
    if counts and counts[-1][1]:
        where = ", ".join(map(str, rises[:5])) + (f" and {len(rises) - 5} more" if len(rises) > 5 else "")
        notes.append(f"{counts[-1][1]} update(s) skipped as non-finite (train.on_nonfinite: skip; not in the "
                     f"logged means), in the records of step(s) {where}")
    stopped = [r for r in train if r.get("stopped")]
    if stopped:
        notes.append(f"the run stopped at step {stopped[-1]['step']}: {stopped[-1]['stopped']} loss or gradient "
                     f"(train.on_nonfinite: stop); its checkpoints end before it")
    end = last_end(records)
    if end is not None and end.get("status") == "preempted" and end["step"] >= max(r["step"] for r in records):
        notes.append(f"the run was stopped by a signal at step {end['step']} (its checkpoint saved; the same "
                     f"command resumes it)")
    return notes


def last_end(records: Sequence[dict]) -> dict | None:
    """The run's last {"kind": "end", "status": ...} record (train.loop_control.log_end) of `records` in
    step order (`read_metrics`'); None without one (a run still going or killed, or one of an older fxjax)."""
    ends = [r for r in records if r.get("kind") == "end"]
    return ends[-1] if ends else None


SUMMARY_KEYS = (("loss", "loss"), ("format_rate", "format rate"), ("verdict_accuracy", "verdict accuracy"),
                ("mean_iou", "mean IoU"), ("reward/total_mean", "mean reward"))


def summary_lines(records: Sequence[dict]) -> list[str]:
    """The numbers a reader looks for first, printed beside the figure: the last training record's and the
    last held-out evaluation's (SFT's and eval's reports printed none), and how the run ended."""
    lines = []
    for kind, what in (("train", "last training record"), ("eval", "last held-out evaluation")):
        last = [r for r in records if r.get("kind") == kind]
        if last:
            parts = [f"{name} {metric_value(last[-1][key]):.4g}" for key, name in SUMMARY_KEYS if key in last[-1]]
            if parts:
                lines.append(f"{what} (step {last[-1]['step']}): {', '.join(parts)}")
    end = last_end(records)
    if end is not None:
        lines.append(f"the run's end: {end.get('status')} at step {end['step']}")
    return lines


def format_axes(ax, panel: Panel, plotted: Sequence[float], staged: bool, xlabel: str,
                xlim: tuple[float, float]) -> None:
    """A panel's title, axes, scale and grid, once its lines are drawn (`plotted`: their finite values;
    `staged`: the stage names sit above the plotting area)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(panel.title, fontsize=11, pad=16 if staged else 6)
    ax.set_xlabel(xlabel)
    ax.set_xlim(*xlim)  # one step axis for every panel, so held-out points line up with training curves
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # no offset: a nearly constant series (entropy 11.9387 +/- 1e-6) drew "1e-6+1.19387e1" over the stage names
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    if panel.unit_interval:
        ax.set_ylim(-0.03, 1.03)
    elif panel.log_scale and plotted and min(plotted) > 0 and max(plotted) > 20 * min(plotted):
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        ax.set_ylabel(panel.ylabel + ", log scale", fontsize=9)
        # 2x and 5x ticks labelled too: with decades alone a final loss of 0.015 sat between two labels
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.grid(True, alpha=0.3, zorder=0)


def draw_eval_points(ax, steps: Sequence[int], values: Sequence[float], colour: str, marker: str,
                     label: str | None, join: Any = ":", fill: str = "none") -> None:
    """Evaluations are a few points: markers, joined by a faint line (`join`'s style) that does not pretend
    to know the values in between (a solid line between step 0 and the end read as a linear rise). A shape
    each, hollow: equal values (format, verdict and IoU all 0) show every series, not the last. `fill`: the
    markers' fill style (a run's, in a comparison: "none", "full", "left", "bottom")."""
    ax.plot(steps, values, marker, color=colour, label=label, ms=7, zorder=4, mew=1.5,
            **({"mfc": "none"} if fill == "none" else {"fillstyle": fill, "mfcalt": "white"}))
    ax.plot(steps, values, ls=join, color=colour, lw=1, alpha=0.6, zorder=3)


def draw_train_series(ax, steps: Sequence[int], values: Sequence[float], spans: Sequence[StageSpan], *,
                      colour: str, window: int, smooth: bool, label: str | None, style: Any = "-") -> None:
    """A training series, stage by stage (no line crosses a boundary): per step thin and its centred moving
    average thick when `smooth` and long enough, else one line; values with no finite neighbour as dots."""
    for i, (part_steps, part) in enumerate(stage_segments(steps, values, spans)):
        name = label if i == 0 else None  # one legend entry per series
        if smooth and window > 1 and len(values) > window:
            ax.plot(part_steps, part, ls=style, color=colour, alpha=0.3, lw=0.8, zorder=2)  # per step (figure title)
            ax.plot(part_steps, moving_average(part, window), ls=style, color=colour, lw=2, label=name, zorder=3)
        else:
            ax.plot(part_steps, part, ls=style, color=colour, lw=1.5, marker="." if len(values) < 15 else None,
                    label=name, zorder=3)
        lone = isolated(part)  # (a one-step stage, a value between two non-finite ones: no line shows it)
        if lone:
            ax.plot([part_steps[i] for i in lone], [part[i] for i in lone], "o", color=colour, ms=3, zorder=4)


def factor_into_labels(fig) -> None:
    """Each panel's axis multiplier ("1e-4", which matplotlib draws at the panel's top left, over the stage
    names there) moved into its y label, "learning rate (x 1e-4)". The tick formatter chooses it from the
    ticks, which are asked for here (drawing the whole figure to have them took a second a figure)."""
    from matplotlib.ticker import ScalarFormatter

    for ax in fig.axes:
        formatter = ax.yaxis.get_major_formatter()
        if not isinstance(formatter, ScalarFormatter) or ax.get_yscale() != "linear":
            continue
        ax.get_ylim()  # (the data's limits settled: the ticks follow them)
        formatter.set_locs(ax.yaxis.get_majorticklocs())
        factor = formatter.get_offset()
        if factor:
            ax.yaxis.get_offset_text().set_visible(False)
            ax.set_ylabel(f"{ax.get_ylabel()} (x {factor})", fontsize=9)


def shared_stages(spans: Sequence[Sequence[StageSpan]]) -> list[StageSpan]:
    """The stages to shade on runs compared: the longest run's, when every run's have its names and starts
    (a run stopped in gamma beside a finished one still shares alpha and beta); [] when they differ or a run
    has none."""
    if not all(spans):
        return []
    longest = max(spans, key=lambda s: s[-1].last)
    for run in spans:
        if len(run) > len(longest):
            return []
        for i, (mine, theirs) in enumerate(zip(run, longest)):
            ends_sooner = i == len(run) - 1 and mine.last < theirs.last  # (only where the run stopped)
            if (mine.name, mine.first) != (theirs.name, theirs.first) or (mine.last != theirs.last and not ends_sooner):
                return []
    return list(longest)


def drawable_series(records: Sequence[dict], panel: Panel):
    """(colour, marker, line, steps, values) of each of the panel's lines with a finite value in `records`
    (a line's colour and held-out marker are its place in the panel's, whatever is drawn)."""
    for colour, marker, line in zip(COLOURS, EVAL_MARKERS, panel.lines):
        steps, values = series(records, line.kind, line.key)
        if steps and any(math.isfinite(v) for v in values):
            yield colour, marker, line, steps, values


def read_run_metrics(run_dir: str | Path) -> tuple[Path, list[dict]]:
    """(metrics file, its records) of RUN_DIR (or its metrics.jsonl): one run's, or an error naming the file."""
    from fxjax.train.metrics import read_metrics

    source = Path(run_dir)
    metrics_file = source / METRICS_FILE if source.is_dir() else source
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_file} (a fxjax sft/grpo run writes "
                                f"<train.output_dir>/{METRICS_FILE})")
    records = read_metrics(metrics_file)
    train = [r for r in records if r.get("kind") == "train"]
    grpo = sum(map(is_grpo_step, train))
    if 0 < grpo < len(train):  # two runs appended to one file: one report would plot only one of them
        raise ValueError(f"{metrics_file}: holds the training records of an SFT run ({len(train) - grpo}) and of a "
                         f"GRPO run ({grpo}); put each run's records in a file of its own to plot it")
    return metrics_file, records


def staged_rewards(records: Sequence[dict]) -> list[dict]:
    """The GRPO steps' stage and mean total reward (what `stage_trends` reads)."""
    return [{"stage": r["stage"], "reward/total_mean": metric_value(r["reward/total_mean"])} for r in records
            if is_grpo_step(r) and "stage" in r and "reward/total_mean" in r]
