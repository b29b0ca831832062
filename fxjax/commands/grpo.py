"""`fxjax grpo --config configs/grpo.yaml [--set key=value ...]`: GRPO after SFT, through the reward stages."""

from __future__ import annotations

import argparse
import json
import math

from fxjax.commands.training import add_run_arguments

HELP = "GRPO (the paper's RL phase) from a YAML config, through the reward stages alpha -> beta -> gamma"

DESCRIPTION = """\
GRPO of Qwen2.5-VL with LoRA, as TRL's GRPOTrainer computes it: one jitted rollout per step, then its updates.
Each step takes data.batch_size prompts, samples grpo.num_generations completions per prompt with the
current policy (each prompt prefilled once, its image encoded once), scores them with the rewards of the
current stage (format, verdict, box IoU; weights in configs/rewards.yaml), turns rewards into group
advantages, and applies grpo.num_iterations (default 1) clipped-ratio updates with a k3 KL to the base model
(LoRA off, no copy).

Start from the SFT result: model.from_run = the SFT run directory (its base model, tokenizer and LoRA at
its newest step, or model.from_run_step), or model.path = the base HF directory and model.adapter = the
PEFT adapter SFT wrote. Stages: the `stages` list (name + steps, or name + epochs: passes over the training
records, the paper's one epoch a stage; one stage's: --set stages[1].steps=20), or grpo.schedule=continuous
with train.steps. Reward terms of your own (TRL's reward_funcs): grpo.reward_funcs. The grpo keys are TRL's
GRPOConfig names; where TRL's other keys go here (its batch counts completions, data.batch_size prompts):
`fxjax docs readme --section 'from TRL'`. The prompts: JSONL records, native or ms-swift (docs/data.md,
which `fxjax docs data` prints; `fxjax data check` validates them), their boxes and verdicts the rewards'
truth.
Outputs under train.output_dir: metrics.jsonl (per step: reward and each component, format rate,
verdict accuracy, mean IoU on generated images, KL, clip ratios, entropy, completion lengths,
truncated and zero-std fractions, rollout/update times, the stage), TensorBoard events, checkpoints/
(resumes from the latest: run the same command again), and with --set train.profile_steps=N a
jax.profiler trace of N steps in profile/. SIGTERM (or SIGHUP, SIGINT) saves and exits 0; a non-finite loss
exits 3 with the last good checkpoint kept."""


def add_parser(sub) -> None:
    p = sub.add_parser("grpo", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, config_help="YAML config, or the name of one fxjax ships (grpo: every key with its default, "
                                     "as configs/grpo.yaml documents them; recipes/paper_3b_grpo: the paper's recipe)",
                      set_example="grpo.num_generations=8")
    p.set_defaults(func=run)


def _json_value(value):
    """null for a NaN (a step without generated images has no mean IoU): JSON has no NaN, and strict parsers
    reject the bare token json.dumps writes for it."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run(args: argparse.Namespace) -> int:
    from fxjax.commands.training import report, run_training
    from fxjax.grpo_config import load_grpo_config

    cfg, result = run_training("grpo", args, load_grpo_config, "fxjax.train.grpo:run_grpo")
    if result is None:  # stopped on a non-finite loss: the plot of how it got there is wanted most now
        report("grpo", args, cfg)
        return 3
    last = result.history[-1] if result.history else {}
    # steps: the step reached; steps_run: by this invocation (a resumed run's "last" is of those: {} for none)
    summary = {"steps": result.steps, "steps_run": result.steps - (result.resumed_from or 0),
               "total_steps": result.total_steps, "preempted": result.preempted,
               "resumed_from": result.resumed_from, "seconds": round(result.seconds, 1),
               "last": {k: _json_value(last[k]) for k in ("stage", "reward/total_mean", "format_rate",
                                                         "verdict_accuracy", "mean_iou_generated") if k in last},
               "exported": result.exported}
    print(json.dumps(summary, allow_nan=False))
    report("grpo", args, cfg)
    return 0
