"""`fxjax sft --config configs/sft.yaml [--set key=value ...]`: LoRA supervised fine-tuning."""

from __future__ import annotations

import argparse

from fxjax.commands.training import add_run_arguments

HELP = "LoRA supervised fine-tuning from a YAML config"

DESCRIPTION = ("LoRA SFT of Qwen2.5-VL: model (HF directory or preset), LoRA, mesh, data, AdamW with warmup + "
               "cosine, gradient accumulation, orbax checkpoints (running the same command again resumes from the "
               "latest one), periodic evaluation, export. SIGTERM/SIGINT/SIGHUP save a checkpoint and exit 0. "
               "Metrics go to <train.output_dir>/metrics.jsonl; --set train.profile_steps=N traces N updates with "
               "jax.profiler into <train.output_dir>/profile.")

EPILOG = ("example: fxjax sft --config configs/sft.yaml --set model.path=DIR "
          "--set 'data.train_files=[data/train.jsonl]' --set train.steps=1000. A --set of one of a pair that "
          "excludes each other replaces the other (train.steps / train.epochs, model.path / model.preset); each "
          "key it changes besides is printed as a "
          "note. The data: JSONL records, native or ms-swift (docs/data.md: `fxjax docs data`); `fxjax data check "
          "FILE.jsonl` validates them first.")


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    add_run_arguments(p, config_help="the run's config: a YAML file, or the name of one fxjax ships (sft: every key "
                                     "with its default, as configs/sft.yaml; recipes/paper_3b_sft: the paper's "
                                     "recipe), usable after pip install without the repository",
                      set_example="optim.learning_rate=2e-4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fxjax.commands.training import finished, report, run_training
    from fxjax.train_config import load_sft_config

    cfg, result = run_training("sft", args, load_sft_config, "fxjax.train.sft:run_sft")
    if result is None:  # stopped on a non-finite loss: the plot of how it got there is wanted most now
        report("sft", args, cfg)
        return 3
    if finished("sft", result, "the last step's loss " + ("n/a" if result.final_loss is None else
                                                        f"{result.final_loss:.4f}")):
        report("sft", args, cfg)
    return 0
