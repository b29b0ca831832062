"""`fxjax eval` from Python: a detector measured on a labelled test set, its metrics returned.

    from fxjax.evaluate import evaluate

    metrics = evaluate("data/test.jsonl", out="runs/grpo/eval", run="runs/grpo", step="gamma", batch_size=16)
    print(metrics["accuracy"], metrics["f1"], metrics["mean_iou"], metrics["format_rate"])
    by_stage = evaluate("data/test.jsonl", out="runs/grpo/eval", run="runs/grpo", step=["alpha", "beta", "gamma"])
    print({stage: m["mean_iou"] for stage, m in by_stage.items()})

The command runs as it runs from a shell (its checks, its lock on `out`, resuming the predictions already in
`out`, the table it prints and the files it writes: predictions.jsonl, metrics.json, settings.json, and
eval_report.png for several steps; `fxjax eval --help`), and its metrics.json is what comes back. The options
are the command's, as keywords (`fxjax.keyword_options`): model, adapter, run, step, data files, root, format,
on_error, limit, group_by, the prompt and pixel options, batch_size, max_new_tokens, fresh, progress, ...

This module is the app layer (it runs the command, which reads training runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["evaluate"]


def evaluate(data: str | Path | Sequence[str | Path], out: str | Path = "eval", model: str | Path | None = None,
             **options: Any) -> dict[str, Any]:
    """`fxjax eval --data DATA --out OUT [--model MODEL] --option value ...`; returns its metrics.json (the
    metrics, their 95% intervals, the breakdown by group, the settings and any record left out), or, with
    steps given as a list (`step=[...]`, one or several), {each step as given: its metrics.json}. Errors are the command's
    exceptions (a bad option: ValueError or TypeError naming it), which name the options as keywords."""
    from fxjax.commands.eval import run
    from fxjax.commands.eval_folder import METRICS
    from fxjax.commands.eval_steps import step_folder
    from fxjax.keyword_options import command_arguments, in_keyword_words

    files = [data] if isinstance(data, (str, Path)) else list(data)
    args = command_arguments("eval", [], {"data": files, "out": out, "model": model, **options}, "evaluate")
    try:
        run(args)
    except (ValueError, TypeError, OSError) as err:  # (said in the keywords' words: fresh=True, not --fresh)
        raise in_keyword_words(err, "eval")
    steps = args.step if isinstance(args.step, list) else [args.step]
    if len(steps) == 1:  # (a list of one step, as a list of several: {step: metrics}, its metrics in OUT)
        metrics = json.loads((Path(args.out) / METRICS).read_text(encoding="utf-8"))
        return {steps[0]: metrics} if isinstance(options.get("step"), (list, tuple)) else metrics
    return {value: json.loads((Path(args.out) / step_folder(value) / METRICS).read_text(encoding="utf-8"))
            for value in steps}
