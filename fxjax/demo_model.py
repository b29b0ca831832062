"""The demo's base model: the `tiny` preset with random weights, saved in HF layout with the real Qwen2.5-VL
tokenizer, and one change to its init: the embedding rows of the tokens the demo's training texts use are
drawn with std `task_std` (0.3); every other row keeps the init's 0.02.

Why the larger std: with 0.02, a 64-wide model's logits over 152k tokens can never be confident (the largest
possible logit is about 0.02 * 64), so it could learn the format's tokens only as barely-winning argmaxes.

Why only the task's tokens (2026-12-04; docs/demo_tuning.md, "The task's tokens only"): with every row at
0.3 (the demo until then) the tail's logits scatter by a few nats, so wherever the tiny model is unsure most
of its probability sits on the 152k tokens it never saw (0.72 at the row digit after SFT, seed 0), top-k 5
sampled them (6% of GRPO's completions broke the answer, most at the row digit), and pushing a wrong row's
digit down handed its probability to that tail. A pretrained model knows which tokens can follow a box's
"[0, "; the small rows of the unused tokens stand in for that knowledge, as the demo data's row code stands
in for its positional knowledge.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_demo_base_model", "task_token_ids"]

# A box's corner can be any number: every digit is a task token, whichever corners the training boxes have.
_DIGITS = "0123456789"
_INIT_STD = 0.02  # the embedding init of model/layers.py


def task_token_ids(tokenizer_dir: Path, train_file: Path, *, system_prompt: str, user_prompt: str,
                   min_pixels: int, max_pixels: int) -> list[int]:
    """The ids of every token SFT's examples of `train_file` hold (prompt, image tokens, answer, the closing
    <|im_end|>), built by the training pipeline itself, and of the ten digits."""
    from fxjax.data.config import DataConfig
    from fxjax.data.examples import ExampleBuilder
    from fxjax.data.records import load_records

    records, _ = load_records([str(train_file)])
    cfg = DataConfig(data_files=(str(train_file),), tokenizer=str(tokenizer_dir), system_prompt=system_prompt,
                     user_prompt=user_prompt, min_pixels=min_pixels, max_pixels=max_pixels)
    builder = ExampleBuilder(cfg, len(records))
    ids = {t for d in _DIGITS for t in builder.tokens.encode(d)}
    for record in records:
        text = builder.text(record)
        ids.update(text.prompt_ids)
        ids.update(builder.completion_ids(text.target))
    return sorted(ids)


def make_demo_base_model(model_dir: Path, train_file: Path, *, seed: int, task_std: float, system_prompt: str,
                         user_prompt: str, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Write the demo's base model and tokenizer to `model_dir`; returns (parameters, task tokens)."""
    import numpy as np

    from fxjax.data.tokenizer import build_qwen_tokenizer
    from fxjax.hf_save import save_pretrained
    from fxjax.model_init import init_model, parameter_counts

    build_qwen_tokenizer(model_dir)
    ids = task_token_ids(model_dir, train_file, system_prompt=system_prompt, user_prompt=user_prompt,
                         min_pixels=min_pixels, max_pixels=max_pixels)
    model = init_model("tiny", seed=seed)
    emb = model.embed_tokens.embedding
    table = np.asarray(emb.get_value())
    scale = np.ones((table.shape[0], 1), table.dtype)
    scale[ids] = task_std / _INIT_STD
    emb.set_value(table * scale)
    save_pretrained(model, model_dir)
    return parameter_counts(model)["total"], len(ids)
