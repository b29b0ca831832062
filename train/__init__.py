"""Training: LoRA SFT of Qwen2.5-VL (losses, optimiser, the jitted step, checkpoints, metrics, evaluation).

    from fxjax.train_config import load_sft_config
    from fxjax.train.sft import run_sft
    result = run_sft(load_sft_config("configs/sft.yaml", overrides=["train.steps=100"]))

Imports point one way: model, rewards -> fxjax -> train -> the CLI.
"""
