"""The CLI's commands, one module each (the app layer: may import anything of fxjax, train included).

Each module defines `add_parser(subparsers)`, which registers its sub-command with `set_defaults(func=run)`,
and `run(args) -> int`. Module level imports stay light (the standard library and fxjax modules that load no
jax nor fxjax.train: tests/test_cli_help.py checks) so `fxjax --help` and argument errors answer at once;
the heavy imports live inside `run`.
"""

# Sub-commands in the order `fxjax --help` lists them, after the built-in ones of fxjax/cli.py (and info, sft
# and grpo, modules here too, which cli.py registers in their places among those: info after init, the
# training commands before the demo).
COMMAND_MODULES: tuple[str, ...] = ("grpo", "data_check", "eval", "detect", "export", "report", "docs")
