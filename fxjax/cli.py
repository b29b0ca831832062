"""The `fxjax` command line."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from fxjax.commands import COMMAND_MODULES
from fxjax.commands.arg_types import number, positive_int, seed
from fxjax.commands.suggesting_parser import SuggestingParser
from fxjax.compilation_cache import use_compilation_cache
from fxjax.host_allocator import keep_freed_memory


def _cmd_init(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to write the model into it anyway "
                              f"(files of the same names are replaced)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    from fxjax.hf_save import save_pretrained
    from fxjax.model_init import init_model, parameter_counts
    from fxjax.presets import load_preset

    if args.tokenizer:  # (before anything is written: it wrote the model, then refused, leaving OUT half made)
        from fxjax.data.tokenizer import FORMAT_MARKER_IDS

        ids_needed, vocab = max(FORMAT_MARKER_IDS.values()) + 1, load_preset(args.preset).text.vocab_size
        if vocab < ids_needed:
            raise ValueError(f"--preset {args.preset} has vocab_size {vocab}, fewer than the Qwen2.5-VL tokenizer's "
                             f"{ids_needed} ids; pass --no-tokenizer")
    model = init_model(args.preset, seed=args.seed, dtype=args.dtype)
    out = save_pretrained(model, args.out)
    what = "config and weights"
    if args.tokenizer:
        from fxjax.data.tokenizer import build_qwen_tokenizer

        build_qwen_tokenizer(out)
        what += ", and the Qwen2.5-VL tokenizer"
    print(f"wrote random-init {args.preset} ({parameter_counts(model)['total']:,} parameters) to {out}: {what}")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from fxjax.selfcheck import run_selfcheck

    return run_selfcheck(Path(args.workdir) if args.workdir else None)


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fxjax.data.demo_data import make_demo_data

    files = make_demo_data(args.out, n=args.n, seed=args.seed, test_fraction=args.test_fraction,
                           min_side=args.min_side, max_side=args.max_side, overwrite=args.overwrite,
                           multiple=args.multiple, fingerprint=args.fingerprint,
                           max_regions=args.max_regions, fingerprint_scope=args.fingerprint_scope,
                           box_multiple=args.box_multiple, region_layout=args.region_layout, brief=args.brief,
                           row_code=args.row_code, row_code_scope=args.row_code_scope,
                           artefacts=args.artefacts.split(",") if args.artefacts is not None else None)
    counts = {split: sum(1 for _ in open(path, encoding="utf-8")) for split, path in files.items()}
    print(f"wrote {args.n} demo images to {Path(args.out) / 'images'}; "
          + ", ".join(f"{files[s]} ({counts[s]} record{'s' if counts[s] != 1 else ''})" for s in files))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fxjax.demo import run_demo

    return run_demo(out=Path(args.out), steps=args.steps, n_images=args.n, quick=args.quick, seed=args.seed,
                    overwrite=args.overwrite)


def version_text() -> str:
    """`fxjax --version`: fxjax's version and those of the packages a bug report needs, read from the
    installed packages' metadata (nothing is imported: jax would take seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    others = ", ".join(f"{name} {of(name)}" for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                                                         "transformers"))
    return f"fxjax {of('fxjax')} ({others}; Python {sys.version.split()[0]})"


class _PrintVersion(argparse.Action):
    """--version: `version_text()` on one line (argparse's own version action wraps it at the terminal's
    width) and exit; read only when asked."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    # Module-level imports of this file stay light (argparse, pathlib): --help and argument errors must
    # answer without importing jax. Each command imports what it needs when it runs.
    from fxjax.demo import DEMO

    parser = SuggestingParser(
        prog="fxjax",
        description="Grounded AI-generated-image detection with Qwen2.5-VL in JAX/Flax: "
                    "HF-exact model, checkpoint import/export, LoRA training.",
        epilog="Start with `fxjax demo` (offline, 3.5-8 minutes on 2 CPU cores). The full path: a dataset (your JSONL, "
               "or make-demo-data) -> sft -> grpo -> eval / detect / export. `fxjax COMMAND --help` explains each; "
               "the docs/NAME.md that help texts cite, `fxjax docs NAME` prints. "
               "On a GPU or TPU compiled programs are kept in ~/.cache/fxjax/xla (JAX's persistent cache; "
               "FXJAX_COMPILATION_CACHE=DIR, or your JAX_COMPILATION_CACHE_DIR, puts it elsewhere and asks for "
               "it on a CPU; =off keeps none), so a resumed or repeated run does not compile them again. "
               f"{EXIT_STATUS}",
    )
    parser.add_argument("--version", action=_PrintVersion,
                        help="print the versions of fxjax, jax, flax, optax, orbax and transformers, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("selfcheck", help="end-to-end check of this install on a tiny model (no downloads)",
                       description="Builds the tiny preset with random weights, writes it in HF layout, loads "
                                   "it back, runs a real photograph through the processor, the forward pass and "
                                   "cached greedy decoding, and checks that export reproduces every tensor.")
    p.add_argument("--out", "--workdir", dest="workdir", metavar="DIR",
                   help="where to write the checkpoints (default: a temporary directory)")
    p.set_defaults(func=_cmd_selfcheck)

    p = sub.add_parser("init", help="write a random-initialised model in HF layout",
                       description="Write a Qwen2.5-VL with random weights as an HF checkpoint directory "
                                   "(config.json, sharded safetensors, generation_config.json) and, unless "
                                   "--no-tokenizer, the Qwen2.5-VL tokenizer, so the directory loads with "
                                   "fxjax.from_pretrained and transformers alike.")
    _add_out(p, "output directory (must be empty or new, unless --overwrite)")
    p.add_argument("--preset", default="tiny",
                   help="model preset (tiny, 3b, 7b, 32b, 72b; `fxjax info` lists them) or a preset YAML path "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=seed, default=0, metavar="N", help="random-init seed (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight dtype (default: %(default)s)")
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                   help="skip writing the Qwen2.5-VL tokenizer (tokenizer.json + chat template, built offline from "
                        "the BPE ranks in dashscope) next to the weights")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(func=_cmd_init)

    importlib.import_module("fxjax.commands.info").add_parser(sub)  # (in this place of --help's list)

    p = sub.add_parser("make-demo-data", help="write a small native-format dataset made from scikit-image photos",
                       description="Real images are random crops, scales and flips of the photographs that ship "
                                   "with scikit-image; generated ones get 1 to --max-regions regions rewritten by "
                                   "procedural artefact generators, with captions and tags. Deterministic for a "
                                   "seed. The records are in the native JSONL format the data pipeline reads.")
    _add_out(p, "output directory (images/, train.jsonl, test.jsonl)")
    p.add_argument("--n", type=positive_int, metavar="N", default=1000,
                   help="number of images, half real, half generated (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=0, metavar="N", help="random seed (default: %(default)s)")
    p.add_argument("--test-fraction", type=number, metavar="X", default=0.1,
                   help="share of the images in test.jsonl, in [0, 1) (default: %(default)s)")
    p.add_argument("--min-side", type=positive_int, metavar="N", default=192,
                   help="smallest longer side of an image, pixels, 32 or more (default: %(default)s)")
    p.add_argument("--max-side", type=positive_int, metavar="N", default=384,
                   help="largest longer side of an image, pixels, at least --min-side (default: %(default)s)")
    p.add_argument("--multiple", type=positive_int, metavar="N", default=1,
                   help="round both sides to multiples of this (28: the image processor keeps the pixels as they "
                        "are; default: %(default)s)")
    p.add_argument("--fingerprint", type=number, metavar="X", default=0.0,
                   help="amplitude (0-64 levels of 255) of a period-2 up-sampling checkerboard on every generated image "
                        f"(default 0: none; `fxjax demo` uses {DEMO['fingerprint']:g})")
    p.add_argument("--fingerprint-scope", choices=("frame", "regions", "frame+regions"), default="frame",
                   help="where the fingerprint goes: over the whole frame; inside the artefact regions only (then "
                        "finding it is finding the regions); or a third of it over the frame and all of it in the "
                        "regions (the demo's: the verdict and the regions both learnable; default: %(default)s)")
    p.add_argument("--box-multiple", type=positive_int, metavar="N", default=1,
                   help="put the regions' corners on multiples of this many pixels (2 or more with --row-code; "
                        "default: %(default)s)")
    p.add_argument("--region-layout", choices=("boxes", "bands"), default="boxes",
                   help="boxes: regions anywhere; bands: each region spans the full width, so locating it is a "
                        "1-D search (`fxjax demo` uses bands; default: %(default)s)")
    p.add_argument("--brief", action="store_true",
                   help="one-clause reasoning texts without the scene description (fewer tokens to learn; the demo's)")
    p.add_argument("--row-code", type=number, metavar="X", default=0.0,
                   help="amplitude (0-64 levels of 255) of a code that tells each row of --box-multiple "
                        "cells where it is (stripes 1/2/4/8 px wide): a stand-in for the positional knowledge a "
                        "pretrained model has and a random one lacks (default 0: none; see `fxjax demo`)")
    p.add_argument("--row-code-scope", choices=("frame", "regions"), default="frame",
                   help="where the row code goes: over the whole frame of every image, or inside the artefact "
                        "regions only (then the trace itself says which row the region is in; the demo's)")
    p.add_argument("--artefacts", default=None, metavar="NAMES",
                   help="comma-separated artefact kinds a region may get (over_smoothed, repeated_texture, "
                        "checkerboard, colour_shift, copy_move, banding; default: all)")
    p.add_argument("--max-regions", type=positive_int, metavar="N", default=3,
                   help="most artefact regions per generated image, 1-8 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.set_defaults(func=_cmd_make_demo_data)

    for name in ("sft", "grpo"):  # (listed before the demo, which runs them)
        importlib.import_module(f"fxjax.commands.{name}").add_parser(sub)

    p = sub.add_parser("demo", help="the whole method on a tiny model in minutes: data, SFT, GRPO, eval, export, report",
                       description="make-demo-data -> a tiny random Qwen2.5-VL saved in HF layout with the real "
                                   "Qwen2.5-VL tokenizer -> LoRA SFT -> GRPO through the stages alpha, beta, gamma "
                                   "-> `fxjax eval` on held-out images before SFT, after SFT and after each stage "
                                   "-> `fxjax export` (merged HF checkpoint + PEFT adapter) -> `fxjax report` PNGs "
                                   "(both runs; the held-out metrics by phase) and `fxjax detect` overlays before/after -> one table. Offline; 3.5-8 "
                                   "minutes on 2 CPU cores (each phase's time is printed).")
    p.add_argument("--out", default="fxjax-demo", metavar="DIR",
                   help="working directory (default: ./%(default)s); one the demo did not make is refused")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help=f"SFT steps (default: {DEMO['sft']['steps']}; fewer with --quick)")
    p.add_argument("--n", type=positive_int, default=None, metavar="N",
                   help=f"demo images to generate (default: {DEMO['images']}; fewer with --quick)")
    p.add_argument("--seed", type=seed, default=0, metavar="N",
                   help="seed of the demo data and the model's init (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="every phase in a few steps: a smoke run of the pipeline (learns nothing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo's results in --out (without it they are kept and the demo stops)")
    p.set_defaults(func=_cmd_demo)

    for name in COMMAND_MODULES:
        if name != "grpo":  # (above)
            importlib.import_module(f"fxjax.commands.{name}").add_parser(sub)
    return parser


def _add_out(p: argparse.ArgumentParser, what: str) -> None:
    """The output folder of init and make-demo-data: OUT, or --out DIR as the other commands spell it."""
    p.add_argument("out", metavar="OUT", nargs="?", help=what)
    p.add_argument("--out", dest="out_option", metavar="DIR", help="the same as OUT")


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """`build_parser()`'s parser of one COMMAND (its errors print that command's usage)."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[command]


def _resolve_out(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not hasattr(args, "out_option"):
        return
    if args.out is not None and args.out_option is not None:
        command_parser(parser, args.command).error(f"give the output folder once: OUT ({args.out}) or --out "
                                             f"({args.out_option})")
    if args.out is None and args.out_option is None:
        command_parser(parser, args.command).error("the following arguments are required: OUT (or --out DIR)")
    args.out = args.out if args.out is not None else args.out_option


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `fxjax` command; main([...]) from Python (a notebook) leaves the process's malloc alone
        keep_freed_memory()  # (a CPU run: before JAX starts its threads; fxjax/host_allocator.py)
        say_stop_signals()  # (and its signal handlers)
    use_compilation_cache()  # (before JAX is imported, which reads its cache settings; fxjax/compilation_cache.py)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser (its usage), not fxjax's: `export --step alpha beta`
        words = list(argv if argv is not None else sys.argv[1:])
        at = words.index("--step") if "--step" in words else -1
        several = " (several steps: fxjax eval only)" if args.command in ("export", "detect") and at >= 0 and \
            words[at + 2:at + 3] == extra[:1] else ""
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}{several}")
    _resolve_out(parser, args)
    if args.command == "detect" and getattr(args, "step", None) is not None:  # `detect --step 1 2 a.png`: the 2
        # went to the images (IMAGE ...), and was said as an image that is not there
        words = list(argv if argv is not None else sys.argv[1:])
        at = words.index("--step") if "--step" in words else -1
        after = words[at + 2] if 0 <= at < len(words) - 2 else None
        if after in args.images and not Path(after).exists():
            command_parser(parser, "detect").error(f"--step takes one step here; {after} is no image (several steps: "
                                             f"fxjax eval only)")
    try:
        code = args.func(args)
    except SystemExit:
        raise
    except BrokenPipeError:  # `fxjax info 3b | head -1`: the reader has what it wanted; nothing more to say
        return _stdout_closed()
    except (ValueError, OSError) as err:  # a user's path or value, a full disk: said in one line
        name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))  # ("data check")
        print(f"fxjax {name}: error: {err}{_record_hint(err, args)}", file=sys.stderr)
        _leave_run(err, 2)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM, SIGHUP: Stopped) outside a training loop's steps
        _interrupted(args.command, err, exit_now=argv is None)
        raise  # (main([...]) from Python, a notebook: the caller's KeyboardInterrupt, its kernel alive)
    except BaseException as err:
        if _out_of_memory(err, args.command):  # (XLA's message and stack say nothing of what to change)
            print(f"fxjax {args.command}: error: {_out_of_memory(err, args.command)}", file=sys.stderr)
            _leave_run(err, 1)
            return 1
        _leave_run(err, 1, with_traceback=True)
        raise
    if "jax" in sys.modules:  # (a peer that fails later need not wait for this process)
        from fxjax.host_exchange import mark_finished

        mark_finished()
    return code


_TRAINING_MEMORY = ("lower data.batch_size (raise optim.grad_accum to keep the batch), data.max_length or "
                    "data.max_pixels, or spread the model over more devices (mesh.fsdp)")
MEMORY_ADVICE = {  # what to change, by command, when the device runs out of memory
    "detect": "give a lower --max-pixels (fewer image tokens) or --batch-size",
    "eval": "give a lower --max-pixels (fewer image tokens) or --batch-size",
    "sft": _TRAINING_MEMORY,
    "grpo": _TRAINING_MEMORY + "; or fewer grpo.num_generations or a lower grpo.max_completion_length",
}


def _out_of_memory(err: BaseException, command: str) -> str:
    """The one-line error of a device that ran out of memory (XLA's RESOURCE_EXHAUSTED), with what to change
    for `command`; "" for any other error."""
    text = str(err).strip()  # (XLA says "Out of memory allocating ..." on CPU and GPU, "Ran out of memory" on TPU;
    # RESOURCE_EXHAUSTED alone is also a gRPC status of the coordination service)
    if not isinstance(err, RuntimeError) or "RESOURCE_EXHAUSTED" not in text or "out of memory" not in text.lower():
        return ""
    advice = MEMORY_ADVICE.get(command, "use smaller images or batches, or more devices")
    return f"the device ran out of memory ({text.splitlines()[0]}): {advice}"


def _record_hint(err: BaseException, args: argparse.Namespace) -> str:
    """After the first invalid record of a training run (data.on_error: raise) or of `fxjax eval` (--on-error
    raise): its kind, and how to see every one, or go on without them."""
    records = sys.modules.get("fxjax.data.records")  # (not imported: no record was read, and none is now)
    if records is None or not isinstance(err, records.DataError) or args.command not in ("sft", "grpo", "eval") \
            or ":" not in err.where:
        return ""
    if args.command == "eval":  # (with the flags that change how records read: the same records listed)
        given = {name: getattr(args, name, None) for name in ("root", "format", "max_image_pixels")}
        flags = [*args.data, *(f"--{name.replace('_', '-')}={value}" for name, value in given.items()
                               if value not in (None, "auto")),
                 *(["--allow-absolute-paths"] if getattr(args, "allow_absolute_paths", False) else [])]
        return (f" [{err.kind}] (`fxjax data check {' '.join(shlex.quote(f) for f in flags)}` lists every invalid "
                "record; --on-error skip evaluates without them)")
    sets = "".join(f" --set {shlex.quote(item)}" for item in (getattr(args, "set", None) or []))
    return (f" [{err.kind}] (`fxjax data check --config {args.config}{sets}` lists every invalid record; "
            f"--set data.on_error=skip trains without them)")


INTERRUPTED = 130  # a shell's status for a command ended by SIGINT
EXIT_STATUS = ("Exit status: 0 done; 1 some input could not be used (data check: invalid records; detect: an "
               "image it could not read; the rest reported), the device ran out of memory (one line saying what "
               "to lower), or an unexpected error (its traceback); 2 a bad option, config, path or input (one "
               "line naming it); 3 a training run stopped on a non-finite loss (its last good checkpoint kept); "
               "128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), except that a training loop "
               "saves a checkpoint on SIGTERM or SIGHUP (and the first Ctrl-C) and exits 0 (metrics.jsonl's last "
               "record then says \"status\": \"preempted\", where a finished run's says \"finished\").")
PIPE_CLOSED = 141  # a shell's status for a command ended by SIGPIPE (as `yes | head -1` leaves `yes`)


def _stdout_closed() -> int:
    """The reader of our stdout went away: stdout pointed at /dev/null, so that the interpreter's own flush
    at exit does not fail and print a second error, and the status a SIGPIPE'd command has."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # (a stdout without a file descriptor: nothing to redirect)
        pass
    return PIPE_CLOSED


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside a training loop (which saves a checkpoint on them and exits 0): the command
    stops as on Ctrl-C, saying so, with the status a shell gives a command that signal ended (143, 129)."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say_stop_signals() -> None:
    """SIGTERM and SIGHUP (a preemption, a scheduler's cancel, a closed SSH session) ended an eval, a detect or
    an export silently (status 143 / 129, no word of what was kept): they now raise `Stopped`, said in one line
    as Ctrl-C is. A signal the process was started ignoring (nohup: SIGHUP) stays ignored; a training loop
    takes both for its own (save, exit 0) and gives them back after it."""
    import signal

    def stop(signum, frame):
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, stop)


def _interrupted(command: str, err: KeyboardInterrupt, exit_now: bool) -> None:
    """Ctrl-C: one line, and from the command line (`exit_now`) exit status 130, at once. A normal exit tore
    XLA down under a compilation still running in its threads (a segmentation fault, status 139, whenever
    the interrupt landed in one) and printed a traceback. What a command leaves is safe to stop at any
    point: exports are written aside and renamed, an eval resumes from its predictions, a training run saves
    on the first Ctrl-C by itself. Called from Python (main([...]) in a notebook) it returns, and the caller
    gets the KeyboardInterrupt: exiting would end the notebook's kernel."""
    import os

    why, code = ((f"stopped by {err.args[0]}", 128 + err.signum) if isinstance(err, Stopped)
                 else ("interrupted (Ctrl-C)", INTERRUPTED))
    print(f"\nfxjax {command}: {why}; running the same command again resumes or redoes it", file=sys.stderr)
    if not exit_now:
        return
    _leave_run(err, code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave_run(err: BaseException, code: int, *, with_traceback: bool = False) -> None:
    """One process of a multi-process run failed: tell the others (their next host-side wait raises, naming
    this process and its error, so every process stops with a message instead of hanging until JAX's
    timeouts abort them), and when some have neither stopped nor finished within 60 s (5 s after Ctrl-C;
    blocked in a device step, where nothing reaches them), exit at once rather than wait minutes in JAX's
    shutdown barrier."""
    if "jax" not in sys.modules:  # (nothing started a run)
        return
    from fxjax.host_exchange import stop_peers

    if stop_peers(err, **({"wait_s": 5.0} if isinstance(err, KeyboardInterrupt) else {})):
        return
    import os
    import traceback

    if with_traceback:
        traceback.print_exc()
    print("fxjax: some processes of the run neither stopped nor finished in time (waiting in a device step?); "
          "this process exits without waiting for them (JAX's heartbeat timeout ends them)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
