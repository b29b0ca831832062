"""`fxjax report RUN_DIR`: one PNG of a run's metrics.jsonl, for a person to look at.

SFT runs: training and held-out loss, learning rate, gradient norm, the held-out generation metrics
(format rate, verdict accuracy, mean IoU from greedy decoding) and throughput. GRPO runs: total reward,
its components and the terms of the user's own, the stage's weights, mean IoU on generated images, KL to
the base model, completion length, the groups without signal and the truncated completions, the policy's
entropy, learning rate, gradient norm, loss, clipped ratios and time per step, each per step
with a centred moving average that restarts at each stage (a stage's reward has its own weights), the reward stages shaded and
their boundaries marked and named on every panel; held-out evaluation as well when the run logged some.
A panel without values (the KL when grpo.beta is 0) is left out and named in the subtitle. `fxjax sft` and
`fxjax grpo` write it at the end of a run (--no-report: not). Given `fxjax eval` folders instead, it
compares their held-out metrics (fxjax.commands.eval_report).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fxjax.commands.eval_report import (EVAL_REPORT_FILE, eval_report_path, is_eval_dir, png_path, step_label,
                                        write_eval_report)
from fxjax.commands.eval_folder import SETTINGS
from fxjax.commands.report_panels import STEP_LABELS, Panel, panels_for
from fxjax.run_files import METRICS_FILE

HELP = "plot a run's metrics.jsonl (SFT or GRPO) into one PNG, or compare `fxjax eval` folders"

DESCRIPTION = """\
Plot the metrics of a fxjax sft or grpo run (RUN_DIR/metrics.jsonl) into one PNG.

SFT panels: loss (training and held-out token cross-entropy; log scale when it falls more than 20x),
learning rate, gradient norm, held-out generation metrics (format rate, verdict accuracy, mean IoU; greedy
decoding), throughput (tokens / s). Training values are means over the steps between two records
(train.log_every), the learning rate its value at the record's step.
GRPO panels: total reward (mean and std over the step's completions), reward components (format rate,
verdict accuracy, the IoU term R_G and the raw matched IoU, means over the step's completions), the terms
of your own (grpo.reward_funcs, each with its weight), the stage's reward weights, mean IoU on generated
images, KL to the base model, completion length, groups whose rewards are all equal (no signal) and
truncated completions, policy entropy, learning rate, gradient norm, the GRPO loss, the clipped importance
ratios (left out when all 0: grpo.num_iterations 1), the time per step (sampling, update), and the
held-out evaluation when the run logged one. Every
GRPO panel shades the reward stages (alpha, beta, gamma, ...) and marks and names the boundaries between
them; no line crosses a boundary.

Steps are optimiser updates (SFT) or sampling steps (GRPO: each makes grpo.num_iterations updates). Noisy
series are drawn thin, with a thick centred moving average (about a fifteenth of the steps, at most 25
around each point; within each GRPO stage). Panels without values (or, for the clip ratios, all 0) are
left out and named in the subtitle and on stderr; non-finite values ("nan", "inf") are not drawn, and
the subtitle names their series and steps; a value with no finite neighbour is drawn as a dot.
`fxjax sft` and `fxjax grpo` write RUN_DIR/report.png when they finish, unless given --no-report.

Given several runs of one kind (2 to 4 RUN_DIRs: seeds, settings), it draws each panel with every run's
series in it, a line style per run (solid, dashed, dotted, dash-dot), the stages shaded when the runs
share them; written to compare_report.png beside the first run unless --out.

Given `fxjax eval` output folders instead (one or more, each holding metrics.json), it draws their held-out
metrics side by side: format rate, verdict accuracy, F1 for "generated" and mean IoU on generated images,
one bar per folder in the order given, with the 95% intervals `fxjax eval` computed. Given the --out of
`fxjax eval --step A B ...` (a folder of eval folders), its folders in the order of their steps."""

EPILOG = """\
examples:
  fxjax report runs/sft                   # writes runs/sft/report.png
  fxjax report runs/grpo --out grpo.png
  fxjax report runs/grpo-seed0 runs/grpo-seed4 --labels "seed 0,seed 4"   # writes runs/compare_report.png
  fxjax report eval/step-100 eval/step-200 --labels "step 100,step 200"   # writes eval/eval_report.png
  fxjax report runs/grpo/eval   # the folders of `fxjax eval --step alpha beta gamma --out runs/grpo/eval`"""

REPORT_FILE = "report.png"
COMPARE_REPORT_FILE = "compare_report.png"  # (fxjax.commands.report_compare draws it)
EVAL_MARKERS = ("o", "s", "^", "D", "v", "P")  # the held-out points' shapes, by the series' place in its panel
STAGE_SHADES = ("#f2f2f2", "#ffffff")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="DIR", nargs="+",
                   help="a run's train.output_dir (holding metrics.jsonl) or that file; 2 to 4 such runs of one "
                        "kind to compare; or one or more `fxjax eval` output folders (holding metrics.json) to "
                        "compare, or a folder of them (`fxjax eval --step A B --out DIR`)")
    p.add_argument("--out", metavar="FILE.png", help=f"where to write the PNG: a file (.png added when missing) or a directory "
                        f"(default: RUN_DIR/{REPORT_FILE}; for several runs {COMPARE_REPORT_FILE} in the folder "
                        f"holding the first; for eval folders {EVAL_REPORT_FILE} next to the first)")
    p.add_argument("--title", help="figure title (default: the run directory and its kind; for eval folders "
                                   "'held-out evaluation')")
    p.add_argument("--labels", metavar="A,B,...", help="the names of the runs compared, or of the eval folders' bars, "
                                                        "comma-separated, one per DIR (default: the folder names)")
    p.set_defaults(func=run)


# ---- data -----------------------------------------------------------------------------------------

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
    so the average neither lags the data nor mixes in values beyond the series' ends."""
    half = window // 2
    out = []
    for i in range(len(values)):
        near = [v for v in values[max(0, i - half):i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if near else math.nan)
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


def mark_stages(ax, spans: Sequence[StageSpan]) -> None:
    """Shade each stage, draw a dashed line at each boundary and name the stage at the top of the panel."""
    from matplotlib.transforms import blended_transform_factory

    to_axes = blended_transform_factory(ax.transData, ax.transAxes)  # x in steps, y in the panel's height
    for i, span in enumerate(spans):
        lo, hi = span.first - 0.5, span.last + 0.5
        ax.axvspan(lo, hi, color=STAGE_SHADES[i % 2], zorder=0, lw=0)
        if i:
            ax.axvline(lo, color="#555555", ls="--", lw=1.2, zorder=1)
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
                     label: str | None, join: Any = ":") -> None:
    """Evaluations are a few points: markers, joined by a faint line (`join`'s style) that does not pretend
    to know the values in between (a solid line between step 0 and the end read as a linear rise). A shape
    each, hollow: equal values (format, verdict and IoU all 0) show every series, not the last."""
    ax.plot(steps, values, marker, color=colour, label=label, ms=7, zorder=4, mfc="none", mew=1.5)
    ax.plot(steps, values, ls=join, color=colour, lw=1, alpha=0.6, zorder=3)


def draw_train_series(ax, steps: Sequence[int], values: Sequence[float], spans: Sequence[StageSpan], *,
                      colour: str, window: int, smooth: bool, label: str | None, style: str = "-") -> None:
    """A training series, stage by stage (no line crosses a boundary): per step thin and its centred moving
    average thick when `smooth` and long enough, else one line; values with no finite neighbour as dots."""
    for i, (part_steps, part) in enumerate(stage_segments(steps, values, spans)):
        name = label if i == 0 else None  # one legend entry per series
        if smooth and window > 1 and len(values) > window:
            ax.plot(part_steps, part, style, color=colour, alpha=0.3, lw=0.8, zorder=2)  # per step (figure title)
            ax.plot(part_steps, moving_average(part, window), style, color=colour, lw=2, label=name, zorder=3)
        else:
            ax.plot(part_steps, part, style, color=colour, lw=1.5, marker="." if len(values) < 15 else None,
                    label=name, zorder=3)
        lone = isolated(part)  # (a one-step stage, a value between two non-finite ones: no line shows it)
        if lone:
            ax.plot([part_steps[i] for i in lone], [part[i] for i in lone], "o", color=colour, ms=3, zorder=4)


def drawable_series(records: Sequence[dict], panel: Panel):
    """(colour, marker, line, steps, values) of each of the panel's lines with a finite value in `records`
    (a line's colour and held-out marker are its place in the panel's, whatever is drawn)."""
    for colour, marker, line in zip(COLOURS, EVAL_MARKERS, panel.lines):
        steps, values = series(records, line.kind, line.key)
        if steps and any(math.isfinite(v) for v in values):
            yield colour, marker, line, steps, values


def _draw_panel(ax, records: Sequence[dict], panel: Panel, spans: Sequence[StageSpan], window: int, xlabel: str,
                xlim: tuple[float, float]) -> None:
    if spans:
        mark_stages(ax, spans)
    plotted = []
    for colour, marker, line, steps, values in drawable_series(records, panel):
        plotted += [v for v in values if math.isfinite(v)]
        if line.kind == "eval":
            label = f"{line.label} (evaluated at {len(steps)} step{'s' if len(steps) > 1 else ''})"
            draw_eval_points(ax, steps, values, colour, marker, label)
        else:
            draw_train_series(ax, steps, values, spans, colour=colour, window=window, smooth=line.smooth,
                              label=line.label)
    format_axes(ax, panel, plotted, bool(spans), xlabel, xlim)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def build_report(records: Sequence[dict], title: str | None = None, timings: bool = True):
    """The report figure (matplotlib Figure; each panel's title names it) of a run's metrics records;
    `timings` False leaves out the wall-clock panels (the demo's report is then the same, byte for byte, at
    every run)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if not records:
        raise ValueError("no metrics records to plot")
    kind = run_kind(records)
    spans = stage_spans(records) if kind == "grpo" else []
    candidates = [p for p in panels_for(kind, records) if timings or not p.timing]
    why = {p.title: left_out(records, p) for p in candidates}
    panels = [p for p in candidates if why[p.title] is None]
    missing = [why[p.title] for p in candidates if why[p.title] is not None]
    if not panels:
        raise ValueError("the metrics records hold none of the values a report plots")
    train_steps = len({r["step"] for r in records if r.get("kind") == "train"})
    window = max(1, min(25, train_steps // 15))
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    steps = [r["step"] for r in records]
    margin = max(0.5, 0.02 * (max(steps) - min(steps)))
    xlim = (min(steps) - margin, max(steps) + margin)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, records, panel, spans, window, STEP_LABELS[kind], xlim)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    heading = title or f"{kind.upper()} run"
    detail = f"steps {min(steps)}-{max(steps)}"
    if spans:
        detail += "; stages " + ", ".join(f"{s.name} {s.first}-{s.last}" for s in spans)
    logged = sorted({r["step"] for r in records if r.get("kind") == "train"})
    gaps = [b - a for a, b in zip(logged, logged[1:])]
    every = max(set(gaps), key=gaps.count) if gaps else 1  # the usual gap (the last record may come sooner)
    per = ("per step" if every == 1 else
           f"means over each {every} steps (train.log_every; the learning rate: its value at the step)")
    if window > 1 and train_steps > window:
        detail += (f"; thin lines: {per}, thick: centred moving average of {2 * (window // 2) + 1} points"
                   + (" within each stage" if spans else ""))
    elif every > 1:
        detail += f"; training values: {per}"
    if missing:
        detail += "\nnot plotted: " + "; ".join(missing)
    note = non_finite_note(records, panels)
    if note:
        detail += "\n" + note
    # (wrapped to the figure's width: a long list of panels left out ran off both edges)
    lines = [textwrap.fill(line, width=70 * cols) for line in f"({detail})".split("\n")]
    fig.suptitle("\n".join([heading, *lines]), fontsize=12)
    fig.missing_panels = missing
    return fig


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


def write_report(run_dir: str | Path, out: str | Path | None = None, title: str | None = None,
                 timings: bool = True) -> Path:
    """Read RUN_DIR/metrics.jsonl (or that file), draw the report (`timings`: as `build_report`'s), save it
    as PNG; returns its path."""
    metrics_file, records = read_run_metrics(run_dir)
    run_name = metrics_file.parent.name or str(metrics_file.parent)
    fig = build_report(records, title or f"{run_name}: {run_kind(records).upper()}", timings)
    path = png_path(out, metrics_file.parent, REPORT_FILE)
    fig.savefig(path, dpi=110)
    if fig.missing_panels:
        print(f"fxjax report: panels left out (named in the subtitle): {'; '.join(fig.missing_panels)}",
              file=sys.stderr)
    staged = staged_rewards(records)
    if staged:  # (what a reader looks for first in a GRPO run, in numbers beside the panels)
        from fxjax.demo_summary import stage_trends

        print(f"fxjax report: training reward by stage (mean of its first third -> last third): "
              f"{stage_trends(staged)}", file=sys.stderr)
    return path


def report_after_run(output_dir: str | Path, say: Callable[[str], None]) -> None:
    """The end-of-run report of `fxjax sft` / `fxjax grpo`: never fails the run, says why when it cannot."""
    try:
        import jax

        if jax.process_index() != 0:
            return
        say(f"wrote the report {write_report(output_dir)}")
    except Exception as err:  # noqa: BLE001 - a plotting problem must not turn a finished run into a failure
        say(f"no report ({type(err).__name__}: {err}); run `fxjax report {output_dir}` to retry")


def eval_subfolders(folder: str | Path) -> list[tuple[Path, int | None]]:
    """The `fxjax eval` folders directly inside `folder` (the --out of `fxjax eval --step A B ...`), each
    with the checkpoint step it recorded, in step order (by name when one has none); [] for a folder that is
    itself a run or an eval folder."""
    folder = Path(folder)
    if not folder.is_dir() or is_eval_dir(folder) or (folder / METRICS_FILE).is_file():
        return []
    found = [d for d in sorted(folder.iterdir()) if d.is_dir() and is_eval_dir(d)]

    def recorded_step(d: Path):
        try:
            step = json.loads((d / SETTINGS).read_text(encoding="utf-8"))["model"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return step if isinstance(step, int) else None

    steps = [recorded_step(d) for d in found]
    return sorted(zip(found, steps), key=lambda x: x[1]) if None not in steps else list(zip(found, steps))


def run(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.strip():  # (Path("") is the working folder: ./report.png)
        raise ValueError("--out: give a file or a folder (an empty text names none)")
    same = sorted({d for d in args.run if sum(Path(d).resolve() == Path(e).resolve() for e in args.run) > 1})
    if same:  # (compared with itself: one line drawn over another, without a word)
        raise ValueError(f"{', '.join(same)} given more than once: give each run or eval folder once")
    inside = eval_subfolders(args.run[0]) if len(args.run) == 1 else []
    if inside:  # a multi-step eval's --out: its step folders, compared, named as `fxjax eval` names them
        args.run, args.out = [str(d) for d, _ in inside], args.out or str(Path(args.run[0]) / EVAL_REPORT_FILE)
        args.labels = args.labels or ",".join(step_label(d.name, step) for d, step in inside)
    evals = [is_eval_dir(d) for d in args.run]
    if all(evals):
        labels = args.labels.split(",") if args.labels else None
        if labels is not None and len(labels) != len(args.run):
            raise ValueError(f"--labels: {len(labels)} names for {len(args.run)} eval folders")
        existed = eval_report_path(args.run, args.out).is_file()
        path = write_eval_report(args.run, args.out, labels, args.title)
        print(f"wrote {path}" + (" (it replaced the one there; --out FILE.png writes another)" if existed else ""),
              file=sys.stderr)
        return 0
    if len(args.run) > 1:
        if any(evals):
            raise ValueError(f"{args.run[evals.index(False)]}: not an `fxjax eval` folder (no metrics.json), beside "
                             f"{args.run[evals.index(True)]}, which is: compare eval folders with eval folders, or "
                             "training runs with training runs")
        from fxjax.commands.report_compare import write_comparison

        path = write_comparison(args.run, args.out, args.labels.split(",") if args.labels else None, args.title)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if args.labels:
        raise ValueError("--labels names the bars of eval folders, or the runs compared; one run's report has none")
    path = write_report(args.run[0], args.out, args.title)
    print(f"wrote {path}", file=sys.stderr)
    return 0
