"""`fxjax eval --run RUN --step A B ...`: several steps of one run, each evaluated into a folder of its own
under --out (the stage's name, or step-N), on one loaded model, then compared in a table and eval_report.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxjax.commands.eval_folder import METRICS, PREDICTIONS, evaluate_detector

__all__ = ["check_distinct_steps", "evaluate_steps", "step_folder"]


def step_folder(value: int | str) -> str:
    """The subfolder of --out for one of several --step values: the stage's name, or step-N."""
    return f"step-{value}" if isinstance(value, int) else str(value)


def evaluate_steps(args, records, report, detectors, settings: list[dict], steps: list, out: Path, say) -> int:
    """Several steps of one run, each into out/<step_folder>, on one loaded model (each step's LoRA swapped
    in: `Detector.load(after=...)`); then a table with a row per step and out/eval_report.png, in step order
    (as `fxjax report OUT` draws them)."""
    from fxjax.commands.eval_report import EVAL_REPORT_FILE, step_label, write_eval_report
    from fxjax.detection_metrics import steps_table

    rows, loaded = [], None
    for value, detector, step_settings in zip(steps, detectors, settings):
        folder = out / step_folder(value)
        say(f"step {detector.source['step']}" + (f" (the end of stage {value})" if isinstance(value, str) else "")
            + f" -> {folder}")
        summary = evaluate_detector(args, records, report, detector, step_settings, folder, say, after=loaded)
        loaded = detector if detector.model is not None else loaded  # (it took the model of the one before)
        rows.append((detector.source["step"], step_label(folder.name, detector.source["step"]), summary, folder))
    rows.sort(key=lambda row: row[0])
    dirs = [folder for *_, folder in rows]
    rows = [(label, summary) for _, label, summary, _ in rows]
    png = write_eval_report(dirs, out / EVAL_REPORT_FILE, labels=[label for label, _ in rows],
                            title=f"held-out evaluation of {args.run} by step")
    print(steps_table(rows))
    print(f"\nwrote {', '.join(str(d) for d in dirs)} (each: {METRICS}, {PREDICTIONS}) and the comparison {png}")
    return 0


def check_distinct_steps(given: list, resolved: list[int]) -> None:
    """Several --step values: each a checkpoint of its own, each with a folder of its own under --out."""
    seen: dict[int, Any] = {}
    folders: dict[str, Any] = {}
    for value, step in zip(given, resolved):
        if step in seen:
            if seen[step] == value:
                raise ValueError(f"--step: {value} is given twice; give each step once")
            raise ValueError(f"--step: {seen[step]} and {value} name the same checkpoint (step {step}); give it once")
        seen[step] = value
        folder = step_folder(value)
        if folder in (".", "..") or Path(folder).name != folder or "\\" in folder:
            raise ValueError(f"--step {value}: the stage's name is not a folder name; with several --step values "
                             f"each is evaluated into --out/<stage>: give its step number ({step}) instead")
        if folder in folders:
            raise ValueError(f"--step: {folders[folder]} and {value} would both be evaluated into --out/{folder}; "
                             f"give the step number ({step}) instead of the stage's name")
        folders[folder] = value
