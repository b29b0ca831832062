"""`fxjax report EVAL_DIR EVAL_DIR ...`: the held-out metrics of several `fxjax eval` runs side by side.

One PNG, one panel per metric (format rate, verdict accuracy, F1 for "generated", mean IoU on generated
images), one bar per evaluation in the order given, with the 95% interval `fxjax eval` wrote (Wilson for
the rates, mean IoU +/- 1.96 standard errors; F1 has none) and the value written on each bar. For
comparing checkpoints or phases (`fxjax demo` draws its five held-out evaluations with it) where a table
of numbers is harder to take in than bars. The evaluations should share their held-out records: when the
number of examples differs the x labels say so, and when the data files' contents differ the subtitle does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from fxjax.commands.eval_folder import METRICS  # (its module-level imports load no jax nor fxjax.train: --help)
from fxjax.run_files import METRICS_FILE

EVAL_REPORT_FILE = "eval_report.png"
# (metrics.json key, panel title, interval key in metrics.json["ci95"] or None)
EVAL_PANELS: tuple[tuple[str, str, str | None], ...] = (
    ("format_rate", "format rate", "format_rate"),
    ("accuracy", "verdict accuracy", "accuracy"),
    ("f1", 'F1 for "generated"', None),
    ("mean_iou", "mean IoU on generated images", "mean_iou"),
)


def step_label(folder: str, step: int | None) -> str:
    """A step's bar and row name in a multi-step eval (`fxjax eval --step A B`, and `fxjax report` of its
    --out): "beta (step 20)" for a folder named for a stage, "step 30" for step-30."""
    if step is None:
        return folder
    return f"step {step}" if folder == f"step-{step}" else f"{folder} (step {step})"


def is_eval_dir(path: str | Path) -> bool:
    """Whether `path` is an `fxjax eval` output folder (or its metrics.json). A folder that also holds a
    training run's metrics.jsonl (`fxjax eval --out RUN_DIR`) is the run's."""
    path = Path(path)
    if path.is_dir():
        return (path / METRICS).is_file() and not (path / METRICS_FILE).is_file()
    return path.name == METRICS


def read_eval_metrics(path: str | Path) -> dict:
    """The metrics.json of an `fxjax eval` folder, checked for the keys the chart draws."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {METRICS} in {path} (an `fxjax eval --out DIR` folder holds one)")
    try:
        summary = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(summary, dict) or "examples" not in summary:
        raise ValueError(f"{file}: not the metrics of `fxjax eval` (no 'examples' key)")
    lacking = [key for key, _, _ in EVAL_PANELS if key not in summary]
    if lacking:
        raise ValueError(f"{file}: lacks {', '.join(lacking)} (written by an older fxjax? rerun `fxjax eval`)")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for key, _, ci_key in EVAL_PANELS:
        if summary[key] is not None and not number(summary[key]):
            raise ValueError(f"{file}: {key} is {summary[key]!r}, not a number or null")
        interval = (summary.get("ci95") or {}).get(ci_key) if ci_key and isinstance(summary.get("ci95"), dict) else None
        if interval is not None and not (isinstance(interval, list) and len(interval) == 2
                                         and all(map(number, interval))):
            raise ValueError(f"{file}: ci95.{ci_key} is {interval!r}, not a [low, high] pair")
    if summary.get("ci95") is not None and not isinstance(summary["ci95"], dict):
        raise ValueError(f"{file}: ci95 is {summary['ci95']!r}, not an object")
    return summary


def build_eval_report(summaries: Sequence[dict], labels: Sequence[str], title: str | None = None):
    """The comparison figure (matplotlib Figure, one panel per metric) of eval summaries, in order."""
    from matplotlib.figure import Figure

    if not summaries:
        raise ValueError("no evaluations to compare")
    if len(labels) != len(summaries):
        raise ValueError(f"{len(labels)} labels for {len(summaries)} evaluations")
    sizes = {s["examples"] for s in summaries}
    names = [label if len(sizes) == 1 else f"{label}\n(n={s['examples']})" for label, s in zip(labels, summaries)]
    fig = Figure(figsize=(max(8.0, 1.1 * len(summaries) * 2 + 2), 7.2), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False).flat
    x = range(len(summaries))
    for ax, (key, panel_title, ci_key) in zip(axes, EVAL_PANELS):
        values = [s.get(key) for s in summaries]
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(x, heights, color="#4c72b0", width=0.6)
        for k, (summary, value) in enumerate(zip(summaries, values)):
            interval = (summary.get("ci95") or {}).get(ci_key) if ci_key else None
            if value is not None and interval:
                below, above = max(0.0, value - interval[0]), max(0.0, interval[1] - value)  # Wilson: 1.0 - ulp
                ax.errorbar(k, value, yerr=[[below], [above]], color="black", capsize=4, linewidth=1)
            text = "n/a" if value is None else f"{value:.3f}" if key in ("mean_iou", "f1") else f"{value:.0%}"
            if key == "mean_iou" and value is not None and isinstance(summary.get("iou_images"), int):
                text += f"\n{summary['iou_images']} img"  # (how many images the mean and its interval rest on)
            inside = value is not None and value > 0.12  # the value inside its bar, else above bar and whisker
            top = max(value or 0.0, interval[1] if value is not None and interval else 0.0)
            ax.text(k, 0.02 if inside else top + 0.02, text, ha="center", va="bottom", fontsize=9,
                    color="white" if inside else "black")
        ax.set_title(panel_title + (" (95% interval)" if ci_key else ""))
        ax.set_ylim(0, 1.05)
        ax.set_xticks(list(x), names, fontsize=9, rotation=20 if len(summaries) > 4 else 0)
        ax.grid(axis="y", alpha=0.3)
    # two lines: one was wider than the 8-inch figure of one to four evaluations, cut off at both ends
    detail = (f"{sizes.pop()} held-out examples each" if len(sizes) == 1 else "different numbers of examples") + \
        "; greedy decoding"
    cut = [(label, s["truncated_rate"]) for label, s in zip(labels, summaries) if s.get("truncated_rate")]
    if cut:  # (a completion cut at --max-new-tokens has no verdict: the bars then measure the length limit)
        detail += ("\ncut at --max-new-tokens (raise it): "
                   + ", ".join(f"{label.splitlines()[0]} {rate:.0%}" for label, rate in cut))
    if any(s.get(key) is None for s in summaries for key, _, _ in EVAL_PANELS):  # (said where a bar says n/a)
        detail += "\nn/a: not defined (F1: images of one true class only; IoU: no generated image)"
    datasets = {_data_identity(s) for s in summaries}
    if len(datasets) > 1:  # the files' contents (sha256 per file fxjax eval recorded), not their paths
        detail += "\nNOTE: the evaluations read different data files: the bars are not on the same images"
    fig.suptitle(f"{title or 'held-out evaluation'}\n{detail}", fontsize=12)
    return fig


def _data_identity(summary: dict) -> tuple | None:
    """The sha256s of the data files an evaluation read (settings.data: {file: sha256}); None if unrecorded."""
    data = (summary.get("settings") or {}).get("data")
    return tuple(sorted(data.values())) if isinstance(data, dict) else None


def write_eval_report(dirs: Sequence[str | Path], out: str | Path | None = None, labels: Sequence[str] | None = None,
                      title: str | None = None) -> Path:
    """Read each folder's metrics.json, draw the comparison, save it as PNG (default: next to the first
    folder, EVAL_REPORT_FILE in its parent); returns its path."""
    summaries = [read_eval_metrics(d) for d in dirs]
    folders = [Path(d) if Path(d).is_dir() else Path(d).parent for d in dirs]
    labels = list(labels) if labels is not None else [f.name or str(f) for f in folders]
    fig = build_eval_report(summaries, labels, title)
    path = eval_report_path(dirs, out)
    fig.savefig(path, dpi=110)
    return path


def eval_report_path(dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Where `write_eval_report` writes (its folder created): `out` (`png_path`), else EVAL_REPORT_FILE in
    the parent of the first folder."""
    first = Path(dirs[0]) if Path(dirs[0]).is_dir() else Path(dirs[0]).parent
    return png_path(out, first.absolute().parent, EVAL_REPORT_FILE)


FIGURE_SUFFIXES = (".png", ".pdf", ".svg")  # (a paper wants vector figures; --out fig.pdf wrote fig.pdf.png)


def png_path(out: str | Path | None, default_dir: Path, name: str) -> Path:
    """Where a report goes (its folder created): `out` as a file (.png, .pdf or .svg, matplotlib's format
    for the suffix; .png added to any other name, so the path printed is the file matplotlib writes) or,
    given as an existing directory or with a trailing slash, as the folder for `name`; without `out`,
    `default_dir / name`."""
    if out is None:
        path = Path(default_dir) / name
    elif Path(out).is_dir() or str(out).endswith(("/", "\\")):
        path = Path(out) / name
    else:
        path = Path(out)
        path = path if path.suffix.lower() in FIGURE_SUFFIXES else path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
