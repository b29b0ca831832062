"""What `fxjax sft` and `fxjax grpo` do around their loop (and their shared arguments): check the config's paths before JAX starts,
join the multi-process run, run the loop, turn a non-finite stop into exit code 3, and draw the report."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable


def add_run_arguments(p, *, config_help: str, set_example: str) -> None:
    """The training commands' arguments: --config, --set (repeatable), --no-report."""
    p.add_argument("--config", required=True, metavar="YAML", help=config_help)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value (YAML syntax; a string key takes the text as written), e.g. "
                        f"--set {set_example} (repeatable)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write <train.output_dir>/report.png (plots of metrics.jsonl, `fxjax report`) at the end")


def say(command: str) -> Callable[[str], None]:
    """A logger that prefixes `fxjax <command>: ` and writes to stderr."""
    return lambda text: print(f"fxjax {command}: {text}", file=sys.stderr)


def relative_to_config_hint(value: str, config: str | None) -> str:
    """Where a relative path that is not there from the working folder lies beside the config (they
    resolve against the working folder, as the README says): that file, and how to reach it."""
    if config is None or Path(value).is_absolute() or not (Path(config).parent / value).exists():
        return ""
    beside = Path(config).parent / value
    return (f" (relative paths resolve against the working folder, {Path.cwd()}, not the config's; {beside} "
            f"exists: run from {Path(config).parent} or write the path from here)")


def check_paths(cfg, config: str | None = None) -> None:
    """The config's input paths exist (checked before jax starts, so a typo costs a second and the error
    names the key; a relative one found beside `config`, the config file, says so). A resuming run's
    starting adapter or run may be gone when the run kept its own copy (train.run_setup.resumed_start uses
    it)."""
    from fxjax.data.tokenizer import tokenizer_json
    from fxjax.run_start import resumes_from_kept_start

    kept_copy = resumes_from_kept_start(cfg)
    for key, value in cfg.input_paths():
        if value is None:
            continue
        if not Path(value).exists():
            if kept_copy and key in ("model.adapter", "model.from_run"):
                continue
            raise FileNotFoundError(f"{key}: {value} does not exist{relative_to_config_hint(value, config)}")
        if key.startswith("model.") and not Path(value).is_dir():  # (found here, not in the tokenizer's parser)
            raise NotADirectoryError(f"{key}: {value} is a file; give the {FOLDER_OF[key]} folder")
        if key in ("data.train_files", "data.eval_files") and Path(value).is_dir():
            raise IsADirectoryError(f"{key}: {value} is a folder; give the JSONL files in it")
        if key == "data.tokenizer" and Path(value).is_dir() and tokenizer_json(value) is None:
            raise FileNotFoundError(f"data.tokenizer: no tokenizer.json in {value}")


def finished(command: str, result, last_step: str) -> bool:
    """The line a training command ends with (stdout): the steps it reached and ran, its time, what its last
    step gave (`last_step`), and where its checkpoints are; a preempted run says how it goes on (stderr).
    Whether to draw the report: not for a preempted run, whose machine is being taken away."""
    if result.preempted:
        left = ("the end's evaluation and exports still to do" if result.steps == result.total_steps else
                "resume by running the same command")
        say(command)(f"preempted at step {result.steps}/{result.total_steps} ({left}); checkpoint in "
                     f"{result.checkpoint_dir}")
        return False
    ran = result.steps - (result.resumed_from or 0)
    done = (f"{result.steps} step{'s' * (ran != 1)}" if not result.resumed_from else
            f"step {result.steps} reached, {ran} step{'s' * (ran != 1)} run from step {result.resumed_from}")
    print(f"fxjax {command}: {done} in {result.seconds:.0f}s, {last_step}; checkpoints in {result.checkpoint_dir}")
    return True


FOLDER_OF = {"model.path": "HF checkpoint's", "model.adapter": "PEFT adapter's", "model.from_run": "fxjax run's"}


def run_training(command: str, args, load_config: Callable[..., Any], runner: str) -> tuple[Any, Any | None]:
    """(config, result) of `fxjax <command> --config ... --set ...`: the config loaded and its paths checked,
    the multi-process run joined (before anything touches a JAX backend), then the loop `runner`
    ("module:function", imported only now so that --help and config errors answer without jax). The
    result is None (the error printed) when the loop stopped on a non-finite loss."""
    cfg = load_config(args.config, overrides=args.set or [], log=say(command))
    try:
        check_paths(cfg, args.config)
    except (OSError, ValueError):
        # joined first, so that the error reaches the run's other processes (fxjax.cli stops them with it):
        # they would wait for this one in the join, minutes, and then abort naming nothing
        from fxjax import distributed

        distributed.initialize({k: v for k, v in vars(cfg.distributed).items() if v is not None})
        raise
    from fxjax import distributed

    distributed.initialize({k: v for k, v in vars(cfg.distributed).items() if v is not None})
    from fxjax.train.loop_control import NonFiniteError
    from fxjax.train.preemption import hold_stop_signals, release_held_signals

    # A preemption notice (SIGTERM, SIGHUP) while the model loads or compiles: kept for the loop, which stops
    # after its first step with a checkpoint and exits 0 (one process was killed by it, status 143, silently;
    # a multi-process run's JAX service dropped it: join_run). After the join: its service's handler would
    # replace ours.
    hold_stop_signals()

    module, function = runner.split(":")
    try:
        return cfg, getattr(importlib.import_module(module), function)(cfg)
    except NonFiniteError as err:
        say(command)(f"error: {err}")
        return cfg, None
    finally:
        release_held_signals()  # (a run that stopped before its loop took them)


def report(command: str, args, cfg) -> None:
    """<train.output_dir>/report.png unless --no-report."""
    if getattr(args, "report", True):
        from fxjax.commands.report import report_after_run

        report_after_run(cfg.train.output_dir, say(command))
