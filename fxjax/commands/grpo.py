"""`fxjax grpo --config configs/grpo.yaml [--set key=value ...]`: GRPO after SFT, through the reward stages."""

from __future__ import annotations

import argparse
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


def last_step_line(history: list[dict]) -> str:
    """What the last step of this invocation gave: its stage, mean reward and the rates behind it."""
    if not history:  # (a resumed run that had no step left)
        return "no step run"
    last = history[-1]

    def share(key: str) -> str:
        value = last.get(key)
        return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.0f}%"

    iou = last.get("mean_iou_generated")
    iou = "n/a (no generated image)" if iou is None or not math.isfinite(iou) else f"{iou:.3f}"
    return (f"the last step (stage {last.get('stage')}): reward {last.get('reward/total_mean', float('nan')):.3f}, "
            f"format {share('format_rate')}, verdict {share('verdict_accuracy')}, mean IoU on generated images {iou}")


def run(args: argparse.Namespace) -> int:
    from fxjax.commands.training import finished, report, run_training
    from fxjax.grpo_config import load_grpo_config

    cfg, result = run_training("grpo", args, load_grpo_config, "fxjax.train.grpo:run_grpo")
    if result is None:  # stopped on a non-finite loss: the plot of how it got there is wanted most now
        report("grpo", args, cfg)
        return 3
    if finished("grpo", result, last_step_line(result.history)):
        report("grpo", args, cfg)
    return 0
