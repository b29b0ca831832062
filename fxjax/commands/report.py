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
compares their held-out metrics (fxjax.commands.eval_report). Several runs: fxjax.commands.report_compare;
what each panel holds: fxjax.commands.report_panels; the pieces both draw with: fxjax.commands.report_drawing.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

from fxjax.commands.eval_report import (EVAL_REPORT_FILE, FIGURE_SUFFIXES, eval_report_path, is_eval_dir, png_path,
                                        step_label, write_eval_report)
from fxjax.commands.eval_folder import METRICS as EVAL_METRICS, SETTINGS
from fxjax.commands.report_drawing import (COMPARE_REPORT_FILE, LINE_STYLES, StageSpan, draw_eval_points,
                                           draw_train_series, drawable_series, factor_into_labels, format_axes,
                                           left_out, mark_stages, non_finite_note, read_run_metrics, run_kind,
                                           stage_spans, staged_rewards, stop_notes, summary_lines)
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
around each point; within each GRPO stage); the series of one panel differ in colour and line style (equal
values stay visible). The loss, gradient norm and KL get a log scale when their values are positive and span
more than 20x;
an axis multiplier (x 1e-4) is in its y label. Panels without values (or, for the clip ratios, all 0) are
left out and named in the subtitle and on stderr; non-finite values ("nan", "inf") are not drawn (nor the
moving average there), and the subtitle names their series and steps, the updates skipped as non-finite
(train.on_nonfinite: skip) and the step a non-finite loss stopped the run at (on_nonfinite: stop); a value
with no finite neighbour is drawn as a dot. --out FILE.pdf (or .svg) writes a vector figure.
`fxjax sft` and `fxjax grpo` write RUN_DIR/report.png when they finish, unless given --no-report.

Given several runs of one kind (2 to 4 RUN_DIRs: seeds, settings), it draws each panel with every run's
series in it, a line style per run (solid, dashed, dotted, dash-dot) and a fill of the held-out markers per
run (hollow, full, half), the stages shaded when the runs share them (a run stopped partway shares those
it reached); written to compare_report.png beside the first run unless --out.

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
def add_parser(sub) -> None:
    p = sub.add_parser("report", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="DIR", nargs="+",
                   help="a run's train.output_dir (holding metrics.jsonl) or that file; 2 to 4 such runs of one "
                        "kind to compare; or one or more `fxjax eval` output folders (holding metrics.json) to "
                        "compare, or a folder of them (`fxjax eval --step A B --out DIR`)")
    p.add_argument("--out", metavar="FILE.png",
                   help=f"where to write the figure: a file (.png, or .pdf / .svg for a vector figure; .png added "
                        f"to another name) or a directory "
                        f"(default: RUN_DIR/{REPORT_FILE}; for several runs {COMPARE_REPORT_FILE} in the folder "
                        f"holding the first; for eval folders {EVAL_REPORT_FILE} next to the first)")
    p.add_argument("--title", help="figure title (default: the run directory and its kind; for eval folders "
                                   "'held-out evaluation')")
    p.add_argument("--labels", metavar="A,B,...", help="the names of the runs compared, or of the eval folders' bars, "
                                                        "comma-separated, one per DIR (default: the folder names)")
    p.set_defaults(func=run)


# ---- data -----------------------------------------------------------------------------------------

def _draw_panel(ax, records: Sequence[dict], panel: Panel, spans: Sequence[StageSpan], window: int, xlabel: str,
                xlim: tuple[float, float]) -> None:
    if spans:
        mark_stages(ax, spans, xlim)
    plotted = []
    for colour, marker, line, steps, values in drawable_series(records, panel):
        plotted += [v for v in values if math.isfinite(v)]
        if line.kind == "eval":
            label = f"{line.label} (evaluated at {len(steps)} step{'s' if len(steps) > 1 else ''})"
            draw_eval_points(ax, steps, values, colour, marker, label)
        else:
            draw_train_series(ax, steps, values, spans, colour=colour, window=window, smooth=line.smooth,
                              label=line.label, style=LINE_STYLES[panel.lines.index(line) % len(LINE_STYLES)])
    format_axes(ax, panel, plotted, bool(spans), xlabel, xlim)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def build_report(records: Sequence[dict], title: str | None = None, timings: bool = True):
    """The report figure (matplotlib Figure; each panel's title names it) of a run's metrics records;
    `timings` False leaves out the wall-clock panels (the demo's report is then the same, byte for byte, at
    every run)."""
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
    # (a record at each checkpoint too: the usual gap is not always the interval, so it is not named)
    per = ("per step" if every == 1 else "means over the steps since the previous record (train.log_every, and "
           "each checkpoint; the learning rate: its value at the step)")
    if window > 1 and train_steps > window:
        detail += (f"; thin lines: {per}, thick: centred moving average of {2 * (window // 2) + 1} points"
                   + (" within each stage" if spans else ""))
    elif every > 1:
        detail += f"; training values: {per}"
    if missing:
        detail += "\nnot plotted: " + "; ".join(missing)
    for note in (non_finite_note(records, panels), *stop_notes(records)):
        if note:
            detail += "\n" + note
    # (wrapped to the figure's width: a long list of panels left out ran off both edges)
    lines = [textwrap.fill(line, width=70 * cols) for line in f"({detail})".split("\n")]
    fig.suptitle("\n".join([heading, *lines]), fontsize=12)
    factor_into_labels(fig)
    fig.missing_panels = missing
    return fig


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
    for line in summary_lines(records):
        print(f"fxjax report: {line}", file=sys.stderr)
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
    try:
        return _report(args)
    except OSError as err:  # (a run folder read-only, on a shared disk: the errno alone said nothing to do)
        written = str(getattr(err, "filename", "") or "").endswith(FIGURE_SUFFIXES)
        if written and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOSPC):
            raise OSError(err.errno, f"{err.strerror}: {err.filename} (the report cannot be written there: "
                                     "--out FILE.png writes it elsewhere)") from None
        raise


def _report(args: argparse.Namespace) -> int:
    """`run` itself."""
    if args.out is not None and not args.out.strip():  # (Path("") is the working folder: ./report.png)
        raise ValueError("--out: give a file or a folder (an empty text names none)")
    def folder(given: str) -> Path:  # (a run's metrics.jsonl, or an eval's metrics.json, is its folder)
        path = Path(given).resolve()
        return path.parent if path.is_file() and path.name in (METRICS_FILE, EVAL_METRICS) else path

    same = sorted({d for d in args.run if sum(folder(d) == folder(e) for e in args.run) > 1})
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
