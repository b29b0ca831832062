"""Training: LoRA SFT and GRPO of Qwen2.5-VL (losses, optimiser, the jitted steps, rollouts, checkpoints,
metrics, evaluation).

    from fxjax.train_config import load_sft_config
    from fxjax.train.sft import run_sft
    result = run_sft(load_sft_config("configs/sft.yaml", overrides=[
        "model.path=/models/Qwen2.5-VL-3B-Instruct", "data.train_files=[data/train.jsonl]", "train.steps=100"]))

    from fxjax.grpo_config import load_grpo_config
    from fxjax.train.grpo import run_grpo      # also: group_advantages, grpo_loss (TRL's math)

Imports point one way: model, rewards -> fxjax core -> train -> the CLI and demo (tests/test_layering.py).
"""
